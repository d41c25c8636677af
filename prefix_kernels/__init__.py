"""prefix_kernels: fused Longformer attention (sliding window + global tokens + prefix keys/values).

`longformer_attention` is the op; `patch_longformer` swaps it into Hugging Face Longformer / LED encoder
self-attention; `apply_prefix_propagation` / `apply_prefix_tuning` add the parameter-efficient prefixes.
The Hugging Face glue is imported lazily, so `import prefix_kernels` does not import transformers.
"""

from .attention import auto_skips, available_backends, longformer_attention

__version__ = "0.1.0"

_LAZY = {
    "patch_longformer": "patching",
    "unpatch_longformer": "patching",
    "patch_longformer_classes": "patching",
    "unpatch_longformer_classes": "patching",
    "is_patched": "patching",
    "apply_prefix_propagation": "prefix",
    "apply_prefix_tuning": "prefix",
    "save_prefix": "prefix",
    "load_prefix": "prefix",
    "from_pretrained_with_prefix": "prefix",
    "PrefixPropagation": "prefix",
    "PrefixTuning": "prefix",
}

__all__ = ["longformer_attention", "available_backends", "auto_skips", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
