#!/usr/bin/env python3
"""The PyTorch side of scripts/bench-dist: SimCLR steps the way a PyTorch user writes data parallelism on CPUs,
DistributedDataParallel over Gloo (127.0.0.1, default 25 MB buckets, gradients all-reduced as backward produces
them) with the negatives gathered by torch.distributed.nn.functional.all_gather (differentiable), LARS as
selfsup's, the projector of configs/simclr-fmnist-tiny.toml. One run per call; the last line printed is
`MODEL MODE SECONDS_PER_STEP COMM_SECONDS_PER_STEP` like bench-dist's own rows (comm: 0, DDP overlaps it; the
script's `n2-nosync` mode, DDP with no_sync(), gives the step without any gradient all-reduce, so the exposed
communication is n2 - n2-nosync).

    python3 scripts/reference/ddp_bench_torch.py --model resnet18 --mode n2 --batch 32 --steps 12

Modes: one (no distribution, all cores), n1 (DDP, world size 1), n2 (DDP, 2 processes with half the cores each,
half the global batch each), n2-nosync (as n2, no gradient all-reduce: not training, only the timing).
The input is random 1 x 28 x 28 pairs made before timing (no data loading): the steps measure model and
communication only. Every step is timed, the first ones too, as selfsup's train_seconds / steps.
"""

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.nn.functional import all_gather
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simclr_fmnist_torch import LARS, nt_xent  # noqa: E402  (the same loss and optimizer as the SimCLR reference)

WARMUP = 0


class ResNet(TorchvisionResNet):
    """torchvision's ResNet with a CIFAR stem on 1 channel and no fc (bench-dist's ResNet-18 / ResNet-50)."""

    def __init__(self, block, layers, width=64):
        super().__init__(block, layers)
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.maxpool = nn.Identity()
        self.fc = nn.Identity()
        self.dim = 512 * block.expansion


class ViT(nn.Module):
    """ViT-Tiny (depth 12, width 192, 3 heads) on 28 px, patch 4, 1 channel, class token out."""

    def __init__(self):
        super().__init__()
        self.vit = VisionTransformer(image_size=28, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192,
                                     mlp_dim=768)
        self.vit.conv_proj = nn.Conv2d(1, 192, 4, 4)
        self.vit.heads = nn.Identity()
        self.dim = 192

    def forward(self, x):
        return self.vit(x)


def backbone(name):
    if name == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2])
    if name == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3])
    if name == "vit-tiny":
        return ViT()
    raise SystemExit(f"unknown model {name}")


class SimCLR(nn.Module):
    def __init__(self, name, hidden=256, dim=64):
        super().__init__()
        self.backbone = backbone(name)
        d = self.backbone.dim
        self.projector = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, dim))

    def forward(self, x):
        return self.projector(self.backbone(x))


def run(rank, world, args, port, threads, result):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    distributed = args.mode != "one"
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = SimCLR(args.model)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = LARS(model.parameters(), lr=0.3 * args.batch / 256, momentum=0.9, weight_decay=1e-5, eta=0.02)
    local = args.batch // world
    g = torch.Generator().manual_seed(rank)
    pairs = [(torch.randn(local, 1, 28, 28, generator=g), torch.randn(local, 1, 28, 28, generator=g))
             for _ in range(4)]
    times = []
    for step in range(WARMUP + args.steps):
        x1, x2 = pairs[step % len(pairs)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)

        def forward_backward():
            z = net(torch.cat([x1, x2]))
            z1, z2 = z[:local], z[local:]
            if distributed:
                # Every rank's rows, the gradient going back to each rank's own: the global batch's negatives.
                z1, z2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))
            # all_gather's backward sums every rank's copy of the loss's gradient into the rows' owner (world x the
            # one-process gradient) and DDP's average divides it back: the one-process step on the global batch.
            nt_xent(z1, z2, 0.2).backward()

        if args.mode == "n2-nosync":
            with net.no_sync():
                forward_backward()
        else:
            forward_backward()
        opt.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        result.put(sum(times) / len(times))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=["resnet18", "resnet50", "vit-tiny"])
    ap.add_argument("--mode", required=True, choices=["one", "n1", "n2", "n2-nosync"])
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    world = 2 if args.mode.startswith("n2") else 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    threads = max(1, cores // world)
    if args.mode == "one":
        run(0, 1, args, port, threads, result)
    else:
        mp.start_processes(run, args=(world, args, port, threads, result), nprocs=world, join=True,
                           start_method="spawn")
    print(f"{args.model} {args.mode} {result.get():.4f} 0.0000")


if __name__ == "__main__":
    main()
