#!/usr/bin/env python3
"""The strongest peer of ``freezesplit train --freeze N``: the same cache idea in PyTorch.

In: a YOLOv5 checkpoint (``--weights``), an Ultralytics data.yaml, the freeze boundary
N (10..24) and train.py's settings. Out (stdout): the cache fill time and size, then per
epoch the seconds of training (and of validation, with ``--val``, apart), the losses,
the peak RSS of training (the fill's apart) and the load average; with ``--json`` a
JSON summary line at the end.

What it does, train.py's way unless said:
* the model as train.py builds it for the data (``Model(ckpt yaml, nc)`` + the
  intersecting checkpoint weights: a new class count re-initialises Detect), then
  BatchNorm folded into the convs (``model.fuse()``, as the ONNX export and freezesplit
  have it: frozen layers are truly frozen, nothing drifts), layers 0..N-1 frozen;
* the train images through yolov5's own ``LoadImagesAndLabels`` with ``augment=False,
  rect=False`` (square letterbox to --imgsz, labels in letterboxed coordinates), run
  ONCE through layers 0..N-1; the crossing tensors (the outputs of layers < N that
  layers >= N read, skip connections included: N = 10 -> 4, 6, 9) are kept in RAM
  (``--cache-dtype``, f16 by default like freezesplit's cache) with the labels;
* each epoch: a seeded shuffle, batches of --batch-size crossing tensors -> layers
  N..24 (yolov5's own modules) -> yolov5's ``ComputeLoss`` -> backward; SGD from
  ``smart_optimizer`` (nesterov, 3 groups, weight decay scaled to the nominal batch 64),
  gradient accumulation to 64, warmup (max(3 epochs, 100 iterations): bias lr from
  warmup_bias_lr, momentum from warmup_momentum, accumulate from 1), linear lr schedule,
  ``clip_grad_norm_(10)``, ``ModelEMA`` after each optimizer step; hyp scaled as
  train.py does (box, cls, obj by nl, nc and imgsz);
* ``--val``: yolov5's own ``val.run`` on the EMA model every epoch, as train.py calls it
  (its val dataloader, rect, batch 2x, the full model on the val images), timed apart.

torch uses --threads threads (2: this project's machine). Timing covers the epoch's
batches only (shuffle, f16 -> f32, forward, loss, backward, optimizer, EMA).

Usage (from the repository root):
    .venv-tools/bin/python tools/peer_cached_train.py --weights ../shared/models/yolov5n.pt \
        --data ../shared/data/vehicles_openimages/data.yaml --freeze 17 --epochs 2
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a pickled yolov5 checkpoint
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_model  # noqa: E402,F401  (offline patches: no downloads, np.trapz)
from yolo_split import crossing, run_frozen, run_tail  # noqa: E402
from yolov5_train import absolute_data  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import yolov5  # noqa: E402
from yolov5 import val as yolov5_val  # noqa: E402
from yolov5.models.yolo import Model  # noqa: E402
from yolov5.utils.dataloaders import LoadImagesAndLabels, create_dataloader  # noqa: E402
from yolov5.utils.general import intersect_dicts, labels_to_class_weights  # noqa: E402
from yolov5.utils.loss import ComputeLoss  # noqa: E402
from yolov5.utils.torch_utils import ModelEMA, smart_optimizer  # noqa: E402

HYPS = Path(yolov5.__file__).parent / "data" / "hyps"
NBS = 64  # train.py's nominal batch size
_LABEL_CACHE_DIR = Path(tempfile.mkdtemp(prefix="peer-labels-"))
_cache_labels = LoadImagesAndLabels.cache_labels


def _cache_labels_elsewhere(self, path=Path("./labels.cache"), prefix=""):
    """yolov5 writes its label scan (``labels/train.cache``) beside the dataset; keep it out of ../shared."""
    return _cache_labels(self, _LABEL_CACHE_DIR / Path(path).name, prefix)


LoadImagesAndLabels.cache_labels = _cache_labels_elsewhere


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def peak_rss_mb() -> float:
    """Peak RSS since the start or the last reset_peak_rss (VmHWM; ru_maxrss where /proc lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start the peak over (Linux >= 4.0), so that training's peak is not the cache fill's."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_model(weights: Path, nc: int, names, freeze: int) -> torch.nn.Module:
    """train.py's model for this data, BN fused, layers 0..freeze-1 without gradients."""
    ckpt = torch.load(str(weights), map_location="cpu")
    model = Model(ckpt["model"].yaml, ch=3, nc=nc)
    csd = intersect_dicts(ckpt["model"].float().state_dict(), model.state_dict())
    model.load_state_dict(csd, strict=False)
    print(f"transferred {len(csd)}/{len(model.state_dict())} items from {weights}")
    model.fuse()
    # fuse_conv_and_bn copies outside no_grad, leaving non-leaf weights: make them plain leaves
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    for k, p in model.named_parameters():
        p.requires_grad = int(k.split(".")[1]) >= freeze
    model.names = names
    return model


def fill_cache(model, dataset, freeze: int, batch: int, workers: int, dtype) -> tuple[dict, list]:
    """Layers 0..freeze-1 once per image: {layer: [n, C, H, W] tensor} and per-image labels [k, 5]."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                         collate_fn=LoadImagesAndLabels.collate_fn)
    n, store, labels = len(dataset), {}, [None] * len(dataset)
    model.eval()
    at = 0
    with torch.no_grad():
        for imgs, targets, _, _ in loader:
            cross = run_frozen(model, imgs.float() / 255, freeze)
            for j, t in cross.items():
                if j not in store:
                    store[j] = torch.empty((n, *t.shape[1:]), dtype=dtype)
                store[j][at:at + t.shape[0]] = t.to(dtype)
            for b in range(imgs.shape[0]):
                labels[at + b] = targets[targets[:, 0] == b, 1:].clone()
            at += imgs.shape[0]
    return store, labels


def batch_targets(labels: list, idx) -> torch.Tensor:
    """collate_fn's layout: (image in batch, class, x, y, w, h)."""
    rows = [torch.cat((torch.full((len(labels[i]), 1), float(b)), labels[i]), 1) for b, i in enumerate(idx)]
    return torch.cat(rows) if rows else torch.zeros(0, 6)


class Schedule:
    """train.py's SGD schedule: linear lf, warmup of lr / momentum / accumulate, then nominal batch."""

    def __init__(self, hyp: dict, epochs: int, batch: int, nb: int):
        self.hyp, self.epochs, self.batch = hyp, epochs, batch
        self.nw = max(round(hyp["warmup_epochs"] * nb), 100)
        self.accumulate = max(round(NBS / batch), 1)

    def lf(self, x: float) -> float:
        return (1 - x / self.epochs) * (1.0 - self.hyp["lrf"]) + self.hyp["lrf"]

    def warmup(self, optimizer, ni: int, epoch: int) -> None:
        if ni > self.nw:
            return
        xi = [0, self.nw]
        self.accumulate = max(1, np.interp(ni, xi, [1, NBS / self.batch]).round())
        for j, x in enumerate(optimizer.param_groups):
            # bias lr falls from warmup_bias_lr to lr0, all other lrs rise from 0.0 to lr0
            x["lr"] = np.interp(ni, xi, [self.hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                         x["initial_lr"] * self.lf(epoch)])
            if "momentum" in x:
                x["momentum"] = np.interp(ni, xi, [self.hyp["warmup_momentum"], self.hyp["momentum"]])


def train_epoch(model, store, labels, state, epoch: int, batch: int, gen) -> tuple[float, torch.Tensor]:
    """One epoch over the cached crossing tensors, train.py's inner loop; (seconds, mean losses)."""
    opt, sched, ema, compute_loss = state["optimizer"], state["schedule"], state["ema"], state["loss"]
    n = len(labels)
    nb = math.ceil(n / batch)
    t0 = time.perf_counter()
    model.train()
    perm = torch.randperm(n, generator=gen)
    mloss = torch.zeros(3)
    opt.zero_grad()
    for i in range(nb):
        idx = perm[i * batch:(i + 1) * batch]
        ni = i + nb * epoch
        sched.warmup(opt, ni, epoch)
        cross = {j: t[idx].float() for j, t in store.items()}
        pred = run_tail(model, state["freeze"], cross)
        loss, loss_items = compute_loss(pred, batch_targets(labels, idx.tolist()))
        loss.backward()
        if ni - state["last_opt_step"] >= sched.accumulate:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            opt.step()
            opt.zero_grad()
            ema.update(model)
            state["last_opt_step"] = ni
        mloss = (mloss * i + loss_items) / (i + 1)
    state["scheduler"].step()
    return time.perf_counter() - t0, mloss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="../shared/models/yolov5n.pt")
    ap.add_argument("--data", default="../shared/data/vehicles_openimages/data.yaml")
    ap.add_argument("--freeze", type=int, default=24, help="layers 0..N-1 frozen (10..24)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--hyp", default=str(HYPS / "hyp.no-augmentation.yaml"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workers", type=int, default=2, help="dataloader workers for the cache fill")
    ap.add_argument("--cache-dtype", choices=("f16", "f32"), default="f16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", action="store_true", help="yolov5's val.run on the EMA model every epoch")
    ap.add_argument("--json", action="store_true", help="a JSON summary line at the end")
    a = ap.parse_args(argv)
    if not 10 <= a.freeze <= 24:
        fail(f"--freeze {a.freeze} is outside 10..24; give the number of frozen layers, as train.py's --freeze")
    for flag, p in (("--weights", a.weights), ("--data", a.data), ("--hyp", a.hyp)):
        if not Path(p).is_file():
            fail(f"{flag} {p} does not exist; give an existing file")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    data = yaml.safe_load(Path(absolute_data(a.data)).read_text())
    root = Path(data["path"])
    names = data["names"] if isinstance(data["names"], list) else [data["names"][k] for k in sorted(data["names"])]
    nc = int(data["nc"])
    hyp = yaml.safe_load(Path(a.hyp).read_text())
    model = load_model(Path(a.weights), nc, names, a.freeze)
    nl = model.model[-1].nl
    hyp["box"] *= 3 / nl  # train.py, verbatim order of operations
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (a.imgsz / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = 0.0
    model.nc, model.hyp = nc, hyp

    t0 = time.perf_counter()
    dataset = LoadImagesAndLabels(str(root / data["train"]), a.imgsz, a.batch_size, augment=False, hyp=hyp,
                                  rect=False, stride=32, pad=0.0, prefix="train: ")
    dtype = torch.float16 if a.cache_dtype == "f16" else torch.float32
    store, labels = fill_cache(model, dataset, a.freeze, a.batch_size, a.workers, dtype)
    fill_s = time.perf_counter() - t0
    per_image = sum(t[0].numel() * t.element_size() for t in store.values())
    model.class_weights = labels_to_class_weights(dataset.labels, nc) * nc
    print(f"cache: {len(labels)} images, crossing layers {crossing(model, a.freeze)}, "
          f"{per_image / 1e6:.2f} MB per image ({a.cache_dtype}), {per_image * len(labels) / 1e9:.2f} GB, "
          f"filled in {fill_s:.1f}s; peak RSS {peak_rss_mb():.0f} MB")
    fill_rss = peak_rss_mb()
    rss_reset = reset_peak_rss()

    hyp["weight_decay"] *= a.batch_size * max(round(NBS / a.batch_size), 1) / NBS
    optimizer = smart_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    schedule = Schedule(hyp, a.epochs, a.batch_size, math.ceil(len(labels) / a.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.lf)
    state = {"optimizer": optimizer, "schedule": schedule, "scheduler": scheduler, "ema": ModelEMA(model),
             "loss": ComputeLoss(model), "last_opt_step": -1, "freeze": a.freeze}
    val_loader = None
    if a.val:
        val_loader = create_dataloader(str(root / data["val"]), a.imgsz, a.batch_size * 2, 32, hyp=hyp,
                                       rect=True, workers=a.workers, pad=0.5, prefix="val: ")[0]
    gen = torch.Generator().manual_seed(a.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training layers {a.freeze}..24 ({n_train} parameters), {a.epochs} epochs, batch {a.batch_size}, "
          f"{a.threads} threads, torch {torch.__version__}, yolov5 {yolov5.__version__}")
    epochs = []
    for epoch in range(a.epochs):
        train_s, mloss = train_epoch(model, store, labels, state, epoch, a.batch_size, gen)
        row = {"epoch": epoch, "train_s": train_s, "box": float(mloss[0]), "obj": float(mloss[1]),
               "cls": float(mloss[2])}
        line = (f"{epoch}/{a.epochs - 1}  train {train_s:.2f}s  box {mloss[0]:.4f} obj {mloss[1]:.4f} "
                f"cls {mloss[2]:.4f}")
        if val_loader is not None:
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                results = yolov5_val.run(
                    data={**data, "nc": nc, "names": names}, batch_size=a.batch_size * 2, imgsz=a.imgsz,
                    half=False, model=state["ema"].ema, dataloader=val_loader, save_dir=Path(tmp),
                    plots=False, compute_loss=state["loss"], verbose=False)
            mp, mr, map50, map5095 = results[0][:4]  # (P, R, mAP50, mAP50-95, *val losses), ...
            row.update(val_s=time.perf_counter() - t1, P=mp, R=mr, mAP50=map50, mAP50_95=map5095)
            line += f"  val {row['val_s']:.2f}s P {mp:.3f} R {mr:.3f} mAP50 {map50:.3f} mAP50-95 {map5095:.3f}"
        row["peak_rss_mb"] = peak_rss_mb()
        row["load"] = os.getloadavg()[0]
        print(f"{line}  peak RSS {row['peak_rss_mb']:.0f} MB{'' if rss_reset else ' (with the fill)'}  "
              f"load {row['load']:.1f}", flush=True)
        epochs.append(row)
    if a.json:
        print(json.dumps({"freeze": a.freeze, "imgsz": a.imgsz, "batch": a.batch_size, "images": len(labels),
                          "cache_dtype": a.cache_dtype, "cache_mb_per_image": per_image / 1e6,
                          "fill_s": fill_s, "fill_peak_rss_mb": fill_rss, "train_rss_reset": rss_reset,
                          "threads": a.threads, "epochs": epochs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
