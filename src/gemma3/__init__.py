"""gemma3: Google's Gemma 3 text models in clean, readable PyTorch."""

from gemma3.config import PRESETS, Gemma3Config, get_preset
from gemma3.errors import CheckpointError, ConfigError, Gemma3Error
from gemma3.loading import load

__all__ = ["Gemma3Config", "ConfigError", "CheckpointError", "Gemma3Error", "PRESETS", "get_preset", "load"]
__version__ = "0.1.0"
