"""CPU backend: Longformer attention as block-batched PyTorch matmuls, forward and backward.

Read top to bottom: the block plan, the additive masks, the dropout masks, the local rows (forward, backward), the
global rows (forward, backward), the launchers `forward` / `backward` (contract: `core/custom_op.py`), then the
backend-module functions `unavailable_reason`, `cannot_serve`. Pure PyTorch: nothing to build.

Local rows. The `N` queries are cut into blocks of `c` rows (`_plan`). Block `j` (rows `j*c .. j*c + c - 1`) sees
`Lt = L + G + P` key columns: the `L = c + 2w` band positions `j*c - w .. j*c + c + w - 1`, then the `G` compact
global keys (through the local `k, v`), then the `P` prefix keys. Row `r` of a block sees band column `t` iff
`r <= t <= r + 2w`, the same for every block (`band_bias (c, Lt)`); columns out of `0..N-1`, padding, global
(a global key counts once, through its global column) or an unused global slot are removed per block
(`col_bias (B, nb, Lt)`). Consecutive blocks of one batch row form a group: one batched matmul
`(g, H, c, D) x (g, H, D, Lt)`, the mask, a softmax over the `Lt` columns, a second matmul. Only one group's
`(g, H, c, Lt)` scores exist at a time (`GROUP_BYTES` bounds them), so memory is `O(N)`: the padded `k, v`,
the output and one group's workspace; autograd keeps only what the custom op saves (inputs, `out`, `lse`).

Global rows: per batch row, the `G` global queries against all `N` keys (+ prefix) with the global projections,
batched over the heads, scattered into the output; in the backward the key gradients (outer products over the
`G` slots) are written straight into their `(B, N, H, D)` outputs. Without the global projections (a global index
but `q_global = None`: local rows only) the global rows are skipped and stay 0, like padding rows.

Masking uses a large finite negative (`finfo.min / 4`, so two of them still add up to a finite number), never
`-inf`: a row whose every column is masked then gets a finite softmax instead of NaN. Such rows, and every row
whose local result is not the output (padding rows; global rows, whose result comes from the global branch),
are "dead": their output is set to 0 and their output gradient to 0 before the backward, so they contribute
nothing. A local row always sees at least itself, so no live row is ever fully masked.

Backward. Each group's scores and softmax are recomputed (every key of a row is in its block, so the softmax is
one fused pass: cheaper than computing a log-sum-exp in the forward and `exp(s - lse)` here); `dS` comes from
`torch._softmax_backward_data` in fp32 (fp32 probabilities, `rowsum(P * dP)` and the softmax scale in fp32, rounded
once); the dropout scale is folded into the output gradient. In "separate" mode the text and the prefix columns
each have their own softmax, the prefix part scaled by `prefix_scale[h]` (`_softmax_parts`, `_combined`).
Band-key gradients are overlap-added (the windows of neighbouring blocks overlap by `2w`) into fp32 buffers;
global-key and prefix gradients are summed over the blocks in fp32. `lse`, which the contract lets each backend
define, is unused here: zeros.

Dropout (`p > 0`): one 16-bit word per (row, column) of each group from a `torch.Generator` seeded with the op's
seed (local rows, group by group; the global rows draw `(H, G, N + P)` per batch row from one seeded with
`seed + 1`), in a fixed order (`torch.int64.random_` viewed as four
int16 words: half the generator time of 32-bit words, which matters: drawing is the dropout's main cost). An
entry is dropped iff its signed word is below `round(p * 2**16) - 2**15`, i.e. with probability `p` rounded to a
multiple of `2**-16`; kept entries are scaled by `1 / (1 - p)`. The backward draws the same words in the same
order, so it replays the forward's masks exactly, and so does a gradient checkpoint's recompute (its seed comes
from torch's generator).

dtypes: fp32 computes in fp32. bf16 computes in bf16 matmuls (fp32 accumulation inside each product; softmax
statistics in fp32; scores, probabilities and `dS` rounded to bf16 for the products, as Hugging Face's eager
attention does on a CPU; the softmax backward itself in fp32, as there). fp16 computes in fp32 and rounds the
results: CPUs without AVX512-FP16 have no fast fp16 matrix products (see BENCHMARKS.md). fp64 stays on the
reference backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core import masks as mask_cache
from ..core.poison import new_output

# Query rows per block: `min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, 2w))`. Smaller blocks waste fewer masked band entries
# (useful fraction `(2w + 1) / (c + 2w)`), larger ones make larger matrix products; the bounds were chosen by timing
# (BENCHMARKS.md, "CPU path").
BLOCK_ROWS = 64
MIN_BLOCK_ROWS = 16
# Bytes of scores per group (`g * H * c * Lt` elements): enough work per matmul call, small enough that the
# group's scores, probabilities and their gradients stay in the caches.
GROUP_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------------------
# Block plan and masks
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    batch: int
    n: int
    heads: int
    head_dim: int
    window: int
    block: int  # c: query rows per block
    num_blocks: int  # nb = ceil(N / c)
    num_global: int  # G: global-key columns (the largest per-row count)
    num_prefix: int  # P
    itemsize: int  # bytes per element of the compute dtype
    separate: bool = False  # the prefix columns in their own softmax ("separate" prefix normalization)

    @property
    def band(self) -> int:
        """`L = c + 2w` band columns per block."""
        return self.block + 2 * self.window

    @property
    def text(self) -> int:
        """`L + G`: the band and global-key columns, before the prefix columns."""
        return self.band + self.num_global

    @property
    def cols(self) -> int:
        """`Lt = L + G + P` key columns per block."""
        return self.band + self.num_global + self.num_prefix

    @property
    def padded_len(self) -> int:
        """Rows of the padded `k, v` (and of the fp32 gradient buffers): `w` before, enough after."""
        return self.num_blocks * self.block + self.band


def _plan(q: torch.Tensor, window: int, num_global: int, num_prefix: int, separate: bool = False) -> _Plan:
    b, n, h, d = q.shape
    c = max(1, min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, 2 * window), n))
    return _Plan(b, n, h, d, window, c, -(-n // c), num_global, num_prefix, q.element_size(), separate)


def _groups(plan: _Plan) -> Iterator[tuple[int, int, int, int]]:
    """`(b, j0, j1, rows)`: blocks `j0 .. j1 - 1` of batch row `b`, `rows` query rows each (a last partial block
    is a group of its own). The order is fixed: the dropout masks are drawn in it."""
    c, h, cols = plan.block, plan.heads, plan.cols
    full = plan.n // c
    per_group = max(1, GROUP_BYTES // (plan.itemsize * h * c * cols))
    for b in range(plan.batch):
        for j0 in range(0, full, per_group):
            yield b, j0, min(full, j0 + per_group), c
        if plan.n % c:
            yield b, full, full + 1, plan.n % c


@dataclass
class _Masks:
    band_bias: torch.Tensor  # (c, Lt) additive, shared by every block
    col_bias: torch.Tensor  # (B, nb, Lt) additive, per block
    dead: torch.Tensor | None  # (B, N) bool: rows whose local result is not the output (padding, global)
    global_rows: tuple[torch.Tensor, torch.Tensor] | None  # (batch index, position) of every used global slot
    global_valid: torch.Tensor | None  # (B, G) bool: slot g < global_count[b]
    # Documents: `(B, nb, c, L + G)` bool, a live row and a column it may otherwise see are in different documents,
    # and `(B, nb)` bool, the blocks with such a pair (they straddle a boundary, or see a global key of another
    # document): only those pay for the row-by-column mask.
    doc_off: torch.Tensor | None = None
    doc_blocks: torch.Tensor | None = None
    global_doc_off: torch.Tensor | None = None  # (B, G, N) bool: global slot g and key j are in different documents


def _masks(plan: _Plan, key_padding_mask, global_idx, global_count, document_ids, dtype) -> _Masks:
    b, n, c, w, band, g = plan.batch, plan.n, plan.block, plan.window, plan.band, plan.num_global
    neg = torch.finfo(dtype).min / 4
    r = torch.arange(c)[:, None]
    t = torch.arange(band)[None, :]
    band_bias = torch.zeros(c, plan.cols, dtype=dtype)
    band_bias[:, :band].masked_fill_((t < r) | (t > r + 2 * w), neg)

    key_ok = torch.ones(b, n, dtype=torch.bool)
    dead = None
    global_rows = global_valid = None
    if key_padding_mask is not None:
        key_ok &= ~key_padding_mask
        dead = key_padding_mask.clone()
    if g:
        global_valid = torch.arange(g)[None, :] < global_count[:, None]
        bsel, slot = global_valid.nonzero(as_tuple=True)
        global_rows = (bsel, global_idx[bsel, slot].long())
        key_ok[global_rows] = False
        dead = torch.zeros(b, n, dtype=torch.bool) if dead is None else dead
        dead[global_rows] = True
    padded_ok = torch.zeros(b, plan.padded_len, dtype=torch.bool)
    padded_ok[:, w : w + n] = key_ok
    col_ok = [padded_ok.unfold(1, band, c)[:, : plan.num_blocks]]
    if g:
        col_ok.append(global_valid[:, None, :].expand(b, plan.num_blocks, g))
    if plan.num_prefix:
        col_ok.append(torch.ones(b, plan.num_blocks, plan.num_prefix, dtype=torch.bool))
    col_ok = torch.cat(col_ok, -1)
    col_bias = torch.zeros(b, plan.num_blocks, plan.cols, dtype=dtype).masked_fill_(~col_ok, neg)
    masks = _Masks(band_bias, col_bias, dead, global_rows, global_valid)
    if document_ids is not None:
        _document_masks(plan, masks, document_ids.long(), col_ok[..., : plan.text], global_idx, dtype)
    return masks


def _document_masks(plan: _Plan, masks: _Masks, doc: torch.Tensor, col_ok: torch.Tensor, global_idx, dtype) -> None:
    """Fills the document fields of `masks` from `doc (B, N)` ids; `col_ok (B, nb, L + G)`: the columns the other
    masks keep."""
    b, n, c, w, g = plan.batch, plan.n, plan.block, plan.window, plan.num_global
    padded = torch.full((b, plan.padded_len), -1, dtype=torch.long)
    padded[:, w : w + n] = doc
    cols = [padded.unfold(1, plan.band, c)[:, : plan.num_blocks]]
    if g:
        cols.append(doc.gather(1, global_idx.long())[:, None, :].expand(b, plan.num_blocks, g))
    cols = torch.cat(cols, -1)  # (B, nb, L + G)
    rows = torch.full((b, plan.num_blocks * c), -1, dtype=torch.long)
    rows[:, :n] = doc
    live = torch.zeros(b, plan.num_blocks * c, dtype=torch.bool)
    live[:, :n] = True if masks.dead is None else ~masks.dead
    rows, live = rows.view(b, plan.num_blocks, c), live.view(b, plan.num_blocks, c)
    # A block whose live rows are all in one document sees the columns of that document: a column mask, folded into
    # `col_bias`, so such blocks (every block of a row holding one document, and the interior blocks of a packed
    # one, which still see the other documents' global keys) cost what they cost without documents.
    far = torch.iinfo(torch.long).max
    any_live = live.any(-1)
    lo = rows.masked_fill(~live, far).amin(-1)
    hi = rows.masked_fill(~live, -far).amax(-1)
    one_doc = ~any_live | (lo == hi)
    other_doc = one_doc[..., None] & any_live[..., None] & (cols != hi[..., None]) & col_ok
    masks.col_bias[..., : plan.text].masked_fill_(other_doc, masks.col_bias.new_tensor(torch.finfo(dtype).min / 4))
    off = (rows[..., None] != cols[:, :, None, :]) & live[..., None] & col_ok[:, :, None, :]
    masks.doc_off = off
    masks.doc_blocks = ~one_doc & off.flatten(2).any(-1)
    if g:
        masks.global_doc_off = doc.gather(1, global_idx.long())[:, :, None] != doc[:, None, :]


def _cached_masks(plan: _Plan, key_padding_mask, global_idx, global_count, document_ids, dtype) -> _Masks:
    """`_masks`, reused while the same mask tensors come back unchanged (`core.masks`): every layer of a model and
    every backward pass sees the same `key_padding_mask`, `document_ids` and (from `core.masks.global_index`) the
    same global index."""
    sources = tuple(t for t in (key_padding_mask, global_idx, global_count, document_ids) if t is not None)
    return mask_cache.cached(
        "cpu_masks", sources,
        lambda: _masks(plan, key_padding_mask, global_idx, global_count, document_ids, dtype),
        key=(plan, dtype, document_ids is None))


class _DropoutMasks:
    """Dropout keep masks (1 kept, 0 dropped, in the compute dtype) drawn from a generator seeded by the op's seed,
    in call order."""

    def __init__(self, p: float, seed: int, dtype: torch.dtype):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        # A uniform signed 16-bit word is below `threshold` with probability round(p * 2**16) / 2**16.
        self.threshold = torch.tensor(min(round(p * 2**16), 2**16 - 1) - 2**15, dtype=torch.int16)

    def next(self, shape: torch.Size) -> torch.Tensor:
        numel = math.prod(shape)
        words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=self.generator)
        # In the compute dtype: multiplying bf16 by a bool tensor takes a slow mixed-dtype path.
        return (words.view(torch.int16)[:numel].view(shape) >= self.threshold).to(self.dtype)


# ------------------------------------------------------------------------------------------------------------
# Softmax, joint or separate
# ------------------------------------------------------------------------------------------------------------


def _softmax_parts(s: torch.Tensor, text: int, separate: bool, dtype=None) -> list[torch.Tensor]:
    """The softmax of scores `s (..., cols)` over all columns (`[P]`), or ("separate") over the first `text`
    columns and over the rest, each on its own (`[A, B]`); in `dtype` (default the scores')."""
    if not separate:
        return [torch.softmax(s, dim=-1, dtype=dtype)]
    return [torch.softmax(s[..., :text], dim=-1, dtype=dtype), torch.softmax(s[..., text:], dim=-1, dtype=dtype)]


def _combined(parts: list[torch.Tensor], prefix_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The probabilities that multiply all columns' values: `P`, or `[A, prefix_scale[h] * B]` (heads at dim -3)."""
    if len(parts) == 1:
        return parts[0].to(dtype)
    return torch.cat([parts[0], parts[1] * prefix_scale.to(parts[1].dtype).view(-1, 1, 1)], dim=-1).to(dtype)


def _softmax_grad(dp: torch.Tensor, parts32: list[torch.Tensor], dtype: torch.dtype, scale: float,
                  prefix_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The score gradient `dS = scale * P * (dP - rowsum(P * dP))` from the fp32 probabilities (`_softmax_parts`)
    and `dP` taken to fp32 (the softmax `scale` applied there, in fp32), rounded to `dtype` once at the end
    (FlashAttention's order: in 16 bits, rounding `P` or a scaled `dO` first would leave rows of `dS` that do not sum
    to zero, which biases the gradients of the queries and keys). "Separate": per part, the prefix part scaled by
    `prefix_scale[h]`; also returns `sum(B * dP)` per head `(H,)` (heads at dim -3), the prefix scale's gradient."""
    dp = dp.float()
    if len(parts32) == 1:
        return torch._softmax_backward_data(dp, parts32[0], -1, torch.float32).mul_(scale).to(dtype), None
    a, bp = parts32
    text = a.shape[-1]
    ds_text = torch._softmax_backward_data(dp[..., :text], a, -1, torch.float32).mul_(scale)
    ds_prefix = torch._softmax_backward_data(dp[..., text:], bp, -1, torch.float32)
    ds_prefix = ds_prefix * (prefix_scale.view(-1, 1, 1) * scale)
    dscale = (bp * dp[..., text:]).sum(dim=(-1, -2))
    return torch.cat([ds_text, ds_prefix], dim=-1).to(dtype), dscale.reshape(-1, dscale.shape[-1]).sum(0)


# ------------------------------------------------------------------------------------------------------------
# Local rows
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Keys:
    """One key/value source for the local rows: the padded band rows and the columns every block shares."""

    padded: torch.Tensor  # (B, padded_len, H, D): position `i` at row `i + w`, zeros around
    shared: torch.Tensor | None  # (B, H, G + P, D): global keys (through the local projection), then prefix


def _local_keys(plan: _Plan, x, prefix, global_idx) -> _Keys:
    w, n = plan.window, plan.n
    # Only the margins are zeroed (F.pad would fill the whole buffer first).
    padded = x.new_empty((plan.batch, plan.padded_len, plan.heads, plan.head_dim))
    padded[:, :w].zero_()
    padded[:, w + n :].zero_()
    padded[:, w : w + n].copy_(x)
    shared = []
    if plan.num_global:
        idx = global_idx.long()[:, :, None, None].expand(-1, -1, plan.heads, plan.head_dim)
        shared.append(torch.gather(x, 1, idx).transpose(1, 2))
    if prefix is not None:
        shared.append(prefix.transpose(1, 2))
    return _Keys(padded, torch.cat(shared, 2) if shared else None)


def _block_keys(plan: _Plan, keys: _Keys, b: int, j0: int, j1: int) -> torch.Tensor:
    """`(j1 - j0, H, Lt, D)` contiguous: the band rows of blocks `j0 .. j1 - 1`, then the shared columns."""
    p = keys.padded
    s = p.stride()
    band = p.as_strided((j1 - j0, plan.heads, plan.band, plan.head_dim), (plan.block * s[1], s[2], s[1], s[3]),
                        p.storage_offset() + b * s[0] + j0 * plan.block * s[1])
    if keys.shared is None:
        return band.contiguous()
    shared = keys.shared[b : b + 1].expand(j1 - j0, -1, -1, -1)
    return torch.cat([band, shared], 2)


def _group_scores(plan, masks, q, kb, b, j0, j1, rows, scale):
    """Masked, scaled scores `(g, H, rows, Lt)` and the group's `(g, H, rows, D)` query view."""
    r0 = j0 * plan.block
    qb = q[b, r0 : r0 + (j1 - j0) * rows].view(j1 - j0, rows, plan.heads, plan.head_dim).transpose(1, 2)
    bias = masks.band_bias[:rows] + masks.col_bias[b, j0:j1, None, :]
    if masks.doc_blocks is not None and bool(masks.doc_blocks[b, j0:j1].any()):
        # Only groups with a block across a document boundary (or a global key of another document) pay for this,
        # on the group's bias (shared by the heads).
        bias[..., : plan.text].masked_fill_(masks.doc_off[b, j0:j1, :rows], torch.finfo(bias.dtype).min / 4)
    s = torch.add(bias[:, None], torch.matmul(qb, kb.transpose(-1, -2)), alpha=scale)
    return s, qb


def _rows_view(t: torch.Tensor, plan: _Plan, b: int, j0: int, j1: int, rows: int) -> torch.Tensor:
    """The group's rows of a `(B, N, H, D)` tensor as `(g, rows, H, D)`."""
    r0 = j0 * plan.block
    return t[b, r0 : r0 + (j1 - j0) * rows].view(j1 - j0, rows, plan.heads, plan.head_dim)


def _local_rows_forward(plan, masks, q, ks: _Keys, vs: _Keys, scale, drop, inv_keep, prefix_scale, out) -> None:
    for b, j0, j1, rows in _groups(plan):
        kb = _block_keys(plan, ks, b, j0, j1)
        s, _ = _group_scores(plan, masks, q, kb, b, j0, j1, rows, scale)
        probs = _combined(_softmax_parts(s, plan.text, plan.separate), prefix_scale, s.dtype)
        del s
        if drop is not None:
            probs.mul_(drop.next(probs.shape))
        o = torch.matmul(probs, _block_keys(plan, vs, b, j0, j1))
        if drop is not None:
            o.mul_(inv_keep)
        _rows_view(out, plan, b, j0, j1, rows).copy_(o.transpose(1, 2))


def _fold_band(acc: torch.Tensor, part: torch.Tensor, plan: _Plan, j0: int) -> None:
    """Overlap-add `part (g, H, L, D)`, the band-column gradients of blocks `j0 ..`, into `acc (padded_len, H, D)`:
    column `t` of block `j` is padded row `j*c + t`. One strided add per `c` columns."""
    c, g = plan.block, part.shape[0]
    for t0 in range(0, plan.band, c):
        m = min(c, plan.band - t0)
        start = j0 * c + t0
        rows = acc[start : start + g * c].view(g, c, plan.heads, plan.head_dim)
        rows[:, :m] += part[:, :, t0 : t0 + m].transpose(1, 2)


def _local_rows_backward(plan, masks, q, ks, vs, go_v, scale, drop, prefix_scale, grads) -> None:
    """`go_v`: output gradient (dead rows 0, times `1 / (1 - p)`).
    Fills `grads["dq"]` rows and accumulates into the fp32 buffers `dk_pad, dv_pad, dk_shared, dv_shared` (and,
    "separate", `dscale`)."""
    band = plan.band
    for b, j0, j1, rows in _groups(plan):
        kb = _block_keys(plan, ks, b, j0, j1)
        vb = _block_keys(plan, vs, b, j0, j1)
        s, qb = _group_scores(plan, masks, q, kb, b, j0, j1, rows, scale)
        parts32 = _softmax_parts(s, plan.text, plan.separate, torch.float32)
        probs = _combined(parts32, prefix_scale, s.dtype)
        del s
        keep = drop.next(probs.shape) if drop is not None else None
        kept = probs if keep is None else probs * keep
        gv = _rows_view(go_v, plan, b, j0, j1, rows).transpose(1, 2)
        dvb = torch.matmul(kept.transpose(-1, -2), gv)
        del kept
        dp = torch.matmul(gv, vb.transpose(-1, -2))
        if plan.separate and dp.dtype != torch.float32:
            # The prefix columns' dP in fp32: the prefix scale's gradient sums them over every row and head dim.
            dp = dp.float()
            dp[..., plan.text :] = torch.matmul(gv.float(), vb[..., plan.text :, :].float().transpose(-1, -2))
        if keep is not None:
            dp.mul_(keep)
        ds, dscale = _softmax_grad(dp, parts32, probs.dtype, scale, prefix_scale)
        if dscale is not None:
            grads["dscale"] += dscale
        del dp, probs, parts32
        _rows_view(grads["dq"], plan, b, j0, j1, rows).copy_(torch.matmul(ds, kb).transpose(1, 2))
        dkb = torch.matmul(ds.transpose(-1, -2), qb)
        del ds
        for part, name in ((dkb, "dk"), (dvb, "dv")):
            part = part.float()  # one conversion per group, not one per strided add
            _fold_band(grads[name + "_pad"][b], part[:, :, :band], plan, j0)
            if band < plan.cols:
                grads[name + "_shared"][b] += part[:, :, band:].sum(0)


# ------------------------------------------------------------------------------------------------------------
# Global rows
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _GlobalRows:
    """Operands of the global rows, per batch row: the global queries of every slot and the keys they see."""

    qsel: torch.Tensor  # (B, G, H, D): q_global at each row's global positions (unused slots: any row)
    k: torch.Tensor  # (B, N, H, D) k_global
    v: torch.Tensor  # (B, N, H, D) v_global
    prefix_k: torch.Tensor | None  # (B, P, H, D): the prefix keys of the global rows
    prefix_v: torch.Tensor | None
    key_padding_mask: torch.Tensor | None  # (B, N)
    doc_off: torch.Tensor | None  # (B, G, N): slot and key are in different documents
    counts: list[int]  # used slots per batch row

    def queries(self, b: int) -> torch.Tensor:
        return self.qsel[b].transpose(0, 1)  # (H, G, D)

    def keys(self, b: int, t: torch.Tensor) -> torch.Tensor:
        """`(H, N, D)` view of `t[b]`, copied for low-precision dtypes: their products on a strided transposed
        operand take a slow path, fp32 products read it as it is (BENCHMARKS.md, "CPU path")."""
        view = t[b].transpose(0, 1)
        return view if view.dtype == torch.float32 else view.contiguous()


def _global_rows(plan, masks, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
                 global_count) -> _GlobalRows:
    idx = global_idx.long()[:, :, None, None].expand(-1, -1, plan.heads, plan.head_dim)
    return _GlobalRows(torch.gather(q_global, 1, idx), k_global, v_global, prefix_k, prefix_v, key_padding_mask,
                       masks.global_doc_off, global_count.tolist())


def _global_scores(plan, gr: _GlobalRows, b: int, scale: float) -> torch.Tensor:
    """Scaled scores `(H, G, N + P)` of batch row `b`'s global queries: its keys (padding and other documents
    masked), then the prefix."""
    qs = gr.queries(b)
    s = torch.bmm(qs, gr.keys(b, gr.k).transpose(1, 2))
    if gr.prefix_k is not None:
        s = torch.cat([s, torch.bmm(qs, gr.prefix_k[b].transpose(0, 1).transpose(1, 2))], -1)
    neg = torch.finfo(s.dtype).min / 4
    if gr.key_padding_mask is not None:
        bias = torch.zeros(plan.n + plan.num_prefix, dtype=s.dtype)
        bias[: plan.n].masked_fill_(gr.key_padding_mask[b], neg)
        s = torch.add(bias, s, alpha=scale)
    else:
        s = s.mul_(scale)
    if gr.doc_off is not None:
        s[..., : plan.n].masked_fill_(gr.doc_off[b], neg)
    return s


def _global_rows_forward(plan, gr: _GlobalRows, global_idx, scale, drop, inv_keep, prefix_scale, out) -> None:
    n = plan.n
    for b in range(plan.batch):
        s = _global_scores(plan, gr, b, scale)
        probs = _combined(_softmax_parts(s, n, plan.separate), prefix_scale, s.dtype)
        if drop is not None:
            probs.mul_(drop.next(probs.shape))
        o = torch.bmm(probs[..., :n], gr.v[b].transpose(0, 1))  # (H, G, D)
        if gr.prefix_v is not None:
            o.baddbmm_(probs[..., n:], gr.prefix_v[b].transpose(0, 1))
        if drop is not None:
            o.mul_(inv_keep)
        cnt = gr.counts[b]
        out[b, global_idx[b, :cnt].long()] = o[:, :cnt].transpose(0, 1)


def _global_rows_backward(plan, gr: _GlobalRows, global_idx, grad_out, scale, drop, inv_keep, prefix_scale,
                          grads) -> None:
    """Writes `grads["dq_g"]` (zeros but the global rows), `grads["dk_g"], grads["dv_g"]` `(B, N, H, D)` and adds
    the prefix gradients into the fp32 `grads["dk_prefix"], grads["dv_prefix"]` `(B, H, P, D)` (and, "separate",
    the prefix scale's into `grads["dscale"]`)."""
    n, g = plan.n, plan.num_global
    for b in range(plan.batch):
        cnt = gr.counts[b]
        rows = global_idx[b, :cnt].long()
        go = grad_out.new_zeros(plan.heads, g, plan.head_dim)  # unused slots: zero gradient
        go[:, :cnt] = grad_out[b, rows].transpose(0, 1)
        qs = gr.queries(b)
        s = _global_scores(plan, gr, b, scale)
        parts32 = _softmax_parts(s, n, plan.separate, torch.float32)
        probs = _combined(parts32, prefix_scale, qs.dtype)
        del s
        keep = drop.next(probs.shape) if drop is not None else None
        kept = probs if keep is None else probs * keep
        go_v = go * inv_keep
        # dK, dV of every key are outer products over the G slots: written straight into the (N, H, D) layout.
        torch.bmm(kept[..., :n].transpose(1, 2), go_v, out=grads["dv_g"][b].transpose(0, 1))
        dp = torch.bmm(go_v, gr.keys(b, gr.v).transpose(1, 2))
        if gr.prefix_v is not None:
            grads["dv_prefix"][b] += torch.bmm(kept[..., n:].transpose(1, 2), go_v)
            pv = gr.prefix_v[b].transpose(0, 1).transpose(1, 2)
            if plan.separate:  # in fp32, as for the local rows
                dp = torch.cat([dp.float(), torch.bmm(go_v.float(), pv.float())], -1)
            else:
                dp = torch.cat([dp, torch.bmm(go_v, pv)], -1)
        if keep is not None:
            dp.mul_(keep)
        ds, dscale = _softmax_grad(dp, parts32, probs.dtype, scale, prefix_scale)
        if dscale is not None:
            grads["dscale"] += dscale
        dq = torch.bmm(ds[..., :n], gr.k[b].transpose(0, 1))
        torch.bmm(ds[..., :n].transpose(1, 2), qs, out=grads["dk_g"][b].transpose(0, 1))
        if gr.prefix_k is not None:
            dq.baddbmm_(ds[..., n:], gr.prefix_k[b].transpose(0, 1))
            grads["dk_prefix"][b] += torch.bmm(ds[..., n:].transpose(1, 2), qs)
        grads["dq_g"][b, rows] = dq[:, :cnt].transpose(0, 1)


# ------------------------------------------------------------------------------------------------------------
# Launchers (contract: core/custom_op.py)
# ------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _lse(b: int, h: int, n: int, separate: bool) -> torch.Tensor:
    """The contract's `lse`, unused by this backend: zeros of the shape the custom op declares."""
    return torch.zeros((2, b, h, n) if separate else (b, h, n), dtype=torch.float32)


def forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            *, window: int, scale: float, dropout_p: float, seed: int, max_global: int, prefix_k_global=None,
            prefix_v_global=None, prefix_scale=None, document_ids=None):
    """Returns `out (B, N, H, D)` in `q.dtype` and `lse` fp32 (unused by this backend: zeros)."""
    b, n, h, d = q.shape
    dtype = q.dtype
    separate = prefix_scale is not None
    lse = _lse(b, h, n, separate)
    if n == 0:
        return new_output(q.shape, dtype), lse
    cdt = _compute_dtype(dtype)
    with torch.autocast("cpu", enabled=False):
        q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global = (
            _cast(t, cdt) for t in (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
                                    prefix_v_global))
        g = max_global if global_idx is not None else 0
        plan = _plan(q, window, g, 0 if prefix_k is None else prefix_k.shape[1], separate)
        masks = _cached_masks(plan, key_padding_mask, global_idx, global_count, document_ids, cdt)
        inv_keep = 1.0 / (1.0 - dropout_p)
        out = new_output((b, n, h, d), cdt)
        drop = _DropoutMasks(dropout_p, seed, cdt) if dropout_p > 0 else None
        ks = _local_keys(plan, k, prefix_k, global_idx)
        vs = _local_keys(plan, v, prefix_v, global_idx)
        _local_rows_forward(plan, masks, q, ks, vs, scale, drop, inv_keep, prefix_scale, out)
        if masks.dead is not None:
            out.masked_fill_(masks.dead[:, :, None, None], 0.0)
        if g and q_global is not None:  # without the global projections the global rows stay 0 (local rows only)
            drop = _DropoutMasks(dropout_p, seed + 1, cdt) if dropout_p > 0 else None
            pk, pv = (prefix_k, prefix_v) if prefix_k_global is None else (prefix_k_global, prefix_v_global)
            gr = _global_rows(plan, masks, q_global, k_global, v_global, pk, pv, key_padding_mask, global_idx,
                              global_count)
            _global_rows_forward(plan, gr, global_idx, scale, drop, inv_keep, prefix_scale, out)
    return out.to(dtype), lse


def backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
             global_count, out, lse, *, window: int, scale: float, dropout_p: float, seed: int, max_global: int,
             prefix_k_global=None, prefix_v_global=None, prefix_scale=None, document_ids=None):
    """Returns the gradients of `q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
    prefix_v_global, prefix_scale`, `None` where the input is."""
    b, n, h, d = q.shape
    dtype = q.dtype
    inputs = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global)
    separate = prefix_scale is not None
    if n == 0:
        zeros = [None if t is None else torch.zeros(t.shape, dtype=t.dtype) for t in (*inputs, prefix_scale)]
        return tuple(zeros)
    cdt = _compute_dtype(dtype)
    with torch.autocast("cpu", enabled=False):
        grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global = (
            _cast(t, cdt) for t in (grad_out, *inputs))
        g = max_global if global_idx is not None else 0
        p = prefix_k.shape[1] if prefix_k is not None else 0
        plan = _plan(q, window, g, p, separate)
        masks = _cached_masks(plan, key_padding_mask, global_idx, global_count, document_ids, cdt)
        inv_keep = 1.0 / (1.0 - dropout_p)
        go = grad_out if masks.dead is None else grad_out.masked_fill(masks.dead[:, :, None, None], 0.0)
        go_v = go * inv_keep if dropout_p > 0 else go
        grads = {
            "dq": new_output((b, n, h, d), cdt),
            "dk_pad": torch.zeros(b, plan.padded_len, h, d, dtype=torch.float32),
            "dv_pad": torch.zeros(b, plan.padded_len, h, d, dtype=torch.float32),
            "dk_shared": torch.zeros(b, h, g + p, d, dtype=torch.float32),
            "dv_shared": torch.zeros(b, h, g + p, d, dtype=torch.float32),
            "dscale": torch.zeros(h, dtype=torch.float32),
        }
        drop = _DropoutMasks(dropout_p, seed, cdt) if dropout_p > 0 else None
        ks = _local_keys(plan, k, prefix_k, global_idx)
        vs = _local_keys(plan, v, prefix_v, global_idx)
        _local_rows_backward(plan, masks, q, ks, vs, go_v, scale, drop, prefix_scale, grads)
        del ks, vs, go_v
        dk = grads["dk_pad"][:, window : window + n]
        dv = grads["dv_pad"][:, window : window + n]
        if g:
            # Global keys, seen by every local row through the local k, v (unused slots carry exact zeros).
            rows = (torch.arange(b)[:, None].expand(b, g), global_idx.long())
            dk.index_put_(rows, grads["dk_shared"][:, :, :g].transpose(1, 2), accumulate=True)
            dv.index_put_(rows, grads["dv_shared"][:, :, :g].transpose(1, 2), accumulate=True)
        dq_g = dk_g = dv_g = None
        dpk_g = dpv_g = None
        if prefix_k_global is not None:  # the global rows' own prefix keys: their gradients apart
            dpk_g, dpv_g = (torch.zeros(b, h, p, d, dtype=torch.float32) for _ in range(2))
        if g and q_global is not None:
            drop = _DropoutMasks(dropout_p, seed + 1, cdt) if dropout_p > 0 else None
            pk, pv = (prefix_k, prefix_v) if prefix_k_global is None else (prefix_k_global, prefix_v_global)
            gr = _global_rows(plan, masks, q_global, k_global, v_global, pk, pv, key_padding_mask, global_idx,
                              global_count)
            grads.update(dq_g=torch.zeros(b, n, h, d, dtype=cdt), dk_g=new_output((b, n, h, d), cdt),
                         dv_g=new_output((b, n, h, d), cdt),
                         dk_prefix=grads["dk_shared"][:, :, g:] if dpk_g is None else dpk_g,
                         dv_prefix=grads["dv_shared"][:, :, g:] if dpv_g is None else dpv_g)
            _global_rows_backward(plan, gr, global_idx, grad_out, scale, drop, inv_keep, prefix_scale, grads)
            dq_g, dk_g, dv_g = grads["dq_g"], grads["dk_g"], grads["dv_g"]
        elif q_global is not None:
            dq_g, dk_g, dv_g = (torch.zeros(b, n, h, d, dtype=cdt) for _ in range(3))
        dpk = grads["dk_shared"][:, :, g:] if p else None
        dpv = grads["dv_shared"][:, :, g:] if p else None
    dscale = grads["dscale"].to(prefix_scale.dtype) if separate else None
    grads_out = [grads["dq"], dk, dv, dq_g, dk_g, dv_g, *(None if t is None else t.transpose(1, 2)
                                                           for t in (dpk, dpv, dpk_g, dpv_g))]
    return (*(None if t is None else t.to(dtype).contiguous() for t in grads_out), dscale)


# ------------------------------------------------------------------------------------------------------------
# Backend-module interface (see `backends/__init__.py`)
# ------------------------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    return None  # pure PyTorch: runs wherever torch does


def cannot_serve(args) -> str | None:
    if args.device.type != "cpu":
        return f"needs CPU tensors, got {args.device}"
    if args.dtype == torch.float64:
        return "float64 is served by the reference backend only"
    return None

