"""Prefix-propagation and prefix-tuning on Hugging Face Longformer and LED models.

Both work by wrapping, not by copying HF's modeling code:

* propagation: the base model's `forward` (`LongformerModel`, or the `LEDEncoder` of an LED model) is wrapped
  so that `P` prefix slots are prepended as real positions `0..P-1`, marked global, with a zero word embedding
  (so HF's own embedding layer gives `LayerNorm(position_embeddings[i] + token_type_embeddings[0])` there) and
  the text positions shifted by `P`; a forward pre-hook on every layer adds `dropout(prefix[l])` to the prefix
  rows; the wrapper strips the prefix rows from every output again, so heads and output fields keep their
  shapes. The prefix slots are ordinary global tokens to the attention op.
* tuning: each patched self-attention module gets its layer's `prefix_key` / `prefix_value`, which reach the
  op as `prefix_k` / `prefix_v`; the text position ids are shifted by `P` (HF's `past_key_values_length`
  convention). No token becomes global because of the prefix.

The prefix module is registered on the model (`model.prefix_propagation` / `model.prefix_tuning`), so it is in
the state dict and moves with `.to()`; the wrapper and hooks reach it through plain (non-module) references,
which `copy.deepcopy` maps onto the copy's prefix.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .patching import PREFIX_CONFIG_KEY, patch_longformer, restoring_prefix

__all__ = [
    "PrefixPropagation",
    "PrefixTuning",
    "apply_prefix_propagation",
    "apply_prefix_tuning",
    "save_prefix",
    "load_prefix",
    "from_pretrained_with_prefix",
]

_ATTRS = {"propagation": "prefix_propagation", "tuning": "prefix_tuning"}


# ------------------------------------------------------------------------------------------------------------
# Finding the backbone
# ------------------------------------------------------------------------------------------------------------


class _Backbone:
    """What the prefixes need to know about a model: its base module, layers, attention modules and sizes."""

    def __init__(self, model: nn.Module):
        from transformers.models.longformer.modeling_longformer import LongformerModel

        from .patching import _LED, _attention_modules, _hf_classes

        # HF's own class: while the classes are patched, the module-level name is the patched subclass.
        LEDEncoder = _hf_classes("encoder").get(f"{_LED}:LEDEncoder", ())  # noqa: N806
        try:
            from transformers.models.led.modeling_led import LEDModel
        except ImportError:  # an install without LED
            LEDModel = ()  # noqa: N806

        base = next((m for m in model.modules() if isinstance(m, (LongformerModel, LEDEncoder))), None)
        if base is None:
            raise ValueError(f"{type(model).__name__} is not a Longformer or LED model")
        self.kind = "longformer" if isinstance(base, LongformerModel) else "led"
        self.base = base
        config = base.config
        self.config = config
        if self.kind == "longformer":
            self.layers = base.encoder.layer
            self.hidden_size = config.hidden_size
            self.hidden_dropout = config.hidden_dropout_prob
            self.padding_idx = base.embeddings.padding_idx
            # The pooler of a task model (multiple choice) is part of its head; a bare LongformerModel trains
            # only the prefix.
            frozen = [model] if model is base else [base.embeddings, base.encoder]
        else:
            self.layers = base.layers
            self.hidden_size = config.d_model
            self.hidden_dropout = config.dropout
            self.padding_idx = base.padding_idx
            led = next((m for m in model.modules() if isinstance(m, LEDModel)), None)
            frozen = [led if led is not None else base]
        self.num_layers = len(self.layers)
        if self.kind == "longformer":
            self.positions = base.embeddings.position_embeddings.num_embeddings
        else:
            self.positions = base.embed_positions.num_embeddings
        window = config.attention_window
        self.window = window if isinstance(window, int) else max(window)
        # The module whose output is the first layer's input, and those that carry HF's checkpointing flag
        # (the encoder in older transformers, every layer in newer ones).
        if self.kind == "longformer":
            self.embedding_output, self.checkpointed = base.embeddings, [base.encoder, *self.layers]
        else:
            self.embedding_output, self.checkpointed = base.layernorm_embedding, [base, *self.layers]
        self.num_heads = config.encoder_attention_heads if self.kind == "led" else config.num_attention_heads
        self.frozen_ids = {id(p) for m in frozen for p in m.parameters()}
        self.attentions = []
        for layer in self.layers:
            found = _attention_modules(layer)
            if len(found) != 1:
                raise ValueError(f"expected one self-attention per layer, found {len(found)}")
            self.attentions.append(found[0])


def _forward_arg_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(type(module).forward).parameters)[1:]


def _shifted_positions(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    shape: tuple[int, int],
    num_prefix: int,
    padding_idx: int,
    device: torch.device,
) -> torch.Tensor:
    """Longformer text position ids shifted by `P`: `(B, N)` long, padding tokens keep `padding_idx`.

    Given ids are shifted where they are not `padding_idx`, so passing HF's default positions explicitly gives
    the same result as passing none.
    """
    if position_ids is not None:
        return torch.where(position_ids == padding_idx, position_ids, position_ids + num_prefix)
    if input_ids is not None:
        # HF's `create_position_ids_from_input_ids` with `past_key_values_length = P`.
        mask = input_ids.ne(padding_idx).int()
        return ((torch.cumsum(mask, dim=1).type_as(mask) + num_prefix) * mask).long() + padding_idx
    b, n = shape
    start = padding_idx + 1 + num_prefix
    return torch.arange(start, start + n, dtype=torch.long, device=device).unsqueeze(0).expand(b, n)


def _config_return_dict(config) -> bool:
    return bool(getattr(config, "return_dict", True))


# ------------------------------------------------------------------------------------------------------------
# The wrapped base forward
# ------------------------------------------------------------------------------------------------------------


class _WrappedForward:
    """Stands in for `base.forward` (an instance attribute); shows the original signature to `inspect`
    (HF `Trainer` reads it to pick dataset columns) and hands the bound call to the prefix module.
    """

    def __init__(self, prefix: _Prefix, base: nn.Module):
        self.prefix = prefix
        self.base = base
        self.inner = base.__dict__.get("forward")  # e.g. an accelerate hook that was already there
        self.arg_names = _forward_arg_names(base)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner if self.inner is not None else type(self.base).forward.__get__(self.base))

    def call_inner(self, call: dict) -> object:
        if self.inner is not None:
            return self.inner(**call)
        return type(self.base).forward(self.base, **call)

    def __call__(self, *args, **kwargs):
        call = dict(zip(self.arg_names, args, strict=False))
        call.update(kwargs)
        return self.prefix._base_forward(self, call)


def _cat_front(t: torch.Tensor | None, front: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else torch.cat([front.to(t.dtype), t], dim=1)


class _Prefix(nn.Module):
    """Shared plumbing of the two prefix modules."""

    method: str

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None):
        super().__init__()
        if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 1:
            raise ValueError(f"num_prefix must be a positive int, got {num_prefix!r}")
        p = backbone.hidden_dropout if dropout is None else float(dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_prefix = num_prefix
        self.num_layers = backbone.num_layers
        self.hidden_size = backbone.hidden_size
        self.num_heads = backbone.num_heads
        self.kind = backbone.kind
        self.padding_idx = backbone.padding_idx
        self.positions = backbone.positions
        self.window = backbone.window
        self.dropout = nn.Dropout(p)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_prefix={self.num_prefix}, num_layers={self.num_layers}"

    @property
    def max_length(self) -> int:
        """The longest input (in tokens, padding included) the model's position table takes with this prefix.

        Longformer numbers text positions from `padding_idx + 1 + P`. LED numbers the positions of the sequence
        after Hugging Face padded it to a multiple of the window `W`: prefix-propagation pads `P + N`,
        prefix-tuning starts the padded text at position `P`.
        """
        p, w = self.num_prefix, self.window
        if self.kind == "longformer":
            return self.positions - self.padding_idx - 1 - p
        if self.method == "propagation":
            return self.positions // w * w - p
        return (self.positions - p) // w * w

    def check_length(self, n: int) -> None:
        """`ValueError` naming the limit before an input of `n` tokens reaches the position embedding."""
        if n <= self.max_length:
            return
        if self.kind == "longformer":
            how = (f"the position table has max_position_embeddings={self.positions} rows, text positions start at "
                   f"padding_idx + 1 + P = {self.padding_idx + 1 + self.num_prefix}")
        else:
            what = "the P prefix slots and the input together" if self.method == "propagation" else "the input"
            how = (f"the position table has max_encoder_position_embeddings={self.positions} rows, and Hugging Face "
                   f"pads {what} to a multiple of the attention window ({self.window}) before numbering positions"
                   f"{'' if self.method == 'propagation' else f' from P = {self.num_prefix}'}")
        raise ValueError(
            f"input of {n} tokens is too long for prefix-{self.method} with P={self.num_prefix} prefix slots: the "
            f"limit is {self.max_length} tokens ({how})"
        )

    def config_record(self) -> dict:
        """What `from_pretrained_with_prefix` needs to rebuild this prefix (stored in `config.prefix_kernels`)."""
        return {"method": self.method, "num_prefix": self.num_prefix, "dropout": self.dropout.p}

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        raise NotImplementedError

    def require_input_grads(self, checkpointed: list[nn.Module], module: nn.Module, args: tuple, output):
        """Embedding forward hook: under reentrant gradient checkpointing (transformers 4.x's default) a layer
        whose inputs need no gradient returns outputs without one, and the frozen backbone's embeddings need
        none, so the prefix used inside the layers would get no gradient. Mark the embeddings as needing one.
        """
        if (
            torch.is_grad_enabled()
            and not output.requires_grad
            and any(getattr(m, "gradient_checkpointing", False) and m.training for m in checkpointed)
        ):
            output.requires_grad_(True)
        return output


class PrefixPropagation(_Prefix):
    """Prefix-propagation: `prefix` `(L, P, C)`, added to the `P` global prefix slots before each layer."""

    method = "propagation"

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None, pool_prefix: bool, init_std: float):
        super().__init__(backbone, num_prefix, dropout)
        self.pool_prefix = bool(pool_prefix)
        self.prefix = nn.Parameter(torch.randn(self.num_layers, num_prefix, self.hidden_size) * init_std)
        self._prefix_states: torch.Tensor | None = None  # last forward's prefix rows, for `pool_prefix`

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

    def pool_prefix_hook(self, module: nn.Module, args: tuple):
        """Classifier pre-hook: hand the head the prefix rows, so its `[:, 0]` pools prefix slot 0.

        The rows were kept by the base forward that ran just before; a direct call of the head (no such
        forward) gets its own input.
        """
        states, self._prefix_states = self._prefix_states, None
        if states is None:
            return None
        return (states, *args[1:])

    def _prepend(self, call: dict, embed_tokens: nn.Module) -> tuple[int, int]:
        """Prepend the `P` slots to the call's inputs in place; returns `(B, N)` of the user's input."""
        p = self.num_prefix
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None and ids is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        self.check_length((ids if embeds is None else embeds).shape[1])
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
            front = torch.arange(p, device=dev).unsqueeze(0).expand(b, p)
            call["position_ids"] = torch.cat([front, text], dim=1)
        # LED's encoder numbers positions 0.. itself, so the text lands at P.. without help.
        return b, n

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        base, p = wrapper.base, self.num_prefix
        embed_tokens = base.embeddings.word_embeddings if self.kind == "longformer" else base.embed_tokens
        self._prepend(call, embed_tokens)
        want_dict = call.get("return_dict")
        want_dict = _config_return_dict(base.config) if want_dict is None else want_dict
        call["return_dict"] = True
        out = wrapper.call_inner(call)

        full = out.last_hidden_state
        if self.pool_prefix:
            self._prefix_states = full[:, :p].contiguous()  # not a view: the full rows need not stay alive
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


class _LayerPrefix:
    """What a patched attention module holds for prefix-tuning: its prefix module and layer index."""

    def __init__(self, prefix: PrefixTuning, layer: int):
        self.prefix = prefix
        self.layer = layer

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

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None, init_std: float):
        super().__init__(backbone, num_prefix, dropout)
        shape = (self.num_layers, num_prefix, self.hidden_size)
        self.prefix_key = nn.Parameter(torch.randn(shape) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape) * init_std)

    def shift_led_positions(self, module: nn.Module, args: tuple):
        """Pre-hook on the LED encoder's position embedding: start the text at position `P`."""
        if len(args) == 1:
            return (args[0], self.num_prefix)
        return None

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        src = ids if ids is not None else embeds
        if src is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        shape = tuple(src.shape[:2])
        self.check_length(shape[1])
        if self.kind == "longformer":
            call["position_ids"] = _shifted_positions(
                ids, call.get("position_ids"), shape, self.num_prefix, self.padding_idx, src.device
            )
        # LED: `shift_led_positions` starts the (padded) text at position P.
        return wrapper.call_inner(call)


# ------------------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------------------


def _existing_prefix(model: nn.Module) -> _Prefix | None:
    return next((m for m in model.modules() if isinstance(m, _Prefix)), None)


def _freeze(model: nn.Module, backbone: _Backbone, prefix: _Prefix) -> None:
    """Everything trains except the backbone (and what is tied to it); the prefix trains."""
    for p in model.parameters():
        p.requires_grad_(id(p) not in backbone.frozen_ids)
    for p in prefix.parameters():
        p.requires_grad_(True)


def _install(model: nn.Module, backbone: _Backbone, prefix: _Prefix) -> None:
    """Register the prefix on the model, hook the embeddings for checkpointing, freeze the backbone."""
    ref = next(backbone.base.parameters())
    prefix.to(device=ref.device, dtype=ref.dtype)
    prefix.train(model.training)  # a fresh module trains; its dropout must follow the model's mode
    model.add_module(_ATTRS[prefix.method], prefix)
    # Saved in config.json by save_pretrained / Trainer, so `from_pretrained_with_prefix` can rebuild the prefix
    # and a plain `from_pretrained` can be told what it dropped.
    setattr(backbone.config, PREFIX_CONFIG_KEY, prefix.config_record())
    hook = functools.partial(prefix.require_input_grads, backbone.checkpointed)
    backbone.embedding_output.register_forward_hook(hook)
    _freeze(model, backbone, prefix)


def _prepare(model: nn.Module, backend: str) -> _Backbone:
    if _existing_prefix(model) is not None:
        raise ValueError("this model already has a prefix; build a fresh model to apply another")
    backbone = _Backbone(model)
    patch_longformer(model, backend)
    return backbone


def apply_prefix_propagation(
    model: nn.Module,
    num_prefix: int = 8,
    dropout: float | None = None,
    pool_prefix: bool = False,
    backend: str = "auto",
    init_std: float = 0.02,
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

    Returns:
        The prefix module, registered as `model.prefix_propagation`; its `prefix` is `(L, P, C)`.
    """
    backbone = _prepare(model, backend)
    if pool_prefix:
        from transformers.models.longformer.modeling_longformer import LongformerForSequenceClassification

        if not isinstance(model, LongformerForSequenceClassification):
            raise ValueError("pool_prefix is an option of LongformerForSequenceClassification only")
    prefix = PrefixPropagation(backbone, num_prefix, dropout, pool_prefix, init_std)
    _install(model, backbone, prefix)
    backbone.base.forward = _WrappedForward(prefix, backbone.base)
    for i, layer in enumerate(backbone.layers):
        layer.register_forward_pre_hook(functools.partial(prefix.add_prefix, i), with_kwargs=True)
    if pool_prefix:
        model.classifier.register_forward_pre_hook(prefix.pool_prefix_hook)
    return prefix


def apply_prefix_tuning(
    model: nn.Module,
    num_prefix: int = 8,
    dropout: float | None = None,
    backend: str = "auto",
    init_std: float = 0.02,
) -> PrefixTuning:
    """Add prefix-tuning to a Longformer / LED model in place, patch its attention, and freeze
    everything but the prefix and the task head.

    Args:
        model: `LongformerModel`, any `LongformerFor*`, `LEDModel`, `LEDFor*` (the prefix goes on the encoder).
        num_prefix: `P`, prefix keys/values per layer, seen by every (local and global) query.
        dropout: on the prefix keys/values; default the config's hidden dropout.
        backend: the attention backend, see `longformer_attention`.
        init_std: keys and values start as `N(0, init_std**2)`.

    Returns:
        The prefix module, registered as `model.prefix_tuning`; `prefix_key` / `prefix_value` are `(L, P, C)`.
    """
    backbone = _prepare(model, backend)
    if backbone.hidden_size % backbone.num_heads:
        raise ValueError("hidden size must be a multiple of the number of heads")
    prefix = PrefixTuning(backbone, num_prefix, dropout, init_std)
    _install(model, backbone, prefix)
    for i, attn in enumerate(backbone.attentions):
        attn._prefix_kernels_prefix = _LayerPrefix(prefix, i)
    backbone.base.forward = _WrappedForward(prefix, backbone.base)
    if backbone.kind == "led":
        backbone.base.embed_positions.register_forward_pre_hook(prefix.shift_led_positions)
    return prefix


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
    save_file(tensors, str(path), metadata=metadata)


def load_prefix(model: nn.Module, path, backend: str = "auto", strict: bool = True) -> _Prefix:
    """Load what `save_prefix` wrote into `model`.

    A model without a prefix gets one first (method and `P` from the file, with `backend`). With `strict`, the
    file must hold exactly the model's trainable parameters. Returns the prefix module.
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
            raise ValueError(f"{path}: no prefix method in the file's metadata; apply the prefix first")
        num_prefix = int(metadata["num_prefix"])
        if method == "propagation":
            pool = metadata.get("pool_prefix") == "True"
            prefix = apply_prefix_propagation(model, num_prefix, pool_prefix=pool, backend=backend)
        else:
            prefix = apply_prefix_tuning(model, num_prefix, backend=backend)
    elif metadata.get("method", prefix.method) != prefix.method:
        raise ValueError(f"{path} holds a prefix-{metadata['method']} prefix, the model has prefix-{prefix.method}")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if unknown or (strict and missing):
        raise ValueError(f"{path} does not match the model: unknown {unknown}, missing {missing}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} in {path}, {tuple(params[name].shape)} in the model")
            params[name].copy_(t)
    return prefix


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
    `prefix_kernels` entry (written by `apply_prefix_*`) says which prefix the model had; that prefix is applied
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
    with restoring_prefix():
        if record["method"] == "propagation":
            prefix = apply_prefix_propagation(model, record["num_prefix"], dropout=record.get("dropout"),
                                              pool_prefix=bool(record.get("pool_prefix", False)), backend=backend)
        else:
            prefix = apply_prefix_tuning(model, record["num_prefix"], dropout=record.get("dropout"), backend=backend)
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
        import warnings

        warnings.warn(f"loading {path}: weights newly initialized {not_found}, weights not used {unexpected}",
                      UserWarning, stacklevel=2)
    return model
