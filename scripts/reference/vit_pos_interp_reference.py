#!/usr/bin/env python3
"""Reference values for the ViT's position-embedding resampling (multi-crop inputs), produced by PyTorch.

Writes models/tests/data/vit_pos_interp_reference.json: a fixed position table `pos_embed [1, 1 + G*G, D]`
(cls row first, then the G x G patch grid in row-major order) and, for each target grid (h, w), the patch part
resampled the way timm's `resample_abs_pos_embed` and DINO's `interpolate_pos_encoding` (with `size=`) do it:
reshape to [1, D, G, G], F.interpolate(mode="bicubic", align_corners=False, size=(h, w)) without antialias, in
float32, then back to [1, h*w, D]. The cls row is not resampled.

    ~/.cache/selfsup/venv/bin/python scripts/reference/vit_pos_interp_reference.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

GRID, DIM = 7, 8
SIZES = [(3, 3), (5, 7), (14, 14), (2, 9), (7, 7)]


def resample(pos_embed, grid, size):
    """timm.layers.resample_abs_pos_embed(pos_embed, new_size=size, old_size=(grid, grid), num_prefix_tokens=1)."""
    dim = pos_embed.shape[-1]
    prefix, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=size, mode="bicubic", align_corners=False, antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, patches], dim=1)


def main():
    g = torch.Generator().manual_seed(20250101)
    # Random, not sin-cos: a transposed grid or swapped (h, w) must change the numbers.
    pos_embed = torch.randn(1, 1 + GRID * GRID, DIM, generator=g, dtype=torch.float32)
    cases = []
    for h, w in SIZES:
        out = resample(pos_embed, GRID, (h, w))
        assert out.shape == (1, 1 + h * w, DIM)
        cases.append({"h": h, "w": w, "pos_embed": out.flatten().tolist()})
    out = {"torch_version": torch.__version__, "grid": GRID, "dim": DIM, "pos_embed": pos_embed.flatten().tolist(),
           "cases": cases}
    path = pathlib.Path(__file__).resolve().parents[2] / "models/tests/data/vit_pos_interp_reference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
