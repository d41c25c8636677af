"""Hugging Face glue: make `LongformerSelfAttention` and `LEDEncoderSelfAttention` compute through
`longformer_attention`, without adding, renaming or moving a single parameter.

Two ways in:

* `patch_longformer(model, backend)` patches the instances of an existing model: each attention module's class
  is swapped for a subclass whose `forward` calls the fused op. Parameters, buffers, module names and state-dict
  keys stay what they were, so checkpoints, `Trainer`, DDP and `save_pretrained` see no difference.
  `unpatch_longformer(model)` swaps the original classes back.
* `patch_longformer_classes(backend)` makes every model built afterwards (e.g. by `from_pretrained`) come out
  patched, until `unpatch_longformer_classes()`; it also works as a context manager.

The patched `forward` accepts both call conventions: transformers 4.x passes `layer_head_mask` (each head's
probabilities are multiplied by it, i.e. each head's output row is scaled), 5.x does not; LED calls with
`hidden_states=` by keyword. `output_attentions=True` needs HF's probability layouts, so that call runs the
original HF forward.

Compiling and exporting. HF's encoders (`LongformerEncoder`, `LEDEncoder`) read one batch-wide flag back to the
host, `is_index_global_attn.flatten().any().item()`, and branch on it; the patched attention does not need it
(the op handles a batch without global tokens itself). Patching also swaps each encoder's class for a subclass
whose `forward`, while `torch.compile` or an exporter traces it, runs HF's own `forward` with that `.item()`
answering the Python constant `True`: the graph then has no host read and no branch on the masks, so changing
only the masks never recompiles. While an exporter traces (`torch.export`, `torch.onnx.export`), the patched
attention computes through `export.static_attention` (static shapes, standard ops) instead of the custom ops.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import BACKEND_ORDER, local_rows_attention, longformer_attention, select_backend
from .checks import _global_without_padding, check_inputs
from .custom_op import global_index
from .export import is_exporting, static_attention
from .reference import masked_softmax

__all__ = ["patch_longformer", "unpatch_longformer", "patch_longformer_classes", "unpatch_longformer_classes"]

# Where the HF classes live, and which module-level name each model's `__init__` looks up.
_LONGFORMER = "transformers.models.longformer.modeling_longformer"
_LED = "transformers.models.led.modeling_led"
_HF_LOCATIONS = {
    "attention": ((_LONGFORMER, "LongformerSelfAttention"), (_LED, "LEDEncoderSelfAttention")),
    "encoder": ((_LONGFORMER, "LongformerEncoder"), (_LED, "LEDEncoder")),
}
_ORIGINALS: dict[str, type] = {}  # "module:name" -> the HF class, recorded before any class patch
_PATCHED: dict[type, type] = {}  # HF class (or a user subclass) -> its patched subclass
# The config attribute `apply_prefix_*` writes (saved in config.json by `save_pretrained`).
PREFIX_CONFIG_KEY = "prefix_kernels"


def _hf_classes(kind: str = "attention") -> dict[str, type]:
    """The original HF classes of `kind` ("attention" or "encoder") by location, importing only those the
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


def _check_backend(backend: str) -> str:
    if backend not in ("auto", *BACKEND_ORDER):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_ORDER))}; got {backend!r}")
    return backend


class _FusedSelfAttention:
    """Mixin placed in front of an HF self-attention class; `super().forward` is the original HF forward.

    Instance attributes (plain, never parameters or buffers):
    `_prefix_kernels_backend` (str) and `_prefix_kernels_prefix` (an object whose `key_values(like)` returns
    this layer's prefix-tuning keys/values `(P, H, D)` in `like`'s dtype; set by `apply_prefix_tuning`).
    """

    _hf_class: type
    _hf_arg_names: tuple[str, ...]  # the original forward's parameter names, for binding positional args
    _class_backend = "auto"  # the backend of instances built while the classes are patched

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefix_kernels_backend = type(self)._class_backend
        config = args[0] if args else kwargs.get("config")
        if getattr(self, "layer_id", 0) == 0:  # once per model
            warn_if_prefix_dropped(config, None)

    def forward(self, *args, **kwargs):
        call = dict(zip(self._hf_arg_names, args, strict=False))
        call.update(kwargs)
        prefix = getattr(self, "_prefix_kernels_prefix", None)
        if call.get("output_attentions"):
            if prefix is not None:
                raise ValueError(
                    "output_attentions=True is not supported with prefix-tuning: HF's attention layout has no "
                    "place for the prefix keys"
                )
            return super().forward(*args, **kwargs)
        return (fused_self_attention(self, **call),)


def fused_self_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_head_mask: torch.Tensor | None = None,
    is_index_masked: torch.Tensor | None = None,
    is_index_global_attn: torch.Tensor | None = None,
    is_global_attn: bool | None = None,
    output_attentions: bool = False,
    **unused,
) -> torch.Tensor:
    """What an HF Longformer/LED-encoder self-attention computes, through `longformer_attention`.

    Args:
        module: the HF self-attention module (its Linear layers, `num_heads`, `head_dim`,
            `one_sided_attn_window_size`, `dropout` are used).
        hidden_states: `(B, N, C)`.
        attention_mask: HF's float `(B, N)` mask: negative = padding, 0 = local, positive = global; only read
            when `is_index_masked` / `is_index_global_attn` are not given.
        layer_head_mask: `(H,)` (transformers 4.x) or None.
        is_index_masked, is_index_global_attn: `(B, N)` bool, passed to the op unchanged (HF builds them once
            per forward pass and hands every layer the same tensors, which lets a backend cache per mask).
        is_global_attn: HF's batch-wide flag; False skips the global projections. None (unknown) computes them.

    Returns:
        `(B, N, C)` in the dtype of the projections.

    With global tokens, run eagerly (not traced by `torch.compile` or an exporter), at most `D / 2` global tokens
    in a batch row and `key_global`, `value_global` plain `nn.Linear` layers, the global rows are computed from the
    hidden states by `_global_rows_from_hidden` and the op computes the local rows only: `key_global` and
    `value_global` never project the whole sequence.
    """
    b, n, c = hidden_states.shape
    h, d = module.num_heads, module.head_dim
    if is_index_masked is None and attention_mask is not None:
        is_index_masked = attention_mask < 0
    if is_index_global_attn is None and attention_mask is not None:
        is_index_global_attn = attention_mask > 0
    if is_global_attn is None:
        is_global_attn = is_index_global_attn is not None

    def heads(linear: nn.Module) -> torch.Tensor:
        return linear(hidden_states).view(b, n, h, d)

    q, k, v = heads(module.query), heads(module.key), heads(module.value)
    glob = is_index_global_attn if is_global_attn else None
    prefix_k = prefix_v = None
    prefix = getattr(module, "_prefix_kernels_prefix", None)
    if prefix is not None:
        prefix_k, prefix_v = prefix.key_values(q)
    kwargs = dict(
        window=int(module.one_sided_attn_window_size),
        key_padding_mask=is_index_masked,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        softmax_scale=d**-0.5,
        dropout_p=float(module.dropout) if module.training else 0.0,
    )
    backend = getattr(module, "_prefix_kernels_backend", "auto")
    index = None
    if glob is not None and not output_attentions and not (torch.compiler.is_compiling() or is_exporting()):
        # The op's own compact index (same combined mask, same cache): one host read per forward pass for the
        # whole model.
        index = global_index(glob if is_index_masked is None else _global_without_padding(glob, is_index_masked))
        if not (_global_rows_from_hidden_pays(index[2], d) and _plain_linear(module.key_global)
                and _plain_linear(module.value_global)):
            index = None
    if index is not None:
        idx, counts, g = index
        out = local_rows_attention(q, k, v, is_global=glob if g else None, **kwargs, backend=backend)
        if g:
            rows = _global_rows_from_hidden(module, hidden_states, idx, counts, is_index_masked, prefix_k, prefix_v,
                                            kwargs["softmax_scale"], kwargs["dropout_p"])
            # The op left the global rows 0; entries past a row's count add exact zeros to distinct local rows.
            out = out.scatter_add(1, idx.long()[:, :, None, None].expand(b, g, h, d), rows.to(out.dtype))
        return _scale_heads(out, layer_head_mask).reshape(b, n, c)

    qg = kg = vg = None
    if glob is not None:
        qg = _global_rows_projection(module.query_global, hidden_states, glob, is_index_masked)
        qg = qg.view(b, n, h, d)
        kg, vg = heads(module.key_global), heads(module.value_global)
    kwargs.update(is_global=glob, q_global=qg, k_global=kg, v_global=vg)
    if is_exporting():
        # An exported graph carries no custom op and no data-dependent shape: the static formulation.
        out = static_attention(check_inputs(q, k, v, **kwargs))
    elif torch.compiler.is_compiling() and select_backend(check_inputs(q, k, v, **kwargs), backend) == "reference":
        out = _reference_outside_the_graph(q, k, v, **kwargs, backend=backend)
    else:
        out = longformer_attention(q, k, v, **kwargs, backend=backend)
    return _scale_heads(out, layer_head_mask).reshape(b, n, c)


def _scale_heads(out: torch.Tensor, layer_head_mask: torch.Tensor | None) -> torch.Tensor:
    """`out (B, N, H, D)` times `layer_head_mask (H,)` per head: HF multiplies both probability matrices by the
    head's weight, which scales that head's output rows, local and global."""
    if layer_head_mask is None:
        return out
    return out * layer_head_mask.to(out.dtype).view(1, 1, -1, 1)


def _plain_linear(linear: nn.Module) -> bool:
    """Whether `linear` computes exactly `x @ weight.T + bias` from its own two parameters: an `nn.Linear` (not a
    subclass or a wrapper: LoRA adapters, quantized layers) with no forward hooks, so that its weight and bias may
    be used without calling it."""
    return type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks


def _global_rows_from_hidden_pays(max_global: int, head_dim: int) -> bool:
    """Whether `_global_rows_from_hidden` replaces the `key_global` / `value_global` projections: when the most
    global tokens of a batch row, `G`, are at most `D / 2`. Both its costs scale as `G / D` of what it replaces:
    FLOPs (`2 * B*H*G*N*C` per product against `2 * B*N*C*C` per projection, forward and backward) and the
    activations autograd keeps (about two fp32 `(B, G, H, N)` probability tensors against the two `(B, N, C)`
    projections). At `G <= D / 2` it takes at most half the FLOPs, and no more saved memory than the projections
    even in 16-bit (in fp32, half); beyond that the projections and the fused global rows win."""
    return 2 * max_global <= head_dim


def _global_rows_from_hidden(module: nn.Module, x: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                             pad: torch.Tensor | None, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                             scale: float, dropout_p: float) -> torch.Tensor:
    """The global rows `(B, G, H, D)` (compact order of `idx (B, G)`; slots past `counts (B,)` exactly 0) from the
    hidden states `x (B, N, C)`, without projecting `x` by `key_global` / `value_global`.

    Per head `h`, with `Wk_h`, `bk_h` its `D` rows of `key_global` (the same for value) and `qg` the query_global
    rows: `qg_i . kg_j = (Wk_h^T qg_i) . x_j + qg_i . bk_h`, and `sum_j p_ij vg_j = Wv_h (sum_j p_ij x_j) +
    bv_h sum_j p_ij` (sums over the text keys, after dropout). So each global query is one width-`C` query per head
    against `x`; the prefix keys/values `(P, H, D)` enter as in the op. One softmax per row (fp32, padding keys
    masked), dropout `dropout_p`, as `reference.py` states the global rows. Every weight gets its gradient from
    autograd through these products.
    """
    b, n, c = x.shape
    h, d = module.num_heads, module.head_dim
    g = idx.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.gather(1, idx.long()[:, :, None].expand(b, g, c))
    qg = module.query_global(xg).view(b, g, h, d)
    key, value = module.key_global, module.value_global
    qx = torch.einsum("bghd,hdc->bghc", qg, key.weight.view(h, d, c))
    # x untransposed in the product: its gradient comes out contiguous (a transposed one costs a strided
    # accumulation into the gradient of x, slow in bf16).
    scores = torch.bmm(x, qx.reshape(b, g * h, c).transpose(1, 2)).transpose(1, 2).view(b, g, h, n)
    if key.bias is not None:
        scores = scores + (qg * key.bias.view(h, d)).sum(-1, keepdim=True)
    allowed = (torch.arange(g, device=x.device) < counts[:, None])[:, :, None, None]  # (B, G, 1, 1): used slots
    key_ok = allowed if pad is None else allowed & ~pad[:, None, None, :]
    if prefix_k is not None:
        scores = torch.cat([scores, torch.einsum("bghd,phd->bghp", qg, prefix_k)], dim=-1)
        key_ok = torch.cat([key_ok.expand(b, g, 1, n), allowed.expand(b, g, 1, prefix_k.shape[0])], dim=-1)
    probs = masked_softmax(scores.to(cdt) * scale, key_ok)
    if dropout_p > 0:
        probs = nn.functional.dropout(probs, dropout_p, training=True)
    probs = probs.to(x.dtype)
    text = probs[..., :n]
    context = torch.bmm(text.reshape(b, g * h, n), x).view(b, g, h, c)
    out = torch.einsum("bghc,hdc->bghd", context, value.weight.view(h, d, c))
    if value.bias is not None:
        out = out + text.sum(-1, keepdim=True) * value.bias.view(h, d)
    if prefix_v is not None:
        out = out + torch.einsum("bghp,phd->bghd", probs[..., n:], prefix_v)
    return out


@torch.compiler.disable
def _reference_outside_the_graph(q, k, v, **kwargs) -> torch.Tensor:
    """The reference backend under `torch.compile`: it sizes its tensors by the global count (a host read), a
    data-dependent size inductor cannot lower, so it runs eagerly between two graphs (a graph break;
    `fullgraph=True` needs a fused backend)."""
    return longformer_attention(q, k, v, **kwargs)


def _global_rows_projection(linear: nn.Module, x: torch.Tensor, is_global: torch.Tensor,
                            pad: torch.Tensor | None) -> torch.Tensor:
    """`linear(x)` on the global rows of `x (B, N, C)`, zeros elsewhere: the op reads `q_global` on global,
    non-padding rows only, so (as in HF) only those rows are projected, sparing a full `(B, N, C)` matmul, its
    activation and its weight-gradient matmul. The compact index is the op's own (same combined mask, same cache):
    one host read per forward pass, shared by every layer. Under `torch.compile` and the exporters (where that
    read would break the graph) the whole projection runs instead."""
    if torch.compiler.is_compiling() or is_exporting():
        return linear(x)
    if pad is not None:
        is_global = _global_without_padding(is_global, pad)
    idx, counts, g = global_index(is_global)
    if g == 0:
        return linear(x)
    b, n, c = x.shape
    idx = idx.long()
    used = torch.arange(g, device=x.device)[None, :] < counts[:, None]
    rows = linear(x.gather(1, idx[..., None].expand(b, g, c)))
    # Entries past a row's count hold arbitrary (distinct) positions: they add exact zeros.
    rows = torch.where(used[..., None], rows, 0.0)
    return rows.new_zeros(b, n, rows.shape[-1]).scatter_add(1, idx[..., None].expand_as(rows), rows)


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


class _TraceableEncoder:
    """Mixin placed in front of HF's `LongformerEncoder` / `LEDEncoder`: the same `forward`, without the
    host read of the batch-wide global flag while `torch.compile` or an exporter traces it."""

    _hf_class: type
    _hf_arg_names: tuple[str, ...]

    def forward(self, *args, **kwargs):
        if not (torch.compiler.is_compiling() or is_exporting()):
            return super().forward(*args, **kwargs)
        call = dict(zip(self._hf_arg_names, args, strict=False))
        call.update(kwargs)
        wants_maps = call.get("output_attentions")
        if wants_maps is None:
            wants_maps = getattr(self.config, "output_attentions", False)
        if wants_maps or not all(isinstance(m, _FusedSelfAttention) for m in _attention_modules(self)):
            return super().forward(*args, **kwargs)  # HF's own attention: it needs the real flag
        with _GlobalFlagIsConstant():
            return super().forward(*args, **kwargs)


def _patched_class(cls: type, mixin: type) -> type:
    """The subclass of an HF class with `mixin` in front (one per class, reused)."""
    cls = getattr(cls, "_hf_class", cls)
    if cls not in _PATCHED:
        names = tuple(inspect.signature(cls.forward).parameters)[1:]  # drop `self`
        qualname = f"Fused{cls.__name__}"
        patched = type(
            cls.__name__,  # same name: accelerate's `no_split_modules` and HF's module lists match by name
            (mixin, cls),
            {"_hf_class": cls, "_hf_arg_names": names, "__module__": __name__, "__qualname__": qualname},
        )
        globals()[qualname] = patched  # picklable by its qualified name
        _PATCHED[cls] = patched
    return _PATCHED[cls]


def _fused_class(cls: type) -> type:
    """The fused subclass of an HF self-attention class."""
    return _patched_class(cls, _FusedSelfAttention)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    targets = tuple(_hf_classes().values())
    return [m for m in model.modules() if isinstance(m, targets)]


def _encoder_modules(model: nn.Module) -> list[nn.Module]:
    targets = tuple(_hf_classes("encoder").values())
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


_RESTORING = [False]  # set by `prefix.from_pretrained_with_prefix` while it rebuilds a model with its prefix


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
    drops the prefix weights (an "unexpected key" to HF), so the model would silently compute without it.
    """
    saved = getattr(config, PREFIX_CONFIG_KEY, None)
    if not saved or _RESTORING[0]:
        return
    from .prefix import _existing_prefix  # here: prefix imports this module

    if model is not None and _existing_prefix(model) is not None:
        return
    method = saved.get("method", "?") if isinstance(saved, dict) else "?"
    warnings.warn(
        f"this model's config says it was saved with a prefix-{method} prefix ({saved}), but the model has none: "
        "`from_pretrained` drops the prefix weights (an unexpected key to Hugging Face), so outputs differ from the "
        "trained model. Load it with `prefix_kernels.from_pretrained_with_prefix(cls, path)`.",
        UserWarning,
        stacklevel=3,
    )


def patch_longformer(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every Longformer / LED-encoder self-attention in `model` compute with `longformer_attention`.

    In place; parameters, buffers and state-dict keys are unchanged. Patching a patched model only changes
    the backend. `backend`: "auto" | "cuda" | "triton" | "reference" (env `PREFIX_KERNELS_BACKEND` overrides
    per call). Returns `model`.
    """
    _check_backend(backend)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LongformerSelfAttention or LEDEncoderSelfAttention")
    warn_if_prefix_dropped(getattr(model, "config", None), model)
    for module in modules:
        if not isinstance(module, _FusedSelfAttention):
            module.__class__ = _fused_class(type(module))
        module._prefix_kernels_backend = backend
    for encoder in _encoder_modules(model):
        if not isinstance(encoder, _TraceableEncoder):
            encoder.__class__ = _patched_class(type(encoder), _TraceableEncoder)
    _quiet_padding_notice_when_traced()
    return model


def unpatch_longformer(model: nn.Module) -> nn.Module:
    """Restore HF's own attention in every patched module of `model` (instance- or class-patched). Returns it."""
    for module in model.modules():
        if not isinstance(module, _FusedSelfAttention):
            continue
        if getattr(module, "_prefix_kernels_prefix", None) is not None:
            raise ValueError("this model uses prefix-tuning, which HF's attention cannot compute; keep it patched")
        module.__class__ = type(module)._hf_class
        module.__dict__.pop("_prefix_kernels_backend", None)
    for encoder in model.modules():
        if isinstance(encoder, _TraceableEncoder):
            encoder.__class__ = type(encoder)._hf_class
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

    _check_backend(backend)
    for key, cls in _hf_classes().items():
        module_name, name = key.split(":")
        patched = _fused_class(cls)
        patched._class_backend = backend
        setattr(importlib.import_module(module_name), name, patched)
    for key, cls in _hf_classes("encoder").items():
        module_name, name = key.split(":")
        setattr(importlib.import_module(module_name), name, _patched_class(cls, _TraceableEncoder))
    _quiet_padding_notice_when_traced()
    return _ClassPatch()


def unpatch_longformer_classes() -> None:
    """Point the modeling modules back at HF's classes (models already built keep what they have)."""
    import importlib

    for kind in ("attention", "encoder"):
        for key, cls in _hf_classes(kind).items():
            module_name, name = key.split(":")
            setattr(importlib.import_module(module_name), name, cls)
