#!/usr/bin/env python3
"""The PyTorch reference for `selfsup pretrain`: the SimCLR recipe of a selfsup TOML preset in PyTorch +
torchvision, written the usual way (solo-learn style, one file), hyperparameters read from the same file (`--config`,
`--set key=value`; defaults as selfsup's). It follows selfsup's Rust code piece by piece (data, ResNet, projector,
NT-Xent in fp32, LARS, schedule, bf16 autocast, k-NN and linear-probe evaluation) and measures the pretraining time,
images/s of the training loop and the fraction of it spent blocked in next(loader). The last line printed is JSON
(top-1 as fractions, like eval.json): {"impl": "pytorch", "pretrain_seconds": ..., "knn_top1": ..., ...}.
scripts/gpu-check runs it next to our binary:

    python3 scripts/reference/simclr_fmnist_torch.py --config configs/simclr-fmnist.toml --set train.epochs=1
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import ResNet as TorchvisionResNet
from torchvision.transforms import v2

# selfsup's defaults (the `Default` impls) for every key this script reads; the TOML file overrides them.
DEFAULTS = {
    "name": "run", "seed": 0,
    "data": {"train": "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
             "test": "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", "class_names": []},
    "augment": {"size": 28, "crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip_p": 0.5,
                "jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.0, "p": 0.8},
                "grayscale_p": 0.0, "blur": {"p": 0.0}, "solarize_p": 0.0, "equalize_p": 0.0,
                "mean": [], "std": []},
    "model": {"backbone": {"kind": "resnet", "layers": [2, 2, 2, 2], "width": 64, "cifar_stem": True}},
    "objective": {"kind": "simclr", "temperature": 0.2, "proj_hidden": 2048, "proj_dim": 128},
    "optimizer": {"kind": "lars", "base_lr": 0.3, "momentum": 0.9, "weight_decay": 1e-6, "eta": 0.02,
                  "warmup_epochs": 2.0, "final_lr_fraction": 0.0},
    "train": {"epochs": 20, "batch_size": 512, "threads": 0, "prefetch": 4, "log_every": 20,
              "checkpoint_every": 5, "device": "auto", "bf16": True, "max_steps": 0, "preview_pairs": 16,
              "profile_steps": 0},
    "eval": {"at_end": True, "knn_every": 0, "knn_k": 200, "knn_temperature": 0.1, "probe_epochs": 30,
             "probe_lr": 0.1, "probe_batch": 256, "probe_weight_decay": 1e-5, "raw_pixel_baseline": True,
             "train_limit": 0},
}


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


def check_simclr(cfg):
    a = cfg["augment"]
    if a["grayscale_p"] or a["blur"]["p"] or a["solarize_p"] or a["equalize_p"] or cfg["objective"]["kind"] != "simclr":
        sys.exit("this reference implements SimCLR with the gray recipe (no grayscale, blur, solarize, equalize) only")


def load_config(path, overrides, defaults=DEFAULTS, check=check_simclr):
    """`defaults` with the TOML file and then `--set key=value` merged in; `check(cfg)` validates (and may
    complete) the merged dict before it becomes a namespace (cfg.train.epochs)."""
    cfg = json.loads(json.dumps(defaults))  # deep copy
    with open(path, "rb") as f:
        merge(cfg, tomllib.load(f))
    for arg in overrides:
        key, sep, raw = arg.partition("=")
        if not sep:
            sys.exit(f"--set {arg}: expected key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string, as in selfsup
        *parents, last = key.strip().split(".")
        node = cfg
        for p in parents:
            node = node.get(p)
            if not isinstance(node, dict):
                sys.exit(f"--set {arg}: `{p}` is not a table")
        if last not in node:
            sys.exit(f"--set {arg}: unknown key `{key}`")
        node[last] = value
    check(cfg)
    return json.loads(json.dumps(cfg), object_hook=lambda d: SimpleNamespace(**d))  # cfg.train.epochs


def read_idx(path):
    """IDX u8 file (gz or not) -> uint8 tensor: images [N, 1, H, W] (magic 0x803) or labels [N] (0x801)."""
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    magic = int.from_bytes(data[0:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
    return torch.from_numpy(arr.copy()).unsqueeze(1) if len(dims) == 3 else torch.from_numpy(arr.astype(np.int64))


def read_labels(images_path):
    return read_idx(str(images_path).replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1"))


def transform(a, train, side):
    """One view of `a` (the [augment] table); for evaluation the whole image at the view size, normalized."""
    j, ops = a.jitter, []
    if train:
        ops.append(v2.RandomResizedCrop(a.size, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio), antialias=True))
        if a.flip_p > 0:
            ops.append(v2.RandomHorizontalFlip(a.flip_p))
        if j.p > 0 and (j.brightness > 0 or j.contrast > 0):
            ops.append(v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p))
        if a.solarize_p > 0:  # BYOL's second view; selfsup's threshold (inverts values >= 128)
            ops.append(v2.RandomSolarize(128, p=a.solarize_p))
    elif side != a.size:
        ops.append(v2.Resize((a.size, a.size), antialias=True))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(a.mean or [0.5], a.std or [0.5])])


class TwoViews(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform  # uint8 [N, 1, H, W], read once

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return self.transform(img), self.transform(img)


def worker_init(_):
    torch.set_num_threads(1)  # N workers x M intra-op threads on N cores only oversubscribes for 28 px ops


class ResNet(TorchvisionResNet):
    """torchvision's ResNet (BasicBlock) with a first-stage `width`, `in_channels`, optional CIFAR stem, no fc."""

    def __init__(self, layers, width, cifar_stem, in_channels=1):
        super().__init__(BasicBlock, layers)
        k, s = (3, 1) if cifar_stem else (7, 2)
        self.conv1 = nn.Conv2d(in_channels, width, k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if cifar_stem:
            self.maxpool = nn.Identity()
        self.inplanes = width
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(BasicBlock, width << i, n, stride=1 if i == 0 else 2))
        self.fc = nn.Identity()
        self.dim = width << 3
        for m in self.modules():  # torchvision's initialisation, again for the rebuilt layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class SimCLR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        b, o = cfg.model.backbone, cfg.objective
        self.backbone = ResNet(b.layers, b.width, b.cifar_stem)
        self.projector = nn.Sequential(nn.Linear(self.backbone.dim, o.proj_hidden), nn.BatchNorm1d(o.proj_hidden),
                                       nn.ReLU(inplace=True), nn.Linear(o.proj_hidden, o.proj_dim))

    def forward(self, x):
        return self.projector(self.backbone(x))


def nt_xent(z1, z2, temperature):
    """NT-Xent over 2N anchors; z1, z2: [N, D] -> scalar. Call outside autocast (fp32 similarities)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    idx = torch.arange(n, device=z.device)
    return F.cross_entropy(logits, torch.cat([idx + n, idx]))


class LARS(torch.optim.Optimizer):
    """SGD with momentum; weight decay and (lars) the trust ratio eta*|p|/|g| only on tensors of ndim > 1. With
    `clip` (LARC's clip mode, solo-learn's `clip_lr`, selfsup's `optimizer.lars_clip`) the ratio becomes
    min(ratio / lr, 1): no tensor's adapted rate exceeds the scheduled one."""

    def __init__(self, params, lr, momentum, weight_decay, eta, lars=True, clip=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=lars,
                                      clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    if group["weight_decay"] > 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    if group["lars"]:
                        pn, gn = p.norm(), g.norm()
                        ratio = group["eta"] * pn / gn
                        if group["clip"]:
                            lr = group["lr"]
                            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(pn)
                        g = g * torch.where((pn > 0) & (gn > 0), ratio, torch.ones_like(pn))
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


class StepProfile:
    """selfsup's StepProfile: per phase, host ms to issue the work and device ms to finish it after that."""

    def __init__(self):
        self.steps, self.host, self.device = 0, [0.0] * 3, [0.0] * 3

    def time(self, i, f):
        t0 = time.perf_counter()
        out = f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        self.host[i] += (t1 - t0) * 1e3
        self.device[i] += (time.perf_counter() - t1) * 1e3
        return out

    def result(self):
        if not self.steps:
            return None
        return {"phases": ["forward", "backward", "optimizer"], "steps": self.steps,
                "host_ms": [round(x / self.steps, 3) for x in self.host],
                "device_ms": [round(x / self.steps, 3) for x in self.device]}


def lr_at(o, peak, epoch, total_epochs):
    if epoch < o.warmup_epochs:
        return peak * epoch / o.warmup_epochs
    t = min(max((epoch - o.warmup_epochs) / max(total_epochs - o.warmup_epochs, 1e-9), 0.0), 1.0)
    floor = peak * o.final_lr_fraction
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def extract(net, images, tf, device, amp, channels_last, batch=512):
    out = []
    for i in range(0, len(images), batch):
        x = tf(images[i:i + batch].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(net(x).float())
    return torch.cat(out)


@torch.no_grad()
def knn_predict(bank, bank_y, queries, k, temperature, classes):
    bank = F.normalize(bank, dim=1)
    k = min(k, len(bank))
    preds = []
    for q in F.normalize(queries, dim=1).split(1024):
        vals, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), classes, device=q.device).scatter_add_(1, bank_y[idx], (vals / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def linear_probe_predict(x, y, xt, classes, e, seed):
    torch.manual_seed(seed)
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    lin = nn.Linear(x.shape[1], classes).to(x.device)
    opt = torch.optim.SGD(lin.parameters(), lr=e.probe_lr, momentum=0.9, nesterov=True,
                          weight_decay=e.probe_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(e.probe_epochs, 1))
    for _ in range(e.probe_epochs):
        for idx in torch.randperm(len(x), device=x.device).split(e.probe_batch):
            loss = F.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return lin(xt).argmax(1)


class Evaluator:
    def __init__(self, cfg, device, amp, channels_last):
        self.cfg, self.device, self.amp, self.cl = cfg, device, amp, channels_last
        limit = cfg.eval.train_limit
        self.train_x = read_idx(cfg.data.train)[: limit or None]
        self.train_y = read_labels(cfg.data.train)[: limit or None].to(device)
        self.test_x, self.test_y = read_idx(cfg.data.test), read_labels(cfg.data.test).to(device)
        self.classes = int(max(self.train_y.max(), self.test_y.max())) + 1
        self.tf = transform(cfg.augment, False, self.train_x.shape[-1])

    def features(self, net, amp=None):
        net.eval()
        f = [extract(net, x, self.tf, self.device, self.amp if amp is None else amp, self.cl)
             for x in (self.train_x, self.test_x)]
        net.train()
        return f

    def knn(self, tr, te):
        e = self.cfg.eval
        return self.top1(knn_predict(tr, self.train_y, te, e.knn_k, e.knn_temperature, self.classes))

    def probe(self, tr, te):
        return self.top1(linear_probe_predict(tr, self.train_y, te, self.classes, self.cfg.eval, self.cfg.seed))

    def top1(self, pred):
        return (pred == self.test_y).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs/simclr-fmnist.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workers", type=int, help="DataLoader workers (default: train.threads, 0 there = all cores)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", help="folder for checkpoints (every train.checkpoint_every epochs and at the end)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=None,
                    help="as selfsup's train.profile_steps (default: the config's): synchronize after each phase of "
                         "this many steps after 10 warm-up steps; host vs device ms per phase in the JSON")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    t, o, e = cfg.train, cfg.optimizer, cfg.eval
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device, amp = torch.device("cuda" if cuda else "cpu"), cuda and t.bf16
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = cuda
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    log = (lambda *_: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    torch.manual_seed(cfg.seed)

    images = read_idx(cfg.data.train)
    workers = args.workers if args.workers is not None else (t.threads or len(os.sched_getaffinity(0)))
    loader = DataLoader(TwoViews(images, transform(cfg.augment, True, images.shape[-1])), batch_size=t.batch_size,
                        shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                        worker_init_fn=worker_init if workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    model = SimCLR(cfg).to(device, memory_format=mf)
    opt = LARS(model.parameters(), 0.0, o.momentum, o.weight_decay, o.eta, lars=o.kind == "lars")
    evaluator = Evaluator(cfg, device, amp, args.channels_last) if getattr(cfg.data, "test", None) else None
    steps_per_epoch = len(loader)
    max_steps = min(t.max_steps or steps_per_epoch * t.epochs, steps_per_epoch * t.epochs)
    peak_lr = o.base_lr * t.batch_size / 256
    log(f"pytorch reference: {len(images)} images, {steps_per_epoch} steps/epoch, {max_steps} steps, {workers} "
        f"workers, {device}, bf16 {amp}, channels_last {args.channels_last}, torch {torch.__version__}")

    def save(name):  # checkpoints count in the pretraining time, as selfsup's do
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step}
            torch.save(state, Path(args.out) / f"{name}.pt")
        return step

    profile_steps = args.profile_steps if args.profile_steps is not None else getattr(t, "profile_steps", 0)
    prof = StepProfile()
    step, epoch, images_seen, wait, loop_time, final_loss, last_saved = 0, 0, 0, 0.0, 0.0, float("nan"), None
    run_start = time.perf_counter()
    while epoch < t.epochs and step < max_steps:
        epoch_start = time.perf_counter()
        it, consumed, loss_acc, acc_steps = iter(loader), 0, torch.zeros((), device=device), 0
        wait += time.perf_counter() - epoch_start
        while step < max_steps:
            w0 = time.perf_counter()
            views = next(it, None)
            wait += time.perf_counter() - w0
            if views is None:
                break
            consumed, n = consumed + 1, views[0].shape[0]
            x = torch.cat([v.to(device, non_blocking=True) for v in views]).contiguous(memory_format=mf)
            lr = lr_at(o, peak_lr, step / steps_per_epoch, t.epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            def forward():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    z = model(x)
                return nt_xent(z[:n], z[n:], cfg.objective.temperature)  # outside autocast: fp32 logits

            def backward():
                opt.zero_grad(set_to_none=True)
                loss.backward()

            if cuda and 10 <= step < 10 + profile_steps:  # as selfsup's StepProfile
                torch.cuda.synchronize()
                loss = prof.time(0, forward)
                prof.time(1, backward)
                prof.time(2, opt.step)
                prof.steps += 1
            else:
                loss = forward()
                backward()
                opt.step()
            step, images_seen, acc_steps = step + 1, images_seen + n, acc_steps + 1
            loss_acc += loss.detach()
            if step % t.log_every == 0 or step >= max_steps:
                final_loss = loss_acc.item() / acc_steps  # the deliberate sync point
                loss_acc, acc_steps = torch.zeros((), device=device), 0
                if not math.isfinite(final_loss):
                    sys.exit(f"loss is {final_loss} at step {step}; lower optimizer.base_lr?")
                dt = loop_time + time.perf_counter() - epoch_start
                log(f"epoch {epoch + 1}/{t.epochs} step {step}/{max_steps} loss {final_loss:.4f} lr {lr:.4f} "
                    f"{images_seen / dt:.0f} img/s, waited {100 * wait / dt:.1f}%")
        if acc_steps:
            final_loss = loss_acc.item() / acc_steps  # syncs too: the epoch's time is all spent
        loop_time += time.perf_counter() - epoch_start
        if consumed < steps_per_epoch:
            break  # stopped by train.max_steps
        epoch += 1
        if t.checkpoint_every and epoch % t.checkpoint_every == 0:
            last_saved = save(f"epoch-{epoch:04d}")
        if evaluator and e.knn_every and epoch % e.knn_every == 0 and epoch < t.epochs:
            log(f"epoch {epoch}: k-NN top-1 {100 * evaluator.knn(*evaluator.features(model.backbone)):.2f}%")
    if last_saved != step:
        save(f"epoch-{epoch:04d}" + ("" if step % steps_per_epoch == 0 else f"-step-{step}"))
    pretrain_seconds = time.perf_counter() - run_start  # like selfsup's: mid-run k-NN and checkpoints included
    result = {"impl": "pytorch", "pretrain_seconds": round(pretrain_seconds, 3),
              "images_per_s": round(images_seen / max(loop_time, 1e-9), 1), "data_wait_seconds": round(wait, 3),
              "data_wait_fraction": round(wait / max(loop_time, 1e-9), 5), "knn_top1": None, "linear_top1": None,
              "raw_pixels_linear_top1": None, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "steps": step, "images": images_seen, "epochs": epoch, "final_loss": round(final_loss, 5), "workers": workers,
              "channels_last": args.channels_last, "torch": torch.__version__, "profile": prof.result()}
    if evaluator and e.at_end:
        t0 = time.perf_counter()
        tr, te = evaluator.features(model.backbone)
        result["knn_top1"], result["linear_top1"] = evaluator.knn(tr, te), evaluator.probe(tr, te)
        if e.raw_pixel_baseline:  # the same probe on normalized pixels: the baseline to beat
            result["raw_pixels_linear_top1"] = evaluator.probe(*evaluator.features(nn.Flatten(), amp=False))
        result["eval_seconds"] = round(time.perf_counter() - t0, 3)
        log(f"k-NN top-1 {100 * result['knn_top1']:.2f}%, linear probe top-1 {100 * result['linear_top1']:.2f}%")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
