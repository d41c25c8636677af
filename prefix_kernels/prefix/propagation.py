"""Prefix-propagation (the paper's method): `P` prefix slots prepended as global tokens, `prefix[l]` added to them
before each layer (`PrefixPropagation`, `apply_prefix_propagation`). With `prefix_attention="separate"` the slots
leave every row's softmax and are attended to on their own, by a kernel, added with a learned scale.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..hf.prefix_attention import SeparatePrefix
from .backbone import _Backbone
from .base import (
    _cat_front,
    _config_return_dict,
    _install,
    _Prefix,
    _prepare,
    _shifted_positions,
    _WrappedForward,
    attention_options,
)

# The prefix rows of the last base forward of a `pool_prefix` model, for its classifier (`_pool_prefix_hook`). A
# plain holder, not state of the prefix module: the classifier's hook then holds no reference to the module, so a
# copy of the classifier alone (PEFT's `modules_to_save` deep-copies the head) still finds the rows.
_POOLED: list[torch.Tensor | None] = [None]


def _pool_prefix_hook(module: nn.Module, args: tuple):
    """Classifier pre-hook: hand the head the prefix rows, so its `[:, 0]` pools prefix slot 0.

    The rows were kept by the base forward that ran just before; a direct call of the head (no such forward) gets
    its own input.
    """
    states, _POOLED[0] = _POOLED[0], None
    if states is None:
        return None
    return (states, *args[1:])


class _LayerSlots:
    """What a patched attention module holds for prefix-propagation with `prefix_attention="separate"`: the first
    `slots` positions of its sequence are the prefix slots, which leave every row's softmax (the text rows see them
    through `separate()`'s kernel, the slots' own rows are computed beside the op: `hf/self_attention.py`)."""

    def __init__(self, prefix: PrefixPropagation, layer: int):
        self.prefix = prefix
        self.layer = layer

    @property
    def slots(self) -> int:
        return self.prefix.num_prefix

    def key_values(self, like: torch.Tensor) -> None:
        """No prefix keys/values of its own: the slots' projections are the prefix."""
        return None

    def separate(self) -> SeparatePrefix | None:
        return self.prefix.separate(self.layer)


class PrefixPropagation(_Prefix):
    """Prefix-propagation: `prefix` `(L, P, C)`, added to the `P` global prefix slots before each layer."""

    method = "propagation"

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None, pool_prefix: bool, init_std: float,
                 attention: dict | None = None):
        super().__init__(backbone, num_prefix, dropout, attention)
        self.pool_prefix = bool(pool_prefix)
        self.prefix = nn.Parameter(torch.randn(self.num_layers, num_prefix, self.hidden_size) * init_std)
        self._add_attention_parameters()

    def config_record(self) -> dict:
        return {**super().config_record(), "pool_prefix": self.pool_prefix}

    def add_prefix(self, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        """Layer pre-hook: `h[:, :P] += dropout(prefix[layer])` (out of place, autograd-safe)."""
        p = self.num_prefix
        h = args[0] if args else kwargs["hidden_states"]
        add = self.dropout(self.prefix[layer]).to(h.dtype)
        h = torch.cat([h[:, :p] + add, h[:, p:]], dim=1)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _prepend(self, call: dict, embed_tokens: nn.Module) -> tuple[int, int]:
        """Prepend the `P` slots to the call's inputs in place; returns `(B, N)` of the user's input."""
        p = self.num_prefix
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None and ids is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        n_in = (ids if embeds is None else embeds).shape[1]
        if self.kind == "led":
            self.check_length(n_in)
        if embeds is None:
            embeds = embed_tokens(ids)
        b, n = embeds.shape[:2]
        dev = embeds.device
        call["input_ids"] = None
        # Zero word embedding at the prefix slots: HF's embedding layer adds positions (and token types).
        call["inputs_embeds"] = torch.cat([embeds.new_zeros(b, p, embeds.shape[-1]), embeds], dim=1)
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=dev)
        call["attention_mask"] = _cat_front(mask, torch.ones(b, p, dtype=mask.dtype, device=dev))
        glob = call.get("global_attention_mask")
        if glob is None:
            glob = torch.zeros(b, n, dtype=torch.long, device=dev)
        call["global_attention_mask"] = _cat_front(glob, torch.ones(b, p, dtype=glob.dtype, device=dev))
        if self.kind == "longformer":
            call["token_type_ids"] = _cat_front(call.get("token_type_ids"), torch.zeros(b, p, device=dev))
            text = _shifted_positions(ids, call.get("position_ids"), (b, n), p, self.padding_idx, dev)
            self.check_length(n, text)
            front = torch.arange(p, device=dev).unsqueeze(0).expand(b, p)
            call["position_ids"] = torch.cat([front, text], dim=1)
        # LED's encoder numbers positions 0.. itself, so the text lands at P.. without help.
        return b, n

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        self.warn_if_frozen()
        base, p = wrapper.base, self.num_prefix
        embed_tokens = base.embeddings.word_embeddings if self.kind == "longformer" else base.embed_tokens
        self._prepend(call, embed_tokens)
        want_dict = call.get("return_dict")
        want_dict = _config_return_dict(base.config) if want_dict is None else want_dict
        call["return_dict"] = True
        out = wrapper.call_inner(call)

        full = out.last_hidden_state
        if self.pool_prefix:
            _POOLED[0] = full[:, :p].contiguous()  # not a view: the full rows need not stay alive
        fields = {"last_hidden_state": full[:, p:]}
        if getattr(out, "hidden_states", None) is not None:
            fields["hidden_states"] = tuple(s[:, p:] for s in out.hidden_states)
        if getattr(out, "attentions", None) is not None:
            # (B, H, N, G + 2w + 1) per query row; the columns of the P global prefix keys stay.
            fields["attentions"] = tuple(a[:, :, p:] for a in out.attentions)
        if getattr(out, "global_attentions", None) is not None:
            # (B, H, N_padded, G) per key; HF leaves the window padding on, so keep the user's padded length.
            n = fields["last_hidden_state"].shape[1]
            window = base.config.attention_window
            window = window if isinstance(window, int) else max(window)
            padded = n + (window - n % window) % window
            fields["global_attentions"] = tuple(a[:, :, p : p + padded] for a in out.global_attentions)
        if self.kind == "longformer":
            pooler = base.pooler
            fields["pooler_output"] = pooler(fields["last_hidden_state"]) if pooler is not None else None
        result = type(out)(**fields)
        if want_dict:
            return result
        extras = tuple(fields.get(k) for k in ("hidden_states", "attentions", "global_attentions"))
        extras = tuple(x for x in extras if x is not None)
        if self.kind == "longformer":
            return (fields["last_hidden_state"], fields["pooler_output"], *extras)
        return (fields["last_hidden_state"], *extras)


def apply_prefix_propagation(
    model: nn.Module,
    num_prefix: int = 8,
    dropout: float | None = None,
    pool_prefix: bool = False,
    backend: str = "auto",
    init_std: float = 0.02,
    *,
    prefix_attention: str = "joint",
    kernel: str | None = None,
    kernel_scale: str | None = None,
    kernel_scale_init: float | None = None,
    rbf_length_scale: float | None = None,
) -> PrefixPropagation:
    """Add prefix-propagation to a Longformer / LED model in place, patch its attention, and freeze
    everything but the prefix and the task head.

    Args:
        model: `LongformerModel`, any `LongformerFor*`, `LEDModel`, `LEDFor*` (the prefix goes on the encoder).
        num_prefix: `P`, the number of prefix slots (global positions `0..P-1`).
        dropout: on `prefix[l]` before it is added; default the config's hidden dropout.
        pool_prefix: `LongformerForSequenceClassification` only: the head pools prefix slot 0 instead of `<s>`.
        backend: the attention backend, see `longformer_attention`.
        init_std: the prefix starts as `N(0, init_std**2)`.
        prefix_attention: "joint" (the slots are global tokens in every row's one softmax) or "separate" (the paper's
            kernel attention: the slots leave the key set of every row, the slots' own rows included, and each row
            adds `prefix_scale[l] * B`, `B` its attention over the slots alone, normalised by `kernel`; local rows
            see the slots through the local projections, global rows through the global ones; see
            `hf/prefix_attention.py`). The options below apply to "separate" only.
        kernel: "exp" (default: a softmax, the op's own "separate" mode), "rbf" (`exp(-|q' - k|^2 / (2 l^2))`) or
            "poly" (`(q' . k + c)^2`, `c` learned: `poly_offset (L,)`, starting at 1), with `q'` the scaled query.
        kernel_scale: "scalar" (default: `prefix_scale (L,)`) or "head" (`(L, H)`), a raw learned scale.
        kernel_scale_init: the scale's initial value (default 0.005).
        rbf_length_scale: "rbf"'s fixed `l` (default 64).

    Returns:
        The prefix module, registered as `model.prefix_propagation`; its `prefix` is `(L, P, C)`.
    """
    options = attention_options(prefix_attention, kernel, kernel_scale, kernel_scale_init, rbf_length_scale)
    backbone = _prepare(model, backend)
    if pool_prefix:
        from transformers.models.longformer.modeling_longformer import LongformerForSequenceClassification

        if not isinstance(model, LongformerForSequenceClassification):
            raise ValueError("pool_prefix is an option of LongformerForSequenceClassification only")
    prefix = PrefixPropagation(backbone, num_prefix, dropout, pool_prefix, init_std, options)
    _install(model, backbone, prefix)
    if options:
        for i, attn in enumerate(backbone.attentions):
            attn._prefix_kernels_prefix = _LayerSlots(prefix, i)
    backbone.base.forward = _WrappedForward(prefix, backbone.base)
    for i, layer in enumerate(backbone.layers):
        layer.register_forward_pre_hook(functools.partial(prefix.add_prefix, i), with_kwargs=True)
    if pool_prefix:
        model.classifier.register_forward_pre_hook(_pool_prefix_hook)
    return prefix
