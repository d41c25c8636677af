"""`python -m prefix_kernels`: environment report, then one random Longformer layer through HF and the chosen
backends (max error against HF, time, peak memory). `python -m prefix_kernels demo [...]` runs the
prefix-propagation training demo (`cli/demo.py`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

import torch

from ..attention import BACKEND_ORDER, ENV_VAR, auto_skips, available_backends, longformer_attention, resolve_backend
from ..version import __version__
from .args import HelpFormatter, default_device, device_arg, positive_int
from .memory import peak_memory


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"


def environment_report(device: torch.device) -> list[str]:
    lines = [
        f"prefix_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
        f"transformers {_version('transformers')}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {device} ({props.name}, sm_{props.major}{props.minor}, {props.total_memory >> 20} MiB)")
    else:
        lines.append(f"device: {device} (no CUDA device)")
    skipped = auto_skips()
    for name, why in available_backends().items():
        state = "available" if why is None else "unavailable: " + why
        if why is None and name in skipped:
            state += f" ({skipped[name]})"
        lines.append(f"  backend {name:<9} {state}")
    return lines


def _time(fn, device: torch.device, repeat: int) -> float:
    """Median wall time in ms (synchronizing CUDA around each call)."""
    fn()  # warm-up: compilation, autotuning, allocator
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def layer_comparison(device: torch.device, dtype: torch.dtype, *, batch: int, seq_len: int, hidden: int,
                     heads: int, window: int, n_global: int, repeat: int, backends: list[str]) -> list[str]:
    """One random `LongformerSelfAttention` layer through HF and through each of `backends`."""
    from transformers.models.longformer.modeling_longformer import LongformerConfig, LongformerSelfAttention

    torch.manual_seed(0)
    config = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[2 * window],
                              attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, layer_id=0).to(device=device, dtype=dtype).eval()
    d = hidden // heads
    x = torch.randn(batch, seq_len, hidden, device=device, dtype=dtype)
    is_global = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    is_global[:, :n_global] = True
    pad = torch.zeros_like(is_global)
    pad[-1, seq_len - seq_len // 8 :] = True  # the last row ends in padding
    mask = torch.zeros(batch, seq_len, device=device, dtype=dtype)
    mask[is_global] = torch.finfo(dtype).max
    mask[pad] = torch.finfo(dtype).min

    def hf():
        return layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                     is_global_attn=n_global > 0)[0]

    def ours(backend):
        def run():
            heads_view = lambda lin: lin(x).view(batch, seq_len, heads, d)  # noqa: E731
            out = longformer_attention(
                heads_view(layer.query), heads_view(layer.key), heads_view(layer.value), window=window,
                is_global=is_global, key_padding_mask=pad, q_global=heads_view(layer.query_global),
                k_global=heads_view(layer.key_global), v_global=heads_view(layer.value_global), backend=backend)
            return out.reshape(batch, seq_len, hidden)
        return run

    rows = [("hf (eager)", hf)] + [(name, ours(name)) for name in backends]
    with torch.no_grad():
        expected = hf().float()
        table = [f"{'implementation':<14} {'max |err| vs HF':>16} {'time (ms)':>10} {'peak extra (MB)':>16}"]
        for name, fn in rows:
            try:
                with peak_memory(device) as mem:
                    out = fn()
                err = (out.float() - expected).abs().max().item()
                ms = _time(fn, device, repeat)
                table.append(f"{name:<14} {err:>16.2e} {ms:>10.2f} {mem.peak / 2**20:>16.1f}")
            except ValueError as exc:  # a backend that cannot serve this shape/dtype/device
                table.append(f"{name:<14} skipped: {exc}")
    head = (f"one Longformer layer: B={batch} N={seq_len} C={hidden} H={heads} w={window} globals={n_global} "
            f"{str(dtype).replace('torch.', '')} on {device}")
    return [head, *table]


def chosen_backends(choice: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends `--backend` names: "all" = every usable backend that `auto` may pick (the Triton interpreter
    only when named), "auto" = the one it picks for this device and dtype, else the one named. With
    `PREFIX_KERNELS_BACKEND` set, every call runs that backend: it is the one row, under its own name."""
    if os.environ.get(ENV_VAR):
        return [resolve_backend(device, dtype)]
    if choice == "all":
        skipped = auto_skips()
        return [name for name, why in available_backends().items() if why is None and name not in skipped]
    if choice == "auto":
        return [resolve_backend(device, dtype)]
    return [choice]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prefix_kernels", description=__doc__, formatter_class=HelpFormatter,
        epilog="python -m prefix_kernels demo --help: the training demo's options")
    parser.add_argument("--device", type=device_arg, default=default_device(),
                        help="where the layer runs: cpu, cuda or cuda:N")
    parser.add_argument("--backend", choices=("all", "auto", *BACKEND_ORDER), default="all",
                        help="backends compared with HF: 'all' = every one 'auto' may pick here (the Triton "
                             "interpreter only when named), 'auto' = the one it picks, or one by name")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per sequence, a multiple of 2 * window (HF's layer needs it); default 4096 on "
                             "CUDA (longformer-base layer, bf16), 1024 on a CPU (a small fp32 layer)")
    parser.add_argument("--repeat", type=positive_int, default=None,
                        help="timed calls per implementation (the median is reported); default 20 on CUDA, 3 on a CPU")
    opts = parser.parse_args(argv)
    window = 256 if opts.device.type == "cuda" else 64
    if opts.seq_len is not None and opts.seq_len % (2 * window):
        parser.error(f"--seq-len must be a multiple of {2 * window} (2 * window) on {opts.device.type}, "
                     f"got {opts.seq_len}")
    if opts.backend not in ("all", "auto"):
        why = available_backends()[opts.backend]
        if why is not None:
            parser.error(f"--backend {opts.backend} is not available here: {why}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    opts = parse_args(argv)
    device = opts.device
    print("\n".join(environment_report(device)))
    print()
    if device.type == "cuda":  # longformer-base sized
        shape = dict(batch=1, seq_len=opts.seq_len or 4096, hidden=768, heads=12, window=256, n_global=17,
                     repeat=opts.repeat or 20)
        dtype = torch.bfloat16
    else:
        shape = dict(batch=2, seq_len=opts.seq_len or 1024, hidden=256, heads=4, window=64, n_global=5,
                     repeat=opts.repeat or 3)
        dtype = torch.float32
    backends = chosen_backends(opts.backend, device, dtype)
    if os.environ.get(ENV_VAR):
        print(f"{ENV_VAR}={os.environ[ENV_VAR]} overrides --backend: every call runs {backends[0]!r}\n")
    print("\n".join(layer_comparison(device, dtype, **shape, backends=backends)))
    return 0
