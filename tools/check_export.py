#!/usr/bin/env python3
"""Show that YOLOv5's own inference tools accept an ONNX file freezesplit exported.

In: an ONNX model (and optionally an image). Out: the model as
``yolov5.models.common.DetectMultiBackend`` sees it (stride, names, input and
output shapes) and the detections of ``non_max_suppression`` on the image,
one line each: class, confidence, xyxy box in original-image pixels. This is
the path ``detect.py --weights model.onnx`` takes (LoadImages letterbox,
ONNX Runtime, NMS, scale_boxes). Exit status 1 when the output's last
dimension is not 5 + len(names).

Usage:
    .venv-tools/bin/python tools/check_export.py MODEL.onnx [IMAGE] [--imgsz N]
        [--conf 0.25] [--iou 0.45] [--max-print 20]

IMAGE defaults to ../shared/data/images/bus.jpg, else a test fixture. --imgsz
is used only when the model's input size is dynamic (default 640).
Runs offline: yolov5's Hugging Face / GitHub download hooks are disabled.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import torch  # noqa: E402
import yolov5.models.common as yolo_common  # noqa: E402
import yolov5.models.experimental as yolo_experimental  # noqa: E402
from yolov5.utils.dataloaders import LoadImages  # noqa: E402
from yolov5.utils.general import check_img_size, non_max_suppression, scale_boxes  # noqa: E402

# A local file needs no download; these hooks would otherwise query the network.
yolo_common.attempt_download_from_hub = lambda *a, **k: None
yolo_experimental.attempt_download = lambda file, *a, **k: str(file)

ROOT = Path(__file__).resolve().parent.parent


def default_image() -> Path:
    shared = ROOT.parent / "shared" / "data" / "images" / "bus.jpg"
    return shared if shared.exists() else ROOT / "tests" / "fixtures" / "letterbox" / "src" / "a_landscape.jpg"


def dims(value_info) -> list:
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("image", nargs="?", default=None)
    ap.add_argument("--imgsz", type=int, default=640, help="input size for models with a dynamic size")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.45)
    ap.add_argument("--max-print", type=int, default=20, help="print at most this many detections")
    a = ap.parse_args(argv)
    image = Path(a.image) if a.image else default_image()

    proto = onnx.load(a.model, load_external_data=False)
    in_dims, out_dims = dims(proto.graph.input[0]), dims(proto.graph.output[0])
    print(f"model: {a.model}")
    print(f"  producer {proto.producer_name} {proto.producer_version}, opset {proto.opset_import[0].version}, "
          f"input {proto.graph.input[0].name} {in_dims}, output {proto.graph.output[0].name} {out_dims}")

    model = yolo_common.DetectMultiBackend(a.model, device=torch.device("cpu"))
    names = model.names
    print(f"  DetectMultiBackend: onnx={model.onnx}, stride={model.stride}, {len(names)} names: "
          f"{dict(list(names.items())[:5])}{' ...' if len(names) > 5 else ''}")

    static = all(isinstance(d, int) and d > 0 for d in in_dims[2:])
    imgsz = [in_dims[2], in_dims[3]] if static else check_img_size([a.imgsz, a.imgsz], s=model.stride)
    # auto=False: a square letterbox, as detect.py does for ONNX models
    dataset = LoadImages(str(image), img_size=imgsz, stride=model.stride, auto=model.pt)
    for path, im, im0, _, _ in dataset:
        x = torch.from_numpy(im).float()[None] / 255.0
        pred = model(x)
        if pred.shape[-1] != 5 + len(names):
            print(f"error: output has {pred.shape[-1]} columns, metadata names say nc = {len(names)}")
            return 1
        det = non_max_suppression(pred, a.conf, a.iou, max_det=1000)[0]
        print(f"image: {path} {im0.shape[1]}x{im0.shape[0]} -> input {list(x.shape)}, output {list(pred.shape)}, "
              f"{len(det)} detections (conf >= {a.conf}, NMS iou {a.iou})")
        det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape).round()
        for *xyxy, conf, cls in det.tolist()[:a.max_print]:
            box = ", ".join(f"{v:.0f}" for v in xyxy)
            print(f"  {names[int(cls)]:<16} {conf:.3f}  [{box}]")
        if len(det) > a.max_print:
            print(f"  ... {len(det) - a.max_print} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
