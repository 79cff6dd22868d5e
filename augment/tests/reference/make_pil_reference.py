"""Writes pil.txt: reference outputs of Pillow for the resize and equalize tests.

Run: python3 make_pil_reference.py  (needs `pip install pillow`; made with Pillow 13.0.0).
Inputs are formulas, so the Rust test rebuilds them without sharing files.
Line format: `<op> <w> <h> <c> <out_w> <out_h> <values...>` (HWC order, out_* = 0 for equalize).
"""
from pathlib import Path

from PIL import Image, ImageOps


def pattern(w, h, c, kind):
    vals = []
    for y in range(h):
        for x in range(w):
            for k in range(c):
                if kind == "resize":
                    vals.append((x * 37 + y * 91 + k * 53 + x * y * 7) % 256)
                else:
                    vals.append((x * x + y * 3) % 97 + 20 * k)
    return vals


def to_pil(vals, w, h, c):
    return Image.frombytes("L" if c == 1 else "RGB", (w, h), bytes(vals))


lines = []
for (w, h, c), sizes in {
    (13, 9, 1): [(5, 4), (7, 5), (20, 11), (13, 3), (4, 9)],
    (12, 10, 3): [(5, 7), (9, 4), (25, 21), (3, 3)],
    (64, 48, 3): [(28, 21), (17, 40)],
}.items():
    src = to_pil(pattern(w, h, c, "resize"), w, h, c)
    for ow, oh in sizes:
        out = src.resize((ow, oh), Image.Resampling.BILINEAR, reducing_gap=None)
        lines.append(" ".join(map(str, ["resize", w, h, c, ow, oh, *out.tobytes()])))
for w, h, c in [(16, 12, 1), (11, 7, 3)]:
    out = ImageOps.equalize(to_pil(pattern(w, h, c, "equalize"), w, h, c))
    lines.append(" ".join(map(str, ["equalize", w, h, c, 0, 0, *out.tobytes()])))
Path(__file__).with_name("pil.txt").write_text("\n".join(lines) + "\n")
