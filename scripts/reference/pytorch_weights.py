#!/usr/bin/env python3
"""The PyTorch side of weights in and out of selfsup (pipeline/tests/pytorch_weights.rs, tests/weights_import.rs):
torchvision and timm backbones, their state dicts saved with safetensors, and their features on fixed images.

    python pytorch_weights.py make DIR
        Writes, with random (seeded) initialisation:
          DIR/resnet18.safetensors, DIR/resnet50.safetensors   torchvision state dicts as `state_dict()` gives
                                                              them (fc.* and num_batches_tracked included)
          DIR/vit_tiny_patch16_224.safetensors                timm state dict (head.* included)
          DIR/images.safetensors                              "x224" [2, 3, 224, 224], "x112" [2, 3, 112, 112]
          DIR/features.safetensors                            the features of each, eval mode:
            resnet18, resnet50   fc = Identity: after the global average pool
            vit_token            timm's default for this model: global_pool='token' (the cls token after `norm`)
                                 = our pool = "cls"
            vit_avg              global_pool='avg', fc_norm=False (mean of the patch tokens after `norm`)
                                 = our pool = "mean" (timm's default for 'avg', fc_norm=None, normalises AFTER
                                 pooling, under the name fc_norm.*, which ours does not do)
            vit_avg_112          the 224 px state dict loaded into vit_tiny_patch16_224(img_size=112, 'avg',
                                 fc_norm=False) through timm's checkpoint_filter_fn (pos_embed resampled 14x14 ->
                                 7x7, bicubic, antialias=True), features of x112
        The norms' weights, biases and running statistics and the linear biases are drawn at random too (seeded),
        so that a tensor loaded into the wrong place changes the features.

    python pytorch_weights.py load FILE ARCH IMAGES OUT
        Loads FILE (a selfsup export) into ARCH with load_state_dict(strict=True) for the backbone (no classifier)
        and writes its eval-mode features of IMAGES["x224"] to OUT ("features"). ARCH: resnet18, resnet50 (fc =
        Identity), vit_token (timm vit_tiny_patch16_224, num_classes=0, global_pool='token'), vit_avg (the same
        with global_pool='avg', fc_norm=False). Prints {"arch", "tensors"} as JSON.

    python pytorch_weights.py tiny DIR
        Small files for the CLI test, made as a PyTorch user would make them:
          DIR/resnet_cifar_rgb.safetensors   torchvision ResNet(BasicBlock, [1, 1, 1, 1]) with a 3x3 stride-1 stem
                                             for 3 channels and no max-pool (CIFAR style), fc included
          DIR/vit_rgb_56.safetensors         timm VisionTransformer(img_size=56, patch_size=4, in_chans=3,
                                             embed_dim=96, depth=4, num_heads=3, num_classes=10)

Run with the setup venv's python (~/.cache/selfsup/venv/bin/python: torch 2.11.0, torchvision 0.26.0, timm 1.0.31,
safetensors 0.8.0).
"""
import json
import pathlib
import sys

import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn

VIT = "vit_tiny_patch16_224"


def randomize_norms_and_biases(model, seed):
    """Every 1-D parameter away from its init (norm weights ~ U(0.5, 1.5), biases ~ 0.1 N(0, 1)), seeded, so that
    the features depend on each of them being in its place. Batch norms then get the running statistics of a
    train-mode pass over 4 random images (cumulative average), as a trained network has: its eval-mode
    activations stay O(1) through 16 blocks (with the init's mean 0, variance 1, ResNet-50's features reach ~3500,
    where float32 alone differs by more than 1e-4), and every running mean and variance is a different number."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() != 1:
                continue
            if name.endswith(".weight"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            model.train()(torch.randn(4, 3, 224, 224, generator=g))
            for m in bns:
                m.momentum = 0.1
    model.eval()


def state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def resnet(arch, seed):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    randomize_norms_and_biases(model, seed + 1)
    return model.eval()


def vit(seed, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(VIT, pretrained=False, **kwargs)
    randomize_norms_and_biases(model, seed + 1)
    return model.eval()


def features_resnet(model, x):
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        out = model(x)
    model.fc = head
    return out


def make(out):
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    x224 = torch.randn(2, 3, 224, 224, generator=g)
    x112 = torch.randn(2, 3, 112, 112, generator=g)
    save_file({"x224": x224, "x112": x112}, out / "images.safetensors")
    feats, summary = {}, {}
    for i, arch in enumerate(["resnet18", "resnet50"]):
        model = resnet(arch, 100 + i)
        save_file(state(model), out / f"{arch}.safetensors")
        feats[arch] = features_resnet(model, x224)
        summary[arch] = len(model.state_dict())
    model = vit(200)  # timm's defaults for this model: global_pool='token', class_token=True, 1000-class head
    sd = state(model)
    save_file(sd, out / f"{VIT}.safetensors")
    summary[VIT] = len(sd)
    with torch.no_grad():
        feats["vit_token"] = model.forward_head(model.forward_features(x224), pre_logits=True)
        avg = timm.create_model(VIT, pretrained=False, num_classes=0, global_pool="avg", fc_norm=False).eval()
        missing, unexpected = avg.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
        assert not missing and not unexpected, (missing, unexpected)
        feats["vit_avg"] = avg(x224)
        small = timm.create_model(VIT, pretrained=False, num_classes=0, global_pool="avg", fc_norm=False,
                                  img_size=112).eval()
        filtered = checkpoint_filter_fn({k: v for k, v in sd.items() if not k.startswith("head.")}, small)
        small.load_state_dict(filtered, strict=True)
        feats["vit_avg_112"] = small(x112)
    save_file({k: v.contiguous() for k, v in feats.items()}, out / "features.safetensors")
    summary["features"] = {k: list(v.shape) for k, v in feats.items()}
    summary["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                           "timm": timm.__version__}
    print(json.dumps(summary))


def load(file, arch, images, out):
    sd = load_file(file)
    if arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)()
        model.fc = torch.nn.Identity()
    elif arch == "vit_token":
        model = timm.create_model(VIT, pretrained=False, num_classes=0, global_pool="token")
    elif arch == "vit_avg":
        model = timm.create_model(VIT, pretrained=False, num_classes=0, global_pool="avg", fc_norm=False)
    else:
        sys.exit(f"unknown arch {arch}")
    # strict=True: every backbone tensor of the model is in the file and nothing else is (torchvision's batch
    # norms fill in num_batches_tracked for a plain dict, as for any pre-1.0 checkpoint).
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        f = model(load_file(images)["x224"])
    save_file({"features": f.contiguous()}, out)
    print(json.dumps({"arch": arch, "tensors": len(sd)}))


def tiny(out):
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    r = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    r.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    r.maxpool = torch.nn.Identity()
    save_file(state(r), out / "resnet_cifar_rgb.safetensors")
    torch.manual_seed(8)
    v = timm.models.vision_transformer.VisionTransformer(img_size=56, patch_size=4, in_chans=3, embed_dim=96,
                                                         depth=4, num_heads=3, num_classes=10)
    save_file(state(v), out / "vit_rgb_56.safetensors")
    print(json.dumps({"resnet_cifar_rgb": len(r.state_dict()), "vit_rgb_56": len(v.state_dict())}))


def main():
    cmd = sys.argv[1]
    if cmd == "make":
        make(pathlib.Path(sys.argv[2]))
    elif cmd == "load":
        load(*sys.argv[2:6])
    elif cmd == "tiny":
        tiny(pathlib.Path(sys.argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
