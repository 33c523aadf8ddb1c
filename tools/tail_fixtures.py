#!/usr/bin/env python3
"""Gradient parity fixtures for the movable freeze boundary (issue 11) in tests/fixtures/tail/.

In: model A (the weights behind models/tiny-320-op17.onnx, rebuilt exactly as
make_test_models.py builds them, or a kept ``--pt tiny-coco80.pt``), two images
letterboxed to 320 (../shared/data/images/bus.jpg and zidane.jpg, as val's
dataloader does it: letterbox_reference.preprocess) and seeded targets.
Out: for N in NS, ``n{N}.safetensors`` + ``n{N}.json``; the forward check below
prints its figures and fails loudly.

The model is loaded as yolov5's export loads it (``attempt_load(fuse=True)``: BN
folded into the convs, so the values are the ONNX initializers bit for bit), the
parameters of layers N..24 are made trainable and the model is put in train mode
(Detect returns the raw p list, no BatchNorm is left to move). Layers 0..N-1 run
once without grad; their outputs that layers >= N read (the crossing tensors,
skip connections included: N = 10 -> layers 4, 6, 9; N = 24 -> 17, 20, 23) feed
layers N..24, whose output goes through yolov5 7.0's own ``ComputeLoss`` with
hyp.scratch-low scaled as train.py scales it (nc 80, imgsz 320, nl 3), and
``loss.backward()`` gives d(total)/d(param). ``total`` is what train.py
backpropagates: (lbox + lobj + lcls) * batch size.

safetensors (float32):
  <ONNX tensor name>        [2, C, H, W]  each crossing tensor, named as the output of its
                                          producing node in tiny-320-op17.onnx
                                          (e.g. ``/model.9/cv2/act/Mul_output_0``)
  <ONNX initializer name>   param shape   d(total)/d(param) of every parameter of layers
                                          N..24 (e.g. ``model.10.conv.weight``)
  targets                   [nt, 6]       (image, class, x, y, w, h), normalised
JSON: N, crossing [{layer, name, shape}], params {onnx_name: {torch, shape}},
loss {total, lbox, lobj, lcls} (float32), targets_moved (see precision_stable),
loss_f64 and grad_f32_vs_f64 (the same computation in float64: how far float32
itself is from exact, per tensor max|g32 - g64| / max|g64|, the worst tensor
reported), hyp, imgsz, batch, images, versions.

The forward check (every run, before writing): for every layer 0..23 the fused
model's output on both images equals onnxruntime's value of the ONNX tensor the
mapping names (max abs difference <= 1e-4), which proves the crossing-tensor
names for every N in 10..24; and for every N in 10..24 layers N..24 run from
onnxruntime's crossing tensors reproduce its ``output0`` (same tolerance on the
sigmoid scores, 1e-3 px on boxes). Every initializer of layers >= 10 is matched
by value to the fused PyTorch parameter it names.

Usage (from the repository root):
    .venv-tools/bin/python tools/tail_fixtures.py [--out tests/fixtures/tail] [--pt tiny-coco80.pt]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_test_models as mtm  # noqa: E402  (also patches attempt_download for local files)
from letterbox_reference import preprocess  # noqa: E402
from loss_fixtures import make_targets  # noqa: E402
from yolo_split import crossing, run_layers, run_tail  # noqa: E402

import yolov5  # noqa: E402
from yolov5.models.yolo import Detect  # noqa: E402
from yolov5.utils.loss import ComputeLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONNX_MODEL = ROOT / "models" / "tiny-320-op17.onnx"
IMAGES = [ROOT / ".." / "shared" / "data" / "images" / n for n in ("bus.jpg", "zidane.jpg")]
IMGSZ = 320
NS = (10, 17, 24)
FORWARD_NS = range(10, 25)
TOL = 1e-4
SEED = 11


def load_model(pt: Path | None) -> torch.nn.Module:
    """Model A exactly as export.run loads it before exporting tiny-320-op17.onnx."""
    with tempfile.TemporaryDirectory(prefix="freezesplit-tail-") as tmp:
        if pt is None:
            arch = mtm.ARCHS["coco80"]
            pt = Path(tmp) / "tiny-coco80.pt"
            mtm.save_checkpoint(mtm.build_model(arch["width"], arch["nc"], arch["names"]), pt)
        model = mtm.yolov5_experimental.attempt_load(str(pt), device=torch.device("cpu"), inplace=True, fuse=True)
    # fuse_conv_and_bn copies into the fused weights outside no_grad, leaving them non-leaf
    # views of the unfused graph: make every parameter a plain leaf holding the same values.
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = torch.nn.Parameter(p.detach().clone().float(), requires_grad=False)
    return model


def scaled_hyp(nc: int, nl: int) -> dict:
    hyp = yaml.safe_load((Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp["box"] *= 3 / nl  # train.py, verbatim order of operations
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (IMGSZ / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = 0.0
    return hyp


def seeded_targets(nc: int) -> torch.Tensor:
    """loss_fixtures' mix (made for a 16-cell P3) plus its cell-half cases on this 40-cell P3."""
    g = torch.Generator().manual_seed(SEED)
    t = make_targets(nc, g)
    extra = [[0, 3, (17 + 0.49) / 40, (22 + 0.51) / 40, 0.1, 0.15],
             [1, 7, (30 + 0.51) / 40, (8 + 0.49) / 40, 0.25, 0.12]]
    return torch.cat([t, torch.tensor(extra, dtype=torch.float32)])


def precision_stable(model, targets: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The targets, each moved by +1e-3 in x and y until build_targets treats it alike in f32 and f64.

    loss_fixtures' rows sit at 0.2, 0.4, 0.6, 0.7, ...: on this model's 40/20/10-cell grids those
    are exact cell borders, where ``gxy % 1 < 0.5`` flips with the last bit of ``x * nx``. The
    fixture is about the tail's gradients, not that coin toss (tests/fixtures/loss has the
    edges): a target that f32 rounding decides would make the float32 reference arbitrary.
    """
    det = model.model[-1]
    ny = [IMGSZ // int(s) for s in det.stride]
    crit = {dt: ComputeLoss(deepcopy(model).to(dt)) for dt in (torch.float32, torch.float64)}

    def assigned(row: torch.Tensor, dt) -> list:
        p = [torch.zeros(2, det.na, n, n, det.no, dtype=dt) for n in ny]
        return [torch.stack(ix).tolist() for ix in crit[dt].build_targets(p, row[None].to(dt))[2]]

    t, moved = targets.clone(), []
    for i in range(t.shape[0]):
        while assigned(t[i], torch.float32) != assigned(t[i], torch.float64):
            t[i, 2:4] += 1e-3
            moved.append(i)
    return t, sorted(set(moved))


def images() -> torch.Tensor:
    missing = [str(p) for p in IMAGES if not p.exists()]
    if missing:
        sys.exit(f"error: {missing[0]} not found: the fixtures are made from ../shared's images")
    ims = [preprocess(str(p), IMGSZ)[0] for p in IMAGES]  # RGB HWC uint8, letterboxed
    x = np.stack(ims).transpose(0, 3, 1, 2).astype(np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(x))


def onnx_layer_outputs(graph: onnx.GraphProto, nlayers: int) -> dict[int, str]:
    """The output tensor of each layer ``/model.i/...``: the one its nodes hand to other layers."""
    owner = {o: n.name for n in graph.node for o in n.output}
    out = {}
    for i in range(nlayers):
        pre = f"/model.{i}/"
        names = {x for n in graph.node if not n.name.startswith(pre) for x in n.input
                 if owner.get(x, "").startswith(pre)}
        assert len(names) == 1, (i, names)
        out[i] = names.pop()
    return out


def param_mapping(model, graph: onnx.GraphProto, first_layer: int) -> dict[str, dict]:
    """{onnx initializer name: {torch, shape}} for every parameter of layers >= first_layer.

    By name when the exporter kept it (``model.N.conv.weight``), else by value among the
    initializers of the same shape (exports may name them ``onnx::Conv_NNN``); either way
    the values must be equal, so a wrong match cannot pass.
    """
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    mapping, used = {}, set()
    for tname, p in model.named_parameters():
        if int(tname.split(".")[1]) < first_layer:
            continue
        v = p.detach().numpy()
        cands = [tname] if tname in inits else [k for k, a in inits.items() if a.shape == v.shape and k not in used]
        hit = [k for k in cands if inits[k].shape == v.shape and np.array_equal(inits[k], v)]
        assert len(hit) == 1, f"{tname}: {len(hit)} ONNX initializers hold its values"
        used.add(hit[0])
        mapping[hit[0]] = {"torch": tname, "shape": list(v.shape)}
    layer_inits = [k for k in inits if k.startswith("model.") and int(k.split(".")[1]) >= first_layer]
    assert set(layer_inits) <= set(mapping), sorted(set(layer_inits) - set(mapping))
    return mapping


def forward_check(model, graph_path: Path, x: torch.Tensor, names: dict[int, str]) -> dict:
    """Fused PyTorch layer outputs and split runs against onnxruntime on the same images."""
    m = onnx.load(str(graph_path))
    for name in names.values():
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = ["output0", *names.values()]
    got = [dict(zip(outs, sess.run(outs, {"images": x[b:b + 1].numpy()}))) for b in range(x.shape[0])]
    ref = {k: np.concatenate([g[k] for g in got]) for k in outs}
    model.eval()
    det = model.model[-1]
    det.export = True
    with torch.no_grad():
        ys = run_layers(model, x, len(model.model) - 1)
        layer_err = max(float(np.abs(ys[i].numpy() - ref[name]).max()) for i, name in names.items())
        assert layer_err <= TOL, f"fused PyTorch vs onnxruntime layer outputs differ by {layer_err}"
        box_err = conf_err = 0.0
        for n in FORWARD_NS:
            cross = {j: torch.from_numpy(ref[names[j]]) for j in crossing(model, n)}
            out = run_tail(model, n, cross)[0].numpy()
            box_err = max(box_err, float(np.abs(out[..., :4] - ref["output0"][..., :4]).max()))
            conf_err = max(conf_err, float(np.abs(out[..., 4:] - ref["output0"][..., 4:]).max()))
        assert box_err <= 1e-3 and conf_err <= TOL, (box_err, conf_err)
    det.export = False
    return {"layers_0_23_max_abs": layer_err, "split_output0_box_px": box_err, "split_output0_conf": conf_err}


def loss_and_grads(model, n: int, cross: dict[int, torch.Tensor], targets: torch.Tensor, hyp: dict):
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    tail = [p for name, p in model.named_parameters() if int(name.split(".")[1]) >= n]
    for p in tail:
        p.requires_grad_(True)
    model.hyp = hyp
    p_out = run_tail(model, n, cross)
    loss, parts = ComputeLoss(model)(p_out, targets)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if int(name.split(".")[1]) >= n}
    return loss.detach(), parts, grads


def make_case(model, n, ys, names, mapping, targets, moved, hyp, out: Path) -> None:
    layers = crossing(model, n)
    cross = {j: ys[j].detach().clone() for j in layers}
    loss, parts, grads = loss_and_grads(model, n, cross, targets, hyp)
    m64 = deepcopy(model).double()
    loss64, parts64, grads64 = loss_and_grads(m64, n, {j: t.double() for j, t in cross.items()}, targets.double(), hyp)
    rel64 = max(float((grads[k] - grads64[k].float()).abs().max() / grads64[k].abs().max().clamp_min(1e-30))
                for k in grads)

    pmap = {k: v for k, v in mapping.items() if int(v["torch"].split(".")[1]) >= n}
    assert sorted(v["torch"] for v in pmap.values()) == sorted(grads)
    tensors = {"targets": targets.contiguous()}
    for j in layers:
        tensors[names[j]] = cross[j].contiguous()
    for onnx_name, v in pmap.items():
        tensors[onnx_name] = grads[v["torch"]].contiguous()
    save_file(tensors, str(out / f"n{n}.safetensors"))
    meta = {
        "N": n,
        "model": "models/tiny-320-op17.onnx (model A, BN fused)",
        "imgsz": IMGSZ,
        "batch": int(ys[0].shape[0]),
        "images": [p.name for p in IMAGES],
        "crossing": [{"layer": j, "name": names[j], "shape": list(cross[j].shape)} for j in layers],
        "params": pmap,
        "n_params": int(sum(g.numel() for g in grads.values())),
        "loss": {"total": loss.item(), "lbox": parts[0].item(), "lobj": parts[1].item(), "lcls": parts[2].item()},
        "loss_f64": {"total": loss64.item(), "lbox": parts64[0].item(), "lobj": parts64[1].item(),
                     "lcls": parts64[2].item()},
        "grad_f32_vs_f64": rel64,
        "n_targets": int(targets.shape[0]),
        "targets_moved": moved,  # rows of seeded_targets moved off a cell border (precision_stable)
        "hyp": hyp,
        "tolerance": {"loss_rel": 1e-4, "grad_of_tensor_max": 1e-3},
        "versions": {"torch": torch.__version__, "yolov5": yolov5.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
    }
    (out / f"n{n}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"N={n:2d} crossing {layers} params {len(pmap)} ({meta['n_params']} values) loss {loss.item():.6f} "
          f"(box {parts[0]:.6f} obj {parts[1]:.6f} cls {parts[2]:.6f}) f32 vs f64 grad {rel64:.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "tail"))
    ap.add_argument("--pt", default=None, help="model A checkpoint kept by make_test_models.py --keep-pt")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    model = load_model(Path(a.pt) if a.pt else None)
    det = model.model[-1]
    assert isinstance(det, Detect)
    graph = onnx.load(str(ONNX_MODEL)).graph
    names = onnx_layer_outputs(graph, len(model.model) - 1)
    mapping = param_mapping(model, graph, min(FORWARD_NS))
    x = images()
    fwd = forward_check(model, ONNX_MODEL, x, names)
    print(f"forward check: layers 0..23 max |torch - ort| {fwd['layers_0_23_max_abs']:.1e}; N = 10..24 split "
          f"output0 max |d box| {fwd['split_output0_box_px']:.1e} px, |d conf| {fwd['split_output0_conf']:.1e}")

    with torch.no_grad():
        ys = run_layers(model, x, len(model.model) - 1)
    hyp = scaled_hyp(det.nc, det.nl)
    model.hyp = hyp
    targets, moved = precision_stable(model, seeded_targets(det.nc))
    print(f"targets: {targets.shape[0]}, moved off a cell border: rows {moved}")
    for n in NS:
        make_case(model, n, ys, names, mapping, targets, moved, hyp, out)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(NS)} cases to {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
