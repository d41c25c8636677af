"""The Longformer mask (window + global tokens + padding + prefix keys) as a FlexAttention `BlockMask`.

FlexAttention gets one key sequence: the `P` prefix keys first, then the `N` tokens, so key index
`kv = P + j` is token `j`. A non-padding query sees every prefix key; a local query sees band keys and global
keys, a global query every non-padding key (`prefix_kernels.reference` states the semantics). FlexAttention
has one projection set, so global rows use the local `q, k, v` here: the same pairs, slightly less work than
the real op (which needs a second set for global rows).

`create_block_mask` evaluates the mask densely (`B x Q x KV`, with int64 temporaries: tens of GB at
N = 32768), so `build_block_mask` evaluates it in query-row chunks and hands the block counts to
`BlockMask.from_kv_blocks`. `check_block_mask` compares it with `create_block_mask` where that is affordable.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BLOCK = 128


def longformer_mask_mod(is_global: torch.Tensor, pad: torch.Tensor, window: int, num_prefix: int):
    """`mask_mod(b, h, q_idx, kv_idx)` for `(B, N)` bool `is_global` / `pad` (padding wins over global)."""
    w, p = window, num_prefix
    glob = is_global & ~pad

    def token_key(b, q_idx, j):
        # Key j is attended by a non-padding query that is global, or sees j as a global or band key.
        return ~pad[b, j] & (glob[b, q_idx] | glob[b, j] | ((q_idx - j).abs() <= w))

    if p == 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return ~pad[b, q_idx] & token_key(b, q_idx, kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            j = kv_idx - p
            seq = (j >= 0) & token_key(b, q_idx, j.clamp(min=0))  # clamp: prefix keys index a real token
            return ~pad[b, q_idx] & ((j < 0) | seq)

    return mask_mod


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense `(B, H, Qb, KVb)` block flags -> (count per row, block indices with the set ones first, ascending)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices.contiguous()


@torch.no_grad()
def build_block_mask(mask_mod, batch: int, q_len: int, kv_len: int, device, rows_per_chunk: int = 1024) -> BlockMask:
    """The `BlockMask` of `mask_mod` (independent of the head), built a chunk of query rows at a time."""
    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    step = max(1, rows_per_chunk // BLOCK) * BLOCK
    b = torch.arange(batch, device=device)[:, None, None]
    kv = torch.arange(nk * BLOCK, device=device)[None, None, :]
    kv_ok, kv_idx = kv < kv_len, kv.clamp(max=kv_len - 1)
    partial, full = [], []
    for start in range(0, nq * BLOCK, step):
        q = torch.arange(start, min(start + step, nq * BLOCK), device=device)[None, :, None]
        allowed = mask_mod(b, 0, q.clamp(max=q_len - 1), kv_idx) & kv_ok & (q < q_len)
        rows = q.shape[1] // BLOCK
        count = allowed.view(batch, rows, BLOCK, nk, BLOCK).sum((2, 4))
        partial.append((count > 0) & (count < BLOCK * BLOCK))
        full.append(count == BLOCK * BLOCK)
    partial_counts, partial_idx = _ordered(torch.cat(partial, 1)[:, None])
    full_counts, full_idx = _ordered(torch.cat(full, 1)[:, None])
    return BlockMask.from_kv_blocks(partial_counts, partial_idx, full_counts, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def check_block_mask(block_mask: BlockMask, mask_mod, batch: int, q_len: int, kv_len: int, device,
                     max_elements: int = 1 << 26) -> bool:
    """Whether `block_mask` equals `create_block_mask`'s (skipped, returning False, above `max_elements`)."""
    if batch * q_len * kv_len > max_elements:
        return False
    expected = create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device, BLOCK_SIZE=BLOCK)
    ours = block_mask.to_dense()
    if not torch.equal(ours, expected.to_dense()):
        raise AssertionError("build_block_mask disagrees with create_block_mask")
    if not torch.equal(block_mask.full_kv_num_blocks, expected.full_kv_num_blocks):
        raise AssertionError("build_block_mask finds other full blocks than create_block_mask")
    return True


_COMPILED = None


def compiled_flex_attention():
    """`flex_attention` compiled once per process: static shapes (one graph per shape) and no silent fallback.

    `fullgraph=True` turns a graph break into an error, `fail_on_recompile_limit_hit` turns hitting the
    recompile limit (after which dynamo would run the unfused eager path) into an error, and the limit is
    raised so a full matrix of shapes fits.
    """
    global _COMPILED
    if _COMPILED is None:
        cfg = torch._dynamo.config
        for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                            ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096),
                            ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True),
                            ("suppress_errors", False)):
            if hasattr(cfg, name):
                setattr(cfg, name, value)
        _COMPILED = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled so far: a change during timing means a recompile inside the timed region."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
