#!/usr/bin/env python3
"""The tables of scripts/gpu-check from what its runs left in a folder (python >= 3.11, no torch needed):
SimCLR (ours/summary.json, torch.json), MAE (mae/summary.json, mae-ft/*/finetune.json, mae-torch.json) and the
joint-embedding family (methods/<preset>/summary.json, byol-torch.json, dino-torch.json) and data parallel through
NCCL (dist/{none,nccl}-<i>/: summary.json and the event file's train/loss), each printed when its files are there,
with the targets. Results of several device commands can be put into one folder first (their
files do not overlap).
    python3 scripts/gpu_table.py OUT [SMOKE]
"""
import glob
import json
import os
import statistics
import struct
import sys
import tomllib

if len(sys.argv) < 2:
    sys.exit(__doc__)
out, smoke = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
KNN, LINEAR, WAIT = 0.855, 0.915, 0.02          # SimCLR targets
MAE_TOP1, MAE_GAIN, MAE_EPOCHS, FT_EPOCHS = 0.895, 0.05, 30, 8  # MAE targets, for the full recipe
METHODS = ("byol", "mocov3", "dino", "barlow", "vicreg")  # scripts/gpu-check's `methods`, in its order
REFERENCES = ("byol", "dino")                              # those with a PyTorch reference
SIMCLR_LINEAR = 0.9119  # ours, simclr-fmnist, H200, 2026-11-27 (README): the linear probe to beat


def read(name, parse=json.loads):
    try:
        with open(os.path.join(out, name)) as f:
            return parse(f.read().strip() or "null")
    except (OSError, ValueError):
        return None


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def num(v, fmt=".1f"):
    return "-" if v is None else format(v, fmt)


def print_table(fields, rows):
    w0, w = max(len(f[0]) for f in fields), max(24, *(len(n) for n in rows))
    print(f"{'':<{w0}}  " + "  ".join(f"{n:>{w}}" for n in rows))
    for label, fn in fields:
        cells = []
        for r in rows.values():
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        print(f"{label:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))


def simclr_table():
    rows = {}
    s = read("ours/summary.json")
    if s:
        ev = s.get("eval") or {}
        top1 = lambda k: (ev.get(k) or {}).get("top1")  # noqa: E731
        batch = read("ours/config.toml", tomllib.loads)["train"]["batch_size"]
        rows["ours (selfsup)"] = dict(
            wall=read("ours.wall_seconds", float), pretrain=s["seconds"], ips=s["images_per_s"],
            pairs=s["steps"] * batch, wait_s=s["data_wait_seconds"], wait_reported=s["data_wait_fraction"],
            knn=top1("knn"), linear=top1("linear"), raw=top1("raw_pixels_linear"), device=s["device"],
            steps=s["steps"], loss=s["final_loss"])
    t = read("torch.json")
    if t:
        rows["pytorch reference"] = dict(
            wall=read("torch.wall_seconds", float), pretrain=t["pretrain_seconds"], ips=t["images_per_s"],
            pairs=t["images"], wait_s=t["data_wait_seconds"], wait_reported=t["data_wait_fraction"], knn=t["knn_top1"],
            linear=t["linear_top1"], raw=t["raw_pixels_linear_top1"], device=t["device"], steps=t["steps"],
            loss=t["final_loss"])
    if not rows:
        return False

    def verdict(r):
        checks = {"k-NN": (r["knn"] or 0) >= KNN, "linear": (r["linear"] or 0) >= LINEAR,
                  "wait": r["wait_reported"] < WAIT}
        return "PASS" if all(checks.values()) else "FAIL: " + ", ".join(k for k, ok in checks.items() if not ok)

    print("== SimCLR (configs/simclr-fmnist.toml)")
    print_table([
        ("device", lambda r: str(r["device"])), ("steps", lambda r: str(r["steps"])),
        ("wall time, whole process (s)", lambda r: num(r["wall"])),
        ("pretraining (s)", lambda r: f"{r['pretrain']:.1f}"),
        ("pairs/s as reported", lambda r: f"{r['ips']:.0f}"),
        ("pairs / pretraining second", lambda r: f"{r['pairs'] / r['pretrain']:.0f}"),
        ("data wait (s)", lambda r: f"{r['wait_s']:.1f}"),
        ("data wait / pretraining", lambda r: pct(r["wait_s"] / r["pretrain"])),
        ("data wait / training-loop time", lambda r: pct(r["wait_reported"])),
        ("final loss", lambda r: f"{r['loss']:.4f}"),
        (f"k-NN top-1 (>= {100 * KNN:.1f}%)", lambda r: pct(r["knn"])),
        (f"linear top-1 (>= {100 * LINEAR:.1f}%)", lambda r: pct(r["linear"])),
        ("linear on raw pixels", lambda r: pct(r["raw"])),
        (f"targets (wait < {100 * WAIT:.0f}%)", verdict)], rows)
    if len(rows) == 2:
        a, b = rows.values()
        print(f"pretraining time, reference / ours: {b['pretrain'] / a['pretrain']:.2f}x")
    return True


def fraction(v):  # finetune.json's top1, a fraction or a percent
    return None if v is None else (v / 100 if v > 1 else v)


def mae_table(after_another):
    rows = {}
    s = read("mae/summary.json")
    fts = {k: read(f"mae-ft/{k}/finetune.json") for k in
           ("fmnist-pretrained", "fmnist-scratch", "mnist-pretrained", "mnist-scratch")}
    if s or any(fts.values()):
        s = s or {}
        ev = s.get("eval") or {}
        walls = [read("mae.wall_seconds", float)] + [read(f"mae-ft/{k}.wall_seconds", float) for k in fts if fts[k]]
        r = dict(device=s.get("device"), epochs=s.get("epochs"), steps=s.get("steps"), pretrain=s.get("seconds"),
                 loop=s.get("train_seconds"), ips=s.get("images_per_s"), wait=s.get("data_wait_fraction"),
                 loss=s.get("final_loss"), wall=sum(w for w in walls if w is not None),
                 pretrain_wall=read("mae.wall_seconds", float),
                 knn=(ev.get("knn") or {}).get("top1"), linear=(ev.get("linear") or {}).get("top1"))
        for k, f in fts.items():
            r[k] = fraction(f.get("top1")) if f else None
            r[k + "-s"] = f.get("seconds") if f else None
            r["ft_epochs"] = r.get("ft_epochs") or (f.get("epochs") if f else None)
        rows["ours (selfsup)"] = r
    t = read("mae-torch.json")
    if t:
        p, ft = t.get("pretrain") or {}, t.get("finetune") or {}
        r = dict(device=t.get("device"), epochs=p.get("epochs"), steps=p.get("steps"), pretrain=p.get("seconds"),
                 loop=p.get("train_seconds"), ips=p.get("images_per_s"), wait=p.get("data_wait_fraction"),
                 loss=p.get("final_loss"), wall=read("mae-torch.wall_seconds", float) or t.get("wall_seconds"),
                 pretrain_wall=None, knn=None, linear=None, ft_epochs=None)
        for ds in ("fmnist", "mnist"):
            for init in ("pretrained", "scratch"):
                f = (ft.get(ds) or {}).get(init)
                r[f"{ds}-{init}"] = f.get("top1") if f else None
                r[f"{ds}-{init}-s"] = f.get("seconds") if f else None
                r["ft_epochs"] = r["ft_epochs"] or (f.get("epochs") if f else None)
        rows[f"pytorch reference (torch {t.get('torch', '?')})"] = r
    if not rows:
        return False
    if after_another:
        print()

    def gain(r, ds):
        return r[f"{ds}-pretrained"] - r[f"{ds}-scratch"]

    def verdict(r):
        if r["fmnist-pretrained"] is None:
            return "-"
        checks = {"top-1": r["fmnist-pretrained"] >= MAE_TOP1}
        if r["fmnist-scratch"] is not None:
            checks["gain"] = gain(r, "fmnist") >= MAE_GAIN - 1e-12
        verdict = "PASS" if all(checks.values()) else "FAIL: " + ", ".join(k for k, ok in checks.items() if not ok)
        if (r["epochs"], r["ft_epochs"]) != (MAE_EPOCHS, FT_EPOCHS):
            verdict += f" ({r['epochs']}+{r['ft_epochs']} epochs)"
        return verdict

    print(f"== MAE (preset mae-fmnist: ViT-Tiny, patch 4; {MAE_EPOCHS} epochs pretraining, {FT_EPOCHS} epochs "
          f"full fine-tuning)")
    fields = [
        ("device", lambda r: str(r["device"])),
        ("pretraining epochs / steps", lambda r: f"{r['epochs']} / {r['steps']}"),
        ("pretraining (s)", lambda r: num(r["pretrain"])),
        ("  of it the training loop (s)", lambda r: num(r["loop"])),
        ("pretraining command, wall (s)", lambda r: num(r["pretrain_wall"])),
        ("img/s in the training loop", lambda r: num(r["ips"], ".0f")),
        ("data wait / training loop", lambda r: pct(r["wait"])),
        ("final loss", lambda r: num(r["loss"], ".4f")),
        ("k-NN / linear probe after pretraining", lambda r: f"{pct(r['knn'])} / {pct(r['linear'])}"),
        ("fine-tuning epochs", lambda r: str(r["ft_epochs"] or "-")),
        (f"FMNIST fine-tune, pretrained (>= {100 * MAE_TOP1:.1f}%)", lambda r: pct(r["fmnist-pretrained"])),
        ("FMNIST fine-tune, from scratch", lambda r: pct(r["fmnist-scratch"])),
        (f"FMNIST gain, points (>= +{100 * MAE_GAIN:.1f})", lambda r: f"{100 * gain(r, 'fmnist'):+.2f}"),
        ("FMNIST fine-tune s, pretrained / scratch",
         lambda r: f"{num(r['fmnist-pretrained-s'])} / {num(r['fmnist-scratch-s'])}"),
        ("MNIST (transfer), pretrained", lambda r: pct(r["mnist-pretrained"])),
        ("MNIST, from scratch", lambda r: pct(r["mnist-scratch"])),
        ("MNIST gain, points", lambda r: f"{100 * gain(r, 'mnist'):+.2f}"),
        ("MNIST fine-tune s, pretrained / scratch",
         lambda r: f"{num(r['mnist-pretrained-s'])} / {num(r['mnist-scratch-s'])}"),
        ("wall, all commands (s)", lambda r: num(r["wall"])),
        ("targets (FMNIST)", verdict),
    ]
    print_table(fields, rows)
    if len(rows) == 2:
        a, b = rows.values()
        if a["pretrain"] and b["pretrain"]:
            print(f"MAE pretraining time, reference / ours: {b['pretrain'] / a['pretrain']:.2f}x "
                  f"({b['pretrain']:.1f}s / {a['pretrain']:.1f}s)")
    return True


def methods_table(after_another):
    """One row per preset and implementation: ours, then (BYOL, DINO) the PyTorch reference with the ratio."""
    rows = []
    for m in METHODS:
        preset = f"{m}-fmnist"
        s, status = read(f"methods/{preset}/summary.json"), read(f"methods/{preset}.status", int)
        wall = read(f"methods/{preset}.wall_seconds", float)
        if s or status is not None or os.path.exists(os.path.join(out, f"methods/{preset}.log")):  # killed?
            s = s or {}
            ev = s.get("eval") or {}
            rows.append(dict(preset=preset, impl="ours", wall=wall, pretrain=s.get("seconds"), epochs=s.get("epochs"),
                             steps=s.get("steps"), ips=s.get("images_per_s"), wait=s.get("data_wait_fraction"),
                             loss=s.get("final_loss"), knn=(ev.get("knn") or {}).get("top1"),
                             linear=(ev.get("linear") or {}).get("top1"), status=status, device=s.get("device")))
        t = read(f"{m}-torch.json") if m in REFERENCES else None
        t_wall = read(f"{m}-torch.wall_seconds", float) if m in REFERENCES else None
        if t or t_wall is not None or (m in REFERENCES and os.path.exists(os.path.join(out, f"{m}-torch.log"))):
            t = t or {}
            rows.append(dict(preset=preset, impl=f"pytorch {t.get('torch', '')}".strip(), wall=t_wall,
                             pretrain=t.get("pretrain_seconds"), epochs=t.get("epochs"), steps=t.get("steps"),
                             ips=t.get("images_per_s"), wait=t.get("data_wait_fraction"), loss=t.get("final_loss"),
                             knn=t.get("knn_top1"), linear=t.get("linear_top1"), status=0 if t else None,
                             device=t.get("device")))
    if not rows:
        return False
    if after_another:
        print()
    ours = {r["preset"]: r for r in rows if r["impl"] == "ours"}

    def ratio(r):
        o = ours.get(r["preset"])
        if r["impl"] == "ours" or not (o and o["pretrain"] and r["pretrain"]):
            return "-"
        same = "" if o["steps"] == r["steps"] else f" (steps {r['steps']} vs {o['steps']})"
        return f"{r['pretrain'] / o['pretrain']:.2f}x{same}"

    def state(r):
        if r["pretrain"] is not None and r["linear"] is not None:
            return "ok"
        if r["status"] == 124:
            return "cut (METHOD_CAP)"
        return "failed" if r["status"] not in (None, 0) else "no result"

    cols = [("preset", lambda r: r["preset"]), ("impl", lambda r: r["impl"]),
            ("epochs/steps", lambda r: "-" if r["steps"] is None else f"{r['epochs']}/{r['steps']}"),
            ("wall s", lambda r: num(r["wall"])),
            ("pretrain s", lambda r: num(r["pretrain"])), ("img/s", lambda r: num(r["ips"], ".0f")),
            ("data wait", lambda r: pct(r["wait"])), ("loss", lambda r: num(r["loss"], ".4f")),
            ("k-NN", lambda r: pct(r["knn"])), ("linear", lambda r: pct(r["linear"])),
            ("pytorch/ours time", ratio), ("run", state)]
    cells = []
    for r in rows:
        line = []
        for _, fn in cols:
            try:
                line.append(fn(r))
            except (KeyError, TypeError, ValueError):
                line.append("-")
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    device = next((r["device"] for r in rows if r["device"]), "?")
    print(f"== joint-embedding methods (configs/<preset>.toml: ResNet-18, batch 512, LARS, bf16; {device}); "
          "pretraining includes mid-run k-NN and checkpoints; img/s = samples/s in the training loop")
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, ((h, _), w) in enumerate(zip(cols, widths))))
    for line in cells:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))

    simclr = read("ours/summary.json") or {}
    bar = ((simclr.get("eval") or {}).get("linear") or {}).get("top1")
    source = "ours/summary.json in this folder" if bar is not None else "README, H200 2026-11-27"
    bar = SIMCLR_LINEAR if bar is None else bar
    done = [r for r in ours.values() if r["linear"] is not None]
    above = [f"{r['preset']} {pct(r['linear'])}" for r in done if r["linear"] > bar]
    print(f"target: a linear probe above SimCLR's {pct(bar)} ({source}): "
          + (("PASS: " + ", ".join(above)) if above else ("FAIL" if done else "-")) + f" ({len(done)} presets ran)")
    refs = {r["preset"]: r for r in rows if r["impl"] != "ours"}
    for m in REFERENCES:
        o, r = ours.get(f"{m}-fmnist"), refs.get(f"{m}-fmnist")
        if o and r and o["pretrain"] and r["pretrain"]:
            verdict = "PASS" if r["pretrain"] >= o["pretrain"] else "FAIL"
            print(f"target: ours at least as fast as PyTorch, {m}: {verdict} ({o['pretrain']:.1f}s vs "
                  f"{r['pretrain']:.1f}s, {r['pretrain'] / o['pretrain']:.2f}x; linear {pct(o['linear'])} vs "
                  f"{pct(r['linear'])})")
    epochs = {r["epochs"] for r in rows if r["epochs"] is not None}
    if epochs and epochs != {20}:
        print(f"(epochs {sorted(epochs)}: the presets' recipe is 20)")
    return True


def varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return v, i


def fields(b):
    """(field number, wire type, value) of one protobuf message: enough of the format for TensorBoard events."""
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield num, wire, v


def scalars(run, tag):
    """[(step, value)] of scalar `tag` in the run folder's event files (TFRecord framing, Event.step = 2,
    Event.summary = 5, Summary.value = 1, Value.tag = 1, Value.simple_value = 2)."""
    points = []
    for path in sorted(glob.glob(os.path.join(out, run, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, i)
            record = data[i + 12:i + 12 + n]
            i += 12 + n + 4
            step, summary = 0, None
            for num, _, v in fields(record):
                if num == 2:
                    step = v
                elif num == 5:
                    summary = v
            for num, _, value in fields(summary or b""):
                if num != 1:
                    continue
                got = dict((k, x) for k, _, x in fields(value))
                if got.get(1) == tag.encode() and 2 in got:
                    points.append((step, struct.unpack("<f", got[2])[0]))
    return points


def curve_gap(a, b):
    """The largest difference between two loss curves at their common steps (None without any)."""
    db = dict(b)
    gaps = [abs(v - db[s]) for s, v in a if s in db]
    return max(gaps) if gaps else None


def dist_table(after_another):
    runs = {}
    for mode in ("none", "nccl"):
        for path in sorted(glob.glob(os.path.join(out, "dist", f"{mode}-*", "summary.json"))):
            s = read(os.path.relpath(path, out))
            if s and s.get("steps"):
                runs.setdefault(mode, []).append((os.path.basename(os.path.dirname(path)), s))
    if not runs:
        return False
    if after_another:
        print()
    device = next((s["device"] for rs in runs.values() for _, s in rs), "?")
    print(f"== data parallel through NCCL, world size 1 (our SimCLR preset, no evaluation; {device})")
    ms = {}
    for mode, rs in runs.items():
        for name, s in rs:
            step = 1000 * s["train_seconds"] / s["steps"]
            ms.setdefault(mode, []).append(step)
            print(f"{name:<8} backend {s.get('dist_backend') or '-':<5} world {s.get('world_size')}  steps {s['steps']}  "
                  f"{step:7.2f} ms/step  {s['images_per_s']:8.0f} img/s  wait {pct(s.get('data_wait_fraction'))}  "
                  f"all-reduce {1000 * s.get('grad_allreduce_seconds', 0) / s['steps']:.2f} ms/step  "
                  f"final loss {s['final_loss']:.4f}")
    if "none" in ms and "nccl" in ms:
        ratio = statistics.median(ms["nccl"]) / statistics.median(ms["none"])
        print(f"target: step time with the NCCL group within 2% of none: {'PASS' if ratio <= 1.02 else 'FAIL'} "
              f"(median {statistics.median(ms['nccl']):.2f} vs {statistics.median(ms['none']):.2f} ms/step, "
              f"ratio {ratio:.3f})")
        none = [scalars(f"dist/{name}", "train/loss") for name, _ in runs["none"]]
        nccl = [scalars(f"dist/{name}", "train/loss") for name, _ in runs["nccl"]]
        gap = curve_gap(none[0], nccl[0])
        noise = curve_gap(none[0], none[1]) if len(none) > 1 else None
        if gap is not None:
            bar = max(noise or 0.0, 1e-3)
            print(f"target: the same loss curve: {'PASS' if gap <= bar else 'FAIL'} (largest difference "
                  f"{gap:.2e} over {len(none[0])} points; two runs without distribution differ by "
                  f"{'-' if noise is None else format(noise, '.2e')}; bar {bar:.1e})")
    return True


simclr = simclr_table()
mae = mae_table(after_another=simclr)
methods = methods_table(after_another=simclr or mae)
dist = dist_table(after_another=simclr or mae or methods)
if not (simclr or mae or methods or dist):
    print(f"no results in {out} (every run failed or was skipped; see the logs)")
if smoke:
    print("(SMOKE=1: tiny models and a few steps; the targets are not expected to pass)")
