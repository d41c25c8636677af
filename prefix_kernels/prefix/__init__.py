"""The paper's parameter-efficient methods on Hugging Face Longformer and LED models: prefix-propagation
(`propagation.py`) and prefix-tuning (`tuning.py`), what they share (`base.py`, `backbone.py`), and their
checkpoints (`checkpoint.py`).
"""

from .base import unfreeze_prefix
from .checkpoint import from_pretrained_with_prefix, load_prefix, save_prefix
from .propagation import PrefixPropagation, apply_prefix_propagation
from .tuning import PrefixTuning, apply_prefix_tuning

__all__ = [
    "PrefixPropagation",
    "PrefixTuning",
    "apply_prefix_propagation",
    "apply_prefix_tuning",
    "from_pretrained_with_prefix",
    "load_prefix",
    "save_prefix",
    "unfreeze_prefix",
]
