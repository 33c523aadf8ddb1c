#!/usr/bin/env python3
"""Build models/demo-shapes.onnx: a small PRETRAINED YOLOv5 detector for synthetic shapes.

Pipeline (all offline, CPU only, reproducible):

1. generate a synthetic dataset (seed 0) in a temporary directory, Ultralytics layout
   (images/{train,val}/*.png, labels/{train,val}/*.txt, data.yaml):
   256x256 RGB, smooth random gradient background + uniform per-pixel noise +-20,
   1..4 objects (pairwise IoU <= 0.1, rejected and redrawn otherwise), box side
   s ~ U[28, 72] px fully inside the image; shape circle (disc inscribed in the box),
   square (= the box) or triangle (top-centre, bottom-left, bottom-right of the box);
   colour red / green / blue (uniform) with per-channel jitter +-20; 9 classes
   ``colour * 3 + shape`` named "red circle" ... "blue triangle"; YOLO labels
   ``class x y w h`` (normalised, the shape's bounding box);
2. train yolov5n.yaml (depth_multiple 0.33, width_multiple --width, nc=9, default anchors)
   FROM SCRATCH with yolov5's own ``train.run`` (imgsz 256, CPU, batch 32, seed 0,
   hyp.scratch-low with the overrides in HYP_OVERRIDES, Adam; validation after every
   epoch, best.pt = best fitness (``--noval`` crashes in yolov5 7.0.14: ``map50s``
   unbound in train.py));
3. validate best.pt with yolov5's own ``val.run`` and print P, R, mAP50, mAP50-95;
4. export best.pt with yolov5's own ``export.run`` (ONNX, opset 17, static 1x3x256x256,
   not simplified), copy it to --out and verify it (onnx.checker, onnxruntime output
   ``output0`` [1, 4032, 14], metadata names, equality with the fused PyTorch model).

Offline patches (same as tools/make_test_models.py): ``attempt_download`` (and train.py's
``attempt_download_from_hub``) do not touch the network; ``torch.onnx.export`` defaults to
``dynamo=False`` (TorchScript exporter, as yolov5 7.0.14 expects);
``ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1`` (no pip auto-installs).

Versions used for the committed file: Python 3.11.7, torch 2.15.0 (CPU), yolov5 7.0.14,
onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6, opencv (see tools/requirements-tools.txt).
Seed: 0 (data generation and yolov5 ``--seed``). Training on CPU with
``init_seeds(deterministic=True)``; bit-exact reproduction also depends on the thread
count / CPU kind (float summation order), so a rerun gives a very similar, not
necessarily byte-identical, model.

Usage:
    .venv-tools/bin/python tools/make_demo_model.py [--epochs 10] [--width 0.125] \
        [--out models/demo-shapes.onnx] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load of pickled yolov5 ckpts
os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")  # no auto pip installs
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("COMET_MODE", "disabled")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

_torch_onnx_export = torch.onnx.export


def _export_torchscript_exporter(*args, **kwargs):
    kwargs.setdefault("dynamo", False)
    return _torch_onnx_export(*args, **kwargs)


torch.onnx.export = _export_torchscript_exporter

import types  # noqa: E402


def _stub(name: str, **attrs) -> None:
    """yolov5 7.0.14's train.py imports optional integrations (roboflow, ...) at module
    level; they are not installed (and never used here), so give it empty stand-ins."""
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


for _name, _attrs in (("roboflow", {"Roboflow": object}), ("roboflow.core", {}),
                      ("roboflow.core.version", {"Version": object})):
    _stub(_name, **_attrs)

import yolov5  # noqa: E402
import yolov5.models.experimental as yolov5_experimental  # noqa: E402

yolov5_experimental.attempt_download = lambda file, *a, **k: str(file)

from yolov5 import export as yolov5_export  # noqa: E402
from yolov5 import train as yolov5_train  # noqa: E402
from yolov5 import val as yolov5_val  # noqa: E402

yolov5_train.attempt_download_from_hub = lambda *a, **k: None  # would query the HF hub
yolov5_train.attempt_download = lambda file, *a, **k: str(file)
import yolov5.models.common as yolov5_common  # noqa: E402  (val.py's DetectMultiBackend)

yolov5_common.attempt_download_from_hub = lambda *a, **k: None

if not hasattr(np, "trapz"):  # numpy 2.x removed it; yolov5 7.0.14's metrics.compute_ap uses it
    np.trapz = np.trapezoid

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
IMG = 256
SHAPES = ["circle", "square", "triangle"]
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220)]  # red, green, blue (RGB)
COLOUR_NAMES = ["red", "green", "blue"]
# 9 classes, colour-major: "red circle", "red square", ..., "blue triangle". Shape
# and colour both have to be in the features for these; `freezesplit demo` then
# retrains the class rows for a coarser, new class set (colour only).
NAMES = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
OPTIMIZER = "Adam"
HYP_OVERRIDES = {
    # hyp.scratch-low, except: Adam (lr0 0.002) instead of SGD and no mosaic -- both converge
    # much faster on this simple, train == val distribution task in a short CPU schedule --,
    # milder scale jitter, shorter warmup with a small bias warmup lr (0.1 is meant for SGD).
    "lr0": 0.002,
    "lrf": 0.05,
    "warmup_epochs": 1.0,
    "warmup_bias_lr": 0.01,
    "mosaic": 0.0,
    "scale": 0.25,
}


# --------------------------------------------------------------------------- data


def iou(a, b) -> float:
    """IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_image(rng: np.random.Generator):
    """One image (HxWx3 uint8 RGB) and its labels [(cls, x, y, w, h) normalised]."""
    # background: two random colours at opposite corners, linear blend along a random direction
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float64)
    proj = (xx - (IMG - 1) / 2) * d[0] + (yy - (IMG - 1) / 2) * d[1]
    half = (abs(d[0]) + abs(d[1])) * (IMG - 1) / 2  # projection of the corners: t in [0, 1]
    t = ((proj + half) / (2 * half))[..., None]
    img = (1 - t) * c0 + t * c1
    img = img + rng.uniform(-20, 20, img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img)

    n = int(rng.integers(1, 5))
    boxes = []
    while len(boxes) < n:
        s = rng.uniform(28, 72)
        cx = rng.uniform(s / 2, IMG - s / 2)
        cy = rng.uniform(s / 2, IMG - s / 2)
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        if any(iou(box, b) > 0.1 for b, _, _ in boxes):
            continue  # reject and redraw
        cls = int(rng.integers(0, 3))  # shape
        colour = int(rng.integers(0, 3))
        base = np.array(COLOURS[colour], dtype=np.float64)
        col = np.clip(base + rng.integers(-20, 21, 3), 0, 255).astype(int)
        boxes.append((box, (cls, colour), tuple(int(v) for v in col)))

    sh = 4  # cv2 sub-pixel shift bits
    k = 1 << sh
    labels = []
    for (x0, y0, x1, y1), (cls, colour), col in boxes:
        if cls == 0:
            cv2.circle(img, (int(round((x0 + x1) / 2 * k)), int(round((y0 + y1) / 2 * k))),
                       int(round((x1 - x0) / 2 * k)), col, -1, cv2.LINE_AA, sh)
        elif cls == 1:
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            cv2.fillPoly(img, [np.rint(pts * k).astype(np.int32)], col, cv2.LINE_AA, sh)
        else:
            pts = np.array([[(x0 + x1) / 2, y0], [x0, y1], [x1, y1]])
            cv2.fillPoly(img, [np.rint(pts * k).astype(np.int32)], col, cv2.LINE_AA, sh)
        labels.append((colour * 3 + cls, (x0 + x1) / 2 / IMG, (y0 + y1) / 2 / IMG, (x1 - x0) / IMG, (y1 - y0) / IMG))
    return img, labels


def make_dataset(root: Path, n_train: int, n_val: int, seed: int = SEED) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = draw_image(rng)
            stem = f"{split}_{i:05d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), img[..., ::-1])  # RGB -> BGR
            (root / "labels" / split / f"{stem}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels))
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "nc": len(NAMES), "names": NAMES}, sort_keys=False))
    return data


# --------------------------------------------------------------------------- train / val / export


def write_cfgs(work: Path, width: float) -> tuple[Path, Path]:
    pkg = Path(yolov5.__file__).parent
    cfg = yaml.safe_load((pkg / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = width
    cfg["nc"] = len(NAMES)
    cfg_path = work / "yolov5n-shapes.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    hyp = yaml.safe_load((pkg / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp.update(HYP_OVERRIDES)
    hyp_path = work / "hyp.shapes.yaml"
    hyp_path.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return cfg_path, hyp_path


def verify(path: Path, pt: Path) -> dict:
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta.get("stride") == "32", meta
    assert meta.get("names") == str(dict(enumerate(NAMES))), meta.get("names")
    assert [o.name for o in m.graph.output] == ["output0"]
    opset = {o.domain: o.version for o in m.opset_import}[""]
    assert opset == 17, opset
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.name == "images" and list(inp.shape) == [1, 3, IMG, IMG], (inp.name, inp.shape)
    x = np.random.default_rng(SEED).random((1, 3, IMG, IMG), dtype=np.float32)
    (y,) = sess.run(["output0"], {"images": x})
    assert y.shape == (1, 4032, 5 + len(NAMES)), y.shape
    # same as the fused PyTorch model in export mode
    from yolov5.models.experimental import attempt_load
    from yolov5.models.yolo import Detect
    model = attempt_load(str(pt), device="cpu", inplace=True, fuse=True).float().eval()
    for mod in model.modules():
        if isinstance(mod, Detect):
            mod.inplace, mod.export = False, True
    with torch.no_grad():
        yt = model(torch.from_numpy(x))
    yt = (yt[0] if isinstance(yt, (list, tuple)) else yt).numpy()
    diff = float(np.abs(yt - y).max())
    assert diff < 1e-3, diff
    return {"shape": list(y.shape), "max_abs_diff_vs_torch": diff, "names": meta["names"],
            "size_bytes": path.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--train-n", type=int, default=800)
    ap.add_argument("--val-n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "demo-shapes.onnx")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (data, runs, best.pt)")
    ap.add_argument("--data-only", action="store_true", help="only generate the dataset")
    ap.add_argument("--from-pt", type=Path, default=None,
                    help="skip training: validate and export this yolov5 checkpoint (e.g. a run's last.pt)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}")
    print(f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, yolov5 {yolov5.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, cv2 {cv2.__version__}")
    try:
        t0 = time.time()
        data = make_dataset(work / "data", args.train_n, args.val_n, SEED)
        print(f"dataset: {args.train_n} train / {args.val_n} val images in {time.time() - t0:.1f} s -> {data}")
        if args.data_only:
            return 0
        cfg, hyp = write_cfgs(work, args.width)

        t0 = time.time()
        if args.from_pt is not None:
            best = work / "runs" / "train" / "weights" / "best.pt"
            best.parent.mkdir(parents=True, exist_ok=True)
            if args.from_pt.resolve() != best.resolve():
                shutil.copyfile(args.from_pt, best)
        else:
            yolov5_train.run(data=str(data), cfg=str(cfg), weights="", hyp=str(hyp), epochs=args.epochs,
                             batch_size=args.batch, imgsz=IMG, device="cpu", workers=args.workers, seed=SEED,
                             project=str(work / "runs"), name="train", exist_ok=True, noplots=True,
                             cache="ram", patience=1000, optimizer=OPTIMIZER)
        t_train = time.time() - t0
        best = work / "runs" / "train" / "weights" / "best.pt"
        print(f"training: {args.epochs} epochs in {t_train / 60:.1f} min -> {best}")

        (mp, mr, map50, map5095, *_), _, *_ = yolov5_val.run(
            data=str(data), weights=str(best), imgsz=IMG, batch_size=args.batch, device="cpu",
            task="val", workers=args.workers, project=str(work / "runs"), name="val", exist_ok=True,
            plots=False)

        yolov5_export.run(weights=str(best), include=("onnx",), imgsz=(IMG, IMG), opset=17,
                          dynamic=False, simplify=False, device="cpu")
        onnx_file = best.with_suffix(".onnx")
        if not onnx_file.exists():
            raise RuntimeError(f"yolov5 export produced no {onnx_file}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_file, args.out)
        info = verify(args.out, best)

        print("\n==== demo-shapes summary ====")
        print(f"model: yolov5n.yaml depth 0.33 width {args.width}, nc={len(NAMES)} {NAMES}, seed {SEED}")
        if args.from_pt is not None:
            print(f"train: skipped, validated/exported checkpoint {args.from_pt}")
        else:
            print(f"train: {args.epochs} epochs, batch {args.batch}, imgsz {IMG}, {t_train / 60:.1f} min on CPU")
        print(f"val ({args.val_n} images): P {mp:.4f}  R {mr:.4f}  mAP50 {map50:.4f}  mAP50-95 {map5095:.4f}")
        print(f"onnx: {args.out} {info}")
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
