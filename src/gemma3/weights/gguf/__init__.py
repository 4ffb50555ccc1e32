"""GGUF for Gemma 3 (for one commit only, while gguf.py moves to gguf/reader.py: the next commit splits it and
its callers import the modules)."""

from gemma3.weights.gguf.reader import *  # noqa: F401,F403
from gemma3.weights.gguf.reader import _DEQUANTISERS, _dq_q4_k, _parse  # noqa: F401
