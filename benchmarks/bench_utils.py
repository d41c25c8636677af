"""Shapes, the benchmark matrix, useful-FLOP counting and the timing/memory harness shared by the benchmarks.

Environment (all optional):

* `PK_BENCH_MATRIX`: `full` (default with CUDA), `short` (the ~4-minute GPU run) or `cpu` (default without CUDA).
* `PK_BENCH_N`, `PK_BENCH_B`, `PK_BENCH_MODEL_N`: comma-separated overrides of the sequence lengths / batch
  sizes of the op and module levels, and of the model level's sequence lengths.
* `PK_BENCH_DTYPES` (`bf16,fp16,fp32`), `PK_BENCH_PROVIDERS`, `PK_BENCH_MODES` (`fwd,fwdbwd`),
  `PK_BENCH_LEVELS` (`op,module,model`): keep only these.
* `PK_BENCH_SECONDS`: timed seconds per benchmark (rounds are chosen from one untimed call; default 1 on a
  GPU, 0.5 for the short matrix, 0.2 on a CPU).
* `PK_BENCH_PARTIAL=path.jsonl`: append each result as it finishes (`report.py` reads it too);
  `PK_BENCH_PROGRESS=1`: print each result's line as it finishes; `PK_BENCH_NO_SUMMARY=1`: no final table.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from report import add_ratios

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwdbwd")
# Forward+backward useful FLOPs are 3.5x the forward's: the backward recomputes the scores.
FWDBWD_FACTOR = 3.5


def has_cuda() -> bool:
    return torch.cuda.is_available()


def matrix_name() -> str:
    return os.environ.get("PK_BENCH_MATRIX") or ("full" if has_cuda() else "cpu")


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name, "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def env_ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = _env_list(name)
    return tuple(int(x) for x in raw) if raw else default


def selected(name: str, value: str) -> bool:
    """Whether `value` passes the `PK_BENCH_<name>` filter (no filter: everything passes)."""
    allowed = _env_list(f"PK_BENCH_{name}")
    return allowed is None or value in allowed


@dataclass(frozen=True)
class Shape:
    """One attention problem: `G` global tokens at positions `0..G-1`, `P` prefix-tuning keys/values."""

    dtype: str
    B: int
    N: int
    H: int = 12
    D: int = 64
    w: int = 256
    G: int = 17
    P: int = 0
    pad: int = 0  # padding tokens at the end of the last batch row

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        pad = f"-pad{self.pad}" if self.pad else ""
        return f"{self.dtype}-B{self.B}-N{self.N}-H{self.H}-D{self.D}-w{self.w}-G{self.G}-P{self.P}{pad}"

    def masks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(is_global, key_padding_mask)`, both `(B, N)` bool."""
        is_global = torch.zeros(self.B, self.N, dtype=torch.bool, device=device)
        is_global[:, : self.G] = True
        pad = torch.zeros_like(is_global)
        if self.pad:
            pad[-1, self.N - self.pad :] = True
            is_global &= ~pad
        return is_global, pad


def attended_pairs(is_global: torch.Tensor, pad: torch.Tensor, w: int, num_prefix: int) -> int:
    """Exact number of attended (query, key) pairs of the Longformer mask, summed over the batch (one head).

    Local rows see band ∩ valid ∩ non-global keys, plus every global key, plus the prefix; global rows see
    every non-padding key plus the prefix; padding rows see nothing.
    """
    is_global, pad = is_global.cpu(), pad.cpu()
    n = is_global.shape[1]
    valid = ~pad
    glob = is_global & valid
    band_key = (valid & ~glob).long()
    csum = torch.nn.functional.pad(band_key.cumsum(1), (1, 0))  # csum[:, j] = keys before j
    i = torch.arange(n)
    hi, lo = (i + w + 1).clamp(max=n), (i - w).clamp(min=0)
    in_band = csum[:, hi] - csum[:, lo]  # (B, N) band keys of row i
    n_glob, n_valid = glob.sum(1), valid.sum(1)
    local_rows = valid & ~glob
    local = ((in_band + n_glob[:, None] + num_prefix) * local_rows).sum()
    global_ = (n_glob * (n_valid + num_prefix)).sum()
    return int(local + global_)


def attention_flops(shape: Shape, mode: str) -> float:
    """Useful attention FLOPs: `4·D` per attended pair and head forward, 3.5x that forward+backward."""
    is_global, pad = shape.masks("cpu")
    pairs = attended_pairs(is_global, pad, shape.w, shape.P)
    fwd = 4.0 * shape.D * pairs * shape.H
    return fwd * (FWDBWD_FACTOR if mode == "fwdbwd" else 1.0)


def projection_flops(tokens: int, global_rows: int, hidden: int, mode: str) -> float:
    """The six Longformer projections: q, k, v, k_global, v_global on every token, q_global on global rows."""
    fwd = 2.0 * hidden * hidden * (5 * tokens + global_rows)
    return fwd * (3.0 if mode == "fwdbwd" else 1.0)  # backward: input and weight gradients


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # not installed
            out[name] = f"n/a ({type(exc).__name__})"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} of {os.cpu_count()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_extra_bytes(fn, device: torch.device, before=None) -> int | None:
    """Peak memory of one call above what is allocated before it (the inputs, the weights), in bytes.

    CUDA: the allocator's statistics. CPU: `prefix_kernels.memory`'s storage tracker, `None` where it cannot
    look (compiled FlexAttention) or the package is missing.
    """
    if before is not None:
        before()
    free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        from prefix_kernels.cli.memory import peak_memory

        with peak_memory(device) as mem:
            fn()
    except (ImportError, NotImplementedError):  # the tracker is a dispatch mode: blind to compiled HOPs
        return None
    return int(mem.peak)


# Every finished benchmark: its identity, median and `extra_info` dict (the one pytest-benchmark serializes).
RESULTS: list[dict] = []


def run_benchmark(benchmark, fn, device: torch.device, *, level: str, provider: str, shape: Shape, mode: str,
                  flops: float | None, shape_id: str | None = None, warmup: int | None = None,
                  info: dict | None = None, before_memory=None) -> None:
    """Time `fn` with pytest-benchmark and record TFLOP/s, peak extra memory and versions in `extra_info`.

    `fn` must do the whole measured work (forward, or forward+backward) and have run once already (compilation,
    autotuning); `warmup` more untimed calls follow (default 1 on a GPU: the allocator's pools, clocks; 0 on a
    CPU). Each timed round ends with a synchronize, so all its GPU work is counted. The number of rounds (and of
    calls per round, for sub-millisecond GPU calls) comes from one untimed, synchronized call. `before_memory()`
    runs before the memory measurement (e.g. dropping `.grad`s so that they count as extra memory).
    """

    def timed():
        fn()
        sync(device)

    on_gpu = device.type == "cuda"
    for _ in range((1 if on_gpu else 0) if warmup is None else warmup):
        timed()
    start = time.perf_counter()
    timed()
    once = time.perf_counter() - start
    peak = peak_extra_bytes(fn, device, before_memory)
    default_seconds = "0.2" if not on_gpu else ("0.5" if matrix_name() == "short" else "1.0")
    seconds = float(os.environ.get("PK_BENCH_SECONDS", default_seconds))
    # Sub-millisecond GPU calls: several back-to-back calls per round and one synchronize at its end, so the
    # host's launch latency overlaps the previous call's kernels as in a training loop.
    iterations = max(1, min(100, math.ceil(2e-3 / max(once, 1e-6)))) if on_gpu else 1
    calls = [0]

    def round_target():
        fn()
        calls[0] += 1
        if calls[0] % iterations == 0:
            sync(device)

    rounds = max(3, min(200, math.ceil(seconds / max(once * iterations, 1e-6))))
    shape_id = shape_id or shape.id
    benchmark.group = f"{level} {mode} {shape_id}"
    benchmark.pedantic(round_target, rounds=rounds, warmup_rounds=1 if on_gpu else 0, iterations=iterations)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else once
    extra = benchmark.extra_info
    extra.update(info or {})
    extra.update(dataclasses.asdict(shape))
    extra.update(
        level=level,
        provider=provider,
        shape=shape_id,
        mode=mode,
        median_ms=median * 1e3,
        calls_per_round=iterations,
        flops=flops,
        tflops=(flops / median / 1e12) if flops else None,
        peak_extra_mb=None if peak is None else peak / 2**20,
        device=device_name(device),
        x_hf=None,
        x_flex=None,
        **versions(),
    )
    RESULTS.append(extra)
    partial = os.environ.get("PK_BENCH_PARTIAL")
    if partial:  # one JSON line per result as it finishes: a run killed by a time limit keeps what it measured
        with open(partial, "a") as fh:
            fh.write(json.dumps(extra, default=str) + "\n")


def compute_ratios() -> None:
    """Fill `x_hf` / `x_flex` of every recorded result (see `report.add_ratios`)."""
    add_ratios(RESULTS)
