#!/usr/bin/env python3
"""Reference values for selfsup's joint-embedding losses (models/src/loss/), produced by PyTorch.

Writes models/tests/data/ssl_losses_reference.json: for each loss, several cases of fixed seeded float64 inputs,
the loss, its gradient with respect to every input, and for multi-term losses each unweighted term with its own
gradients. Each loss is written the way a PyTorch user writes it from the paper's pseudo-code and the authors'
released code (F.normalize, F.cross_entropy, nn.BatchNorm1d(affine=False), F.mse_loss, nn.PairwiseDistance):

- BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733): mean of 2 - 2 cos(p, z).
- MoCo v3 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057): contrastive_loss, CE(q k^T / T, arange + offset) * 2T.
- DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294): DINOLoss.forward over all (teacher g, student v != g).
- iBOT (Zhou et al. 2022, https://arxiv.org/abs/2111.07832) / DINOv2 (Oquab et al. 2023,
  https://arxiv.org/abs/2304.07193): forward_masked, per image the mean over its masked tokens, then the sum over
  images divided by the number of images.
- KoLeo (Sablayrolles et al. 2019, https://arxiv.org/abs/1806.03198) as DINOv2's KoLeoLoss (the diagonal is excluded
  with -inf where DINOv2 writes -1: the same unless every other row is exactly opposite).
- Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230), VICReg (Bardes et al. 2022,
  https://arxiv.org/abs/2105.04906) as their official implementations.

    ~/.cache/selfsup/venv/bin/python scripts/reference/ssl_losses_reference.py
"""
import json
import pathlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def byol(p, z):
    p = F.normalize(p, dim=-1)
    z = F.normalize(z, dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def infonce(q, k, temperature, offset):
    t = temperature
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / t
    labels = torch.arange(q.shape[0]) + offset
    return F.cross_entropy(logits, labels) * (2 * t)


def dino(student, teacher, center, student_temp, teacher_temp):
    # DINOLoss.forward: the student output of all crops concatenated, chunked per crop; teacher likewise.
    n_crops, n_global = len(student), len(teacher)
    student_out = (torch.cat(student) / student_temp).chunk(n_crops)
    teacher_out = F.softmax((torch.cat(teacher) - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def ibot_patch(student, teacher, mask, center, student_temp, teacher_temp):
    # DINOv2's iBOTPatchLoss.forward_masked: only the masked tokens, each weighted by 1 / (masked tokens of its
    # image), summed and divided by the number of images (images without masked tokens contribute 0).
    mask = mask.bool()
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).detach()[mask]
    s = student[mask]
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    weight = (1 / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(mask)[mask]
    return -(loss * weight).sum() / mask.shape[0]


def koleo(x, eps=1e-8):
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(float("-inf"))
        nn_index = dots.argmax(dim=1)
    distances = nn.PairwiseDistance(2, eps=eps)(x, x[nn_index])
    return -torch.log(distances + eps).mean()


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow(z1, z2, lambd):
    n, d = z1.shape
    bn = nn.BatchNorm1d(d, affine=False).double().train()
    c = bn(z1).T @ bn(z2) / n
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag, {"on_diagonal": on_diag, "off_diagonal": off_diag}


def vicreg(x, y, sim_coeff, std_coeff, cov_coeff):
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return loss, {"invariance": repr_loss, "variance": std_loss, "covariance": cov_loss}


def tensor_json(x):
    return {"shape": list(x.shape), "data": x.detach().double().flatten().tolist()}


def run(fn, inputs, params):
    """Evaluate fn(*inputs, **params) on fresh leaves; record value, gradients w.r.t. every tensor input
    (zeros where no gradient flows) and, for multi-term losses, each term with its gradients."""
    names = list(inputs)
    leaves = {}
    for name in names:
        v = inputs[name]
        if isinstance(v, list):
            leaves[name] = [x.clone().requires_grad_(True) for x in v]
        elif v.is_floating_point():
            leaves[name] = v.clone().requires_grad_(True)
        else:
            leaves[name] = v.clone()
    flat = [x for n in names for x in (leaves[n] if isinstance(leaves[n], list) else [leaves[n]])
            if x.requires_grad]
    out = fn(*[leaves[n] for n in names], **params)
    total, terms = out if isinstance(out, tuple) else (out, {})

    def grads_of(value):
        gs = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(x) if g is None else g for x, g in zip(flat, gs)]
        result, i = {}, 0
        for n in names:
            v = leaves[n]
            if isinstance(v, list):
                result[n] = [tensor_json(g) for g in gs[i:i + len(v)]]
                i += len(v)
            elif v.requires_grad:
                result[n] = tensor_json(gs[i])
                i += 1
        return result

    case = {"params": params, "value": total.item(), "grads": grads_of(total)}
    case["inputs"] = {n: [tensor_json(x) for x in v] if isinstance(v, list) else tensor_json(v)
                      for n, v in inputs.items()}
    case["terms"] = {name: {"value": t.item(), "grads": grads_of(t)} for name, t in terms.items()}
    return case


def main():
    g = torch.Generator().manual_seed(20240607)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    out = {"torch_version": torch.__version__}

    p, z = randn(6, 5), randn(6, 5)
    scaled = torch.tensor([0.01, 0.5, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64).unsqueeze(1)
    out["byol"] = [
        run(byol, {"p": p, "z": z}, {}),
        run(byol, {"p": p * scaled, "z": p + 0.3 * z}, {}),
    ]

    q = randn(6, 5)
    k = q + 0.8 * randn(6, 5)
    k_all = randn(10, 5)
    k_all[3:9] = q + 0.5 * randn(6, 5)
    out["infonce"] = [run(infonce, {"q": q, "k": k}, {"temperature": t, "offset": 0}) for t in (0.1, 0.2, 1.0)]
    out["infonce"].append(run(infonce, {"q": q, "k": k_all}, {"temperature": 0.2, "offset": 3}))

    n, classes = 5, 7
    teacher = [randn(n, classes, scale=2.0) for _ in range(2)]
    student = [t + randn(n, classes) for t in teacher] + [randn(n, classes, scale=2.0) for _ in range(4)]
    center = randn(1, classes, scale=0.5)
    out["dino"] = [
        run(dino, {"student": student, "teacher": teacher, "center": center},
            {"student_temp": 0.1, "teacher_temp": 0.04}),
        run(dino, {"student": student, "teacher": teacher, "center": center},
            {"student_temp": 0.1, "teacher_temp": 0.07}),
        run(dino, {"student": student[:2], "teacher": teacher, "center": center},
            {"student_temp": 0.2, "teacher_temp": 0.05}),
        run(dino, {"student": student[:3], "teacher": teacher[:1], "center": torch.zeros(1, classes).double()},
            {"student_temp": 1.0, "teacher_temp": 1.0}),
    ]

    n, tokens = 4, 6
    s_patch = randn(n, tokens, classes, scale=2.0)
    t_patch = s_patch + randn(n, tokens, classes)
    patch_center = randn(1, 1, classes, scale=0.5)
    # Image 0 fully masked, image 1 not masked at all, images 2 and 3 partly.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]],
                        dtype=torch.bool)
    out["ibot"] = [
        run(ibot_patch, {"student": s_patch, "teacher": t_patch, "mask": mask, "center": patch_center},
            {"student_temp": 0.1, "teacher_temp": 0.04}),
        run(ibot_patch, {"student": s_patch, "teacher": t_patch, "mask": mask, "center": patch_center},
            {"student_temp": 0.1, "teacher_temp": 0.07}),
        run(ibot_patch, {"student": s_patch, "teacher": t_patch, "mask": torch.ones(n, tokens, dtype=torch.bool),
                         "center": patch_center}, {"student_temp": 0.2, "teacher_temp": 0.05}),
        run(ibot_patch, {"student": s_patch, "teacher": t_patch, "mask": torch.zeros(n, tokens, dtype=torch.bool),
                         "center": patch_center}, {"student_temp": 0.1, "teacher_temp": 0.04}),
    ]

    x = randn(8, 5)
    # The duplicated pair (2, 5) must be each other's nearest neighbour and nobody else's: another row whose
    # nearest neighbour is one of two identical rows has a tie that rounding breaks either way, and the gradient
    # of an exact duplicate pair is the difference of two ~1e6 terms (see models/tests/ssl_losses_reference.rs).
    # Draw the duplicated row until that holds (deterministic under the seed).
    x_dup = randn(8, 5)
    while True:
        x_dup[2] = randn(5)
        x_dup[5] = x_dup[2]
        xn = F.normalize(x_dup, dim=-1)
        nn_index = (xn @ xn.T).fill_diagonal_(float("-inf")).argmax(dim=1).tolist()
        others = [nn_index[i] for i in range(8) if i not in (2, 5)]
        if nn_index[2] == 5 and nn_index[5] == 2 and not {2, 5} & set(others):
            break
    out["koleo"] = [
        run(koleo, {"x": x}, {}),
        run(koleo, {"x": x * torch.linspace(0.1, 10.0, 8, dtype=torch.float64).unsqueeze(1)}, {}),
        run(koleo, {"x": x_dup}, {}),
    ]

    z1 = randn(8, 6)
    z2 = z1 + 0.5 * randn(8, 6)
    out["barlow"] = [run(barlow, {"z1": z1, "z2": z2}, {"lambd": lam}) for lam in (0.0051, 0.1, 1.0)]
    out["barlow"].append(run(barlow, {"z1": 3.0 * z1 + 1.0, "z2": randn(8, 6)}, {"lambd": 0.0051}))

    # Column scales straddling 1 so that some of the variance hinges are active and some are not.
    col = torch.tensor([0.2, 0.5, 0.8, 1.5, 2.5, 4.0], dtype=torch.float64)
    v1 = randn(8, 6) * col
    v2 = v1 + 0.3 * randn(8, 6)
    out["vicreg"] = [
        run(vicreg, {"z1": v1, "z2": v2}, {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}),
        run(vicreg, {"z1": v1, "z2": v2}, {"sim_coeff": 1.0, "std_coeff": 0.5, "cov_coeff": 2.0}),
        run(vicreg, {"z1": 0.1 * randn(8, 6), "z2": randn(8, 6) * col}, {"sim_coeff": 25.0, "std_coeff": 25.0,
                                                                         "cov_coeff": 1.0}),
    ]

    # Nearest-neighbour margins for every KoLeo case: an argmax that rounding could flip is not a fair comparison.
    for case in out["koleo"]:
        xx = torch.tensor(case["inputs"]["x"]["data"], dtype=torch.float64).view(case["inputs"]["x"]["shape"])
        xx = F.normalize(xx, dim=-1)
        d = (xx @ xx.T).fill_diagonal_(float("-inf"))
        top2 = d.topk(2, dim=1).values
        gaps = top2[:, 0] - top2[:, 1]
        assert gaps.min() > 1e-3, gaps

    path = pathlib.Path(__file__).resolve().parents[2] / "models/tests/data/ssl_losses_reference.json"
    # One line per tensor: numbers on one line, structure indented.
    text = re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  json.dumps(out, indent=1))
    path.write_text(text + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
