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

import inspect

import torch
import torch.nn.functional as F

from ..core.tracing import is_exporting

__all__ = ["document_ids", "document_starts", "check_numbering", "PackingCollator", "DocumentClassifier"]


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

    def __init_subclass__(cls, **kwargs):
        """The patched class shows HF's signature plus `document_ids` (HF's `Trainer` and the prefix methods bind
        calls by the base model's signature)."""
        super().__init_subclass__(**kwargs)
        hf = cls.__dict__.get("_hf_class")
        if hf is None:
            return

        def forward(self, *args, **kwargs):
            return _PackedModel.forward(self, *args, **kwargs)

        signature = inspect.signature(hf.forward)
        params = list(signature.parameters.values())
        extra = inspect.Parameter("document_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        last = len(params) - (params[-1].kind == inspect.Parameter.VAR_KEYWORD)
        forward.__signature__ = signature.replace(parameters=[*params[:last], extra, *params[last:]])
        forward.__doc__ = hf.forward.__doc__
        cls.forward = forward

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
        if not is_exporting():
            # As HF pads the sequence. While an exporter traces, the patched model pads nothing (`patching.py`).
            ids = pad_to_window(ids, self.config)
        modules = [m for m in self.modules() if isinstance(m, _FusedSelfAttention)]
        for module in modules:
            module._prefix_kernels_documents = ids
        try:
            return super().forward(*args, **kwargs)
        finally:
            for module in modules:
                module._prefix_kernels_documents = None


class PackingCollator:
    """Packs tokenized documents into rows of at most `max_tokens` tokens (first-fit, in the order given), for a
    patched Longformer model.

    Args:
        max_tokens: the most tokens in a row (a longer document raises `ValueError`).
        pad_token_id: the token id of padding (and the model's `padding_idx`, unless `padding_idx` is given).
        padding_idx: the position of padding: each document's positions run from `padding_idx + 1`, as the model
            numbers an unpacked document (RoBERTa-style); padding holds `padding_idx`.
        pad_to_multiple_of: rows are padded to a multiple of it (e.g. the attention window `2w`; HF pads to it
            inside the model otherwise).
        global_first_token: mark each document's first token global (ignored for a document that brings its own
            `global_attention_mask`).

    Each feature is a mapping with `input_ids` (a list or 1-D tensor), and optionally `global_attention_mask` (per
    token) and `labels` or `label`: a number per document (sequence classification) or a list per token (token
    classification, -100 at padding). Returns tensors: `input_ids`, `attention_mask`, `global_attention_mask`,
    `position_ids` `(R, L)`, `labels` (`(num_docs,)` in the features' order, or `(R, L)` per token) when the
    features have them, and the per-document index `document_index` `(num_docs, 2)` (row, first token) with
    `document_lengths` `(num_docs,)`, both in the features' order.
    """

    def __init__(self, max_tokens: int, pad_token_id: int = 1, padding_idx: int | None = None,
                 pad_to_multiple_of: int | None = None, global_first_token: bool = True):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.max_tokens = max_tokens
        self.pad_token_id = int(pad_token_id)
        self.padding_idx = self.pad_token_id if padding_idx is None else int(padding_idx)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.global_first_token = bool(global_first_token)

    @staticmethod
    def _tokens(value) -> list:
        return value.tolist() if isinstance(value, torch.Tensor) else list(value)

    def pack(self, lengths: list[int]) -> list[tuple[int, int]]:
        """`(row, start)` of each document of `lengths`, first-fit."""
        used: list[int] = []
        places = []
        for i, n in enumerate(lengths):
            if n < 1:
                raise ValueError(f"features[{i}]['input_ids'] is empty: every document needs a token")
            if n > self.max_tokens:
                raise ValueError(f"features[{i}] has {n} tokens, more than max_tokens={self.max_tokens}: truncate "
                                 "it or raise max_tokens")
            row = next((r for r, u in enumerate(used) if u + n <= self.max_tokens), len(used))
            if row == len(used):
                used.append(0)
            places.append((row, used[row]))
            used[row] += n
        return places

    def __call__(self, features: list) -> dict:
        if not features:
            raise ValueError("features is empty: nothing to pack")
        docs = [self._tokens(f["input_ids"]) for f in features]
        places = self.pack([len(d) for d in docs])
        rows = 1 + max(r for r, _ in places)
        length = max(s + len(d) for (_, s), d in zip(places, docs, strict=True))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(rows, length, dtype=torch.long)
        glob = torch.zeros(rows, length, dtype=torch.long)
        pos = torch.full((rows, length), self.padding_idx, dtype=torch.long)
        label_key = next((k for k in ("labels", "label") if k in features[0]), None)
        token_labels = label_key is not None and not isinstance(features[0][label_key], (int, float)) and (
            not isinstance(features[0][label_key], torch.Tensor) or features[0][label_key].dim() > 0)
        labels = torch.full((rows, length), -100, dtype=torch.long) if token_labels else []
        for f, d, (r, s) in zip(features, docs, places, strict=True):
            n = len(d)
            ids[r, s : s + n] = torch.tensor(d, dtype=torch.long)
            mask[r, s : s + n] = 1
            pos[r, s : s + n] = torch.arange(self.padding_idx + 1, self.padding_idx + 1 + n)
            if f.get("global_attention_mask") is not None:
                glob[r, s : s + n] = torch.tensor(self._tokens(f["global_attention_mask"]), dtype=torch.long)
            elif self.global_first_token:
                glob[r, s] = 1
            if label_key is not None:
                if token_labels:
                    labels[r, s : s + n] = torch.tensor(self._tokens(f[label_key]), dtype=torch.long)
                else:
                    labels.append(f[label_key])
        out = {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob, "position_ids": pos,
               "document_index": torch.tensor(places, dtype=torch.long).view(-1, 2),
               "document_lengths": torch.tensor([len(d) for d in docs], dtype=torch.long)}
        if label_key is not None:
            out["labels"] = labels if token_labels else torch.tensor(labels)
        return out


class DocumentClassifier(torch.nn.Module):
    """One logit row per packed document: a `LongformerForSequenceClassification`'s own classifier applied to each
    document's first token, for a `Trainer` with per-document labels.

    `forward` takes the collator's output (`PackingCollator`): the model's inputs, `document_index (num_docs, 2)`
    (row, first token) and `labels (num_docs,)`; without `document_index` each row is one document (its first
    token), as the model itself classifies. The loss follows the model's `config.problem_type` as HF's head does.
    The wrapped model is `self.model` (its parameters, state-dict keys under `model.`).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        base = getattr(model, "longformer", None)
        if base is None or not hasattr(model, "classifier"):
            raise ValueError(f"model must be a LongformerForSequenceClassification, got {type(model).__name__} (LED "
                             "does not take packed documents: its encoder has no position_ids)")
        if getattr(getattr(model, "prefix_propagation", None), "pool_prefix", False):
            raise ValueError("pool_prefix pools each row's prefix slot 0, not each document's: apply prefix-"
                             "propagation without pool_prefix to classify packed documents")
        self.model = model
        self.config = model.config

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, position_ids=None,
                token_type_ids=None, inputs_embeds=None, document_index=None, labels=None, document_lengths=None,
                return_dict=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.model.longformer(input_ids=input_ids, attention_mask=attention_mask,
                                    global_attention_mask=global_attention_mask, position_ids=position_ids,
                                    token_type_ids=token_type_ids, inputs_embeds=inputs_embeds, return_dict=True)
        states = out.last_hidden_state
        if document_index is None:
            first = states[:, :1]
        else:
            document_index = document_index.to(states.device).long()
            first = states[document_index[:, 0], document_index[:, 1]][:, None]
        logits = self.model.classifier(first)
        loss = None if labels is None else self._loss(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        num_labels = self.config.num_labels
        kind = self.config.problem_type
        if kind is None:
            if num_labels == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        if kind == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
        if kind == "single_label_classification":
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
