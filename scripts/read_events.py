#!/usr/bin/env python3
"""Reads a run folder's TensorBoard event file(s) with TensorBoard's own readers and prints JSON:
{"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height], ...]},
 "histograms": {tag: [[step, count], ...]}, "text": {tag: [[step, markdown], ...]},
 "descriptions": {tag: description}, "plugins": {tag: plugin name},
 "hparams": {"hparams": {name: value}, "hparam_names": [...], "metrics": [[group, tag], ...], "status": n}}.
Used by the tests to check what selfsup writes.

    ~/.cache/selfsup/venv/bin/python scripts/read_events.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util


def main(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in tags["images"]},
        "histograms": {t: [[e.step, e.histogram_value.num] for e in acc.Histograms(t)] for t in tags["histograms"]},
    }
    # The plugin-aware reader (what TensorBoard's server uses): metadata, text and hparams.
    pacc = plugin_event_accumulator.EventAccumulator(run_dir, size_guidance={"tensors": 0})
    pacc.Reload()
    descriptions, plugins, text, hparams = {}, {}, {}, {}
    for tag in pacc.Tags()["tensors"]:
        meta = pacc.SummaryMetadata(tag)
        descriptions[tag] = meta.summary_description
        plugins[tag] = meta.plugin_data.plugin_name
        if meta.plugin_data.plugin_name == "text":
            text[tag] = [
                [e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()] for e in pacc.Tensors(tag)
            ]
        if meta.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME:
            content = meta.plugin_data.content
            if tag == hparams_metadata.SESSION_START_INFO_TAG:
                info = hparams_metadata.parse_session_start_info_plugin_data(content)
                hparams["hparams"] = {
                    k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()
                }
            elif tag == hparams_metadata.EXPERIMENT_TAG:
                exp = hparams_metadata.parse_experiment_plugin_data(content)
                hparams["hparam_names"] = [h.name for h in exp.hparam_infos]
                hparams["metrics"] = [[m.name.group, m.name.tag] for m in exp.metric_infos]
            elif tag == hparams_metadata.SESSION_END_INFO_TAG:
                hparams["status"] = hparams_metadata.parse_session_end_info_plugin_data(content).status
    out.update(descriptions=descriptions, plugins=plugins, text=text, hparams=hparams)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
