"""Prefix checkpoints: `save_prefix` / `load_prefix` (only the trainable parameters, safetensors, FSDP2-aware),
`from_pretrained_with_prefix` (a whole model written by `save_pretrained` or a `Trainer`), and the warning when a
checkpoint's prefix was dropped by a plain `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..hf.self_attention import BUILD_CHECKS
from .base import _ATTRS, ATTENTION_OPTIONS, PREFIX_CONFIG_KEY, _existing_prefix, _Prefix
from .propagation import PrefixPropagation, apply_prefix_propagation
from .tuning import apply_prefix_tuning

_RESTORING = [False]  # set by `from_pretrained_with_prefix` while it rebuilds a model with its prefix


@contextlib.contextmanager
def restoring_prefix():
    """No "prefix dropped" warning inside: the caller restores the prefix."""
    before, _RESTORING[0] = _RESTORING[0], True
    try:
        yield
    finally:
        _RESTORING[0] = before


def warn_if_prefix_dropped(config, model: nn.Module | None) -> None:
    """Warn (loudly: `UserWarning`) when `config` says the checkpoint carried a prefix that `model` lacks.

    `apply_prefix_*` records the prefix in `config.prefix_kernels`; `from_pretrained` restores the config but
    drops the prefix weights (an "unexpected key" to HF), so the model would silently compute without it. Runs when
    a model is patched and when a patched attention module is built (`hf.self_attention.BUILD_CHECKS`).
    """
    saved = getattr(config, PREFIX_CONFIG_KEY, None)
    if not saved or _RESTORING[0]:
        return
    if model is not None and _existing_prefix(model) is not None:
        return
    method = saved.get("method", "?") if isinstance(saved, dict) else "?"
    warnings.warn(
        f"this model's config says it was saved with a prefix-{method} prefix ({saved}), but the model has none: "
        "`from_pretrained` drops the prefix weights (an unexpected key to Hugging Face), so outputs differ from the "
        "trained model. Load it with `prefix_kernels.from_pretrained_with_prefix(cls, path)`.",
        UserWarning,
        stacklevel=4,
    )


BUILD_CHECKS.append(warn_if_prefix_dropped)


def save_prefix(model: nn.Module, path) -> None:
    """Save the trainable parameters of `model` (the prefix and the task head) to a safetensors file.

    In a distributed run call it on every rank: parameters sharded by FSDP2 (`fully_shard`) are gathered (a
    collective), and only rank 0 writes. A `DistributedDataParallel` wrapper is looked through.
    """
    from safetensors.torch import save_file

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    prefix = _existing_prefix(model)
    if prefix is None:
        raise ValueError("this model has no prefix: call apply_prefix_propagation or apply_prefix_tuning first")
    tensors = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2)
                t = t.full_tensor()
            tensors[n] = t.contiguous().cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    metadata = {"method": prefix.method, "num_prefix": str(prefix.num_prefix)}
    if isinstance(prefix, PrefixPropagation):
        metadata["pool_prefix"] = str(prefix.pool_prefix)
    metadata.update({k: str(v) for k, v in prefix.attention_options().items()})  # none with "joint"
    save_file(tensors, str(path), metadata=metadata)


def _options_from_metadata(metadata: dict[str, str]) -> dict:
    """The attention options `save_prefix` wrote (strings), as `apply_prefix_*` takes them (`{}`: "joint")."""
    options = {k: metadata[k] for k in ATTENTION_OPTIONS if k in metadata}
    for k in ("kernel_scale_init", "rbf_length_scale"):
        if k in options:
            options[k] = float(options[k])
    return {} if options.get("prefix_attention", "joint") == "joint" else options


def load_prefix(model: nn.Module, path, backend: str = "auto", strict: bool = True) -> _Prefix:
    """Load what `save_prefix` wrote into `model`.

    A model without a prefix gets one first (method, `P` and the attention options from the file, with `backend`;
    `pool_prefix` when the model is a sequence classifier). A model with a prefix must have the file's method and
    attention options. With `strict`, the file must hold exactly the model's trainable parameters; without, it may
    lack some, but never the prefix's own. Returns the prefix module.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    prefix = _existing_prefix(model)
    if prefix is None:
        method = metadata.get("method")
        if method not in _ATTRS:
            raise ValueError(f"{path}: no prefix method in the file's metadata; {_what_to_apply(tensors)}")
        num_prefix = int(metadata["num_prefix"])
        options = _options_from_metadata(metadata)
        if method == "propagation":
            pool = metadata.get("pool_prefix") == "True" and _pools(model)
            prefix = apply_prefix_propagation(model, num_prefix, pool_prefix=pool, backend=backend, **options)
        else:
            prefix = apply_prefix_tuning(model, num_prefix, backend=backend, **options)
    elif metadata.get("method", prefix.method) != prefix.method:
        raise ValueError(f"{path} holds a prefix-{metadata['method']} prefix, the model has prefix-{prefix.method}")
    elif "method" in metadata and _options_from_metadata(metadata) != prefix.attention_options():
        joint = "prefix_attention='joint'"
        saved, own = _options_from_metadata(metadata) or joint, prefix.attention_options() or joint
        raise ValueError(f"{path} holds a prefix with the attention options {saved}, the model's prefix has {own}")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    own = {n for n, p in model.named_parameters() if any(p is q for q in prefix.parameters())}
    if unknown or (strict and missing) or own & set(missing):
        raise ValueError(f"{path} does not match the model: unknown {unknown}, missing {missing}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} in {path}, {tuple(params[name].shape)} in the model")
            params[name].copy_(t)
    return prefix


def _pools(model: nn.Module) -> bool:
    """Whether `model` has the head that `pool_prefix` concerns (another class, e.g. the bare `LongformerModel` of
    an `AutoModel` load, takes the prefix without it)."""
    from transformers.models.longformer.modeling_longformer import LongformerForSequenceClassification

    return isinstance(model, LongformerForSequenceClassification)


def _what_to_apply(tensors: dict[str, torch.Tensor]) -> str:
    """How to make the prefix a file's tensors belong to (from their names and shapes)."""
    for method, attr in _ATTRS.items():
        name = f"{attr}.prefix" if method == "propagation" else f"{attr}.prefix_key"
        if name in tensors:
            return (f"it holds a prefix-{method} prefix of P={tensors[name].shape[1]}: call "
                    f"apply_prefix_{method}(model, num_prefix={tensors[name].shape[1]}) first")
    return "apply the prefix first"


# ------------------------------------------------------------------------------------------------------------
# Checkpoints written by save_pretrained / Trainer
# ------------------------------------------------------------------------------------------------------------

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _checkpoint_tensors(path, names: list[str], hub_kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensors `names` from the weights `save_pretrained` wrote under `path` (a directory or a Hub id):
    `model.safetensors`, `pytorch_model.bin`, or their sharded forms."""
    import json

    from transformers.utils import cached_file

    def locate(filename: str) -> str | None:
        return cached_file(str(path), filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub_kwargs)

    def read(file: str, wanted: set[str]) -> dict[str, torch.Tensor]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                return {n: f.get_tensor(n) for n in wanted if n in f.keys()}
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {n: state[n] for n in wanted if n in state}

    for single in ("model.safetensors", "pytorch_model.bin"):
        index = locate(f"{single}.index.json")
        if index is not None:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            found = {}
            for shard in sorted({weight_map[n] for n in names if n in weight_map}):
                found.update(read(locate(shard), set(names)))
            return found
        file = locate(single)
        if file is not None:
            return read(file, set(names))
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin (or sharded index) found")


def from_pretrained_with_prefix(cls, path, backend: str = "auto", **kwargs) -> nn.Module:
    """Rebuild a model that `save_pretrained` (or a `Trainer` checkpoint) wrote, with its prefix.

    `cls.from_pretrained(path, **kwargs)` restores the backbone, the task head and the config, whose
    `prefix_kernels` entry (written by `apply_prefix_*`) says which prefix the model had (method, `P`, dropout,
    `pool_prefix`, the attention options); that prefix is applied
    again (patching the attention with `backend`, freezing the backbone) and its weights are read from the same
    checkpoint. Plain `from_pretrained` drops them: Hugging Face reports them as unexpected keys.

    Args:
        cls: the model class (`LongformerForSequenceClassification`, `LEDForConditionalGeneration`, an `Auto*`
            class, ...).
        path: a checkpoint directory or a Hub model id.
        backend: the attention backend, see `longformer_attention`.
        kwargs: passed to `from_pretrained` (the Hub ones, e.g. `revision`, also to the weight lookup).

    Returns:
        The model, in eval mode as `from_pretrained` returns it, with its prefix module registered.
    """
    from transformers.utils import logging as hf_logging

    kwargs.pop("output_loading_info", None)
    verbosity = hf_logging.get_verbosity()
    # HF would report the prefix weights as unexpected keys; its other findings are reported below.
    hf_logging.set_verbosity_error()
    try:
        with restoring_prefix():
            model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    record = getattr(model.config, PREFIX_CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("method") not in _ATTRS:
        raise ValueError(f"{path}: its config records no prefix (no `{PREFIX_CONFIG_KEY}` entry written by "
                         "apply_prefix_propagation / apply_prefix_tuning); load it with from_pretrained")
    options = {k: record[k] for k in ATTENTION_OPTIONS if k in record}  # none for "joint"
    with restoring_prefix():
        if record["method"] == "propagation":
            pool = bool(record.get("pool_prefix", False)) and _pools(model)
            prefix = apply_prefix_propagation(model, record["num_prefix"], dropout=record.get("dropout"),
                                              pool_prefix=pool, backend=backend, **options)
        else:
            prefix = apply_prefix_tuning(model, record["num_prefix"], dropout=record.get("dropout"), backend=backend,
                                         **options)
    attr = _ATTRS[prefix.method]
    names = [f"{attr}.{n}" for n, _ in prefix.named_parameters()]
    tensors = _checkpoint_tensors(path, names, {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {missing}: it was not saved with this prefix")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if tensors[n].shape != params[n].shape:
                raise ValueError(f"{n}: shape {tuple(tensors[n].shape)} in {path}, {tuple(params[n].shape)} "
                                 "in the rebuilt model")
            params[n].copy_(tensors[n])
    unexpected = sorted(set(info.get("unexpected_keys", ())) - set(names))
    not_found = sorted(info.get("missing_keys", ()))
    if unexpected or not_found:
        warnings.warn(f"loading {path}: weights newly initialized {not_found}, weights not used {unexpected}",
                      UserWarning, stacklevel=2)
    return model
