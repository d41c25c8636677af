"""Packed documents: several documents in one row of a patched Longformer model, told apart by restarting positions.

A row's documents are read from its `position_ids`: among the row's real tokens (attention mask 1), a position not
greater than the one of the real token before it starts a new document; padding never does. Positions are numbered as
the model numbers them, RoBERTa-style, from `padding_idx + 1` (padding tokens hold `padding_idx`); a document that
starts at `padding_idx` or below (0-based numbering, as HF's collators write it without an offset) would read the
padding embedding, so a packed call with one raises `ValueError`.

`document_ids(position_ids, attention_mask, padding_idx)` computes the `(B, N)` ids (tensor ops only, no host read, so
`torch.compile` and the exporters trace it); the patched `LongformerModel` (`_PackedModel`, swapped in by
`patching.py`) computes them once per forward pass, pads them as HF pads the sequence to a multiple of the attention
window, and hands the same tensor to every patched self-attention module of the model, which passes it to the op as
its `document_ids` (windows and global tokens stop at document boundaries). Run eagerly, a call whose rows never
restart passes no ids at all (one document per row: nothing changes); traced, the ids are always passed.

A caller that already knows the documents (the prefix methods, which insert rows of their own) passes
`document_ids=` to the patched model's forward instead; `document_ids=False` turns the detection off for one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.tracing import is_exporting

__all__ = ["document_ids", "document_starts", "check_numbering"]


def _tracing() -> bool:
    return torch.compiler.is_compiling() or is_exporting()


def document_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`(B, N)` bool: the real tokens that start a document (each row's first real token, and every real token whose
    position is not greater than the previous real token's)."""
    b, n = position_ids.shape
    real = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    index = torch.arange(n, device=position_ids.device).expand(b, n)
    last_real = torch.where(real, index, -1).cummax(dim=1).values
    previous = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)
    before = position_ids.gather(1, previous.clamp(min=0))
    return real & ((previous < 0) | (position_ids <= before))


def document_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, N)` int64 document ids from restarting `position_ids` (see the module's docstring): the number of
    document starts up to each token, so every real token carries its document's id and padding the id of the
    document before it (padding is neither a row nor a key, whatever its id)."""
    return document_starts(position_ids, attention_mask).long().cumsum(dim=1)


def check_numbering(position_ids: torch.Tensor, starts: torch.Tensor, padding_idx: int) -> None:
    """`ValueError` when a document starts at `padding_idx` or below (one host read; eager calls only)."""
    low = starts & (position_ids <= padding_idx)
    if bool(low.any()):
        row, col = (int(i) for i in low.nonzero()[0])
        raise ValueError(
            f"position_ids restart at {int(position_ids[row, col])} (row {row}, token {col}): packed documents must "
            f"number their positions from padding_idx + 1 = {padding_idx + 1}, as the model numbers an unpacked "
            f"document (position {padding_idx} is the padding embedding); add {padding_idx + 1} to 0-based "
            "position_ids, e.g. those of DataCollatorWithFlattening")


def packed_document_ids(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                        padding_idx: int) -> torch.Tensor | None:
    """The document ids of a call, or `None` when it packs nothing: without `position_ids`, or (run eagerly) when no
    row restarts. Eagerly, a packed call whose numbering starts at `padding_idx` or below raises `ValueError`."""
    if position_ids is None:
        return None
    if position_ids.dim() != 2:
        return None  # e.g. multiple choice's (B, choices, N): flattened by the task model before the base model
    starts = document_starts(position_ids, attention_mask)
    if _tracing():
        return starts.long().cumsum(dim=1)
    if not bool((starts.sum(dim=1) > 1).any()):
        return None
    check_numbering(position_ids, starts, padding_idx)
    return starts.long().cumsum(dim=1)


def pad_to_window(ids: torch.Tensor, config) -> torch.Tensor:
    """`ids (B, N)` padded at the end as HF pads a Longformer sequence to a multiple of the attention window (the
    padding tokens repeat the last id: padding carries any id)."""
    window = config.attention_window
    window = window if isinstance(window, int) else max(window)
    extra = (window - ids.shape[1] % window) % window
    return F.pad(ids, (0, extra), mode="replicate") if extra else ids


class _PackedModel:
    """Mixin placed in front of HF's `LongformerModel`: the same `forward`, plus the packed documents of the call
    (`document_ids=` given, or read from restarting `position_ids`) handed to every patched self-attention module
    for the duration of the call."""

    _hf_class: type
    _hf_arg_names: tuple[str, ...]

    def forward(self, *args, document_ids=None, **kwargs):
        from .self_attention import _FusedSelfAttention

        if document_ids is False:
            return super().forward(*args, **kwargs)
        call = dict(zip(self._hf_arg_names[: len(args)], args, strict=True))
        call.update(kwargs)
        ids = document_ids
        if ids is None:
            mask = call.get("attention_mask")
            padding_idx = getattr(self.embeddings, "padding_idx", self.config.pad_token_id)
            ids = packed_document_ids(call.get("position_ids"), mask, padding_idx)
        if ids is None:
            return super().forward(*args, **kwargs)
        wants_maps = call.get("output_attentions")
        if wants_maps is None:
            wants_maps = getattr(self.config, "output_attentions", False)
        if wants_maps:
            raise ValueError("output_attentions=True is not supported with packed documents (restarting "
                             "position_ids): HF's attention layouts have no document boundaries")
        ids = pad_to_window(ids, self.config)
        modules = [m for m in self.modules() if isinstance(m, _FusedSelfAttention)]
        for module in modules:
            module._prefix_kernels_documents = ids
        try:
            return super().forward(*args, **kwargs)
        finally:
            for module in modules:
                module._prefix_kernels_documents = None
