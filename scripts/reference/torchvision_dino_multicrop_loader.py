#!/usr/bin/env python3
"""PyTorch reference for the multi-crop data stage: DINO's `DataAugmentationDINO` (Caron et al. 2021,
facebookresearch/dino `main_dino.py`) with its default crop scales and 6 local crops, written in
torchvision.transforms.v2 and fed by a DataLoader with N workers, as a PyTorch user writes it.

Each sample is opened and decoded ONCE with PIL (`Image.open(f).convert("RGB")`, what torchvision's `ImageFolder`
does), turned into a uint8 tensor once (v2's advice: tensors, not PIL, for speed), and the 8 views are cut from it:

- global crop 1: RandomResizedCrop(224, scale (0.4, 1), bicubic), flip p .5, ColorJitter(0.4, 0.4, 0.2, 0.1) p .8,
  grayscale p .2, Gaussian blur p 1.0, normalize;
- global crop 2: the same with blur p 0.1, then solarize (threshold 128) p 0.2;
- 6 local crops: RandomResizedCrop(96, scale (0.05, 0.4), bicubic), flip, jitter, grayscale, blur p 0.5, normalize.

DINO blurs with PIL's `GaussianBlur(radius=sigma)`, sigma uniform in [0.1, 2] pixels at any crop size. PIL's filter
(three box passes) reaches about 3 sigma, so v2's sampled Gaussian needs a kernel of 6 * 2 + 1 = 13 taps to be the
same filter; at 224 px we keep the 23 taps that BYOL-style v2 ports use (its extra taps weigh < 0.3% at sigma 2),
at 96 px 13. The last line is `pairs_per_s=<number>` (a "pair" here = one sample with all 8 views).

    python scripts/reference/torchvision_dino_multicrop_loader.py DIR --seconds 10 --workers 2 --batch 10
"""
import argparse
import os
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


class DataAugmentationDINO:
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=6):
        flip_and_color_jitter = v2.Compose([
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        normalize = v2.Compose([
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

        def blur(kernel_size, p):
            return v2.RandomApply([v2.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=p)

        self.global_transfo1 = v2.Compose([
            v2.RandomResizedCrop(224, scale=global_crops_scale, interpolation=BICUBIC, antialias=True),
            flip_and_color_jitter,
            blur(23, 1.0),
            normalize,
        ])
        self.global_transfo2 = v2.Compose([
            v2.RandomResizedCrop(224, scale=global_crops_scale, interpolation=BICUBIC, antialias=True),
            flip_and_color_jitter,
            blur(23, 0.1),
            v2.RandomSolarize(128, p=0.2),
            normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = v2.Compose([
            v2.RandomResizedCrop(96, scale=local_crops_scale, interpolation=BICUBIC, antialias=True),
            flip_and_color_jitter,
            blur(13, 0.5),
            normalize,
        ])

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


class Photos(Dataset):
    def __init__(self, root, transform):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith((".jpg", ".jpeg")))
        self.transform = transform
        self.to_tensor = v2.PILToTensor()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = self.to_tensor(Image.open(self.files[i]).convert("RGB"))  # decoded once per sample, 8 crops of it
        return self.transform(img)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--local-crops", type=int, default=6)
    a = ap.parse_args()
    data = Photos(a.root, DataAugmentationDINO(local_crops_number=a.local_crops))
    # One intra-op thread per worker, as a tuned PyTorch setup does.
    dl = DataLoader(data, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                    persistent_workers=a.workers > 0, worker_init_fn=lambda _: torch.set_num_threads(1))
    it = iter(dl)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        try:
            crops = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        n += crops[0].shape[0]
    print(f"pairs_per_s={n / (time.perf_counter() - t0):.1f}")


if __name__ == "__main__":
    main()
