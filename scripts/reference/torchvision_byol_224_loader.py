#!/usr/bin/env python3
"""PyTorch reference for the 224 px data stage: JPEG files decoded every time (no caching), two views with the
BYOL ImageNet recipe in torchvision.transforms.v2 (Grill et al. 2020: crop, flip, color jitter 0.4/0.4/0.2/0.1 p .8,
grayscale p .2, 23-px Gaussian blur p 1.0 / 0.1, solarize p 0 / 0.2), a DataLoader with N workers, as a PyTorch user
writes it. The last line is `pairs_per_s=<number>`.

    python scripts/reference/torchvision_byol_224_loader.py DIR --seconds 10 --workers 2 --batch 10
"""
import argparse
import os
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2


def recipe(blur_p, solarize_p):
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


class Photos(Dataset):
    def __init__(self, root):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith((".jpg", ".jpeg")))
        self.views = (recipe(1.0, 0.0), recipe(0.1, 0.2))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = Image.open(self.files[i]).convert("RGB")  # decoded every time
        return tuple(v(img) for v in self.views)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=10)
    a = ap.parse_args()
    # One intra-op thread per worker, as a tuned PyTorch setup does.
    dl = DataLoader(Photos(a.root), batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                    persistent_workers=a.workers > 0, worker_init_fn=lambda _: torch.set_num_threads(1))
    it = iter(dl)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        try:
            v1, _ = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        n += v1.shape[0]
    print(f"pairs_per_s={n / (time.perf_counter() - t0):.1f}")


if __name__ == "__main__":
    main()
