"""lorakit: the whole LoRA lifecycle."""

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError

__all__ = ["LoraConfig", "LorakitError"]
__version__ = "0.1.0"
