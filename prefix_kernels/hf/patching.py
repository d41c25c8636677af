"""Hugging Face glue: make `LongformerSelfAttention` and `LEDEncoderSelfAttention` compute through
`longformer_attention`, without adding, renaming or moving a single parameter.

Two ways in:

* `patch_longformer(model, backend)` patches the instances of an existing model: each attention module's class
  is swapped for a subclass whose `forward` calls the fused op. Parameters, buffers, module names and state-dict
  keys stay what they were, so checkpoints, `Trainer`, DDP and `save_pretrained` see no difference.
  `unpatch_longformer(model)` swaps the original classes back.
* `patch_longformer_classes(backend)` makes every model built afterwards (e.g. by `from_pretrained`) come out
  patched, until `unpatch_longformer_classes()`; it also works as a context manager.

Compiling and exporting. HF's encoders (`LongformerEncoder`, `LEDEncoder`) read one batch-wide flag back to the
host, `is_index_global_attn.flatten().any().item()`, and branch on it; the patched attention does not need it
(the op handles a batch without global tokens itself). Patching also swaps each encoder's class for a subclass
whose `forward`, while `torch.compile` or an exporter traces it, runs HF's own `forward` with that `.item()`
answering the Python constant `True`: the graph then has no host read and no branch on the masks, so changing
only the masks never recompiles.

Exporting, at the model level (`_ExportableModel`, in front of `LongformerModel` and `LEDEncoder`, so patching swaps
`LongformerModel`'s class too), two more things, only while an exporter traces:

* HF pads every input to a multiple of the attention window (`_pad_to_window_size`), which HF's own attention needs
  and the patched attention does not: it takes any length, and the padding rows are cut off again. That padding
  branches on the length (`if padding_len > 0`), which an exporter cannot express for a dynamic length, so a model
  whose attention is all patched skips it: the same outputs, fewer rows, a length that may be any size;
* HF builds its 2D float mask by expanding it to `(B, 1, N, N)` and keeping the first query row (`LEDEncoder`, and
  `LongformerModel` in transformers 5): the same values are built as `(B, 1, 1, N)`, so the graph holds no
  `N x N` tensor. Run eagerly, the patched model builds the mask that way too.

The patched attention itself is `hf/self_attention.py`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..attention import check_backend_name
from ..core.masks import one_forward_pass
from ..core.tracing import is_exporting
from .packing import _PackedModel
from .self_attention import _FusedSelfAttention, run_build_checks

__all__ = ["patch_longformer", "unpatch_longformer", "patch_longformer_classes", "unpatch_longformer_classes"]

# Where the HF classes live, and which module-level name each model's `__init__` looks up.
_LONGFORMER = "transformers.models.longformer.modeling_longformer"
_LED = "transformers.models.led.modeling_led"
_HF_LOCATIONS = {
    "attention": ((_LONGFORMER, "LongformerSelfAttention"), (_LED, "LEDEncoderSelfAttention")),
    "encoder": ((_LONGFORMER, "LongformerEncoder"), (_LED, "LEDEncoder")),
    "model": ((_LONGFORMER, "LongformerModel"),),  # packed documents (`packing.py`), export; LED pads in its encoder
}
_ORIGINALS: dict[str, type] = {}  # "module:name" -> the HF class, recorded before any class patch
_PATCHED: dict[type, type] = {}  # HF class (or a user subclass) -> its patched subclass


def _hf_classes(kind: str = "attention") -> dict[str, type]:
    """The original HF classes of `kind` ("attention", "encoder" or "model") by location, importing only those the
    installed transformers has."""
    import importlib

    found = {}
    for module_name, name in _HF_LOCATIONS[kind]:
        key = f"{module_name}:{name}"
        if key not in _ORIGINALS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            cls = getattr(module, name)
            _ORIGINALS[key] = getattr(cls, "_hf_class", cls)
        found[key] = _ORIGINALS[key]
    return found


class _GlobalFlagIsConstant(TorchFunctionMode):
    """Makes `Tensor.item()` of a bool tensor return `True` without reading the tensor.

    Active only around HF's encoder `forward` while it is traced, where the one bool `.item()` is
    `is_global_attn = is_index_global_attn.flatten().any().item()`. `True` makes every layer pass the global
    projections, which the patched attention would compute under tracing anyway; HF's own uses of the flag
    (global attention maps) only matter with `output_attentions=True`, which is never traced this way.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item and args[0].dtype == torch.bool:
            return True
        return func(*args, **(kwargs or {}))


def _wants_maps(module: nn.Module, call: dict) -> bool:
    """Whether an HF forward call asks for attention maps (its argument, else the config's default)."""
    wants = call.get("output_attentions")
    return bool(getattr(module.config, "output_attentions", False) if wants is None else wants)


def _all_fused(module: nn.Module) -> bool:
    return all(isinstance(m, _FusedSelfAttention) for m in _attention_modules(module))


class _TraceableEncoder:
    """Mixin placed in front of HF's `LongformerEncoder` / `LEDEncoder`: the same `forward`, without the
    host read of the batch-wide global flag while `torch.compile` or an exporter traces it; run eagerly, inside
    one `core.masks.one_forward_pass()` scope."""

    _hf_class: type
    _hf_arg_names: tuple[str, ...]

    def forward(self, *args, **kwargs):
        if not (torch.compiler.is_compiling() or is_exporting()):
            with one_forward_pass():  # every layer shares the masks' derived values, inference tensors included
                return super().forward(*args, **kwargs)
        call = dict(zip(self._hf_arg_names[: len(args)], args, strict=True))
        call.update(kwargs)
        if _wants_maps(self, call) or not _all_fused(self):
            return super().forward(*args, **kwargs)  # HF's own attention: it needs the real flag
        with _GlobalFlagIsConstant():
            return super().forward(*args, **kwargs)


# Whether the `_ExportableModel` forward being traced skips the window padding (innermost last). A plain list,
# not module state: the exporters trace Python as it runs, and nothing here is part of the graph.
_UNPADDED: list[bool] = []


def _padding_bias(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What transformers 5's `create_bidirectional_mask` gives `LongformerModel` for a 2D mask (0 where a key is
    attended, the dtype's lowest value elsewhere), as `(B, 1, 1, N)`: the model keeps only `[:, 0, 0, :]`."""
    dtype = inputs_embeds.dtype
    zero = torch.zeros((), dtype=dtype, device=inputs_embeds.device)
    return torch.where(attention_mask.to(inputs_embeds.device).bool(), zero, torch.finfo(dtype).min)[:, None, None]


@functools.cache
def _one_query_row(prepare: Callable) -> Callable:
    """LED's `_prepare_4d_attention_mask_inverted` with one query row (`tgt_len=1`) unless another is asked for: the
    encoder keeps only `[:, 0, 0, :]`."""

    def prepare_one_row(mask, dtype, tgt_len=None):
        return prepare(mask, dtype, 1 if tgt_len is None else tgt_len)

    prepare_one_row._prefix_kernels_one_row = True
    return prepare_one_row


_padding_bias._prefix_kernels_one_row = True
_ONE_ROW_BUILDERS = ((_LONGFORMER, "create_bidirectional_mask", lambda f: _padding_bias),
                     (_LED, "_prepare_4d_attention_mask_inverted", _one_query_row))


@contextlib.contextmanager
def _masks_without_query_rows() -> Iterator[None]:
    """The modeling modules' mask builders replaced, for one model forward, by ones that build the row HF keeps.
    A builder already replaced (a nested forward, another thread's) is left to its scope; whatever the interleaving,
    a model sees HF's values either way."""
    replaced = []
    for module_name, name, replacement in _ONE_ROW_BUILDERS:
        module = sys.modules.get(module_name)  # a model of that family has imported it
        original = getattr(module, name, None)
        if original is not None and not getattr(original, "_prefix_kernels_one_row", False):
            replaced.append((module, name, original))
            setattr(module, name, replacement(original))
    try:
        yield
    finally:
        for module, name, original in reversed(replaced):
            setattr(module, name, original)


class _ExportableModel:
    """Mixin placed in front of HF's `LongformerModel` (and, with `_TraceableEncoder`, `LEDEncoder`): run eagerly or
    while an exporter traces it, HF's mask builders make the one row of the mask HF keeps, not `(B, 1, N, N)` (the
    same values; eagerly it saves an `N x N` mask per batch row in every forward pass); while an exporter traces a
    model whose attention is all patched and no attention maps are asked for, `_pad_to_window_size` also pads
    nothing (the patched attention takes any length; HF's padding rows would only be cut off again), so the exported
    length may be dynamic. Under `torch.compile`, HF's own forward."""

    _hf_class: type
    _hf_arg_names: tuple[str, ...]

    def forward(self, *args, **kwargs):
        if not is_exporting():
            if torch.compiler.is_compiling():
                return super().forward(*args, **kwargs)
            with _masks_without_query_rows():
                return super().forward(*args, **kwargs)
        call = dict(zip(self._hf_arg_names[: len(args)], args, strict=True))
        call.update(kwargs)
        _UNPADDED.append(_all_fused(self) and not _wants_maps(self, call))
        try:
            with _masks_without_query_rows():
                return super().forward(*args, **kwargs)
        finally:
            _UNPADDED.pop()

    def _pad_to_window_size(self, *args, **kwargs):
        if not (_UNPADDED and _UNPADDED[-1]):
            return super()._pad_to_window_size(*args, **kwargs)
        # HF returns `(padding_len, *its tensor arguments in order)`, `pad_token_id` left out.
        names = tuple(inspect.signature(self._hf_class._pad_to_window_size).parameters)[1:]
        call = dict(zip(names[: len(args)], args, strict=True))
        call.update(kwargs)
        return (0, *(call.get(name) for name in names if name != "pad_token_id"))


class _PatchedModel(_PackedModel, _ExportableModel):
    """`LongformerModel`'s mixin: the packed documents of a call (`packing.py`), then the exporters' tracing."""


class _TraceableLEDEncoder(_TraceableEncoder, _ExportableModel):
    """`LEDEncoder`'s mixin: it reads the global flag and pads to the window both."""


def _encoder_mixin(cls: type) -> type:
    return _TraceableLEDEncoder if hasattr(cls, "_pad_to_window_size") else _TraceableEncoder


def _patched_class(cls: type, mixin: type) -> type:
    """The subclass of an HF class with `mixin` in front (one per class, reused)."""
    cls = getattr(cls, "_hf_class", cls)
    if cls not in _PATCHED:
        names = tuple(inspect.signature(cls.forward).parameters)[1:]  # drop `self`
        qualname = f"Fused{cls.__name__}"
        attrs = {"_hf_class": cls, "_hf_arg_names": names, "__module__": __name__, "__qualname__": qualname}
        if hasattr(mixin, "forward"):
            attrs["forward"] = _with_signature_of(mixin.forward, cls.forward)
        patched = type(
            cls.__name__,  # same name: accelerate's `no_split_modules` and HF's module lists match by name
            (mixin, cls),
            attrs,
        )
        globals()[qualname] = patched  # picklable by its qualified name
        _PATCHED[cls] = patched
    return _PATCHED[cls]


def _with_signature_of(forward, hf_forward):
    """`forward` showing `hf_forward`'s signature to `inspect` (HF `Trainer` picks dataset columns by it, the prefix
    methods bind positional arguments by it)."""

    def patched_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return functools.update_wrapper(patched_forward, hf_forward)


def _fused_class(cls: type) -> type:
    """The fused subclass of an HF self-attention class."""
    return _patched_class(cls, _FusedSelfAttention)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    targets = tuple(_hf_classes().values())
    return [m for m in model.modules() if isinstance(m, targets)]


def _encoder_modules(model: nn.Module, kind: str = "encoder") -> list[nn.Module]:
    """The modules of `model` that are HF's classes of `kind` ("encoder" or "model")."""
    targets = tuple(_hf_classes(kind).values())
    return [m for m in model.modules() if isinstance(m, targets)]


def _quiet_padding_notice_when_traced() -> None:
    """HF's `_pad_to_window_size` calls `logger.warning_once` when it pads, and dynamo cannot trace a logging
    call (a graph break, so `fullgraph=True` fails). Tell dynamo to skip the `warning_once` of the two modeling
    modules' loggers while it traces (eager calls still log). Newer torch only; older torch keeps the break."""
    import importlib

    ignored = getattr(torch._dynamo.config, "ignore_logging_functions", None)
    if ignored is None:
        ignored = getattr(torch._dynamo.config, "ignore_logger_methods", None)
    if ignored is None:
        return
    for module_name in (_LONGFORMER, _LED):
        try:
            logger = importlib.import_module(module_name).logger
        except (ImportError, AttributeError):
            continue
        if hasattr(logger, "warning_once"):
            ignored.add(logger.warning_once)


def patch_longformer(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every Longformer / LED-encoder self-attention in `model` compute with `longformer_attention`.

    In place; parameters, buffers and state-dict keys are unchanged. Patching a patched model only changes
    the backend. `backend`: "auto" | "triton" | "cuda" | "cpu" | "reference" (env `PREFIX_KERNELS_BACKEND`
    overrides per call). Returns `model`.
    """
    check_backend_name(backend)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LongformerSelfAttention or LEDEncoderSelfAttention")
    run_build_checks(getattr(model, "config", None), model)
    for module in modules:
        if not isinstance(module, _FusedSelfAttention):
            module.__class__ = _fused_class(type(module))
        module._prefix_kernels_backend = backend
    for encoder in _encoder_modules(model):
        if not isinstance(encoder, _TraceableEncoder):
            encoder.__class__ = _patched_class(type(encoder), _encoder_mixin(type(encoder)))
    for base in _encoder_modules(model, "model"):
        if not isinstance(base, _PatchedModel):
            base.__class__ = _patched_class(type(base), _PatchedModel)
    _quiet_padding_notice_when_traced()
    return model


def unpatch_longformer(model: nn.Module) -> nn.Module:
    """Restore HF's own attention in every patched module of `model` (instance- or class-patched). Returns it."""
    for module in model.modules():
        if not isinstance(module, _FusedSelfAttention):
            continue
        if getattr(module, "_prefix_kernels_prefix", None) is not None:
            raise ValueError("this model uses prefix-tuning or a prefix with prefix_attention='separate', which HF's "
                             "attention cannot compute; keep it patched")
        module.__class__ = type(module)._hf_class
        module.__dict__.pop("_prefix_kernels_backend", None)
    for module in model.modules():
        if isinstance(module, (_TraceableEncoder, _ExportableModel, _PackedModel)):
            module.__class__ = type(module)._hf_class
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any self-attention of `model` computes through `longformer_attention`."""
    return any(isinstance(m, _FusedSelfAttention) for m in model.modules())


class _ClassPatch:
    """Returned by `patch_longformer_classes`; `with` undoes the patch on exit."""

    def __enter__(self) -> _ClassPatch:
        return self

    def __exit__(self, *exc) -> None:
        unpatch_longformer_classes()


def patch_longformer_classes(backend: str = "auto") -> _ClassPatch:
    """Models built from now on (`from_pretrained`, `from_config`, constructors) come out patched.

    The modeling modules' `LongformerSelfAttention` / `LEDEncoderSelfAttention` names are pointed at the fused
    subclasses, which the model constructors look up; models built earlier are not touched. Undo with
    `unpatch_longformer_classes()`, or use `with patch_longformer_classes(backend): model = ...`.
    """
    import importlib

    check_backend_name(backend)
    for key, cls in _hf_classes().items():
        module_name, name = key.split(":")
        patched = _fused_class(cls)
        patched._class_backend = backend
        setattr(importlib.import_module(module_name), name, patched)
    for key, cls in _hf_classes("encoder").items():
        module_name, name = key.split(":")
        setattr(importlib.import_module(module_name), name, _patched_class(cls, _encoder_mixin(cls)))
    for key, cls in _hf_classes("model").items():
        module_name, name = key.split(":")
        setattr(importlib.import_module(module_name), name, _patched_class(cls, _PatchedModel))
    _quiet_padding_notice_when_traced()
    return _ClassPatch()


def unpatch_longformer_classes() -> None:
    """Point the modeling modules back at HF's classes (models already built keep what they have)."""
    import importlib

    for kind in ("attention", "encoder", "model"):
        for key, cls in _hf_classes(kind).items():
            module_name, name = key.split(":")
            setattr(importlib.import_module(module_name), name, cls)
