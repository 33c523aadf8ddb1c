#!/usr/bin/env python3
"""Generate ComputeLoss parity fixtures in tests/fixtures/loss/.

In: nothing (seeded). Out: for each case ``<name>.safetensors`` + ``<name>.json``.

Each case runs yolov5 7.0's real ``yolov5.utils.loss.ComputeLoss`` on the real
``yolov5.models.yolo.Detect`` head (ch=(16, 32, 64), default P3-P5 anchors,
strides 8/16/32, imgsz 128 -> grids 16, 8, 4, batch 2) in float32, training
mode, fed with seeded random feature maps, and records the loss parts and the
gradients of the three head convs. Hyp values are data/hyps/hyp.scratch-low.yaml
scaled exactly as train.py scales them (box *= 3/nl, cls *= nc/80*3/nl,
obj *= (imgsz/640)^2*3/nl), with per-case label_smoothing / fl_gamma.

Targets mix random boxes with cases that exercise build_targets' edges: centres
just either side of a cell's half (the j/k/l/m neighbour test), centres at the
image border (x = 0 and x = 1.0, where gij is clamped), extreme aspect ratios
and tiny boxes that fail the anchor_t ratio test at some or all levels, and two
targets sharing a cell and anchor (duplicate tobj writes: last one wins).

safetensors tensors (all float32 unless noted):
  feat{i}          [bs, cin_i, ny_i, nx_i]   Detect input x[i] (NCHW)
  weight{i}        [na*no, cin_i, 1, 1]      Detect.m[i].weight
  bias{i}          [na*no]                   Detect.m[i].bias
  targets          [nt, 6]                   (image, class, x, y, w, h), normalised
  anchors          [nl, na, 2]               Detect.anchors (grid units)
  grad_weight{i}, grad_bias{i}               d(total loss)/d(param)
  p{i}             [bs, na, ny, nx, no]      head output (only when nc <= 5, for size)
  bt{i}_indices    int64 [n_i, 4]            build_targets (b, a, gj, gi)
  bt{i}_tbox       [n_i, 4]                  build_targets tbox
  bt{i}_tcls       int64 [n_i]               build_targets tcls
JSON: case name, nc, na, nl, bs, imgsz, ch, strides, hyp (scaled, as passed to
ComputeLoss), loss {total, lbox, lobj, lcls} in float32 and, for reference,
loss_f64 (same inputs in float64), versions and seed.

Usage (from the repository root):
    .venv-tools/bin/python tools/loss_fixtures.py [--out tests/fixtures/loss]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import yolov5
from yolov5.models.yolo import Detect
from yolov5.utils.loss import ComputeLoss

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
STRIDES = [8.0, 16.0, 32.0]
CH = (16, 32, 64)
IMGSZ = 128
BS = 2

CASES = [
    # name, nc, label_smoothing, fl_gamma, seed
    ("nc80_ls0", 80, 0.0, 0.0, 1),
    ("nc80_ls01", 80, 0.1, 0.0, 2),
    ("nc5_ls0", 5, 0.0, 0.0, 3),
    ("nc5_ls01", 5, 0.1, 0.0, 4),
    ("nc5_focal", 5, 0.0, 1.5, 5),
    ("nc1", 1, 0.0, 0.0, 6),
    ("nc5_notargets", 5, 0.0, 0.0, 7),
]


class Wrap(torch.nn.Module):
    """The two things ComputeLoss reads from a model: .hyp and .model[-1] (Detect)."""

    def __init__(self, det: Detect, hyp: dict):
        super().__init__()
        self.model = torch.nn.ModuleList([det])
        self.hyp = hyp


def scaled_hyp(nc: int, ls: float, fl_gamma: float) -> dict:
    hyp_path = Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml"
    hyp = yaml.safe_load(hyp_path.read_text())
    nl = len(ANCHORS)
    # train.py, verbatim order of operations
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (IMGSZ / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = ls
    hyp["fl_gamma"] = fl_gamma
    return hyp


def make_detect(nc: int, g: torch.Generator) -> Detect:
    det = Detect(nc, ANCHORS, CH)
    det.stride = torch.tensor(STRIDES)
    det.anchors /= det.stride.view(-1, 1, 1)  # as DetectionModel.__init__ does
    with torch.no_grad():
        for mi, s in zip(det.m, det.stride):
            cin = mi.weight.shape[1]
            mi.weight.copy_((torch.rand(mi.weight.shape, generator=g) * 2 - 1) / math.sqrt(cin) * 1.5)
            mi.bias.copy_((torch.rand(mi.bias.shape, generator=g) * 2 - 1) * 0.5)
            # DetectionModel._initialize_biases, so obj/cls logits sit where training starts
            b = mi.bias.view(det.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:5 + nc] += math.log(0.6 / (nc - 0.99999))
    det.train()
    return det


def make_targets(nc: int, g: torch.Generator) -> torch.Tensor:
    rows = []

    def rnd(lo, hi):
        return float(lo + (hi - lo) * torch.rand(1, generator=g).item())

    def cls():
        return float(torch.randint(0, nc, (1,), generator=g).item())

    for img in range(BS):
        for _ in range(7):  # ordinary boxes
            rows.append([img, cls(), rnd(0.05, 0.95), rnd(0.05, 0.95), rnd(0.03, 0.6), rnd(0.03, 0.6)])
    # Centres just below / above a cell half at P3 (16 cells): gx % 1 = 0.49 / 0.51.
    rows.append([0, cls(), (5 + 0.49) / 16, (9 + 0.51) / 16, 0.12, 0.2])
    rows.append([1, cls(), (10 + 0.51) / 16, (3 + 0.49) / 16, 0.3, 0.15])
    # Image borders: gx == 0 (no left neighbour) and x == 1.0 (gi clamped to nx-1).
    rows.append([0, cls(), 0.0, 0.4, 0.1, 0.1])
    rows.append([1, cls(), 1.0, 1.0, 0.2, 0.25])
    rows.append([1, cls(), 0.03, 0.97, 0.05, 0.08])
    # Ratio test: extreme aspect (rejected at every level), tall thin (some levels), tiny.
    rows.append([0, cls(), 0.5, 0.5, 0.9, 0.01])
    rows.append([1, cls(), 0.3, 0.6, 0.02, 0.7])
    rows.append([0, cls(), 0.7, 0.2, 0.004, 0.005])
    # Same cell and size twice, different class: duplicate (b, a, gj, gi).
    rows.append([0, cls(), 0.33, 0.66, 0.2, 0.18])
    rows.append([0, cls(), 0.332, 0.661, 0.21, 0.17])
    return torch.tensor(rows, dtype=torch.float32)


def run_case(name, nc, ls, fl_gamma, seed, out: Path):
    g = torch.Generator().manual_seed(seed)
    hyp = scaled_hyp(nc, ls, fl_gamma)
    det = make_detect(nc, g)
    grids = [IMGSZ // int(s) for s in STRIDES]
    feats = [torch.randn(BS, c, n, n, generator=g) * 1.5 for c, n in zip(CH, grids)]
    targets = make_targets(nc, g) if name != "nc5_notargets" else torch.zeros(0, 6)

    def forward(dtype):
        d = make_detect(nc, torch.Generator())  # structure only; weights copied below
        d.load_state_dict(det.state_dict())
        d = d.to(dtype)
        model = Wrap(d, hyp)
        crit = ComputeLoss(model)
        p = d([f.to(dtype) for f in feats])
        loss, parts = crit(p, targets.to(dtype))
        return d, crit, p, loss, parts

    d32, crit, p, loss, parts = forward(torch.float32)
    loss.backward()
    _, _, _, loss64, parts64 = forward(torch.float64)
    tcls, tbox, indices, _ = crit.build_targets(p, targets)

    tensors = {"targets": targets.contiguous(), "anchors": d32.anchors.clone().contiguous()}
    for i, mi in enumerate(d32.m):
        tensors[f"feat{i}"] = feats[i].contiguous()
        tensors[f"weight{i}"] = mi.weight.detach().clone().contiguous()
        tensors[f"bias{i}"] = mi.bias.detach().clone().contiguous()
        tensors[f"grad_weight{i}"] = mi.weight.grad.clone().contiguous()
        tensors[f"grad_bias{i}"] = mi.bias.grad.clone().contiguous()
        if nc <= 5:
            tensors[f"p{i}"] = p[i].detach().clone().contiguous()
        b, a, gj, gi = indices[i]
        tensors[f"bt{i}_indices"] = torch.stack((b, a, gj, gi), 1).to(torch.int64).contiguous()
        tensors[f"bt{i}_tbox"] = tbox[i].detach().clone().contiguous()
        tensors[f"bt{i}_tcls"] = tcls[i].to(torch.int64).contiguous()
    save_file(tensors, str(out / f"{name}.safetensors"))

    meta = {
        "name": name,
        "nc": nc,
        "na": d32.na,
        "nl": d32.nl,
        "bs": BS,
        "imgsz": IMGSZ,
        "ch": list(CH),
        "strides": STRIDES,
        "hyp": hyp,
        "loss": {
            "total": loss.item(),
            "lbox": parts[0].item(),
            "lobj": parts[1].item(),
            "lcls": parts[2].item(),
        },
        "loss_f64": {
            "total": loss64.item(),
            "lbox": parts64[0].item(),
            "lobj": parts64[1].item(),
            "lcls": parts64[2].item(),
        },
        "positives_per_level": [int(ix[0].shape[0]) for ix in indices],
        "n_targets": int(targets.shape[0]),
        "seed": seed,
        "torch": torch.__version__,
        "yolov5": getattr(yolov5, "__version__", "unknown"),
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name:14s} loss {loss.item():.6f} (box {parts[0]:.6f} obj {parts[1]:.6f} cls {parts[2]:.6f})"
          f" positives {meta['positives_per_level']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/loss")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for case in CASES:
        run_case(*case, out)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(CASES)} cases to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
