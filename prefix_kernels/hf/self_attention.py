"""The patched Hugging Face self-attention: `LongformerSelfAttention` / `LEDEncoderSelfAttention` computing through
`longformer_attention`, with the same parameters and the same call conventions.

`_FusedSelfAttention` is the mixin `hf/patching.py` places in front of an HF class; its `forward` binds HF's call and
routes it (`fused_self_attention`):

* `output_attentions=True` needs HF's probability layouts: HF's own forward serves that call (a prefix the layouts
  have no place for, prefix-tuning's keys or a separately normalised prefix, raises `ValueError`);
* a separately normalised prefix (`prefix_attention="separate"`, `prefix_attention.py`): `_separate_self_attention`;
* with global tokens, run eagerly, at most `D / 2` global tokens per row and `key_global` / `value_global` plain
  `nn.Linear` layers: the global rows from the hidden states (`core/global_rows.py`) and the op's local rows;
* else the global projections and `longformer_attention` (which itself routes export and compile, see
  `attention.py`).

The patched forward accepts both call conventions: transformers 4.x passes `layer_head_mask` (each head's
probabilities are multiplied by it, i.e. each head's output row is scaled), 5.x does not; LED calls with
`hidden_states=` by keyword.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_mod

from ..attention import local_rows_attention, longformer_attention, serving_backend
from ..core.checks import check_inputs
from ..core.global_rows import global_rows_from_hidden, pays
from ..core.masks import cached, global_index, global_without_padding
from ..core.tracing import is_exporting
from .prefix_attention import SeparatePrefix, add_prefix_rows, slot_rows

# Called with `(config, model_or_None)` when a patched attention module is built (once per model) and when a model
# is patched: the prefix layer registers its check that a checkpoint's prefix was not dropped.
BUILD_CHECKS: list[Callable] = []


def run_build_checks(config, model: nn.Module | None) -> None:
    for check in BUILD_CHECKS:
        check(config, model)


class _FusedSelfAttention:
    """Mixin placed in front of an HF self-attention class; `super().forward` is the original HF forward.

    Instance attributes (plain, never parameters or buffers):
    `_prefix_kernels_backend` (str) and `_prefix_kernels_prefix`, set by the prefix methods: an object whose
    `key_values(like)` returns this layer's prefix-tuning keys/values `(P, H, D)` in `like`'s dtype, and optionally
    `separate()` (a `SeparatePrefix`, or `None` for the joint softmax) and `slots` (prefix-propagation with a
    separate prefix: the first `slots` positions are its slots, which leave every softmax; 0 for prefix-tuning).
    """

    _hf_class: type
    _hf_arg_names: tuple[str, ...]  # the original forward's parameter names, for binding positional args
    _class_backend = "auto"  # the backend of instances built while the classes are patched

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefix_kernels_backend = type(self)._class_backend
        config = args[0] if args else kwargs.get("config")
        if getattr(self, "layer_id", 0) == 0:  # once per model
            run_build_checks(config, None)

    def forward(self, *args, **kwargs):
        call = dict(zip(self._hf_arg_names[: len(args)], args, strict=True))
        call.update(kwargs)
        prefix = getattr(self, "_prefix_kernels_prefix", None)
        if call.get("output_attentions"):
            if getattr(self, "_prefix_kernels_documents", None) is not None:
                raise ValueError("output_attentions=True is not supported with packed documents: HF's attention "
                                 "layouts have no document boundaries")
            if prefix is not None and _separate(prefix) is not None:
                raise ValueError(
                    "output_attentions=True is not supported with prefix_attention='separate': HF's attention "
                    "layouts have no place for a separately normalised prefix"
                )
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
    backend = getattr(module, "_prefix_kernels_backend", "auto")
    docs = getattr(module, "_prefix_kernels_documents", None)  # packed documents (`packing.py`), `(B, N)` or None
    prefix_k = prefix_v = None
    prefix = getattr(module, "_prefix_kernels_prefix", None)
    spec = None if prefix is None else _separate(prefix)
    if spec is not None:
        out = _separate_self_attention(module, hidden_states, q, k, v, glob, is_index_masked, prefix, spec, backend,
                                       docs)
        return _scale_heads(out, layer_head_mask).reshape(b, n, c)
    if prefix is not None:
        prefix_k, prefix_v = prefix.key_values(q)
    kwargs = dict(
        window=int(module.one_sided_attn_window_size),
        key_padding_mask=is_index_masked,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        softmax_scale=d**-0.5,
        dropout_p=float(module.dropout) if module.training else 0.0,
        document_ids=docs,
    )
    index = _direct_global_rows_index(module, glob, is_index_masked) if not output_attentions else None
    if index is not None:
        idx, counts, g = index
        out = local_rows_attention(q, k, v, is_global=glob if g else None, **kwargs, backend=backend)
        if g:
            xg = hidden_states.gather(1, idx.long()[:, :, None].expand(b, g, c))
            key, value = module.key_global, module.value_global
            rows = global_rows_from_hidden(
                hidden_states, module.query_global(xg).view(b, g, h, d), key.weight, key.bias, value.weight,
                value.bias, idx, counts, is_index_masked, prefix_k, prefix_v, scale=kwargs["softmax_scale"],
                dropout_p=kwargs["dropout_p"], document_ids=docs)
            # The op left the global rows 0; entries past a row's count add exact zeros to distinct local rows.
            out = out.scatter_add(1, idx.long()[:, :, None, None].expand(b, g, h, d), rows.to(out.dtype))
        return _scale_heads(out, layer_head_mask).reshape(b, n, c)

    qg = kg = vg = None
    if glob is not None:
        qg = _global_rows_projection(module.query_global, hidden_states, glob, is_index_masked).view(b, n, h, d)
        kg, vg = heads(module.key_global), heads(module.value_global)
    out = longformer_attention(q, k, v, is_global=glob, q_global=qg, k_global=kg, v_global=vg, **kwargs,
                               backend=backend)
    return _scale_heads(out, layer_head_mask).reshape(b, n, c)


def _separate(prefix) -> SeparatePrefix | None:
    """The layer's separately normalised prefix, or `None` (the joint softmax; also for an object without
    `separate`)."""
    separate = getattr(prefix, "separate", None)
    return None if separate is None else separate()


_SEPARATE_KEYS = ("prefix_k", "prefix_v", "prefix_k_global", "prefix_v_global", "prefix_normalization",
                  "prefix_scale")


def _separate_in_the_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict, backend: str) -> bool:
    """Whether the op computes the "exp" prefix itself (its `prefix_normalization="separate"`): always while an
    exporter traces (the export formulation, `core/static.py`, has it), else only where the backend that serves the
    call is the one that serves it without the prefix. A backend that declines the feature (the Triton kernels for
    now, the CUDA library) would otherwise hand the whole call to a slower one, or (named explicitly) fail: the
    prefix is then computed beside the op instead, with the same semantics, and the op serves the rest."""
    if is_exporting():
        return True
    with_prefix = serving_backend(check_inputs(q, k, v, **call), backend)
    plain = {key: value for key, value in call.items() if key not in _SEPARATE_KEYS}
    return with_prefix is not None and with_prefix == serving_backend(check_inputs(q, k, v, **plain), backend)


def _text_part(mask: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """`mask[:, slots:]` as one tensor object per mask (cached while `mask` lives, a copy so the cache holds no view
    of it), so every layer hands the op the same text masks and its global index is read back once per pass."""
    if mask is None:
        return None
    if torch.compiler.is_compiling() or is_exporting():
        return mask[:, slots:]
    return cached("text_after_slots", (mask,), lambda: mask[:, slots:].clone(), key=slots)


def _separate_self_attention(module: nn.Module, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, glob: torch.Tensor | None, pad: torch.Tensor | None, prefix,
                             spec: SeparatePrefix, backend: str, docs: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, N, H, D)`: the layer's attention with a separately normalised prefix (`prefix_attention.py`).

    Prefix-tuning: the layer's prefix keys/values, the same for local and global rows. Prefix-propagation
    (`prefix.slots = P`): the slots, positions `0..P-1`, leave the key set of every row; the op runs over the text
    (positions `P..`) with the slots' local projections as the prefix of local rows and their global projections as
    the prefix of global rows, and the slots' own `P` rows are computed beside it (`slot_rows`). `kernel="exp"` is the
    op's own separate softmax where its backend serves it (`_separate_in_the_op`); otherwise, and for "rbf" and
    "poly", the op runs without prefix keys (`A`) and `B` is added beside it. The global projections are applied in
    full (the global rows from the hidden states have no separate prefix).

    Packed documents (`docs`): prefix-tuning's keys are shared by every document, so the op gets the ids; the slots of
    prefix-propagation cannot be per document here (the op's prefix keys are shared by every row), so it raises.
    """
    b, n, c = hidden_states.shape
    h, d = module.num_heads, module.head_dim
    scale = d**-0.5
    dropout_p = float(module.dropout) if module.training else 0.0
    p = int(getattr(prefix, "slots", 0))
    if p and docs is not None:
        raise ValueError("prefix-propagation with prefix_attention='separate' does not support packed documents: the "
                         "slots leave the text's softmax as prefix keys the op shares with every document; pack with "
                         "prefix_attention='joint' or pass one document per row")
    qg = kg = vg = None
    if glob is not None:
        qg = _global_rows_projection(module.query_global, hidden_states, glob, pad).view(b, n, h, d)
        kg = module.key_global(hidden_states).view(b, n, h, d)
        vg = module.value_global(hidden_states).view(b, n, h, d)
    elif p:
        raise ValueError("prefix-propagation's slots are global tokens: the layer got no global attention mask")
    if p:
        local_prefix, global_prefix = (k[:, :p], v[:, :p]), (kg[:, :p], vg[:, :p])
        q_slots = qg[:, :p]
        text_glob, text_pad = _text_part(glob, p), _text_part(pad, p)
        q, k, v, qg, kg_text, vg_text = (t[:, p:] for t in (q, k, v, qg, kg, vg))
    else:
        local_prefix, global_prefix = prefix.key_values(q), None
        text_glob, text_pad, kg_text, vg_text = glob, pad, kg, vg
    call = dict(window=int(module.one_sided_attn_window_size), is_global=text_glob, key_padding_mask=text_pad,
                q_global=qg, k_global=kg_text, v_global=vg_text, softmax_scale=scale, dropout_p=dropout_p,
                document_ids=docs)
    fused = dict(prefix_k=local_prefix[0], prefix_v=local_prefix[1], prefix_normalization="separate",
                 prefix_scale=spec.scale)
    if global_prefix is not None:
        fused.update(prefix_k_global=global_prefix[0], prefix_v_global=global_prefix[1])
    if spec.kernel == "exp" and _separate_in_the_op(q, k, v, {**call, **fused}, backend):
        out = longformer_attention(q, k, v, **call, **fused, backend=backend)
    else:
        out = longformer_attention(q, k, v, **call, backend=backend)
        out = add_prefix_rows(out, q, local_prefix, spec, scale, dropout_p, q_global=qg, is_global=text_glob,
                              global_prefix=global_prefix, key_padding_mask=text_pad)
    if not p:
        return out
    slots = slot_rows(q_slots, kg_text, vg_text, text_pad, *global_prefix, spec, scale, dropout_p)
    return torch.cat([slots.to(out.dtype), out], dim=1)


def _direct_global_rows_index(module: nn.Module, glob: torch.Tensor | None, pad: torch.Tensor | None):
    """The op's compact global index `(idx, counts, G)` when the global rows come from the hidden states
    (`core/global_rows.py`), else `None`: it needs global tokens, an eager run (not traced by `torch.compile` or an
    exporter), `pays(G, D)` and plain `key_global` / `value_global` layers. The index is the op's own (same
    combined mask, same cache): one host read per forward pass for the whole model."""
    if glob is None or torch.compiler.is_compiling() or is_exporting():
        return None
    if not (_plain_linear(module.key_global) and _plain_linear(module.value_global)):
        return None
    index = global_index(glob if pad is None else global_without_padding(glob, pad))
    return index if pays(index[2], module.head_dim) else None


def _scale_heads(out: torch.Tensor, layer_head_mask: torch.Tensor | None) -> torch.Tensor:
    """`out (B, N, H, D)` times `layer_head_mask (H,)` per head: HF multiplies both probability matrices by the
    head's weight, which scales that head's output rows, local and global."""
    if layer_head_mask is None:
        return out
    return out * layer_head_mask.to(out.dtype).view(1, 1, -1, 1)


def _plain_linear(linear: nn.Module) -> bool:
    """Whether `linear` computes exactly `x @ weight.T + bias` from its own two parameters and nothing observes or
    changes the call: an `nn.Linear` (not a subclass or a wrapper: LoRA adapters, quantized layers) with no hook of
    its own (forward, forward pre-, backward, backward pre-) and no global module hook, so that its weight and bias
    may be used without calling it."""
    if type(linear) is not nn.Linear:
        return False
    own = (linear._forward_hooks, linear._forward_pre_hooks, linear._backward_hooks, linear._backward_pre_hooks)
    return not any(own) and not any(_global_module_hooks())


def _global_module_hooks() -> tuple[dict, ...]:
    """The hooks `torch.nn.modules.module.register_module_*_hook` install for every module."""
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return tuple(getattr(module_mod, name, {}) for name in names)


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
        is_global = global_without_padding(is_global, pad)
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
