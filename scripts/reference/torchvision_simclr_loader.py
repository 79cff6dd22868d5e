#!/usr/bin/env python3
"""The PyTorch reference for `selfsup bench-loader`: two-view SimCLR augmentation of Fashion-MNIST with
torchvision.transforms.v2 and a standard DataLoader, written the way a PyTorch user would write it.

The recipe is the `[augment]` section of configs/simclr-fmnist-tiny.toml (and simclr-fmnist.toml):
RandomResizedCrop(28, scale=(0.2, 1.0)), horizontal flip p=0.5, ColorJitter(brightness=0.4, contrast=0.4)
with p=0.8, no grayscale, no blur, then float in [0, 1] and Normalize(0.2860, 0.3530).

Usage: torchvision_simclr_loader.py [--seconds 10] [--workers N] [--batch 512]
The last line printed is `pairs_per_s=<number>` (a pair = one sample with both views), as in bench-loader.
"""

import argparse
import gzip
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

TRAIN_IMAGES = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def read_idx_images(path):
    """IDX3 unsigned-byte images -> uint8 tensor [N, 1, H, W] (what torchvision.datasets.FashionMNIST holds)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = (int.from_bytes(data[i : i + 4], "big") for i in (0, 4, 8, 12))
    if magic != 0x0803:
        raise ValueError(f"{path}: not an IDX3 u8 file (magic {magic:#x})")
    arr = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, h, w)
    return torch.from_numpy(arr.copy())


def simclr_recipe():
    return v2.Compose(
        [
            v2.RandomResizedCrop(28, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)], p=0.8),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.2860], [0.3530]),
        ]
    )


class TwoViewFashionMNIST(Dataset):
    def __init__(self, path=TRAIN_IMAGES):
        self.images = read_idx_images(path)  # read and decompressed once, like torchvision.datasets.FashionMNIST
        self.transform = simclr_recipe()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]  # uint8 [1, 28, 28]; v2 treats a plain tensor as an image
        return self.transform(img), self.transform(img)


def worker_init(_worker_id):
    # Usual tuning: each worker is its own process, and intra-op threads inside a worker only oversubscribe the
    # cores (N workers x M torch threads on N cores) for ops this small. One torch thread per worker.
    torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="0 = load in the main process")
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()

    ds = TwoViewFashionMNIST()
    loader = DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,  # DataLoader rejects persistent_workers with 0 workers
        worker_init_fn=worker_init if args.workers > 0 else None,
    )
    print(
        f"torchvision reference: {len(ds)} samples, batch {args.batch}, 2 views, {args.workers} workers, "
        f"{args.seconds:.0f}s (torch {torch.__version__})",
        flush=True,
    )

    # The first batch pays for worker start-up: not counted.
    it = iter(loader)
    next(it)
    pairs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        try:
            v1, _v2 = next(it)
        except StopIteration:
            it = iter(loader)  # next epoch; persistent workers stay up
            continue
        pairs += v1.shape[0]
    dt = time.perf_counter() - start
    print(f"pairs_per_s={pairs / dt:.1f}")


if __name__ == "__main__":
    main()
