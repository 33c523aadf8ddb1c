#!/usr/bin/env python3
"""Run YOLOv5's own val.py on an ONNX file (for example one written by
`freezesplit export`), offline, so its mAP can be put next to `freezesplit val`.

    .venv-tools/bin/python tools/yolov5_val.py MODEL.onnx DATA.yaml [--imgsz 640]

DATA.yaml should carry an absolute `path:` (YOLOv5 resolves a relative one against
its own package directory, not against the yaml file). Prints P, R, mAP50, mAP50-95.
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")

import numpy as np  # noqa: E402

if not hasattr(np, "trapz"):  # yolov5 7.0's compute_ap calls np.trapz (removed in numpy 2.4)
    np.trapz = np.trapezoid

import yolov5.models.common as yolo_common  # noqa: E402
import yolov5.models.experimental as yolo_experimental  # noqa: E402
from yolov5 import val  # noqa: E402

# A local file needs no download; these hooks would otherwise query the network.
yolo_common.attempt_download_from_hub = lambda *a, **k: None
yolo_experimental.attempt_download = lambda file, *a, **k: str(file)

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("data")
ap.add_argument("--imgsz", type=int, default=640)
a = ap.parse_args()
r = val.run(data=a.data, weights=a.model, imgsz=a.imgsz, batch_size=1, device="cpu", project="/tmp/yolov5_val", name="exp", exist_ok=True, plots=False)
p, rc, map50, map_ = (float(x) for x in r[0][:4])
print(f"YOLOv5 val.py: P {p:.4f} R {rc:.4f} mAP50 {map50:.4f} mAP50-95 {map_:.4f}")
