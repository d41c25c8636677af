"""Data-parallel training of a patched prefix-propagation model on the CPU, two processes over gloo:
`examples/train_distributed.py` under DDP and FSDP2 (`fully_shard`), spawned here and launched by `torchrun`.
Both ranks end with the same weights, equal to one process trained on the same global batches.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLE = ROOT / "examples" / "train_distributed.py"
SETTINGS = dict(steps=3, batch_size=8, seq_len=96, num_prefix=4, backend="reference")
HAS_FSDP2 = importlib.util.find_spec("torch.distributed.fsdp") is not None and hasattr(
    importlib.import_module("torch.distributed.fsdp"), "fully_shard")


def load_example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters; a collective under FSDP2."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, modes: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        example = load_example()
        for mode in modes:
            torch.save(trainable(example.train(mode, **SETTINGS)), f"{out_dir}/{mode}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def one_process() -> tuple[dict, dict]:
    """Weights after training in this process on the whole global batches, and at initialization."""
    example = load_example()
    trained = trainable(example.train("none", **SETTINGS))
    init = trainable(example.build_model(SETTINGS["seq_len"], SETTINGS["num_prefix"], "reference"))
    return trained, init


def assert_matches(ranks: list[dict], want: dict, init: dict) -> None:
    assert ranks[0].keys() == want.keys() and "prefix_propagation.prefix" in want
    for name, w in want.items():
        assert not torch.equal(w, init[name]), f"{name} did not train"
        for r in ranks[1:]:
            torch.testing.assert_close(r[name], ranks[0][name], atol=0, rtol=0, msg=f"ranks differ: {name}")
        torch.testing.assert_close(ranks[0][name], w, atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_ddp_and_fsdp2_match_one_process(tmp_path):
    """Spawned ranks (file-based rendezvous, no port): DDP, then FSDP2 where this torch has it."""
    modes = ["ddp", "fsdp"] if HAS_FSDP2 else ["ddp"]
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), modes), nprocs=2)
    want, init = one_process()
    for mode in modes:
        assert_matches([torch.load(tmp_path / f"{mode}-{r}.pt") for r in range(2)], want, init)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_launch(tmp_path, fsdp):
    """The documented command line: `torchrun --standalone --nproc-per-node 2 examples/train_distributed.py`."""
    if fsdp and not HAS_FSDP2:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    from safetensors.torch import load_file

    out = tmp_path / "prefix.safetensors"
    # The example takes a GPU per rank where it sees one (NCCL): hide them, so both ranks train on the CPU (gloo).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    args = ["--steps", str(SETTINGS["steps"]), "--batch-size", str(SETTINGS["batch_size"]), "--seq-len",
            str(SETTINGS["seq_len"]), "--backend", "reference", "--output", str(out), *(["--fsdp"] if fsdp else [])]
    # The example's defaults differ from SETTINGS only in what these flags set (and num_prefix, below).
    example = load_example()
    assert example.train.__kwdefaults__["num_prefix"] == SETTINGS["num_prefix"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want, init = one_process()
    assert_matches([load_file(str(out))], want, init)
