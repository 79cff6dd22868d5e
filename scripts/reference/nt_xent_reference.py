#!/usr/bin/env python3
"""Reference values for selfsup's nt_xent, produced by PyTorch (run with the setup venv's python).

Writes models/tests/data/nt_xent_reference.json: fixed inputs z1, z2, and for each temperature the loss and its
gradients with respect to z1 and z2, computed the way the SimCLR paper and common PyTorch ports write NT-Xent
(F.normalize, similarity matrix, self-similarity masked out, F.cross_entropy with the other view as target).

    ~/.cache/selfsup/venv/bin/python scripts/reference/nt_xent_reference.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F


def nt_xent(z1, z2, t):
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n) + n, torch.arange(n)])
    return F.cross_entropy(sim, targets)


def main():
    g = torch.Generator().manual_seed(1234)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    cases = []
    for t in (0.07, 0.2, 0.5, 1.0):
        a = z1.clone().requires_grad_(True)
        b = z2.clone().requires_grad_(True)
        loss = nt_xent(a, b, t)
        loss.backward()
        cases.append({"temperature": t, "loss": loss.item(), "grad_z1": a.grad.flatten().tolist(),
                      "grad_z2": b.grad.flatten().tolist()})
    out = {"torch_version": torch.__version__, "shape": list(z1.shape), "z1": z1.flatten().tolist(),
           "z2": z2.flatten().tolist(), "cases": cases}
    path = pathlib.Path(__file__).resolve().parents[2] / "models/tests/data/nt_xent_reference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
