#!/usr/bin/env python3
"""Reference implementation of YOLOv5's validation-time preprocessing.

Reproduces exactly what ``yolov5.utils.dataloaders.LoadImagesAndLabels`` does
for a non-augmented, non-rect dataset (``augment=False``, ``rect=False``):

1. ``load_image``: ``cv2.imread`` (BGR), ``r = imgsz / max(h0, w0)``; if
   ``r != 1`` resize to ``(math.ceil(w0 * r), math.ceil(h0 * r))`` with
   ``cv2.INTER_LINEAR`` when ``r > 1`` else ``cv2.INTER_AREA``.
2. ``__getitem__``: ``letterbox(img, imgsz, auto=False, scaleup=False)``
   (yolov5's own function, imported from the installed ``yolov5`` package),
   which pads with (114, 114, 114) and may resize a second time (INTER_LINEAR)
   if ``math.ceil`` made the image one pixel too large.
3. BGR -> RGB (as ``__getitem__`` does before ``torch.from_numpy``).

Note: ``val.py`` itself builds its dataloader with ``rect=True``, so there the
letterbox target is a per-batch rectangle (``batch_shapes``), not a square.
This tool reproduces the square (``rect=False``) variant only.

Usage:
    .venv-tools/bin/python tools/letterbox_reference.py --imgsz 640 --out DIR IMAGE_OR_DIR...

Writes ``DIR/<stem>.png`` (lossless RGB uint8, imgsz x imgsz) per image and
``DIR/manifest.json``: a list of
``{"source", "png", "imgsz", "ratio", "pad", "shape0", "resized", ...}``.
``--relative`` makes ``source`` relative to DIR instead of absolute.
``--save-decoded`` also writes ``<stem>.decoded.png`` (the cv2.imread pixels as
RGB, before resizing) for non-PNG sources and adds ``"decoded_png"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

# yolov5's own letterbox; importing it pulls in yolov5.utils.general (torch etc.)
from yolov5.utils.augmentations import letterbox
from yolov5.utils.dataloaders import IMG_FORMATS


def load_image(path: str, imgsz: int, augment: bool = False):
    """Copy of LoadImagesAndLabels.load_image (yolov5 7.0.14), without caching."""
    im = cv2.imread(path)  # BGR
    assert im is not None, f"Image Not Found {path}"
    h0, w0 = im.shape[:2]  # orig hw
    r = imgsz / max(h0, w0)  # ratio
    if r != 1:  # if sizes are not equal
        interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
        im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    return im, (h0, w0), im.shape[:2], r


def preprocess(path: str, imgsz: int):
    img, (h0, w0), (h, w), r = load_image(path, imgsz)
    # as __getitem__ with rect=False, augment=False
    img, ratio, pad = letterbox(img, imgsz, auto=False, scaleup=False)
    rgb = np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB
    info = {
        "imgsz": imgsz,
        "ratio": r,
        "pad": [float(pad[0]), float(pad[1])],
        "shape0": [h0, w0],
        "resized": [h, w],
        # extras: what __getitem__ returns in `shapes` and the letterbox's own ratio
        "letterbox_ratio": [float(ratio[0]), float(ratio[1])],
        # size of the image content inside the padding: (h, w) after letterbox's own resize
        "content": [int(round(h * ratio[1])), int(round(w * ratio[0]))],
        "shapes_ratio": [h / h0, w / w0],
        "interp": "none" if r == 1 else ("INTER_LINEAR" if r > 1 else "INTER_AREA"),
    }
    return rgb, info


def check_dataloader(files, out: Path, manifest, imgsz: int) -> None:
    """Cross-check against yolov5's real dataset class (in a temp dir: it writes a .cache file)."""
    import shutil
    import tempfile

    from yolov5.utils.dataloaders import LoadImagesAndLabels

    with tempfile.TemporaryDirectory() as tmp:
        imgdir = Path(tmp) / "images"
        imgdir.mkdir()
        for f in files:
            shutil.copy(f, imgdir / f.name)
        ds = LoadImagesAndLabels(str(imgdir), img_size=imgsz, augment=False, rect=False, workers=1)
        by_stem = {e["png"][:-4]: e for e in manifest}
        for i in range(len(ds)):
            img, _, path, shapes = ds[i]
            e = by_stem[Path(path).stem]
            ref = cv2.imread(str(out / e["png"]))[:, :, ::-1]  # stored RGB
            got = img.numpy().transpose(1, 2, 0)  # CHW RGB -> HWC RGB
            assert got.shape == ref.shape and (got == ref).all(), f"pixel mismatch for {path}"
            (h0, w0), ((rh, rw), pad) = shapes
            assert [h0, w0] == e["shape0"] and [rh, rw] == e["shapes_ratio"], (path, shapes, e)
            assert [float(pad[0]), float(pad[1])] == e["pad"], (path, pad, e["pad"])
        assert len(ds) == len(manifest), (len(ds), len(manifest))
    print(f"check-dataloader: {len(manifest)} images identical to yolov5 LoadImagesAndLabels output")


def collect(inputs):
    files = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.is_file():
            files.append(p)
        else:
            sys.exit(f"not found: {p}")
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--relative", action="store_true",
                    help="write 'source' relative to the output dir instead of absolute")
    ap.add_argument("--save-decoded", action="store_true",
                    help="for non-PNG sources also write <stem>.decoded.png: the exact cv2.imread pixels "
                         "(RGB) before any resize, to tell decoder differences from resize differences")
    ap.add_argument("--check-dataloader", action="store_true",
                    help="also run yolov5's LoadImagesAndLabels(augment=False, rect=False) on copies of the "
                         "inputs and assert its images and shapes equal the written references")
    ap.add_argument("inputs", nargs="+", help="image files or directories")
    a = ap.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect(a.inputs)
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        sys.exit(f"duplicate stems would overwrite each other: {sorted(dup)}")

    t0 = time.perf_counter()
    manifest = []
    for f in files:
        rgb, info = preprocess(str(f), a.imgsz)
        png = f"{f.stem}.png"
        # cv2.imwrite expects BGR; PNG is lossless so the stored pixels are exactly `rgb`
        ok = cv2.imwrite(str(out / png), np.ascontiguousarray(rgb[:, :, ::-1]),
                         [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok, f"failed to write {out / png}"
        src = os.path.relpath(f.resolve(), out.resolve()) if a.relative else str(f.resolve())
        entry = {"source": src, "png": png, **info}
        if a.save_decoded and f.suffix.lower() != ".png":
            decoded = cv2.imread(str(f))  # BGR, exactly what load_image starts from
            entry["decoded_png"] = f"{f.stem}.decoded.png"
            assert cv2.imwrite(str(out / entry["decoded_png"]), decoded, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        manifest.append(entry)
    (out / "manifest.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in manifest) + "\n]\n")
    dt = time.perf_counter() - t0
    if a.check_dataloader:
        check_dataloader(files, out, manifest, a.imgsz)
    print(f"{len(files)} images -> {out} in {dt:.2f}s ({1000 * dt / max(len(files), 1):.1f} ms/image)")


if __name__ == "__main__":
    main()
