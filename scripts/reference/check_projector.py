"""Reads a run folder's embedding-projector files the way TensorBoard's projector plugin does (its own
ProjectorConfig proto, text format) and checks them against each other; prints JSON (used by tests/cli.rs).

  python check_projector.py RUN_DIR
"""
import json
import math
import os
import sys

from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig


def main():
    run = sys.argv[1]
    config = text_format.Parse(open(os.path.join(run, "projector_config.pbtxt")).read(), ProjectorConfig())
    out = []
    for emb in config.embeddings:
        rows = [line.split("\t") for line in open(os.path.join(run, emb.tensor_path)).read().splitlines()]
        meta = open(os.path.join(run, emb.metadata_path)).read().splitlines()
        sprite = Image.open(os.path.join(run, emb.sprite.image_path))
        k, d = len(rows), len(rows[0]) if rows else 0
        dim = list(emb.sprite.single_image_dim)
        per_row = math.ceil(math.sqrt(k))
        out.append({
            "name": emb.tensor_name,
            "shape": [k, d],
            "declared_shape": list(emb.tensor_shape),
            "all_rows_same_width": all(len(r) == d for r in rows),
            "finite": all(math.isfinite(float(v)) for r in rows for v in r),
            "metadata_header": meta[0] if meta else None,
            "metadata_rows": len(meta) - 1,
            "classes": sorted({m.split("\t")[0] for m in meta[1:]}),
            "sprite_size": list(sprite.size),
            # The projector lays the sprite out as a square of per_row x per_row cells.
            "sprite_expected": [per_row * dim[0], per_row * dim[1]],
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
