"""Run an exported ONNX model in onnxruntime and compare with alexnet's own outputs.

usage: onnx_check.py MODEL.onnx INPUTS.f32 LOGITS.f32 N C H W CLASSES
Prints one JSON line with the largest differences; exits 1 if a logit differs by more than 1e-4
of the largest logit (at least 1e-4; our Winograd F(7x7, 3x3) rounds to within 5e-5 of a
layer's largest value, which onnxruntime's convolutions do not share) or a probability by more
than 1e-4.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, inputs, logits = sys.argv[1:4]
n, c, h, w, classes = map(int, sys.argv[4:9])
x = np.fromfile(inputs, dtype="<f4").reshape(n, c, h, w)
ours = np.fromfile(logits, dtype="<f4").reshape(n, classes)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
theirs_logits, theirs_probs = session.run(["logits", "probabilities"], {"input": x})
e = np.exp(ours - ours.max(axis=1, keepdims=True))
ours_probs = e / e.sum(axis=1, keepdims=True)
report = {
    "onnxruntime": ort.__version__,
    "images": n,
    "max_abs_logit_diff": float(np.abs(theirs_logits - ours).max()),
    "max_abs_logit": float(np.abs(ours).max()),
    "max_abs_probability_diff": float(np.abs(theirs_probs - ours_probs).max()),
    "same_predictions": int((theirs_logits.argmax(1) == ours.argmax(1)).sum()),
}
print(json.dumps(report))
logit_tolerance = 1e-4 * max(1.0, report["max_abs_logit"])
ok = report["max_abs_logit_diff"] <= logit_tolerance and report["max_abs_probability_diff"] <= 1e-4
sys.exit(0 if ok else 1)
