"""Prefix-tuning (the paper's baseline): per-layer prefix keys/values that every query attends to inside its one
softmax (`PrefixTuning`, `apply_prefix_tuning`), or, with `prefix_attention="separate"`, normalised on their own by a
kernel and added with a learned scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hf.prefix_attention import SeparatePrefix
from .backbone import _Backbone
from .base import _install, _Prefix, _prepare, _shifted_positions, _WrappedForward, attention_options


class _LayerPrefix:
    """What a patched attention module holds for prefix-tuning: its prefix module and layer index."""

    slots = 0  # no position of the sequence is a prefix slot

    def __init__(self, prefix: PrefixTuning, layer: int):
        self.prefix = prefix
        self.layer = layer

    def separate(self) -> SeparatePrefix | None:
        """This layer's kernel and scale with `prefix_attention="separate"`; `None` with "joint"."""
        return self.prefix.separate(self.layer)

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(P, H, D)` prefix keys and values of this layer, in `like`'s dtype (dropout in training)."""
        m = self.prefix
        shape = (m.num_prefix, m.num_heads, m.hidden_size // m.num_heads)
        k = m.dropout(m.prefix_key[self.layer]).to(like.dtype).view(shape)
        v = m.dropout(m.prefix_value[self.layer]).to(like.dtype).view(shape)
        return k, v


class PrefixTuning(_Prefix):
    """Prefix-tuning: `prefix_key`, `prefix_value` `(L, P, C)`, seen by every query of layer `l`."""

    method = "tuning"

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None, init_std: float,
                 attention: dict | None = None):
        super().__init__(backbone, num_prefix, dropout, attention)
        shape = (self.num_layers, num_prefix, self.hidden_size)
        self.prefix_key = nn.Parameter(torch.randn(shape) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape) * init_std)
        self._add_attention_parameters()

    def shift_led_positions(self, module: nn.Module, args: tuple):
        """Pre-hook on the LED encoder's position embedding: start the text at position `P`."""
        if len(args) == 1:
            return (args[0], self.num_prefix)
        return None

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        self.warn_if_frozen()
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        src = ids if ids is not None else embeds
        if src is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        shape = tuple(src.shape[:2])
        if self.kind == "longformer":
            call["position_ids"] = _shifted_positions(
                ids, call.get("position_ids"), shape, self.num_prefix, self.padding_idx, src.device
            )
            self.check_length(shape[1], call["position_ids"])
        else:
            self.check_length(shape[1])
        # LED: `shift_led_positions` starts the (padded) text at position P.
        return wrapper.call_inner(call)


def apply_prefix_tuning(
    model: nn.Module,
    num_prefix: int = 8,
    dropout: float | None = None,
    backend: str = "auto",
    init_std: float = 0.02,
    *,
    prefix_attention: str = "joint",
    kernel: str | None = None,
    kernel_scale: str | None = None,
    kernel_scale_init: float | None = None,
    rbf_length_scale: float | None = None,
) -> PrefixTuning:
    """Add prefix-tuning to a Longformer / LED model in place, patch its attention, and freeze
    everything but the prefix and the task head.

    Args:
        model: `LongformerModel`, any `LongformerFor*`, `LEDModel`, `LEDFor*` (the prefix goes on the encoder).
        num_prefix: `P`, prefix keys/values per layer, seen by every (local and global) query.
        dropout: on the prefix keys/values; default the config's hidden dropout.
        backend: the attention backend, see `longformer_attention`.
        init_std: keys and values start as `N(0, init_std**2)`.
        prefix_attention: "joint" (the prefix keys in each row's one softmax) or "separate" (the paper's kernel
            attention: each row adds `prefix_scale[l] * B`, `B` its attention over the prefix alone, normalised by
            `kernel`; see `hf/prefix_attention.py`). The options below apply to "separate" only.
        kernel: "exp" (default: a softmax, the op's own "separate" mode), "rbf" (`exp(-|q' - k|^2 / (2 l^2))`) or
            "poly" (`(q' . k + c)^2`, `c` learned: `poly_offset (L,)`, starting at 1), with `q'` the scaled query.
        kernel_scale: "scalar" (default: `prefix_scale (L,)`) or "head" (`(L, H)`), a raw learned scale.
        kernel_scale_init: the scale's initial value (default 0.005).
        rbf_length_scale: "rbf"'s fixed `l` (default 64).

    Returns:
        The prefix module, registered as `model.prefix_tuning`; `prefix_key` / `prefix_value` are `(L, P, C)`.
    """
    options = attention_options(prefix_attention, kernel, kernel_scale, kernel_scale_init, rbf_length_scale)
    backbone = _prepare(model, backend)
    if backbone.hidden_size % backbone.num_heads:
        raise ValueError("hidden size must be a multiple of the number of heads")
    prefix = PrefixTuning(backbone, num_prefix, dropout, init_std, options)
    _install(model, backbone, prefix)
    for i, attn in enumerate(backbone.attentions):
        attn._prefix_kernels_prefix = _LayerPrefix(prefix, i)
    backbone.base.forward = _WrappedForward(prefix, backbone.base)
    if backbone.kind == "led":
        backbone.base.embed_positions.register_forward_pre_hook(prefix.shift_led_positions)
    return prefix
