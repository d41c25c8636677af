"""Triton backend: fused Longformer attention (band + global tokens + prefix keys), forward and backward.

Read in this order: `common.py` (device helpers), `forward.py` (`_attention_fwd_kernel`: local-row tiles and
global-row key splits in one grid; `_global_rows_merge_kernel`), `backward.py` (`_bwd_preprocess_kernel`, the
one-pass `_attention_bwd_kernel`, `_bwd_finalize_kernel`), then `launch.py` (the per-mask token tables, the tile
table, the launchers `forward` / `backward` of the contract in `core/custom_op.py`, and the backend-module
functions `unavailable_reason`, `cannot_serve`).

Layout: `q, k, v, q_global, k_global, v_global, O` are `(B, N, H, D)` (any strides, unit stride along `D`), the
prefix `(B, P, H, D)` (batch stride 0 allowed), `LSE` `(B, H, N)` fp32. Conventions shared by every kernel:

* Scores stay raw (`q . k`, fp32) until one FFMA maps them into the log2 domain: `p = exp2(s * qk_scale - m)` with
  `qk_scale = scale * log2(e)`. `LSE` stores the log2-domain log-sum-exp of the *undropped* softmax of each row;
  `+inf` marks a row that attends nothing (padding, or an empty key set), so the backward's `exp2(s * qk_scale -
  LSE)` gives exactly 0 there. The running maximum starts at a finite floor (`M_FLOOR`), so a row whose keys so
  far are all masked (`-inf`) gives `p = 0` and a rescale factor of 1 with no per-element guard.
* Token tables, built once per mask tensor and cached (`_token_tables`): `KIND (B, N)` int8 (0 local, 1 global,
  2 padding), `SPECIAL (B, N + 1)` int32, the running count of non-local tokens (a tile holds a global or padding
  column iff its two ends differ), and `SLOT (B, N)` int32, each global token's index in the compact global list
  (-1 elsewhere). Band columns of kind != 0 are excluded (global keys are attended once, through the compact list);
  only rows of kind 0 are local queries.
* Band tiles are classified per tile, not per element: a tile inside the band, inside the sequence and free of
  global/padding columns takes the plain path (one FFMA, one exp2 per score); only the others build the element
  mask. Whether a tile holds such a column is looked up in `SPECIAL` only by programs whose band holds one (one
  check per program). One software-pipelined loop walks all band tiles of a program; when `N` is a multiple of
  the tile, its loads carry no predicate.
* Global rows are computed twice in the forward: the local-row tiles compute them too (cheaper than branching)
  but store 0 and `LSE = +inf` there, as for padding rows; `_global_rows_merge_kernel` then writes `O` and `LSE` of
  those rows from the global branch, whose key splits ran as extra programs of the same grid as the local-row
  tiles. Without the global projections (`q_global = None` with a global index: local rows only, `GLOBAL_ROWS`
  off) no global-row program runs, in the forward or the backward: those rows stay 0 and take no gradient, while
  the global tokens remain the global keys of the local rows (`HAS_GLOBAL`), with their dK/dV.
* Documents (`document_ids`, `HAS_DOC`): a table `DOCS (4, B, N)` int32, built once per mask (`_doc_tables`):
  per token its document's start and end position and its document's first and past-last slot in the compact
  global list (padding tokens take a neighbouring document: they are neither rows nor keys). Documents are
  contiguous runs, so a tile's documents are one position range and one slot range: a local-row tile's band is
  clipped to `[start of its first row's document, end of its last row's)` and its global keys to that slot range;
  a band key tile's query tiles likewise. A tile whose rows (keys) lie in one document then needs no document
  test on its interior tiles (the clipped edges are classified like the band's edges). A forward tile that
  straddles a boundary compares each element's document start. A backward band key tile takes one pass over its
  query tiles per document among its keys (one, unless it straddles a boundary), with that document's keys
  and its query tiles clipped to the document; its masked tiles admit rows by their position against the
  document's range, so no document is loaded inside the band loop and its interior tiles run the loop body of a
  call without documents. The shared keys' backward admits each key's rows by position too (`[start, end)` of a
  global key's document, every row for a prefix key). Global queries test each text key's document (the global
  rows are few); their forward key splits are clipped to the query block's documents; the prefix is every
  document's.
* Shared keys ("joint" mode): the keys every local query sees, the compact global list (through the local `k,
  v`) and the prefix, are one list, global slots first, gathered into blocks of the key tile's width (`BLOCK_N`;
  one 64-key block for 17 globals and 16 prefix keys; half of it with dropout at D > 64, where the block's one
  Philox call per element would spill) and walked once: the forward's local-row tile takes one
  softmax step for them, the backward's shared-key programs load each query tile and add its dQ part once per
  block, the keys as the rows of 64-row tiles. The order of the softmax steps differs from separate global and
  prefix blocks, so the results agree with them to rounding, not bitwise. "separate" mode keeps two blocks (its
  two softmaxes), and so does the forward with documents (the global keys' document test stays out of the
  prefix block, where in one block it costs more instructions than two blocks).
* "separate" prefix normalization (`SEPARATE`, `prefix_scale (H,)` fp32): the prefix keys get a second running
  normaliser after the text's, `out = A + s_h * B`, and `LSE` is `(2, B, H, N)` (the text's, then the prefix's
  softmax; `lse_plane = B * H * N` apart); a global row's key splits merge the text splits by their LSE and add
  the prefix split scaled. The backward needs `rowsum(dO * B)` per row (the text's delta is `rowsum(dO * O) - s_h
  * rowsum(dO * B)`, the prefix's `rowsum(dO * B)`, whose sum over rows is `prefix_scale`'s gradient): the
  preprocess kernel recomputes `B` from the prefix LSE (P keys per row). The prefix's `dS` is scaled by `s_h`
  and its dV multiplied by it. The global rows' own prefix (`prefix_k_global`, `PKG, PVG`; the local rows' when
  absent) is what their prefix split reads, in both modes, its gradient the prefix partials' last slot.
* Dropout: Philox-4x32-10 keyed by `seed`, counter `(j // 4, i, b * H + h, 0)`, output word `j % 4`, for query `i`
  and key position `j` (prefix key `p` is at `N` rounded up to a multiple of 4, plus `p`): one Philox call serves
  four consecutive keys of a tile, and no counter repeats below 2**32 rows. A row is local or global, never both,
  so one counter space covers both probability matrices, and the backward regenerates exactly the forward's
  mask. A block of shared keys keeps each key's own position (a global key's token, a prefix key's `N`
  rounded up plus `p`), one Philox call per element there. In "separate" mode the prefix columns keep these
  positions: `A` and `B` are different columns of the
  row, so their bits are independent (the counter differs), and each softmax is dropped on its own. Kept
  probabilities are scaled by `1 / (1 - p)`.
* fp32 follows PyTorch's fp32 matmul setting, as PyTorch's own matmuls do: by default (precision "highest")
  `tl.dot(..., input_precision="ieee")`, full fp32 products on the FMA units, matching the fp32 reference to
  ~1e-5; with TF32 matmuls enabled (`torch.set_float32_matmul_precision("high")`, `allow_tf32`,
  `torch.backends.fp32_precision = "tf32"`) TF32 tensor cores (~1e-3). fp16/bf16 use tensor cores with fp32
  accumulation; probabilities and `dS` are rounded to the input dtype before their matmuls, as in FlashAttention.
* Backward, one pass: each key tile's program recomputes the scores of every (query tile, key tile) pair once and
  produces dK/dV of its keys and the pair's dQ part, added with fp32 atomics into `DQ_ACC (B*H, N_pad, BLOCK_D)`
  (zeroed by the preprocess kernel, scaled and cast once by the finalize kernel). Keys every local query sees
  (global keys through the local `k, v`, and the prefix) get their dK/dV from programs that each own a chunk of
  query rows and write fp32 partials, summed once by the finalize kernel (deterministic, no atomics on a few hot
  addresses). The global rows' backward is split along the keys in the same grid; its dQ_global goes to the
  fp32 `DQG_ACC (B*H, G_pad, BLOCK_D)` by atomics. Every float atomic is relaxed: the adds commute, and only the
  next kernel reads the sums (kernel boundaries order them). On a GPU dQ and dQ_global are therefore not bitwise
  reproducible from run to run (the order of the fp32 adds varies); the forward, dK and dV are.
* Launches: both launchers make the inputs' device the current one first (Triton launches on its current device
  and stream), as the CUDA backend does. Head dims above 128, GPUs below compute capability 8.0 and GPUs with less
  shared memory per block than their tiles use are refused by `cannot_serve` (the device's properties read once
  per device), so `auto` moves on. With outputs poisoned (tests), the fp32 work buffers are NaN-filled too.
* Memory access is through pointers, not TMA tensor descriptors. The inputs may have any strides and a descriptor
  needs a 16-byte aligned base and strides, so the pointer path has to exist anyway; it is the path the
  interpreter tests run, and a second, descriptor path would be checked only by compiling and on a GPU. With a
  scalar tile pointer plus loop-invariant offsets the forward's band tile already meets its instruction budget
  (BENCHMARKS.md). Descriptors remain a candidate for the GPU tuning round.
"""

from .launch import INTERPRET, backward, cannot_serve, forward, unavailable_reason

__all__ = ["INTERPRET", "backward", "cannot_serve", "forward", "unavailable_reason"]
