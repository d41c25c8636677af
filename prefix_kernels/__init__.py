"""prefix_kernels: fused Longformer attention (sliding window + global tokens + prefix keys/values).

The public API, and only that: `longformer_attention` is the op (`attention.py`); `patch_longformer` swaps it into
Hugging Face Longformer / LED encoder self-attention (`hf/`); `apply_prefix_propagation` / `apply_prefix_tuning` add
the parameter-efficient prefixes (`prefix/`). The package is layered, each layer importing only those below it:
`core` <- `backends` <- `attention` <- `hf` <- `prefix` <- `cli`. The Hugging Face layers are imported lazily, so
`import prefix_kernels` does not import transformers.
"""

from .attention import auto_skips, available_backends, longformer_attention
from .version import __version__

_LAZY = {
    "patch_longformer": "hf.patching",
    "unpatch_longformer": "hf.patching",
    "patch_longformer_classes": "hf.patching",
    "unpatch_longformer_classes": "hf.patching",
    "is_patched": "hf.patching",
    "PackingCollator": "hf.packing",
    "DocumentClassifier": "hf.packing",
    "apply_prefix_propagation": "prefix",
    "apply_prefix_tuning": "prefix",
    "save_prefix": "prefix",
    "load_prefix": "prefix",
    "from_pretrained_with_prefix": "prefix",
    "unfreeze_prefix": "prefix",
    "PrefixPropagation": "prefix",
    "PrefixTuning": "prefix",
}

__all__ = ["__version__", "longformer_attention", "available_backends", "auto_skips", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        # The prefix layer registers its checkpoint check with the patching layer when imported: load it with any
        # Hugging Face name, so a patched model built from a prefix checkpoint always gets the warning.
        importlib.import_module(".prefix", __name__)
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
