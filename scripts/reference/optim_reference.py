#!/usr/bin/env python3
"""Reference values for selfsup's AdamW, clip_grad_norm and cross_entropy, produced by PyTorch.

Prints Rust constants that are pasted into models/tests/optim_reference.rs (the inputs are written out by hand in
both files, so nothing else is read). Run with the setup venv's python:

    ~/.cache/selfsup/venv/bin/python scripts/reference/optim_reference.py

- AdamW: torch.optim.AdamW, lr 1e-2, betas (0.9, 0.95), eps 1e-8, weight decay 0.05 on the matrix `w` and none on
  the bias `b`; three steps, each on loss = sum(G_k * p) + 0.5 * sum(p^2) (so grad = G_k + p); fp32.
- clip_grad_norm: torch.nn.utils.clip_grad_norm_ with max_norm 1.0 on two fixed gradients (total norm and clipped
  gradients), and max_norm 100 (no change).
- cross_entropy: F.cross_entropy with label_smoothing 0.0 and 0.1 on fixed fp32 logits: value and gradient.
"""
import torch
import torch.nn.functional as F

W0 = [[0.5, -1.0, 2.0], [0.25, 1.5, -0.75]]
B0 = [0.1, -0.2, 0.3]
GW = [
    [[0.3, -0.2, 0.1], [0.05, 0.4, -0.6]],
    [[-0.1, 0.25, 0.0], [0.2, -0.35, 0.15]],
    [[0.7, 0.1, -0.3], [-0.05, 0.0, 0.45]],
]
GB = [[0.2, -0.1, 0.05], [-0.3, 0.15, 0.0], [0.1, 0.1, -0.2]]

CLIP_W = [[3.0, -4.0], [1.0, 2.0]]
CLIP_B = [0.5, -1.5, 2.5]

LOGITS = [[1.0, -0.5, 0.3, 2.0, 0.0], [0.2, 0.1, -1.2, 0.4, 1.5], [-0.7, 2.2, 0.9, 0.0, -0.3], [0.0, 0.0, 3.0, -1.0, 0.5]]
TARGETS = [3, 0, 1, 4]


def rust(name, values):
    flat = torch.as_tensor(values).double().flatten().tolist()
    body = ", ".join(repr(float(v)) for v in flat)
    print(f"const {name}: [f64; {len(flat)}] = [{body}];")


def adamw():
    w = torch.tensor(W0, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(B0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}], lr=1e-2,
                            betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for k in range(3):
        opt.zero_grad()
        gw = torch.tensor(GW[k], dtype=torch.float32)
        gb = torch.tensor(GB[k], dtype=torch.float32)
        loss = (gw * w).sum() + (gb * b).sum() + 0.5 * (w * w).sum() + 0.5 * (b * b).sum()
        loss.backward()
        opt.step()
        rust(f"ADAMW_W{k + 1}", w.detach())
        rust(f"ADAMW_B{k + 1}", b.detach())


def clip():
    w = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    w.grad = torch.tensor(CLIP_W)
    b.grad = torch.tensor(CLIP_B)
    total = torch.nn.utils.clip_grad_norm_([w, b], max_norm=1.0)
    print(f"const CLIP_TOTAL: f64 = {total.item()!r};")
    rust("CLIP_W_AFTER", w.grad)
    rust("CLIP_B_AFTER", b.grad)


def cross_entropy():
    for smoothing, tag in ((0.0, "CE0"), (0.1, "CE1")):
        x = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
        loss = F.cross_entropy(x, torch.tensor(TARGETS), label_smoothing=smoothing)
        loss.backward()
        print(f"const {tag}_LOSS: f64 = {loss.item()!r};")
        rust(f"{tag}_GRAD", x.grad)


if __name__ == "__main__":
    print(f"// torch {torch.__version__}")
    adamw()
    clip()
    cross_entropy()
