"""Exported models in onnxruntime: the patched model's ONNX files (legacy and dynamo exporters, one file each with a
dynamic sequence length) against Hugging Face's legacy export of the unpatched model (one file per length: HF's
export is only correct at the traced length). Not a pytest benchmark (it is not collected): run it as a script.

    python benchmarks/export_bench.py                      # N = 1024, 2048, 4096, 8192, into a temporary folder
    python benchmarks/export_bench.py --n 1024 2048 --keep out/   # other lengths; keep the ONNX files in out/

The model: a random-init `LongformerModel` (hidden 128, 4 heads, 2 layers, FFN 512, attention window 512, i.e.
one-sided window 256), batch 1, one global token (`<s>`), no padding; the output is the last hidden state. Each
figure comes from its own process that imports onnxruntime and numpy only (no torch): one intra-op and one
inter-op thread, sequential execution, default graph optimizations; one warm-up run, then the median of
`--repeat` runs, and the process's peak RSS (`ru_maxrss`, the runtime and the model included). The outputs of
every file are checked against each other (the same weights, the same inputs). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ("input_ids", "attention_mask", "global_attention_mask")
KINDS = {
    "legacy": "patched, legacy exporter (`dynamo=False`), dynamic length",
    "dynamo": "patched, dynamo exporter (`dynamo=True`), dynamic length",
    "hf": "HF's legacy export of the unpatched model, one file per length",
}
TRACE_N = 1024  # the length the dynamic-length files are traced at


def build_model(max_n: int):
    """The benchmark's model, wrapped to take and return plain tensors; the same weights in every process."""
    import torch
    import transformers

    config = transformers.LongformerConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        attention_window=512, max_position_embeddings=max_n + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.LongformerModel(config).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, global_attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              global_attention_mask=global_attention_mask).last_hidden_state

    return LastHidden(model).eval()


def inputs(n: int, seed: int = 0) -> dict:
    """`{name: int64 numpy array (1, n)}`: random tokens, no padding, one global token at position 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    glob = np.zeros((1, n), dtype=np.int64)
    glob[0, 0] = 1
    return {"input_ids": rng.integers(3, 1000, (1, n), dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64), "global_attention_mask": glob}


def export(kind: str, path: Path, n: int, max_n: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    model = build_model(max_n)
    if kind != "hf":
        import prefix_kernels as pk

        pk.patch_longformer(model.model)
    example = tuple(torch.from_numpy(t) for t in inputs(n).values())
    with torch.no_grad():
        if kind == "dynamo":
            dim = torch.export.Dim("n", min=2, max=max_n)
            torch.onnx.export(model, example, str(path), dynamo=True, input_names=list(NAMES),
                              output_names=["out"], dynamic_shapes={k: {1: dim} for k in NAMES})
        else:
            axes = {k: {1: "n"} for k in NAMES} if kind == "legacy" else None
            torch.onnx.export(model, example, str(path), dynamo=False, input_names=list(NAMES),
                              output_names=["out"], dynamic_axes=axes, opset_version=17)


def run(path: Path, n: int, repeat: int, out: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = inputs(n)
    result = session.run(None, feed)[0]  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    np.save(out, result)
    return {"ms": 1e3 * sorted(times)[len(times) // 2],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def file_mb(path: Path) -> float:
    data = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]  # the file and any external data
    return sum(p.stat().st_size for p in data) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the ONNX files (default: temporary)")
    parser.add_argument("--_export", nargs=3, metavar=("KIND", "PATH", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--_run", nargs=3, metavar=("PATH", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_n = max(args.n + [TRACE_N])
    if args._export:
        kind, path, n = args._export
        return export(kind, Path(path), int(n), max_n)
    if args._run:
        path, n, out = args._run
        return print(json.dumps(run(Path(path), int(n), args.repeat, Path(out))))

    folder = args.keep or Path(tempfile.mkdtemp(prefix="export_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--n", *map(str, args.n), "--repeat", str(args.repeat)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for kind in args.kinds:
        for n in args.n:
            path = folder / (f"{kind}_{n}.onnx" if kind == "hf" else f"{kind}.onnx")
            if not path.exists():
                t0 = time.perf_counter()
                subprocess.run([*me, "--_export", kind, str(path), str(n if kind == "hf" else TRACE_N)], check=True,
                               env=env)
                print(f"exported {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out = folder / f"out_{kind}_{n}.npy"
            done = subprocess.run([*me, "--_run", str(path), str(n), str(out)], check=True, env=env,
                                  capture_output=True, text=True)
            rows[kind, n] = {**json.loads(done.stdout.strip().splitlines()[-1]), "file_mb": file_mb(path)}
            print(kind, n, rows[kind, n], file=sys.stderr)

    import numpy as np

    print(f"\nonnxruntime {_version('onnxruntime')}, torch {_version('torch')}, transformers "
          f"{_version('transformers')}; one thread; median of {args.repeat} runs\n")
    head = "| N | " + " | ".join(KINDS[k] for k in args.kinds) + " |"
    print(head + "\n|---|" + "---|" * len(args.kinds))
    for n in args.n:
        cells = []
        for kind in args.kinds:
            r = rows[kind, n]
            cell = f"{r['ms']:.0f} ms, {r['rss_mb']:.0f} MB ({r['file_mb']:.1f} MB)"
            if kind != "hf" and "hf" in args.kinds:
                ref = rows["hf", n]
                err = np.abs(np.load(folder / f"out_{kind}_{n}.npy") - np.load(folder / f"out_hf_{n}.npy")).max()
                cell += f"; {r['ms'] / ref['ms']:.2f}× / {r['rss_mb'] / ref['rss_mb']:.2f}× HF, max diff {err:.1e}"
            cells.append(cell)
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\nfiles in {folder}")


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "-"


if __name__ == "__main__":
    main()
