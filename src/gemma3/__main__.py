"""`python -m gemma3` (and `torchrun -m gemma3 train ...`)."""

import sys

from gemma3.cli import main

sys.exit(main())
