#!/usr/bin/env python3
"""The PyTorch reference for selfsup's MAE recipe (preset `mae-fmnist`, then `selfsup finetune`): MAE pretraining of
a ViT-Tiny (patch 4) on Fashion-MNIST, then full fine-tuning from the pretrained encoder and from scratch, on
Fashion-MNIST and (with --transfer-dir) on MNIST. Plain PyTorch + torchvision, no timm, one file, written the way a
PyTorch user writes it from facebookresearch/mae: models_mae.py (MaskedAutoencoderViT, get_2d_sincos_pos_embed,
random_masking, norm_pix_loss), main_pretrain.py + util/lr_sched.py (AdamW, per-step warmup + cosine), and
main_finetune.py + util/lr_decay.py (param_groups_lrd, head trunc_normal 2e-5, label smoothing).

The recipe is the RECIPE dict below (printed at start, and stored in the JSON); it is configs/mae-fmnist.toml
(+ its [finetune] table), key by key in scripts/reference/README.md. Where it departs from the MAE repo, on purpose
(to be selfsup's recipe): the head sees the mean of the patch tokens AFTER the final `norm` (MAE's global_pool
pools first, then a fresh `fc_norm`); the sin-cos position table stays fixed in fine-tuning too (timm trains it);
no drop-path, mixup, cutmix, RandAugment or random erasing; bf16 autocast instead of fp16 + loss scaler; no weight
decay on cls/pos/mask tokens in pretraining (MAE's add_weight_decay exempts only 1-D tensors and biases); no
horizontal flip when fine-tuning on MNIST (digits; configs/mae-fmnist-mnist.toml); fused AdamW on CUDA.

Data: the IDX files are read into one uint8 tensor; augmentation is torchvision.transforms.v2 per sample in
DataLoader workers (all cores, pinned memory, persistent workers), which is what MAE's main_pretrain.py does
(ImageFolder + transforms + DataLoader); the time the loop spends blocked in next(loader) is measured.
Test images are normalized on the GPU (no crop). Fine-tuning evaluates top-1 on the test set after each epoch.

Usage (the last line printed is the JSON result, also written to --json):
    python3 scripts/reference/mae_fmnist_torch.py --data-dir data/fashion-mnist --transfer-dir data/mnist
CPU smoke test (seconds): --limit 1024 --test-limit 512 --epochs 1 --finetune-epochs 1 --depth 2 --device cpu
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

RECIPE = {
    "seed": 0,
    "data": {"size": 28, "channels": 1, "mean": 0.2860, "std": 0.3530},  # the same normalization for MNIST
    "vit": {"patch": 4, "depth": 12, "width": 192, "heads": 3, "mlp_ratio": 4.0, "ln_eps": 1e-6, "qkv_bias": True,
            "act": "gelu (exact erf)", "pos_embed": "2-D sin-cos, fixed (MAE get_2d_sincos_pos_embed), zero for cls"},
    "mae": {"mask_ratio": 0.75, "decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4,
            "norm_pix_loss": True, "norm_pix_var": "unbiased (torch.var default, as MAE)", "norm_pix_eps": 1e-6,
            "loss_on": "masked patches"},
    "pretrain": {"epochs": 30, "batch_size": 512, "base_lr": 1.5e-4, "lr_scale_batch": 256, "betas": [0.9, 0.95],
                 "weight_decay": 0.05, "no_decay": "biases, norms (all 1-D), cls_token, pos_embed, mask_token",
                 "warmup_epochs": 3.0, "min_lr": 0.0, "schedule": "per-step linear warmup then cosine",
                 "crop_scale": [0.2, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip_p": 0.5, "drop_last": True,
                 "bf16": True, "checkpoint_every": 10},
    "finetune": {"epochs": 8, "batch_size": 256, "base_lr": 1e-3, "lr_scale_batch": 256, "betas": [0.9, 0.999],
                 "weight_decay": 0.05, "no_decay": "1-D tensors, cls_token, pos_embed", "layer_decay": 0.75,
                 "warmup_epochs": 1.0, "min_lr": 0.0, "label_smoothing": 0.1, "grad_clip": None,
                 "pool": "mean of patch tokens after the final norm", "head_init_std": 2e-5,
                 "pos_embed_trainable": False, "crop_scale": [0.6, 1.0], "crop_ratio": [3 / 4, 4 / 3],
                 "flip_p": 0.5, "transfer_flip_p": 0.0, "drop_last": True, "bf16": True, "eval_every_epoch": True},
}


# ---------------------------------------------------------------------------------------------------------- data
def read_idx(path):
    """IDX u8 file (gz or not) -> uint8 tensor: images [N, 1, H, W] (magic 0x803) or int64 labels [N] (0x801)."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
    return torch.from_numpy(arr.copy()).unsqueeze(1) if len(dims) == 3 else torch.from_numpy(arr.astype(np.int64))


def find_idx(folder, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    sys.exit(f"{folder}: no {stem}[.gz]")


def load_dataset(folder, limit=0, test_limit=0):
    """(train_x, train_y, test_x, test_y) from the four IDX files in `folder`; the first `limit` train images."""
    get = lambda stem: read_idx(find_idx(folder, stem))  # noqa: E731
    tx, ty = get("train-images-idx3-ubyte"), get("train-labels-idx1-ubyte")
    vx, vy = get("t10k-images-idx3-ubyte"), get("t10k-labels-idx1-ubyte")
    if len(tx) != len(ty) or len(vx) != len(vy):
        sys.exit(f"{folder}: image and label counts differ")
    return tx[: limit or None], ty[: limit or None], vx[: test_limit or None], vy[: test_limit or None]


def train_transform(r, d):
    """RandomResizedCrop + flip on a uint8 [1, H, W] tensor, then float in [0, 1] and Normalize."""
    return v2.Compose([
        v2.RandomResizedCrop(d["size"], scale=tuple(r["crop_scale"]), ratio=tuple(r["crop_ratio"]), antialias=True),
        v2.RandomHorizontalFlip(r["flip_p"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([d["mean"]], [d["std"]]),
    ])


class Images(Dataset):
    def __init__(self, images, transform, labels=None):
        self.images, self.transform, self.labels = images, transform, labels  # uint8 [N, 1, H, W], read once

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.transform(self.images[i])
        return x if self.labels is None else (x, self.labels[i])


def worker_init(_):
    torch.set_num_threads(1)  # 28 px ops: intra-op threads in each worker would only oversubscribe the cores


def make_loader(dataset, batch_size, workers, pin, seed, drop_last):
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                      drop_last=drop_last, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=worker_init if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- 2-D sin-cos (MAE util/pos_embed.py)
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """[grid*grid (+1), D]: first half of the channels from grid[0] (which varies along w: meshgrid(w, h)), second
    half from grid[1]; a zero row first for the cls token. Verbatim MAE."""
    assert embed_dim % 2 == 0
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos = np.concatenate([np.zeros([1, embed_dim]), pos], axis=0)
    return pos


# -------------------------------------------------------------------------------------- model (timm param names)
class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch, in_chans, dim):
        super().__init__()
        self.patch_size, self.grid = patch, img_size // patch
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):  # [B, C, H, W] -> [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, N, C] -> [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's Block, no drop-path, no layer scale)."""

    def __init__(self, dim, heads, mlp_ratio, eps, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The encoder: patch_embed, cls_token, pos_embed, blocks.{i}, norm (names as timm/MAE, so weights move between
    the MAE and the classifier by name). `pos_trainable`: False in pretraining (MAE); in fine-tuning timm trains it,
    selfsup keeps the sin-cos table fixed (RECIPE finetune.pos_embed_trainable)."""

    def __init__(self, v, d, pos_trainable):
        super().__init__()
        self.patch_embed = PatchEmbed(d["size"], v["patch"], d["channels"], v["width"])
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, v["width"]))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, v["width"]), requires_grad=pos_trainable)
        self.blocks = nn.ModuleList(Block(v["width"], v["heads"], v["mlp_ratio"], v["ln_eps"], v["qkv_bias"])
                                    for _ in range(v["depth"]))
        self.norm = nn.LayerNorm(v["width"], eps=v["ln_eps"])

    def initialize_weights(self):
        """MAE's initialize_weights: sin-cos pos, patch conv weight xavier_uniform as a [D, p*p*C] Linear (its bias
        keeps PyTorch's Conv2d default, as in MAE), cls (and mask) token normal(.02), Linear xavier_uniform with zero
        bias, LayerNorm 1/0."""
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        self.extra_init()
        self.apply(self._init_weights)

    def extra_init(self):
        pass

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def tokens(self, x):  # [B, C, H, W] -> patch tokens with position, [B, L, D]
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def encode(self, x):  # [B, N, D] tokens (cls not yet added) -> [B, 1 + N, D] after the final norm
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class MaskedAutoencoderViT(ViT):
    def __init__(self, v, m, d):
        super().__init__(v, d, pos_trainable=False)
        n, p = self.patch_embed.num_patches, v["patch"]
        self.mask_ratio, self.norm_pix_loss, self.eps = m["mask_ratio"], m["norm_pix_loss"], m["norm_pix_eps"]
        self.decoder_embed = nn.Linear(v["width"], m["decoder_width"])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m["decoder_width"]))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, m["decoder_width"]), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(m["decoder_width"], m["decoder_heads"], v["mlp_ratio"], v["ln_eps"])
                                            for _ in range(m["decoder_depth"]))
        self.decoder_norm = nn.LayerNorm(m["decoder_width"], eps=v["ln_eps"])
        self.decoder_pred = nn.Linear(m["decoder_width"], p * p * d["channels"])
        self.initialize_weights()

    def extra_init(self):
        pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.patch_embed.grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):  # [B, C, H, W] -> [B, L, p*p*C], pixels in (row, col, channel) order
        p, c = self.patch_embed.patch_size, imgs.shape[1]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def random_masking(self, x):
        """Keep int(L * (1 - ratio)) tokens per sample, chosen by argsort of uniform noise. x: [B, L, D] ->
        (kept [B, K, D], mask [B, L] with 1 = masked, ids_restore [B, L])."""
        n, length, dim = x.shape
        len_keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore

    def forward_decoder(self, x, ids_restore):  # [B, 1 + K, D] -> [B, L, p*p*C]
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):  # mean squared error per patch, averaged over the masked patches
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + self.eps) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs):  # [B, C, H, W] -> scalar loss (fp32)
        x, mask, ids_restore = self.random_masking(self.tokens(imgs))
        pred = self.forward_decoder(self.encode(x), ids_restore)
        return self.forward_loss(imgs.float(), pred, mask)


class ViTClassifier(ViT):
    def __init__(self, v, d, classes, pos_trainable):
        super().__init__(v, d, pos_trainable)
        self.head = nn.Linear(v["width"], classes)
        self.initialize_weights()

    def forward(self, x):  # [B, C, H, W] -> logits [B, classes]
        return self.head(self.encode(self.tokens(x))[:, 1:, :].mean(dim=1))


# ----------------------------------------------------------------------------------------- optimizer, schedule
def lr_at(r, epoch):
    """util/lr_sched.adjust_learning_rate: `epoch` fractional (step / steps_per_epoch)."""
    peak = r["base_lr"] * r["batch_size"] / r["lr_scale_batch"]
    if epoch < r["warmup_epochs"]:
        return peak * epoch / r["warmup_epochs"]
    t = (epoch - r["warmup_epochs"]) / max(r["epochs"] - r["warmup_epochs"], 1e-9)
    return r["min_lr"] + (peak - r["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def pretrain_param_groups(model, weight_decay):
    skip = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def layer_id_for_vit(name, num_layers):
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers  # norm, head


def param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """util/lr_decay.param_groups_lrd: lr_scale = layer_decay ** (depth + 1 - layer_id)."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay_list
        layer = layer_id_for_vit(name, num_layers)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"lr_scale": scales[layer], "weight_decay": 0.0 if no_decay else weight_decay,
                           "params": [], "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def adamw(groups, betas, cuda):
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), fused=cuda)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------------------- training
class Env:
    def __init__(self, device, amp, workers, log, seed):
        self.device, self.amp, self.workers, self.log, self.seed = device, amp, workers, log, seed
        self.cuda = device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def pretrain(mae, images, env, out=None, log_every=50):
    """MAE pretraining; with `out`, a checkpoint (weights + optimizer) every `checkpoint_every` epochs and at the end,
    as selfsup writes them (counted in the pretraining time, as ours)."""
    r, d = RECIPE["pretrain"], RECIPE["data"]
    loader = make_loader(Images(images, train_transform(r, d)), r["batch_size"], env.workers, env.cuda, env.seed,
                         r["drop_last"])
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        sys.exit(f"{len(images)} images are less than one batch of {r['batch_size']}")
    opt = adamw(pretrain_param_groups(mae, r["weight_decay"]), r["betas"], env.cuda)
    env.log(f"pretraining: {len(images)} images, {steps_per_epoch} steps/epoch, {r['epochs']} epochs, "
            f"{sum(p.numel() for p in mae.parameters() if p.requires_grad):,} trainable parameters")
    step, seen, wait, loop_time, final_loss = 0, 0, 0.0, 0.0, float("nan")
    start = time.perf_counter()
    for epoch in range(r["epochs"]):
        t_epoch = time.perf_counter()
        it, loss_acc, acc_n = iter(loader), torch.zeros((), device=env.device), 0
        wait += time.perf_counter() - t_epoch
        while True:
            w0 = time.perf_counter()
            x = next(it, None)
            wait += time.perf_counter() - w0
            if x is None:
                break
            set_lr(opt, lr := lr_at(r, step / steps_per_epoch))
            x = x.to(env.device, non_blocking=True)
            with env.autocast():
                loss = mae(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen, acc_n = step + 1, seen + len(x), acc_n + 1
            loss_acc += loss.detach()
            if step % log_every == 0:
                final_loss = loss_acc.item() / acc_n  # the deliberate sync point
                loss_acc, acc_n = torch.zeros((), device=env.device), 0
                if not math.isfinite(final_loss):
                    sys.exit(f"pretraining loss is {final_loss} at step {step}")
                dt = loop_time + time.perf_counter() - t_epoch
                env.log(f"pretrain epoch {epoch + 1}/{r['epochs']} step {step} loss {final_loss:.4f} lr {lr:.2e} "
                        f"{seen / dt:.0f} img/s, waited {100 * wait / dt:.1f}%")
        if acc_n:
            final_loss = loss_acc.item() / acc_n
        loop_time += time.perf_counter() - t_epoch
        every = r["checkpoint_every"]
        if out and ((every and (epoch + 1) % every == 0) or epoch + 1 == r["epochs"]):
            Path(out).mkdir(parents=True, exist_ok=True)
            torch.save({"model": mae.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step},
                       Path(out) / f"epoch-{epoch + 1:04d}.pt")
    seconds = time.perf_counter() - start
    del loader, it
    return {"seconds": round(seconds, 3), "train_seconds": round(loop_time, 3),
            "images_per_s": round(seen / max(loop_time, 1e-9), 1), "steps": step, "epochs": r["epochs"],
            "images": seen, "final_loss": round(final_loss, 5), "data_wait_seconds": round(wait, 3),
            "data_wait_fraction": round(wait / max(loop_time, 1e-9), 5)}


@torch.no_grad()
def top1(model, images, labels, env, batch=1024):
    d = RECIPE["data"]
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(env.device, non_blocking=True).float().div_(255).sub_(d["mean"]).div_(d["std"])
        with env.autocast():
            pred = model(x).argmax(1)
        correct += (pred == labels[i:i + batch].to(env.device)).sum()
    model.train()
    return correct.item() / len(images)


def finetune(encoder_state, data, env, epochs, flip_p, label, log_every=100):
    """Full fine-tuning of a ViTClassifier: from `encoder_state` (MAE state dict) or from scratch (None), with the
    identical recipe and seed (same head init, same data order)."""
    r, d, v = RECIPE["finetune"], RECIPE["data"], RECIPE["vit"]
    r = dict(r, epochs=epochs, flip_p=flip_p)
    tx, ty, vx, vy = data
    classes = int(max(ty.max(), vy.max())) + 1
    start = time.perf_counter()
    torch.manual_seed(env.seed)
    model = ViTClassifier(v, d, classes, r["pos_embed_trainable"])
    if encoder_state is not None:
        state = {k: t for k, t in encoder_state.items() if not (k.startswith("decoder") or k == "mask_token")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"head.weight", "head.bias"} or unexpected:
            sys.exit(f"loading the encoder: missing {missing}, unexpected {unexpected}")
    nn.init.trunc_normal_(model.head.weight, std=r["head_init_std"])  # main_finetune.py, after loading
    nn.init.zeros_(model.head.bias)
    model.to(env.device)
    opt = adamw(param_groups_lrd(model, r["weight_decay"], {"cls_token", "pos_embed"}, r["layer_decay"]),
                r["betas"], env.cuda)
    loader = make_loader(Images(tx, train_transform(r, d), ty), r["batch_size"], env.workers, env.cuda, env.seed,
                         r["drop_last"])
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        sys.exit(f"{len(tx)} images are less than one batch of {r['batch_size']}")
    vy_dev = vy.to(env.device)
    step, seen, loop_time, per_epoch, final_loss = 0, 0, 0.0, [], float("nan")
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        loss_acc, acc_n = torch.zeros((), device=env.device), 0
        for x, y in loader:
            set_lr(opt, lr := lr_at(r, step / steps_per_epoch))
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with env.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen, acc_n = step + 1, seen + len(x), acc_n + 1
            loss_acc += loss.detach()
            if step % log_every == 0:
                final_loss = loss_acc.item() / acc_n
                loss_acc, acc_n = torch.zeros((), device=env.device), 0
                if not math.isfinite(final_loss):
                    sys.exit(f"{label}: loss is {final_loss} at step {step}")
        if acc_n:
            final_loss = loss_acc.item() / acc_n
        loop_time += time.perf_counter() - t_epoch
        per_epoch.append(round(top1(model, vx, vy_dev, env), 5))
        env.log(f"{label} epoch {epoch + 1}/{epochs}: loss {final_loss:.4f} lr {lr:.2e}, "
                f"test top-1 {100 * per_epoch[-1]:.2f}%")
    seconds = time.perf_counter() - start
    del loader
    return {"top1": per_epoch[-1] if per_epoch else None, "top1_per_epoch": per_epoch, "seconds": round(seconds, 3),
            "train_seconds": round(loop_time, 3), "images_per_s": round(seen / max(loop_time, 1e-9), 1),
            "steps": step, "epochs": epochs, "final_loss": round(final_loss, 5), "train_images": len(tx),
            "test_images": len(vx)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "data/fashion-mnist"),
                    help="Fashion-MNIST: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*")
    ap.add_argument("--transfer-dir", help="MNIST (the same four files): fine-tune there too, pretrained and scratch")
    ap.add_argument("--epochs", type=int, default=RECIPE["pretrain"]["epochs"], help="pretraining epochs (0: none)")
    ap.add_argument("--finetune-epochs", type=int, default=RECIPE["finetune"]["epochs"], help="0: no fine-tuning")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch fine-tunes")
    ap.add_argument("--limit", type=int, default=0, help="use the first N training images (0: all)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--depth", type=int, help=f"encoder depth (default {RECIPE['vit']['depth']}; smoke tests only)")
    ap.add_argument("--workers", type=int, help="DataLoader workers (default: all cores)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--out", help="folder for pretraining checkpoints (every 10 epochs and at the end, as ours)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (stderr)")
    args = ap.parse_args()

    wall0 = time.perf_counter()
    RECIPE["pretrain"]["epochs"], RECIPE["finetune"]["epochs"] = args.epochs, args.finetune_epochs
    if args.depth:
        RECIPE["vit"]["depth"] = args.depth
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda
    seed = RECIPE["seed"]
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    log = (lambda *_: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    env = Env(device, cuda and RECIPE["pretrain"]["bf16"], workers, log, seed)
    print("recipe: " + json.dumps(RECIPE), file=sys.stderr, flush=True)
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}, bf16 {env.amp}, {workers} workers; "
        f"augmentation: torchvision v2 per sample in DataLoader workers")

    fmnist = load_dataset(args.data_dir, args.limit, args.test_limit)
    result = {"impl": "pytorch-mae", "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "workers": workers,
              "augmentation": "torchvision.transforms.v2 per sample in DataLoader workers",
              "limit": args.limit, "test_limit": args.test_limit, "recipe": RECIPE,
              "pretrain": None, "finetune": {}}

    torch.manual_seed(seed)
    mae = MaskedAutoencoderViT(RECIPE["vit"], RECIPE["mae"], RECIPE["data"]).to(device)
    if args.epochs > 0:
        result["pretrain"] = pretrain(mae, fmnist[0], env, args.out)
        p = result["pretrain"]
        log(f"pretrained {p['steps']} steps in {p['seconds']:.1f}s: {p['images_per_s']:.0f} img/s, "
            f"waited {100 * p['data_wait_fraction']:.1f}%, final loss {p['final_loss']:.4f}")
    encoder = {k: t.detach().cpu() for k, t in mae.state_dict().items()}
    del mae

    if args.finetune_epochs > 0:
        ft = RECIPE["finetune"]
        sets = [("fmnist", fmnist, ft["flip_p"])]
        if args.transfer_dir:  # digits are not mirror-symmetric: no flip (as configs/mae-fmnist-mnist.toml)
            sets.append(("mnist", load_dataset(args.transfer_dir, args.limit, args.test_limit), ft["transfer_flip_p"]))
        for name, data, flip_p in sets:
            runs = {"pretrained": encoder} if args.no_scratch else {"pretrained": encoder, "scratch": None}
            result["finetune"][name] = {}
            for kind, state in runs.items():
                res = finetune(state, data, env, args.finetune_epochs, flip_p, f"{name} {kind}")
                result["finetune"][name][kind] = res
                log(f"fine-tuned {name} {kind}: top-1 {100 * res['top1']:.2f}% in {res['seconds']:.1f}s")
            if "scratch" in result["finetune"][name]:
                gain = result["finetune"][name]["pretrained"]["top1"] - result["finetune"][name]["scratch"]["top1"]
                log(f"{name}: pretrained - scratch = {100 * gain:+.2f} points")
    result["wall_seconds"] = round(time.perf_counter() - wall0, 3)
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
