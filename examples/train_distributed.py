"""Prefix-propagation trained data-parallel over several processes: DDP or FSDP2 (`fully_shard`).

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py            # DDP
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --fsdp     # FSDP2
    accelerate launch --num_processes 2 --cpu examples/train_distributed.py           # the same, via accelerate

One process per device: gloo on CPUs, NCCL on GPUs (`LOCAL_RANK` picks the GPU). Both launchers set `RANK`,
`WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, which `init_process_group` reads. Every rank builds the same small
random Longformer classifier (nothing downloaded), applies prefix-propagation (patching the attention) before
wrapping it, and trains the prefix and the head on its slice of each global batch of the demo's synthetic task;
DDP averages the gradients, FSDP2 shards the parameters and reduce-scatters them, so every rank ends with the
weights that one process would reach on the whole global batch. Rank 0 saves the trainable parameters with
`save_prefix` (under FSDP2 every rank takes part in gathering them).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import prefix_kernels as pk
from prefix_kernels.attention import BACKEND_ORDER


def build_model(seq_len: int, num_prefix: int, backend: str, seed: int = 0) -> torch.nn.Module:
    """The same random classifier with prefix-propagation on every rank (same seed)."""
    from prefix_kernels.cli.demo import tiny_classifier

    torch.manual_seed(seed)
    # No dropout: a run on N processes then reaches exactly the weights of one process on the global batch
    # (with dropout the masks depend on how the batch is split, so only the distribution would agree).
    model = tiny_classifier(seq_len + num_prefix, dropout=0.0)
    pk.apply_prefix_propagation(model, num_prefix=num_prefix, pool_prefix=True, backend=backend)
    return model


def global_batch(step: int, size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Step `step`'s global batch of the demo's task: the same on every rank, each takes its slice."""
    from prefix_kernels.cli.demo import make_task

    return make_task(size, seq_len, 12, torch.Generator().manual_seed(1000 + step))


def wrap(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard group per layer and one for the rest; "none" for a single process."""
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.longformer.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def train(mode: str, *, steps: int = 3, batch_size: int = 8, seq_len: int = 96, num_prefix: int = 4,
          lr: float = 1e-2, backend: str = "auto", device: torch.device | None = None) -> torch.nn.Module:
    """Train `steps` steps; `mode` "ddp" / "fsdp" in an initialized process group, or "none" (one process)."""
    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "none" else (0, 1)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world}")
    model = build_model(seq_len, num_prefix, backend).to(device).train()
    wrapped = wrap(model, mode, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    local = batch_size // world
    for step in range(steps):
        batch = {k: v[rank * local:(rank + 1) * local].to(device)
                 for k, v in global_batch(step, batch_size, seq_len).items()}
        loss = wrapped(**batch).loss  # the mean over the local slice; DDP / FSDP2 average over the ranks
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} (rank 0's slice)")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (split over the processes)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per document")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKEND_ORDER), help="attention backend")
    parser.add_argument("--output", default="prefix_distributed.safetensors", help="where rank 0 saves the prefix")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model = train("fsdp" if args.fsdp else "ddp", steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, backend=args.backend, device=device)
        pk.save_prefix(model, args.output)  # every rank: FSDP2 gathers the shards; rank 0 writes
        if dist.get_rank() == 0:
            print(f"saved the prefix and the head to {args.output}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
