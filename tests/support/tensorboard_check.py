"""Read a run directory with TensorBoard's own event reader and compare it with metrics.jsonl.

    python tensorboard_check.py RUN_DIR

Prints one JSON object: the tags found, per scalar tag its steps and how many values differ
from metrics.jsonl's, the steps and sizes of the histograms, the decoded size of every image,
and whether the config text is there. The Rust test asserts on it.
"""
import json
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator as ea

run = sys.argv[1]
acc = ea.EventAccumulator(run, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
acc.Reload()
tags = acc.Tags()

# metrics.jsonl: the display lines (train/*) and the evaluation lines (test/*), by step.
names = {"train/loss": "loss", "train/accuracy": "accuracy", "train/lr": "lr", "train/samples_per_s": "samples_per_s",
         "test/loss": "test_loss", "test/accuracy": "test_accuracy"}
expected = {tag: {} for tag in names}
for line in open(f"{run}/metrics.jsonl"):
    m = json.loads(line)
    for tag, key in names.items():
        if key in m:
            expected[tag][m["step"]] = m[key]

report = {"tags": {k: sorted(v) for k, v in tags.items() if isinstance(v, list)}, "scalars": {}}
for tag in tags["scalars"]:
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    want = expected.get(tag)
    mismatched = 0
    if want is not None:
        mismatched = sum(1 for e in events if abs(e.value - want.get(e.step, float("nan"))) > 1e-6 * max(1.0, abs(e.value))
                         or e.step not in want)
    report["scalars"][tag] = {"steps": steps, "expected_steps": sorted(want) if want is not None else None,
                              "mismatched": mismatched}

report["histograms"] = {tag: [[e.step, e.histogram_value.num] for e in acc.Histograms(tag)] for tag in tags["histograms"]}


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return list(struct.unpack(">II", data[16:24]))


report["images"] = {tag: [[e.step, e.width, e.height] + png_size(e.encoded_image_string) for e in acc.Images(tag)]
                    for tag in tags["images"]}
report["config_text"] = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("config")] if "config" in tags["tensors"] else []
print(json.dumps(report))
