"""What prefix-propagation (`propagation.py`) and prefix-tuning (`tuning.py`) share on Hugging Face Longformer and
LED models.

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

With `prefix_attention="separate"` (the paper's kernel-attention study, `hf/prefix_attention.py`) the prefix leaves
every row's softmax: it is normalised on its own by a kernel ("exp", "rbf", "poly") and added with a learned scale
per layer (`prefix_scale`, `(L,)` or `(L, H)`; "poly" also learns an offset per layer, `poly_offset (L,)`). Each
patched self-attention module then gets a per-layer object (`_LayerPrefix` for tuning, `_LayerSlots` for
propagation) whose `separate()` hands it the layer's kernel and scale.

The prefix module is registered on the model (`model.prefix_propagation` / `model.prefix_tuning`), so it is in
the state dict and moves with `.to()`; the wrapper and hooks reach it through plain (non-module) references,
which `copy.deepcopy` maps onto the copy's prefix.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
from torch import nn

from ..core.tracing import is_exporting
from ..hf.patching import patch_longformer
from ..hf.prefix_attention import KERNELS, SeparatePrefix
from .backbone import _Backbone

# The config attribute `apply_prefix_*` writes (saved in config.json by `save_pretrained`), and the model attribute
# each method's prefix module is registered under.
PREFIX_CONFIG_KEY = "prefix_kernels"
_ATTRS = {"propagation": "prefix_propagation", "tuning": "prefix_tuning"}

# The options of a separately normalised prefix, as `apply_prefix_*` takes them (and the config record and
# `save_prefix`'s metadata keep them), with their defaults under `prefix_attention="separate"`.
SEPARATE_DEFAULTS = {"kernel": "exp", "kernel_scale": "scalar", "kernel_scale_init": 0.005}
RBF_LENGTH_SCALE = 64.0
ATTENTION_OPTIONS = ("prefix_attention", "kernel", "kernel_scale", "kernel_scale_init", "rbf_length_scale")


def attention_options(prefix_attention: str = "joint", kernel: str | None = None, kernel_scale: str | None = None,
                      kernel_scale_init: float | None = None, rbf_length_scale: float | None = None) -> dict:
    """The checked options of how the prefix enters the attention, with the defaults filled in: `{}` for "joint"
    (the one softmax, as before these options existed); for "separate" every option. A `ValueError` names the
    argument that is unknown, out of range, or given where it has no meaning."""
    if prefix_attention not in ("joint", "separate"):
        raise ValueError(f"prefix_attention must be 'joint' or 'separate', got {prefix_attention!r}")
    given = {"kernel": kernel, "kernel_scale": kernel_scale, "kernel_scale_init": kernel_scale_init,
             "rbf_length_scale": rbf_length_scale}
    given = {name: value for name, value in given.items() if value is not None}
    if prefix_attention == "joint":
        if given:
            raise ValueError(f"{', '.join(given)} only apply with prefix_attention='separate' (the prefix normalised "
                             "on its own); with 'joint' the prefix shares each row's softmax")
        return {}
    options = {"prefix_attention": "separate", **SEPARATE_DEFAULTS, **given}
    if options["kernel"] not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {options['kernel']!r}")
    if options["kernel_scale"] not in ("scalar", "head"):
        raise ValueError(f"kernel_scale must be 'scalar' (one per layer) or 'head' (one per layer and head), got "
                         f"{options['kernel_scale']!r}")
    init = options["kernel_scale_init"]
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
        raise ValueError(f"kernel_scale_init must be a finite number, got {init!r}")
    options["kernel_scale_init"] = float(init)
    if options["kernel"] == "rbf":
        length = options.setdefault("rbf_length_scale", RBF_LENGTH_SCALE)
        if isinstance(length, bool) or not isinstance(length, (int, float)) or not 0 < length < math.inf:
            raise ValueError(f"rbf_length_scale must be a positive finite number, got {length!r}")
        options["rbf_length_scale"] = float(length)
    elif "rbf_length_scale" in options:
        raise ValueError(f"rbf_length_scale applies to kernel='rbf' only, got kernel={options['kernel']!r}")
    return options


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
        call = dict(zip(self.arg_names[: len(args)], args, strict=True))
        call.update(kwargs)
        return self.prefix._base_forward(self, call)


def _cat_front(t: torch.Tensor | None, front: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else torch.cat([front.to(t.dtype), t], dim=1)


class _Prefix(nn.Module):
    """Shared plumbing of the two prefix modules."""

    method: str

    def __init__(self, backbone: _Backbone, num_prefix: int, dropout: float | None, attention: dict | None = None):
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
        self._warned_frozen = False
        self._attention = dict(attention or {})

    def _add_attention_parameters(self) -> None:
        """With `prefix_attention="separate"`: `prefix_scale`, one raw scale per layer (`(L,)`, or `(L, H)` with
        `kernel_scale="head"`) at `kernel_scale_init`, and for "poly" `poly_offset (L,)`, its offset `c`, at 1."""
        if not self._attention:
            return
        shape = (self.num_layers,) if self.kernel_scale == "scalar" else (self.num_layers, self.num_heads)
        self.prefix_scale = nn.Parameter(torch.full(shape, self._attention["kernel_scale_init"]))
        if self.kernel == "poly":
            self.poly_offset = nn.Parameter(torch.ones(self.num_layers))

    @property
    def prefix_attention(self) -> str:
        """"joint" (the prefix inside each row's softmax) or "separate" (normalised on its own)."""
        return self._attention.get("prefix_attention", "joint")

    @property
    def kernel(self) -> str | None:
        """The kernel of a separate prefix ("exp", "rbf", "poly"); `None` with "joint"."""
        return self._attention.get("kernel")

    @property
    def kernel_scale(self) -> str | None:
        """"scalar" or "head" with a separate prefix; `None` with "joint"."""
        return self._attention.get("kernel_scale")

    def attention_options(self) -> dict:
        """The options `apply_prefix_*` took for the attention (`{}` for "joint"), to rebuild the same prefix."""
        return dict(self._attention)

    def separate(self, layer: int) -> SeparatePrefix | None:
        """Layer `layer`'s separately normalised prefix for the patched attention, or `None` with "joint"."""
        if not self._attention:
            return None
        return SeparatePrefix(kernel=self.kernel, scale=self.prefix_scale[layer],
                              offset=self.poly_offset[layer] if self.kernel == "poly" else None,
                              length_scale=self._attention.get("rbf_length_scale", RBF_LENGTH_SCALE))

    def extra_repr(self) -> str:
        text = f"kind={self.kind!r}, num_prefix={self.num_prefix}, num_layers={self.num_layers}"
        if self._attention:
            text += f", prefix_attention='separate', kernel={self.kernel!r}, kernel_scale={self.kernel_scale!r}"
        return text

    @property
    def max_length(self) -> int:
        """The most tokens of an input that can take a position in the model's position table with this prefix.

        Longformer numbers text positions from `padding_idx + 1 + P`; padding tokens (`input_ids` equal to the pad
        token) take no position (HF gives them `padding_idx`), so the limit is on each row's real tokens, not on
        the padded length (with `inputs_embeds` every token takes one). LED numbers every position of the sequence
        after Hugging Face padded it to a multiple of the window `W`: prefix-propagation pads `P + N`,
        prefix-tuning starts the padded text at position `P`.
        """
        p, w = self.num_prefix, self.window
        if self.kind == "longformer":
            return self.positions - self.padding_idx - 1 - p
        if self.method == "propagation":
            return self.positions // w * w - p
        return (self.positions - p) // w * w

    def check_length(self, n: int, positions: torch.Tensor | None = None) -> None:
        """`ValueError` naming the limit before an input of `n` tokens reaches the position embedding.

        Longformer, with the text position ids `positions (B, N)`: the tokens that take a position are counted from
        their largest id (one host read). Under `torch.compile` and the exporters that read would break the graph,
        so the check stays on shapes there: all `n` tokens count, padding included.
        """
        tokens, what = n, "tokens"
        traced = torch.compiler.is_compiling() or is_exporting()
        if self.kind == "longformer" and positions is not None and positions.numel() and not traced:
            tokens, what = int(positions.max()) - self.padding_idx - self.num_prefix, "tokens that take a position"
        if tokens <= self.max_length:
            return
        if self.kind == "longformer":
            how = (f"the position table has max_position_embeddings={self.positions} rows, text positions start at "
                   f"padding_idx + 1 + P = {self.padding_idx + 1 + self.num_prefix}; padding tokens take none"
                   f"{' (counted here: under torch.compile and export the check is on the shape)' if traced else ''}")
        else:
            what_pads = "the P prefix slots and the input together" if self.method == "propagation" else "the input"
            how = (f"the position table has max_encoder_position_embeddings={self.positions} rows, and Hugging Face "
                   f"pads {what_pads} to a multiple of the attention window ({self.window}) before numbering "
                   f"positions{'' if self.method == 'propagation' else f' from P = {self.num_prefix}'}")
        raise ValueError(
            f"input of {tokens} {what} is too long for prefix-{self.method} with P={self.num_prefix} prefix slots: "
            f"the limit is {self.max_length} tokens ({how})"
        )

    def config_record(self) -> dict:
        """What `from_pretrained_with_prefix` needs to rebuild this prefix (stored in `config.prefix_kernels`): the
        attention options too with a separate prefix (none with "joint", whose record is as it always was)."""
        return {"method": self.method, "num_prefix": self.num_prefix, "dropout": self.dropout.p,
                **self.attention_options()}

    def _base_forward(self, wrapper: _WrappedForward, call: dict):
        raise NotImplementedError

    def warn_if_frozen(self) -> None:
        """Warn once when the model trains while no prefix parameter takes a gradient: `peft.get_peft_model`
        freezes every parameter that is not an adapter's, the prefix included, without a word."""
        if (self._warned_frozen or not self.training or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or any(p.requires_grad for p in self.parameters())):
            return
        self._warned_frozen = True
        warnings.warn(
            f"the prefix-{self.method} prefix is frozen while the model trains (peft.get_peft_model freezes every "
            "parameter that is not an adapter's): call prefix_kernels.unfreeze_prefix(model) after wrapping the "
            "model, or ignore this if the prefix is meant to stay fixed",
            UserWarning,
            stacklevel=4,
        )

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


# ------------------------------------------------------------------------------------------------------------
# Installing a prefix on a model
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


def unfreeze_prefix(model: nn.Module) -> _Prefix:
    """Make the prefix of `model` trainable again and return its module.

    For `peft.get_peft_model(model, config)` on a prefix model: PEFT freezes every parameter that is not an
    adapter's (it keeps the task head trainable through `modules_to_save`), the prefix included; call this after it.
    Wrappers (a `PeftModel`, DDP) are looked through. Do not list the prefix module in `modules_to_save`: PEFT would
    train a copy that the model never uses (this raises `ValueError` when it finds such a copy).
    """
    found = [m for m in model.modules() if isinstance(m, _Prefix)]
    if not found:
        raise ValueError("this model has no prefix: call apply_prefix_propagation or apply_prefix_tuning first")
    if len(found) > 1:
        raise ValueError(f"this model holds {len(found)} prefix modules (a copy, e.g. from PEFT's modules_to_save, "
                         "which the model does not use): keep the prefix out of modules_to_save")
    for p in found[0].parameters():
        p.requires_grad_(True)
    return found[0]
