"""Loads a backbone exported by `selfsup export` into PyTorch, the way a user would, and prints what happened as
JSON (used by tests/cli.rs). safetensors is parsed by hand (header + raw little-endian f32), so only torch is
needed.

  python load_exported.py FILE.safetensors resnet18-cifar-gray   -> torchvision resnet18 with a 3x3 stride-1 stem
                                                                   for 1 channel and no max-pool
  python load_exported.py FILE.safetensors resnet50 [X.safetensors]
                                                               -> torchvision resnet50 (ImageNet stem, 3 channels);
                                                                  with X (key "x", [N,3,H,W]) also its features
                                                                  (fc = Identity) in eval mode, then in train mode
  python load_exported.py FILE.safetensors names                -> names and shapes only
"""
import json
import struct
import sys

import torch


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", (name, meta["dtype"])
        start, end = meta["data_offsets"]
        buf = bytearray(raw[8 + n + start : 8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(meta["shape"]).clone()
    return out


def main():
    path, kind = sys.argv[1], sys.argv[2]
    state = read_safetensors(path)
    result = {"names": sorted(state), "shapes": {k: list(v.shape) for k, v in state.items()}}
    if kind == "resnet18-cifar-gray":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
        missing, unexpected = model.load_state_dict(state, strict=False)
        result["missing"], result["unexpected"] = sorted(missing), sorted(unexpected)
        # Loaded values really are ours.
        result["conv1_equal"] = bool(torch.equal(model.conv1.weight, state["conv1.weight"]))
        model.fc = torch.nn.Identity()
        model.eval()
        with torch.no_grad():
            result["feature_dim"] = list(model(torch.zeros(2, 1, 28, 28)).shape)
    elif kind == "resnet50":
        import torchvision

        model = torchvision.models.resnet50()
        missing, unexpected = model.load_state_dict(state, strict=False)
        result["missing"], result["unexpected"] = sorted(missing), sorted(unexpected)
        result["conv1_equal"] = bool(torch.equal(model.conv1.weight, state["conv1.weight"]))
        model.fc = torch.nn.Identity()
        if len(sys.argv) > 3:
            x = read_safetensors(sys.argv[3])["x"]
            with torch.no_grad():
                # Eval first: a train-mode forward updates the running statistics.
                result["features_eval"] = model.eval()(x).flatten().tolist()
                result["features_train"] = model.train()(x).flatten().tolist()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
