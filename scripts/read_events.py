#!/usr/bin/env python3
"""Reads a run folder's TensorBoard event file(s) with TensorBoard's own EventAccumulator and prints JSON:
{"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height], ...]},
 "histograms": {tag: [[step, count], ...]}}. Used by the tests to check what selfsup writes.

    ~/.cache/selfsup/venv/bin/python scripts/read_events.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in tags["images"]},
        "histograms": {t: [[e.step, e.histogram_value.num] for e in acc.Histograms(t)] for t in tags["histograms"]},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
