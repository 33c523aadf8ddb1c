#!/usr/bin/env python3
"""Build the small YOLOv5-architecture ONNX test models in models/.

The models are real ``yolov5.models.yolo.Model`` instances (yolov5n structure,
depth_multiple 0.33, smaller width_multiple), randomly initialised with a fixed
seed, saved as a YOLOv5 checkpoint and exported with yolov5's OWN
``export.run(include=('onnx',), ...)`` -- the same code path as
``python export.py --weights X.pt --include onnx [--dynamic] [--simplify]``:
``attempt_load(fuse=True)`` -> eval -> Detect.export=True -> 2 dry runs ->
``export_onnx`` (torch.onnx.export, check_model, metadata ``stride``/``names``,
optional onnxsim).

Two things are patched, neither of which changes the exported graph relative
to a working user export:

* ``yolov5.models.experimental.attempt_download`` is replaced by an identity
  for local files: the original always queries the Hugging Face hub / GitHub
  first (no network here).
* ``torch.onnx.export`` gets ``dynamo=False`` as default. yolov5 7.0.14's
  export.py does not pass ``dynamo``; torch >= 2.9 defaults to the dynamo
  exporter, which needs ``onnxscript`` (not installed -> "export failure: No
  module named 'onnxscript'") and produces a different graph. The reference
  exports in shared/models (producer pytorch 2.15.0, node names like
  ``/model.24/Reshape``) were made with the TorchScript exporter, as here.

Also ``ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1`` stops ultralytics'
``check_requirements`` from pip-installing ``onnx-simplifier`` (we use the
``onnxsim`` distribution, which provides the same ``onnxsim`` module).

Usage:
    .venv-tools/bin/python tools/make_test_models.py [--out models] [--keep-pt DIR]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import shutil
import sys
import tempfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load of a pickled yolov5 ckpt
os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")  # no auto pip installs

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

import yolov5  # noqa: E402
import yolov5.models.experimental as yolov5_experimental  # noqa: E402

yolov5_experimental.attempt_download = lambda file, *a, **k: str(file)

import onnxsim  # noqa: E402
from yolov5 import export as yolov5_export  # noqa: E402
from yolov5.models.yolo import Detect, Model  # noqa: E402

# Record whether onnxsim really ran: export_onnx swallows simplifier failures.
_SIMPLIFY_LOG: list[bool] = []
_onnxsim_simplify = onnxsim.simplify


def _recording_simplify(*args, **kwargs):
    model, check = _onnxsim_simplify(*args, **kwargs)
    _SIMPLIFY_LOG.append(bool(check))
    return model, check


onnxsim.simplify = _recording_simplify

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush"]
SHAPE_NAMES = ["circle", "square", "triangle"]


def convt_upsampling(cfg: dict) -> None:
    """Replace the head's two ``nn.Upsample`` layers (11 and 15) by learned 2x ConvTranspose2d.

    parse_model treats ``nn.ConvTranspose2d`` like Conv: args ``[c2, k, s]`` with c2 scaled
    by width_multiple and c1 taken from the input layer, so ``[512, 2, 2]`` after layer 10
    (Conv 512) and ``[256, 2, 2]`` after layer 14 (Conv 256) keep every channel count, and
    every later layer, as in yolov5n.yaml (``[C, C, 2, 2]`` would mean kernel C, stride 2).
    """
    bb = len(cfg["backbone"])
    for i, c in ((11, 512), (15, 256)):
        layer = cfg["head"][i - bb]
        assert layer[2] == "nn.Upsample" and cfg["head"][i - 1 - bb][3][0] == c, (i, layer)
        cfg["head"][i - bb] = [-1, 1, "nn.ConvTranspose2d", [c, 2, 2]]


def build_model(width: float, nc: int, names: list[str], upsample: str = "nearest") -> Model:
    """yolov5n.yaml with a different width_multiple, seeded random init."""
    cfg = yaml.safe_load((Path(yolov5.__file__).parent / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = width
    cfg["nc"] = nc
    if upsample == "convt":
        convt_upsampling(cfg)
    torch.manual_seed(SEED)
    model = Model(cfg, ch=3, nc=nc)
    # Give BatchNorm layers non-trivial running statistics / affine params (seeded) so that
    # fusing is not an identity rescale and the exporter does not deduplicate identical
    # (all-zero) fused biases into Identity nodes -- closer to a trained checkpoint.
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    model.names = list(names)
    model.nc = nc
    model.eval()
    return model


def save_checkpoint(model: Model, path: Path) -> None:
    """Same layout as yolov5 train.py's checkpoints (model stored in FP16)."""
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": deepcopy(model).half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "opt": None,
        "git": None,
        "date": datetime(2026, 1, 1).isoformat(),
    }
    torch.save(ckpt, path)


def export(pt: Path, imgsz: int, opset: int, dynamic: bool, simplify: bool) -> Path:
    _SIMPLIFY_LOG.clear()
    yolov5_export.run(weights=str(pt), include=("onnx",), imgsz=(imgsz, imgsz), opset=opset,
                      dynamic=dynamic, simplify=simplify, device="cpu")
    f = pt.with_suffix(".onnx")
    if not f.exists():
        raise RuntimeError(f"yolov5 export produced no {f}")
    if simplify and _SIMPLIFY_LOG != [True]:
        raise RuntimeError(f"onnxsim did not run successfully (log {_SIMPLIFY_LOG}); see export log above")
    return f


def strip_names(path: Path) -> None:
    """Rename nodes to n0.., intermediate tensors to t0.., initializers to w0..

    Graph input 'images' and output 'output0' keep their names. Metadata is kept.
    """
    m = onnx.load(str(path))
    g = m.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    rename: dict[str, str] = {}
    for i, init in enumerate(g.initializer):
        rename[init.name] = f"w{i}"
    t = 0
    for node in g.node:
        for o in node.output:
            if o and o not in keep and o not in rename:
                rename[o] = f"t{t}"
                t += 1
    for init in g.initializer:
        init.name = rename[init.name]
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.doc_string = ""
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    for vi in list(g.value_info):
        vi.name = rename.get(vi.name, vi.name)
    for inp in g.input:  # old IR: initializers may also be listed as inputs
        inp.name = rename.get(inp.name, inp.name)
    onnx.checker.check_model(m)
    leaked = [n.name for n in g.node if "model" in n.name] + \
             [x for n in g.node for x in list(n.input) + list(n.output) if "model" in x]
    assert not leaked, leaked[:5]
    onnx.save(m, str(path))


def n_boxes(h: int, w: int, strides=(8, 16, 32), na: int = 3) -> int:
    return sum(na * (h // s) * (w // s) for s in strides)


def verify(path: Path, nc: int, imgsz: int, dynamic: bool, names: list[str], torch_model: Model | None) -> dict:
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta.get("stride") == "32", meta
    assert meta.get("names") == str(dict(enumerate(names))), meta.get("names")
    assert [i.name for i in m.graph.input] == ["images"], [i.name for i in m.graph.input]
    assert [o.name for o in m.graph.output] == ["output0"], [o.name for o in m.graph.output]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(SEED)
    shapes = [(1, imgsz, imgsz)] + ([(2, 256, 384), (1, 640, 640)] if dynamic else [])
    outs = {}
    for b, h, w in shapes:
        x = rng.random((b, 3, h, w), dtype=np.float32)
        (y,) = sess.run(["output0"], {"images": x})
        want = (b, n_boxes(h, w), 5 + nc)
        assert y.shape == want, (path.name, y.shape, want)
        assert np.isfinite(y).all()
        outs[(b, h, w)] = (x, y)
    # compare with the fused PyTorch model the ONNX was made from
    if torch_model is not None:
        x, y = outs[(1, imgsz, imgsz)]
        with torch.no_grad():
            yt = torch_model(torch.from_numpy(x))[0].numpy()
        err = float(np.abs(yt - y).max())
        assert err < 1e-2 * max(1.0, float(np.abs(yt).max())), (path.name, err)
    else:
        err = None
    ops = collections.Counter(n.op_type for n in m.graph.node)
    return {"shape_checked": [s for s in outs], "max_abs_err_vs_torch": err, "nodes": len(m.graph.node),
            "initializers": len(m.graph.initializer), "opset": m.opset_import[0].version,
            "input_shape": [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim],
            "output_shape": [d.dim_param or d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim],
            "ops": dict(sorted(ops.items()))}


def reference_model(pt: Path, dynamic: bool) -> Model:
    """The model exactly as export.run prepares it (fused, eval, Detect.export)."""
    model = yolov5_experimental.attempt_load(str(pt), device=torch.device("cpu"), inplace=True, fuse=True)
    model.eval()
    for mod in model.modules():
        if isinstance(mod, Detect):
            mod.inplace, mod.dynamic, mod.export = True, dynamic, True
    return model


MODELS = [
    # file, model key, imgsz, opset, dynamic, simplify, strip
    ("tiny-320-op17.onnx", "coco80", 320, 17, False, False, False),
    ("tiny-320-op12.onnx", "coco80", 320, 12, False, False, False),
    ("tiny-dyn-op12-sim.onnx", "coco80", 320, 12, True, True, False),
    ("tiny-dyn-op17.onnx", "coco80", 320, 17, True, False, False),
    ("tiny-256-nc3-stripped.onnx", "shapes3", 256, 17, False, False, True),
    ("tiny-320-convt-op17.onnx", "convt80", 320, 17, False, False, False),
]
ARCHS = {
    "coco80": dict(width=0.125, nc=80, names=COCO_NAMES),
    "shapes3": dict(width=0.1875, nc=3, names=SHAPE_NAMES),
    # model A's architecture with ConvTranspose upsampling (no shared model has one)
    "convt80": dict(width=0.125, nc=80, names=COCO_NAMES, upsample="convt"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "models"), help="output dir (default: models/)")
    ap.add_argument("--keep-pt", default=None, help="also copy the yolov5 .pt checkpoints here")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    assert len(COCO_NAMES) == 80

    results = {}
    with tempfile.TemporaryDirectory(prefix="freezesplit-models-") as tmp:
        tmp = Path(tmp)
        ckpts = {}
        for key, arch in ARCHS.items():
            model = build_model(arch["width"], arch["nc"], arch["names"], arch.get("upsample", "nearest"))
            pt = tmp / f"{key}.pt"
            save_checkpoint(model, pt)
            ckpts[key] = pt
            if a.keep_pt:
                Path(a.keep_pt).mkdir(parents=True, exist_ok=True)
                shutil.copy(pt, Path(a.keep_pt) / f"tiny-{key}.pt")
        for fname, key, imgsz, opset, dynamic, simplify, strip in MODELS:
            arch = ARCHS[key]
            work = tmp / fname.replace(".onnx", "")
            work.mkdir()
            pt = work / "weights.pt"
            shutil.copy(ckpts[key], pt)
            f = export(pt, imgsz, opset, dynamic, simplify)
            if strip:
                strip_names(f)
            dst = out / fname
            shutil.move(str(f), dst)
            ref = reference_model(ckpts[key], dynamic)
            results[fname] = verify(dst, arch["nc"], imgsz, dynamic, arch["names"], ref)
            if arch.get("upsample") == "convt":
                ops = results[fname]["ops"]
                assert ops.get("ConvTranspose") == 2 and "Resize" not in ops, (fname, ops)

    print("\n=== summary ===")
    for fname, r in results.items():
        p = out / fname
        sha = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        print(f"{fname}: {p.stat().st_size / 1e6:.2f} MB sha256:{sha}.. opset {r['opset']} "
              f"in {r['input_shape']} out {r['output_shape']} nodes {r['nodes']} inits {r['initializers']} "
              f"max|onnx-torch| {r['max_abs_err_vs_torch']:.2e}")
        print(f"    ops {r['ops']}")
    print(f"versions: torch {torch.__version__}, yolov5 {yolov5.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}, onnxsim {onnxsim.__version__}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
