#!/usr/bin/env python3
"""Generate validation-metrics parity fixtures in tests/fixtures/metrics/.

In: nothing (seeded). Out: for each dataset ``<name>.safetensors`` + ``<name>.json``, plus
``interp_cases.json`` (np.interp edge cases) and ``edge_cases.json`` (small NMS / matching
cases with exact ties and the >7680 px class-offset collision).

Each dataset is ~20 synthetic images in the exported output0 layout ([N, 5+nc] rows:
cx, cy, w, h in 640x640 letterboxed pixels, obj, class scores, already sigmoided) with
ground-truth boxes in original-image pixels. Predictions are jittered copies of the labels
(IoUs spread over 0.3..1, mostly the right class, sometimes another), overlapping clusters
of background boxes, boxes poking out of the image (clip_boxes), rows under the conf
threshold, one image without predictions and images without labels. The script then runs
yolov5 7.0's own code exactly as val.py does per image:

    non_max_suppression (3 settings) -> scale_boxes -> val.process_batch ->
    ConfusionMatrix.process_batch -> stats -> ap_per_class

and records inputs and outputs. Our two extra metrics (class-agnostic mAP50, matched-box
class accuracy, see the Rust summary.rs header) are computed here from yolov5's
process_batch/ap_per_class/box_iou for cross-checking.

Ties: numpy's argsort (SIMD builds, >= 4 elements) and torch's sort (> 16 elements) are
not stable, so YOLOv5's result depends on the build when two candidates have EXACTLY equal
confidence or two matches exactly equal IoU. An image is regenerated (next draw from the
same RNG) when it has (a) equal NMS candidate confidences, (b) equal IoUs within a
process_batch / ConfusionMatrix match list of >= 4 rows, or (c) a confidence already used
by a prediction of the same class in an earlier image. Tied lists of <= 3 rows are kept
(numpy is stable there), so the Rust tie rule is still exercised.

safetensors tensors (float32 unless noted), i = 00..:
  img{i}_pred        [N, 5+nc]  network output rows (input to NMS)
  img{i}_labels      [M, 5]     class, x1, y1, x2, y2 in original-image pixels
  img{i}_nms_val     [n, 6]     NMS conf 0.001, iou 0.6, multi_label, max_det 300 (val.py)
  img{i}_nms_det     [n, 6]     NMS conf 0.25, iou 0.45, best class, max_det 1000 (detect.py)
  img{i}_nms_agn     [n, 6]     NMS conf 0.1, iou 0.5, agnostic, multi_label, classes
                                filter (see json), max_det 50
  img{i}_predn       [n, 6]     nms_val after scale_boxes (original-image pixels)
  img{i}_correct     uint8 [n, 10]  bit 0: process_batch(predn, labels), bit 1: the same
                                with all classes set to 0 (agnostic metric)
  confusion          float64 [nc+1, nc+1]  ConfusionMatrix(nc).matrix after all images
  ap                 float64 [nc_u, 10]    ap_per_class ap
  p, r, f1, tp, fp   float64 [nc_u]
  ap_class           int64 [nc_u]
  py, p_curve, r_curve, f1_curve  float64, only when nc <= 5 (size): the arrays
                     ap_per_class hands to its plot functions (py: classes with predictions)
JSON: images (img0 shape [h, w], img1 shape, ratio_pad, nl, n_pred), nms settings,
results (mp, mr, map50, map, seen, nt, best_index, agnostic_map50, class_acc), versions,
seed, rejected-draw count.

Usage (from the repository root):
    .venv-tools/bin/python tools/metrics_fixtures.py [--out tests/fixtures/metrics]
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

if not hasattr(np, "trapz"):  # yolov5 7.0's compute_ap calls np.trapz (removed in numpy 2.4)
    np.trapz = np.trapezoid

import yolov5  # noqa: E402
import yolov5.utils.metrics as ym  # noqa: E402
from yolov5.utils.general import non_max_suppression, scale_boxes  # noqa: E402
from yolov5.utils.metrics import ConfusionMatrix, ap_per_class, box_iou  # noqa: E402
from yolov5.val import process_batch  # noqa: E402

IMG1 = (640, 640)
IOUV = torch.linspace(0.5, 0.95, 10)
NMS = {
    "val": dict(conf_thres=0.001, iou_thres=0.6, multi_label=True, agnostic=False, max_det=300),
    "det": dict(conf_thres=0.25, iou_thres=0.45, multi_label=False, agnostic=False, max_det=1000),
    "agn": dict(conf_thres=0.1, iou_thres=0.5, multi_label=True, agnostic=True, max_det=50),
}
DATASETS = [
    # name, nc, images, rows per image, seed
    ("coco80", 80, 20, 64, 7001),
    ("shapes3", 3, 20, 180, 7002),
]


# ---------------------------------------------------------------- data generation

def class_scores(rng, nc, true_cls):
    """Class probabilities: one dominant class (usually the true one), the rest small."""
    if nc > 5:
        s = rng.beta(0.5, 60, nc)
    else:
        s = rng.uniform(0.0, 0.33, nc)
    c = true_cls if (true_cls is not None and rng.random() < 0.75) else int(rng.integers(nc))
    s[c] = rng.uniform(0.5, 1.0) if true_cls is not None else rng.uniform(0.2, 1.0)
    return s


def gen_image(rng, nc, n_rows, class_pool, kind):
    """One image: (pred [n_rows, 5+nc] f32, labels [M, 5] f32, img0 (h, w), ratio_pad)."""
    h0, w0 = int(rng.integers(240, 1300)), int(rng.integers(240, 1300))
    r = min(IMG1[0] / h0, IMG1[1] / w0)
    h, w = math.ceil(h0 * r), math.ceil(w0 * r)
    h, w = min(h, IMG1[0]), min(w, IMG1[1])
    dw, dh = (IMG1[1] - w) / 2, (IMG1[0] - h) / 2
    ratio_pad = ((h / h0, w / w0), (dw, dh))
    gain = ratio_pad[0][0]

    nl = 0 if kind == "nolabels" else int(rng.integers(1, 9))
    labels = []
    for _ in range(nl):
        bw, bh = rng.uniform(0.04, 0.5) * w0, rng.uniform(0.04, 0.5) * h0
        x1 = rng.uniform(-0.05 * bw, w0 - 0.9 * bw)
        y1 = rng.uniform(-0.05 * bh, h0 - 0.9 * bh)
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x1 + bw, w0), min(y1 + bh, h0)
        labels.append([float(rng.choice(class_pool)), x1, y1, x2, y2])
    labels = np.array(labels, dtype=np.float32).reshape(-1, 5)

    rows = []

    def add(cx, cy, bw, bh, obj, true_cls):
        rows.append([cx, cy, bw, bh, obj, *class_scores(rng, nc, true_cls)])

    if kind != "nopreds":
        for lb in labels:  # jittered copies of each label, in network pixels
            cx = ((lb[1] + lb[3]) / 2) * gain + dw
            cy = ((lb[2] + lb[4]) / 2) * gain + dh
            bw, bh = (lb[3] - lb[1]) * gain, (lb[4] - lb[2]) * gain
            for _ in range(int(rng.integers(0, 8))):
                s = rng.uniform(0.02, 0.25)
                add(cx + rng.normal(0, s * bw), cy + rng.normal(0, s * bh), bw * math.exp(rng.normal(0, s)),
                    bh * math.exp(rng.normal(0, s)), rng.uniform(0.2, 1.0), int(lb[0]))
        while len(rows) < n_rows:  # background: clusters of overlapping boxes, some past the edges
            cx, cy = rng.uniform(-20, IMG1[1] + 20), rng.uniform(-20, IMG1[0] + 20)
            bw, bh = rng.uniform(8, 300), rng.uniform(8, 300)
            for _ in range(int(rng.integers(1, 5))):
                if len(rows) >= n_rows:
                    break
                obj = rng.uniform(0, 0.002) if rng.random() < 0.3 else rng.beta(0.6, 5)
                add(cx + rng.normal(0, 6), cy + rng.normal(0, 6), bw * math.exp(rng.normal(0, 0.1)),
                    bh * math.exp(rng.normal(0, 0.1)), obj, None)
    else:
        for _ in range(n_rows):  # everything under val's conf threshold
            add(rng.uniform(0, 640), rng.uniform(0, 640), rng.uniform(8, 200), rng.uniform(8, 200),
                rng.uniform(0, 0.0009), None)
    pred = np.array(rows, dtype=np.float32)[:n_rows]
    rng.shuffle(pred, axis=0)
    return pred, labels, (h0, w0), ratio_pad


# ---------------------------------------------------------------- tie checks

def has_dup(v):
    v = np.asarray(v)
    return len(np.unique(v)) != len(v)


def nms_conf_tied(pred):
    obj = pred[:, 4:5]
    s = pred[:, 5:] * obj  # same f32 product torch does
    cand = s[(obj[:, 0] > np.float32(0.001))]
    return has_dup(cand[cand > np.float32(0.001)])


def top_tied(groups, vals):
    """True if, within some group, the largest value is attained more than once."""
    for g in np.unique(groups):
        v = vals[groups == g]
        if (v == v.max()).sum() > 1:
            return True
    return False


def pb_order_matters(iou, ok):
    """process_batch: after argsort(iou)[::-1] only 'first row per detection' depends on the
    sort, and the label pass keeps the lowest detection index regardless. So the unstable
    sort matters only for a list of >= 4 rows where a detection ties between labels."""
    l, d = np.nonzero(ok)
    return len(l) >= 4 and top_tied(d, iou[l, d])


def cm_order_matters(iou, ok):
    """ConfusionMatrix: as process_batch, plus its second sort before the label pass."""
    l, d = np.nonzero(ok)
    v = iou[l, d]
    if len(l) < 2:
        return False
    if len(l) >= 4 and top_tied(d, v):
        return True
    keep = [np.flatnonzero(d == j)[np.argmax(v[d == j])] for j in np.unique(d)]
    return len(keep) >= 4 and top_tied(l[keep], v[keep])


def matches_tied(predn, labelsn):
    if len(predn) == 0 or len(labelsn) == 0:
        return False
    iou = box_iou(labelsn[:, 1:], predn[:, :4]).numpy()
    same = (labelsn[:, 0:1] == predn[:, 5]).numpy()
    for t in IOUV.numpy():
        if pb_order_matters(iou, (iou >= t) & same) or pb_order_matters(iou, iou >= t):
            return True
    dets = predn[predn[:, 4] > 0.25]
    if len(dets):
        ci = box_iou(labelsn[:, 1:], dets[:, :4]).numpy()
        return cm_order_matters(ci, ci > np.float32(0.45))
    return False


# ---------------------------------------------------------------- our extra metric

def class_accuracy(predn, labelsn):
    """Matched-box class accuracy counts for one image (definition: Rust summary.rs)."""
    p = predn[predn[:, 4] > 0.25]
    if len(p) == 0 or len(labelsn) == 0:
        return 0, 0
    iou = box_iou(labelsn[:, 1:], p[:, :4]).numpy()
    conf, cls = p[:, 4].numpy(), p[:, 5].numpy()
    matched = correct = 0
    for l in range(len(labelsn)):
        # the most confident prediction overlapping the label (IoU >= 0.5)
        cands = [d for d in range(len(p)) if iou[l, d] >= np.float32(0.5)]
        if cands:
            best = max(cands, key=lambda d: (conf[d], iou[l, d], -d))
            matched += 1
            correct += int(int(cls[best]) == int(labelsn[l, 0]))
    return matched, correct


# ---------------------------------------------------------------- main

def run_dataset(name, nc, n_img, n_rows, seed, out: Path):
    rng = np.random.default_rng(seed)
    class_pool = np.arange(nc) if nc <= 5 else rng.choice(nc, 24, replace=False)
    agn_classes = list(range(0, nc, 3)) if nc > 5 else [0, 2]
    kinds = ["normal"] * n_img
    kinds[3], kinds[11], kinds[16] = "nolabels", "nopreds", "nolabels"

    tensors, images = {}, []
    stats, stats_agn = [], []
    cm = ConfusionMatrix(nc=nc)
    seen, acc_m, acc_c, rejected = 0, 0, 0, {}
    used_conf: dict[int, set] = {}

    for i, kind in enumerate(kinds):
        for _attempt in range(500):
            pred, labels, img0, ratio_pad = gen_image(rng, nc, n_rows, class_pool, kind)
            pt = torch.from_numpy(pred)[None]
            outs = {}
            for key, cfg in NMS.items():
                classes = agn_classes if key == "agn" else None
                outs[key] = non_max_suppression(pt.clone(), classes=classes, **cfg)[0]
            predn = outs["val"].clone()
            scale_boxes(IMG1, predn[:, :4], img0, ratio_pad)
            labelsn = torch.from_numpy(labels)
            conf_cls = [(int(c), float(v)) for v, c in zip(predn[:, 4].numpy(), predn[:, 5].numpy())]
            cross = len(set(conf_cls)) != len(conf_cls) or any(v in used_conf.get(c, ()) for c, v in conf_cls)
            why = "nms" if nms_conf_tied(pred) else "match" if matches_tied(predn, labelsn) else "ap" if cross else None
            if why:
                rejected[why] = rejected.get(why, 0) + 1
                continue
            break
        else:
            raise SystemExit(f"{name} image {i}: no tie-free draw in 500 tries")
        for c, v in conf_cls:
            used_conf.setdefault(c, set()).add(v)

        # ---- val.py's per-image block, verbatim logic (single_cls=False, plots=True)
        pred_v = outs["val"]
        nl, npr = labelsn.shape[0], pred_v.shape[0]
        correct = torch.zeros(npr, len(IOUV), dtype=torch.bool)
        correct_agn = torch.zeros(npr, len(IOUV), dtype=torch.bool)
        seen += 1
        if npr == 0:
            if nl:
                stats.append((correct, *torch.zeros((2, 0)), labelsn[:, 0]))
                stats_agn.append((correct_agn, *torch.zeros((2, 0)), labelsn[:, 0] * 0))
                cm.process_batch(detections=None, labels=labelsn[:, 0])
        else:
            if nl:
                correct = process_batch(predn, labelsn, IOUV)
                cm.process_batch(predn, labelsn)
                p0, l0 = predn.clone(), labelsn.clone()
                p0[:, 5], l0[:, 0] = 0, 0
                correct_agn = process_batch(p0, l0, IOUV)
                m, c = class_accuracy(predn, labelsn)
                acc_m, acc_c = acc_m + m, acc_c + c
            stats.append((correct, pred_v[:, 4], pred_v[:, 5], labelsn[:, 0]))
            stats_agn.append((correct_agn, pred_v[:, 4], pred_v[:, 5] * 0, labelsn[:, 0] * 0))

        k = f"img{i:02d}"
        tensors[f"{k}_pred"] = pred
        tensors[f"{k}_labels"] = labels
        for key in NMS:
            tensors[f"{k}_nms_{key}"] = outs[key].numpy().astype(np.float32)
        tensors[f"{k}_predn"] = predn.numpy()
        tensors[f"{k}_correct"] = (correct.numpy().astype(np.uint8) | (correct_agn.numpy().astype(np.uint8) << 1))
        images.append(dict(kind=kind, img0=list(img0), img1=list(IMG1), ratio_pad=[list(ratio_pad[0]), list(ratio_pad[1])],
                           nl=int(nl), n_pred=int(npr), n_rows=int(pred.shape[0])))

    # ---- val.py's "Compute metrics"
    captured = {}
    orig_smooth, orig_pr, orig_mc = ym.smooth, ym.plot_pr_curve, ym.plot_mc_curve

    def smooth_spy(y, f=0.05):
        out_ = orig_smooth(y, f)
        captured["best_index"] = int(out_.argmax())
        return out_

    ym.smooth = smooth_spy
    ym.plot_pr_curve = lambda px, py, ap, save_dir=None, names=(): captured.update(py=np.stack(py, 0) if py else None)
    ym.plot_mc_curve = lambda px, py, save_dir=None, names=(), xlabel="", ylabel="": captured.update({ylabel: py})
    try:
        st = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
        tp, fp, p, r, f1, ap, ap_class = ap_per_class(*st, plot=True, save_dir=out, names={})
        ap50, apm = ap[:, 0], ap.mean(1)
        mp, mr, map50, map_ = p.mean(), r.mean(), ap50.mean(), apm.mean()
    finally:
        ym.smooth, ym.plot_pr_curve, ym.plot_mc_curve = orig_smooth, orig_pr, orig_mc
    sta = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats_agn)]
    agn_map50 = float(ap_per_class(*sta, names={})[5][:, 0].mean()) if sta[0].any() else 0.0
    assert st[0].any(), "fixture should have true positives"
    nt = np.bincount(st[3].astype(int), minlength=nc)

    tensors.update(confusion=cm.matrix.astype(np.float64), ap=ap, p=p, r=r, f1=f1, tp=tp, fp=fp,
                   ap_class=ap_class.astype(np.int64))
    if nc <= 5:
        tensors.update(py=captured["py"], p_curve=captured["Precision"], r_curve=captured["Recall"],
                       f1_curve=captured["F1"])
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(out / f"{name}.safetensors"))
    meta = dict(
        name=name, nc=nc, seed=seed, rejected_draws=rejected, images=images,
        nms={k: dict(v, classes=(agn_classes if k == "agn" else None)) for k, v in NMS.items()},
        iouv=[float(v) for v in IOUV],
        results=dict(mp=float(mp), mr=float(mr), map50=float(map50), map=float(map_), seen=seen,
                     nt=[int(v) for v in nt], instances=int(nt.sum()), best_index=captured["best_index"],
                     ap50=[float(v) for v in ap50], ap50_95=[float(v) for v in apm],
                     agnostic_map50=agn_map50, class_acc=dict(matched=acc_m, correct=acc_c)),
        versions=dict(yolov5=yolov5.__version__, torch=torch.__version__, numpy=np.__version__),
    )
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: mp {mp:.6f} mr {mr:.6f} map50 {map50:.6f} map {map_:.6f} agn50 {agn_map50:.6f} "
          f"acc {acc_c}/{acc_m} rejected {rejected} nms_val rows "
          f"{sum(im['n_pred'] for im in images)}")


def interp_cases(out: Path, seed=7003):
    """np.interp on the shapes ap_per_class feeds it: duplicates, exact hits, outside."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in [1, 2, 3, 5, 8, 40]:
        for _ in range(3):
            xp = np.sort(np.round(rng.uniform(-1, 1, n), 2))  # rounding makes duplicates
            fp = rng.uniform(0, 1, n)
            x = np.concatenate([rng.uniform(-1.2, 1.2, 30), xp, [-1.5, 1.5]])
            left = [None, 0.0, 1.0][len(cases) % 3]
            y = np.interp(x, xp, fp, left=left)
            cases.append(dict(xp=xp.tolist(), fp=fp.tolist(), x=x.tolist(), left=left, y=y.tolist()))
    (out / "interp_cases.json").write_text(json.dumps(cases) + "\n")


def edge_cases(out: Path):
    """Small hand-made cases: exact ties in lists numpy/torch sort stably (<= 3 matches,
    <= 16 NMS candidates), and the class-offset NMS when coordinates span > 7680 px."""
    nms_cases = []

    def nms_case(name, rows, **cfg):
        pred = np.array(rows, dtype=np.float32)
        out_ = non_max_suppression(torch.from_numpy(pred)[None].clone(), **cfg)[0]
        nms_cases.append(dict(name=name, pred=pred.tolist(), cfg=cfg, out=out_.numpy().tolist()))

    # equal confidences: kept in candidate order (torch sorts <= 16 elements stably)
    nms_case("equal_conf", [[100, 100, 50, 50, 0.8, 0.5, 0.5, 0.1], [104, 100, 50, 50, 0.8, 0.5, 0.5, 0.1],
                            [300, 300, 40, 40, 0.8, 0.1, 0.5, 0.5]],
             conf_thres=0.001, iou_thres=0.6, multi_label=True, max_det=300)
    # class 1 at (20, 120) is offset by 7680 onto a class-0 box at (7700, 7800): YOLOv5 lets them
    # suppress each other (coordinates span > 7680 px)
    nms_case("offset_collision", [[7700, 7800, 60, 60, 0.9, 0.9, 0.1], [20, 120, 60, 60, 0.8, 0.1, 0.9],
                                  [20, 300, 60, 60, 0.7, 0.1, 0.9]],
             conf_thres=0.25, iou_thres=0.45, multi_label=False, max_det=300)
    # IoU 1/3 in f32 (0.33333334) vs iou_thres 1/3 as a double: torchvision suppresses
    nms_case("iou_equal_threshold", [[50, 50, 20, 20, 0.9, 1.0], [60, 50, 20, 20, 0.8, 1.0]],
             conf_thres=0.25, iou_thres=1 / 3, multi_label=False, max_det=300)

    match_cases = []

    def match_case(name, dets, labels, nc):
        d = torch.tensor(dets, dtype=torch.float32).reshape(-1, 6)
        lb = torch.tensor(labels, dtype=torch.float32).reshape(-1, 5)
        cm = ConfusionMatrix(nc=nc)
        cm.process_batch(d, lb)
        corr = process_batch(d, lb, IOUV).numpy()
        match_cases.append(dict(name=name, nc=nc, detections=d.tolist(), labels=lb.tolist(),
                                correct=corr.astype(int).tolist(), confusion=cm.matrix.astype(int).tolist()))

    # one box emitted for two classes (multi-label) on one label: equal IoUs, 2 matches
    match_case("cm_multilabel_tie", [[10, 10, 50, 50, 0.9, 0], [10, 10, 50, 50, 0.6, 1]], [[1, 12, 10, 50, 52]], 2)
    # det 0 has equal IoU (0.818) with two same-class labels, det 1 overlaps only label 1 (0.667):
    # 3 matches; stable-then-reversed makes det 0 take label 1, which then keeps det 0
    match_case("pb_label_tie", [[2, 0, 22, 10, 0.9, 0], [8, 0, 28, 10, 0.8, 0]],
               [[0, 0, 0, 20, 10], [0, 4, 0, 24, 10]], 1)
    # one class-1 detection with equal IoU to a class-0 and a class-1 label
    match_case("cm_label_tie", [[2, 0, 22, 10, 0.9, 1]], [[0, 0, 0, 20, 10], [1, 4, 0, 24, 10]], 2)
    (out / "edge_cases.json").write_text(json.dumps(dict(nms=nms_cases, matching=match_cases)) + "\n")


def main():
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--out", default="tests/fixtures/metrics")
    args = ap_.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, nc, n_img, n_rows, seed in DATASETS:
        run_dataset(name, nc, n_img, n_rows, seed, out)
    interp_cases(out)
    edge_cases(out)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
