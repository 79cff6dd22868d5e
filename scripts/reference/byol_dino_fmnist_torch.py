#!/usr/bin/env python3
"""The PyTorch reference for `selfsup pretrain` with the BYOL and DINO presets (configs/byol-fmnist.toml,
configs/dino-fmnist.toml): the recipe of a selfsup TOML in PyTorch + torchvision, written the usual way (solo-learn
and facebookresearch/dino style, one file), hyperparameters read from the same file (`--config`, `--set key=value`;
defaults as selfsup's). Data, config merge, ResNet, LARS, step profile and the k-NN / linear-probe evaluation are
imported from simclr_fmnist_torch.py; the methods follow selfsup's Rust code (models/src/objective/{byol,dino}.rs,
teacher.rs, head.rs, loss/) piece by piece:

- views: the `[[views]]` tables, each inheriting from `[augment]` (`count` repeats one), one torchvision v2 pipeline
  per view in DataLoader workers (crop, flip, jitter, solarize with threshold 128, normalize);
- BYOL (Grill et al. 2020): projector and predictor Linear(no bias)-BN-ReLU-Linear; the target network is an EMA of
  backbone + projector (`torch._foreach_lerp_`, as timm's ModelEmaV3) after every optimizer step, momentum on a
  cosine from `objective.momentum` to `momentum_end` over all steps (epochs x steps per epoch); batch norm of the
  target in training mode; the loss `2 - 2 cos(p, z')` in fp32, symmetrized; the predictor sees one view at a time;
- DINO (Caron et al. 2021): multi-crop, each run of same-size views (2 global, then the local ones) forwarded once
  through backbone and head (facebookresearch's MultiCropWrapper runs the head once over all crops; selfsup and this
  script run it per size group); DINOHead = MLP with GELU (batch norm without bias before it with
  `head_batch_norm`), l2 normalization, a weight-normed last layer without bias (`weight_g` trainable iff not
  `norm_last_layer`; weight decay and LARS on it as on every tensor of ndim > 1, as selfsup); the teacher (backbone +
  head, EMA as BYOL's) sees the global crops; loss = cross entropy of the centered, sharpened teacher against every
  other student view, in fp32; center EMA with `center_momentum`; teacher temperature per epoch from
  np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs); the last layer gets no gradient (and
  so no update) while epochs done < `freeze_last_layer` (facebookresearch's cancel_gradients_last_layer);
- LARS with `optimizer.lars_clip` (LARC clip mode), lr = base_lr x batch / 256, linear warm-up then cosine per step.

Measured like simclr_fmnist_torch.py: pretraining time (checkpoints and mid-run k-NN included), images/s of the
training loop and the fraction of it blocked in next(loader). The last line printed is JSON (top-1 as fractions):
{"impl": "pytorch-byol" | "pytorch-dino", "pretrain_seconds": ..., "knn_top1": ..., "linear_top1": ..., ...}.
scripts/gpu-check runs it next to our binary (ONLY=byol-torch, ONLY=dino-torch):

    python3 scripts/reference/byol_dino_fmnist_torch.py --config configs/dino-fmnist.toml --set train.epochs=1
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simclr_fmnist_torch as ref  # noqa: E402
from simclr_fmnist_torch import LARS, Evaluator, ResNet, StepProfile, lr_at, read_idx, transform  # noqa: E402

# selfsup's `Default`s of the keys this script reads beyond simclr_fmnist_torch.DEFAULTS.
OBJECTIVES = {
    "byol": {"kind": "byol", "proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096, "momentum": 0.99,
             "momentum_end": 1.0},
    "dino": {"kind": "dino", "out_dim": 4096, "head_layers": 3, "head_hidden": 2048, "bottleneck": 256,
             "head_batch_norm": False, "norm_last_layer": True, "local_crops": 6, "student_temp": 0.1,
             "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 5,
             "center_momentum": 0.9, "momentum": 0.996, "momentum_end": 1.0, "freeze_last_layer": 1.0,
             "ibot_weight": 0.0, "ibot_mask_ratio": 0.3, "koleo_weight": 0.0},
}


def defaults(kind):
    d = json.loads(json.dumps(ref.DEFAULTS))  # deep copy
    d["objective"] = dict(OBJECTIVES[kind])
    d["optimizer"].update(lars_clip=False, clip_grad=0.0)
    d["eval"]["teacher"] = False
    d["views"] = []
    return d


def check(cfg):
    """Resolves `views` as selfsup does (each entry over `[augment]`, `count` repeats) and rejects what this
    reference does not implement."""
    o, views = cfg["objective"], []
    for entry in cfg["views"]:
        entry = dict(entry)
        count = entry.pop("count", 1)
        view = json.loads(json.dumps(cfg["augment"]))
        ref.merge(view, entry)
        views += [view] * count
    want = 2 if o["kind"] == "byol" else 2 + o["local_crops"]
    cfg["views"] = views or [cfg["augment"]] * want
    if len(cfg["views"]) != want:
        sys.exit(f"{len(cfg['views'])} views given, {o['kind']} takes {want}")
    for v in cfg["views"]:
        if v["grayscale_p"] or v["blur"]["p"] or v["equalize_p"]:
            sys.exit("this reference implements the gray recipes (no grayscale, blur, equalize) only")
    if o["kind"] == "dino" and (o["ibot_weight"] or o["koleo_weight"]):
        sys.exit("this reference implements DINO without iBOT and KoLeo (ibot_weight = koleo_weight = 0)")
    if cfg["model"]["backbone"]["kind"] != "resnet":
        sys.exit("this reference implements the ResNet backbone only")


class MultiView(Dataset):
    """One image, one view per recipe (decoded once, cropped len(transforms) times)."""

    def __init__(self, images, transforms):
        self.images, self.transforms = images, transforms  # uint8 [N, 1, H, W], read once

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return [t(img) for t in self.transforms]


def size_groups(views):
    """Runs of consecutive views of one size: [[v0, v1], [v2, ..., v7]] for 2 global + 6 local crops."""
    groups = []
    for v in views:
        if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def cosine_momentum(start, end, step, total_steps):
    """selfsup's teacher momentum (BYOL's tau, DINO's momentum_schedule): start at step 0, end at the last."""
    return end - (end - start) * (math.cos(math.pi * min(step / max(total_steps, 1), 1.0)) + 1) / 2


def mlp(inp, hidden, out):
    """Linear -> BN -> ReLU -> Linear, no bias before the batch norm (BYOL's projector and predictor)."""
    return nn.Sequential(nn.Linear(inp, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


class WithTeacher(nn.Module):
    """Student modules and a momentum teacher of `ema_names` of them: built again, loaded with the student's
    state, never trained (requires_grad False), updated by EMA after every optimizer step."""

    def build_teacher(self, build, ema_names):
        self.teacher = nn.ModuleDict({name: build[name]() for name in ema_names})
        self.teacher.load_state_dict(nn.ModuleDict({n: getattr(self, n) for n in ema_names}).state_dict())
        self.teacher.requires_grad_(False)
        self.ema_names, self.ema_pairs, self.momentum = ema_names, None, self.cfg.objective.momentum

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("teacher.")]

    @torch.no_grad()
    def on_train_batch_end(self, step, total_steps):
        o = self.cfg.objective
        self.momentum = cosine_momentum(o.momentum, o.momentum_end, step, total_steps)
        if self.ema_pairs is None:  # after .to(device): the same order, module by module
            student = [p for n in self.ema_names for p in getattr(self, n).parameters()]
            teacher = list(self.teacher.parameters())
            assert [p.shape for p in student] == [p.shape for p in teacher]
            self.ema_pairs = teacher, student
        torch._foreach_lerp_(*self.ema_pairs, 1.0 - self.momentum)

    def on_after_backward(self, epoch):
        pass


class BYOL(WithTeacher):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, b, o = cfg, cfg.model.backbone, cfg.objective
        build = {"backbone": lambda: ResNet(b.layers, b.width, b.cifar_stem),
                 "projector": lambda: mlp(self.backbone.dim, o.proj_hidden, o.proj_dim)}
        self.backbone = build["backbone"]()
        self.projector = build["projector"]()
        self.predictor = mlp(o.proj_dim, o.pred_hidden, o.proj_dim)
        self.build_teacher(build, ["backbone", "projector"])

    def log_values(self):
        return f"tau {self.momentum:.5f}"

    def training_step(self, views, epoch, amp):
        x, n = torch.cat(views), views[0].shape[0]  # both views of one size: one forward
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            z = self.projector(self.backbone(x))
            p = [self.predictor(zv) for zv in z.split(n)]
            with torch.no_grad():
                zt = self.teacher.projector(self.teacher.backbone(x)).split(n)
        return byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])  # outside autocast: fp32 cosines


def byol_loss(p, z):
    """Mean over the batch of 2 - 2 cos(p_i, z_i); p, z: [N, D] -> scalar in fp32."""
    return (2 - 2 * (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)).mean()


class DINOHead(nn.Module):
    """facebookresearch/dino's DINOHead (no bias in a linear layer followed by batch norm, as selfsup)."""

    def __init__(self, in_dim, o):
        super().__init__()
        bn, layers = o.head_batch_norm, []
        if o.head_layers == 1:
            layers.append(nn.Linear(in_dim, o.bottleneck))
        else:
            for i in range(o.head_layers - 1):
                layers.append(nn.Linear(in_dim if i == 0 else o.head_hidden, o.head_hidden, bias=not bn))
                layers += [nn.BatchNorm1d(o.head_hidden)] if bn else []
                layers.append(nn.GELU())
            layers.append(nn.Linear(o.head_hidden, o.bottleneck))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(o.bottleneck, o.out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # weight_g [K, 1]
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not o.norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(WithTeacher):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, b, o, t = cfg, cfg.model.backbone, cfg.objective, cfg.train
        build = {"backbone": lambda: ResNet(b.layers, b.width, b.cifar_stem),
                 "head": lambda: DINOHead(self.backbone.dim, o)}
        self.backbone = build["backbone"]()
        self.head = build["head"]()
        self.build_teacher(build, ["backbone", "head"])
        self.register_buffer("center", torch.zeros(1, o.out_dim))
        n = o.warmup_teacher_temp_epochs
        self.teacher_temps = np.concatenate((np.linspace(o.warmup_teacher_temp, o.teacher_temp, n),
                                             np.ones(max(t.epochs - n, 1)) * o.teacher_temp))
        self.teacher_temp = float(self.teacher_temps[0])

    def log_values(self):
        return f"tau {self.momentum:.5f} teacher temp {self.teacher_temp:.4f}"

    def training_step(self, views, epoch, amp):
        o = self.cfg.objective
        self.teacher_temp = float(self.teacher_temps[min(int(epoch), len(self.teacher_temps) - 1)])
        with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=amp):
            student = []
            for group in size_groups(views):  # the global crops at once, then the local ones
                student += self.head(self.backbone(torch.cat(group))).chunk(len(group))
            with torch.no_grad():
                teacher = self.teacher.head(self.teacher.backbone(torch.cat(views[:2])))
        loss = dino_loss(student, teacher.chunk(2), self.center, o.student_temp, self.teacher_temp)  # fp32
        with torch.no_grad():
            m = o.center_momentum
            self.center.mul_(m).add_(teacher.float().mean(0, keepdim=True), alpha=1 - m)
        return loss

    def on_after_backward(self, epoch):
        if epoch < self.cfg.objective.freeze_last_layer:  # epochs done, fractional, as selfsup
            for p in self.head.last_layer.parameters():
                p.grad = None  # no gradient: LARS skips it (no decay, no momentum)


def dino_loss(student, teacher, center, student_temp, teacher_temp):
    """DINO's loss: student views [N, K] each (globals first), teacher globals [N, K], center [1, K] -> mean over
    pairs (teacher view g, student view v != g) of the cross entropy; in fp32, no gradient to the teacher."""
    q = [F.softmax((t.float() - center) / teacher_temp, dim=-1).detach() for t in teacher]
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [-(qg * lp).sum(-1).mean() for g, qg in enumerate(q) for v, lp in enumerate(log_p) if v != g]
    return sum(terms) / len(terms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs/byol-fmnist.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--method", choices=sorted(OBJECTIVES), help="default: the config's [objective] kind")
    ap.add_argument("--workers", type=int, help="DataLoader workers (default: train.threads, 0 there = all cores)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", help="folder for checkpoints (every train.checkpoint_every epochs and at the end)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=None,
                    help="as selfsup's train.profile_steps (default: the config's): synchronize after each phase of "
                         "this many steps after 10 warm-up steps; host vs device ms per phase in the JSON")
    args = ap.parse_args()
    with open(args.config, "rb") as f:
        kind = args.method or tomllib.load(f).get("objective", {}).get("kind")
    if kind not in OBJECTIVES:
        sys.exit(f"{args.config}: objective kind {kind!r}; this reference implements {sorted(OBJECTIVES)}")
    cfg = ref.load_config(args.config, args.set, defaults(kind), check)
    if cfg.objective.kind != kind:
        sys.exit(f"--method {kind}, but the config's objective is {cfg.objective.kind}")
    t, o, e = cfg.train, cfg.optimizer, cfg.eval
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device, amp = torch.device("cuda" if cuda else "cpu"), cuda and t.bf16
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = cuda
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    log = (lambda *_: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    torch.manual_seed(cfg.seed)

    images = read_idx(cfg.data.train)
    side = images.shape[-1]
    workers = args.workers if args.workers is not None else (t.threads or len(os.sched_getaffinity(0)))
    loader = DataLoader(MultiView(images, [transform(v, True, side) for v in cfg.views]), batch_size=t.batch_size,
                        shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                        worker_init_fn=ref.worker_init if workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    model = (BYOL if kind == "byol" else DINO)(cfg).to(device, memory_format=mf)
    opt = LARS(model.student_parameters(), 0.0, o.momentum, o.weight_decay, o.eta, lars=o.kind == "lars",
               clip=o.lars_clip)
    evaluator = Evaluator(cfg, device, amp, args.channels_last) if getattr(cfg.data, "test", None) else None
    judged = model.teacher.backbone if e.teacher else model.backbone  # selfsup's eval.teacher
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * t.epochs  # the schedules' length; train.max_steps only cuts the run short
    max_steps = min(t.max_steps or total_steps, total_steps)
    peak_lr = o.base_lr * t.batch_size / 256
    log(f"pytorch {kind} reference: {len(images)} images, {len(cfg.views)} views "
        f"({'/'.join(str(v.size) for v in cfg.views)} px), {steps_per_epoch} steps/epoch, {max_steps} steps, "
        f"{workers} workers, {device}, bf16 {amp}, channels_last {args.channels_last}, torch {torch.__version__}")

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
            batch = next(it, None)
            wait += time.perf_counter() - w0
            if batch is None:
                break
            consumed, n = consumed + 1, batch[0].shape[0]
            views = [v.to(device, non_blocking=True).contiguous(memory_format=mf) for v in batch]
            lr = lr_at(o, peak_lr, step / steps_per_epoch, t.epochs)
            for g in opt.param_groups:
                g["lr"] = lr

            def forward():
                return model.training_step(views, step / steps_per_epoch, amp)

            def backward():
                opt.zero_grad(set_to_none=True)
                loss.backward()
                model.on_after_backward(step / steps_per_epoch)
                if o.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.student_parameters(), o.clip_grad)

            def update():  # the optimizer step, then the teacher's EMA (selfsup's after_step)
                opt.step()
                model.on_train_batch_end(step, total_steps)

            if cuda and 10 <= step < 10 + profile_steps:  # as selfsup's StepProfile
                torch.cuda.synchronize()
                loss = prof.time(0, forward)
                prof.time(1, backward)
                prof.time(2, update)
                prof.steps += 1
            else:
                loss = forward()
                backward()
                update()
            step, images_seen, acc_steps = step + 1, images_seen + n, acc_steps + 1
            loss_acc += loss.detach()
            if step % t.log_every == 0 or step >= max_steps:
                final_loss = loss_acc.item() / acc_steps  # the deliberate sync point
                loss_acc, acc_steps = torch.zeros((), device=device), 0
                if not math.isfinite(final_loss):
                    sys.exit(f"loss is {final_loss} at step {step}; lower optimizer.base_lr?")
                dt = loop_time + time.perf_counter() - epoch_start
                log(f"epoch {epoch + 1}/{t.epochs} step {step}/{max_steps} loss {final_loss:.4f} lr {lr:.4f} "
                    f"{model.log_values()} {images_seen / dt:.0f} img/s, waited {100 * wait / dt:.1f}%")
        if acc_steps:
            final_loss = loss_acc.item() / acc_steps  # syncs too: the epoch's time is all spent
        loop_time += time.perf_counter() - epoch_start
        if consumed < steps_per_epoch:
            break  # stopped by train.max_steps
        epoch += 1
        if t.checkpoint_every and epoch % t.checkpoint_every == 0:
            last_saved = save(f"epoch-{epoch:04d}")
        if evaluator and e.knn_every and epoch % e.knn_every == 0 and epoch < t.epochs:
            log(f"epoch {epoch}: k-NN top-1 {100 * evaluator.knn(*evaluator.features(judged)):.2f}%")
    if last_saved != step:
        save(f"epoch-{epoch:04d}" + ("" if step % steps_per_epoch == 0 else f"-step-{step}"))
    pretrain_seconds = time.perf_counter() - run_start  # like selfsup's: mid-run k-NN and checkpoints included
    result = {"impl": f"pytorch-{kind}", "method": kind, "pretrain_seconds": round(pretrain_seconds, 3),
              "images_per_s": round(images_seen / max(loop_time, 1e-9), 1), "data_wait_seconds": round(wait, 3),
              "data_wait_fraction": round(wait / max(loop_time, 1e-9), 5), "knn_top1": None, "linear_top1": None,
              "raw_pixels_linear_top1": None, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "steps": step, "images": images_seen, "epochs": epoch, "final_loss": round(final_loss, 5),
              "teacher_momentum": model.momentum, "views": [v.size for v in cfg.views], "workers": workers,
              "channels_last": args.channels_last, "torch": torch.__version__, "profile": prof.result()}
    if kind == "dino":
        result["teacher_temp"] = model.teacher_temp
    if evaluator and e.at_end:
        t0 = time.perf_counter()
        tr, te = evaluator.features(judged)
        result["knn_top1"], result["linear_top1"] = evaluator.knn(tr, te), evaluator.probe(tr, te)
        if e.raw_pixel_baseline:  # the same probe on normalized pixels: the baseline to beat
            result["raw_pixels_linear_top1"] = evaluator.probe(*evaluator.features(nn.Flatten(), amp=False))
        result["eval_seconds"] = round(time.perf_counter() - t0, 3)
        log(f"k-NN top-1 {100 * result['knn_top1']:.2f}%, linear probe top-1 {100 * result['linear_top1']:.2f}%")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
