#!/usr/bin/env python3
"""Generate the committed letterbox fixture set in tests/fixtures/letterbox/.

Creates seeded synthetic source images in ``src/`` and runs
``letterbox_reference.py --imgsz 320 --relative --save-decoded`` on them into
``ref320/``. Each image exercises a different branch of YOLOv5's
``load_image`` + ``letterbox`` (imgsz 320):

=====================  ==========  =====================================================
file                   w x h       what it exercises
=====================  ==========  =====================================================
a_landscape.jpg        300 x 200   r > 1: INTER_LINEAR enlarge to 320x214; JPEG 4:2:0
b_portrait.png         500 x 700   r < 1: INTER_AREA shrink to 229x320; odd pad (45/46)
c_wide.jpg             1000 x 90   very wide: INTER_AREA to 320x29; odd pad; JPEG 4:4:4
d_exact.png            320 x 320   r == 1: no resize, no pad
e_ceil_down.png        400 x 525   ceil(525*320/525) == 321: INTER_AREA to 244x321, then
                                   letterbox shrinks again (INTER_LINEAR) to 243x320
f_ceil_up.jpg          98 x 147    ceil(147*320/147) == 321: INTER_LINEAR to 214x321, then
                                   letterbox INTER_LINEAR again to 213x320
=====================  ==========  =====================================================

Usage:
    .venv-tools/bin/python tools/make_letterbox_fixtures.py [--out tests/fixtures/letterbox]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def textured(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """BGR uint8 image: gradients + blocky noise + shapes + a fine-noise patch."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 40 + 170 * xx / max(w - 1, 1)
    img[..., 1] = 60 + 150 * yy / max(h - 1, 1)
    img[..., 2] = 128 + 80 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    # blocky noise (compresses well in PNG, still has hard edges)
    bs = max(6, min(w, h) // 25)
    blocks = rng.integers(-40, 41, size=((h + bs - 1) // bs, (w + bs - 1) // bs, 3)).astype(np.float32)
    img += np.kron(blocks, np.ones((bs, bs, 1), np.float32))[:h, :w]
    img = np.clip(img, 0, 255).astype(np.uint8)
    # flat shapes with sharp edges
    for _ in range(8):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(max(4, min(w, h) // 10), max(5, min(w, h) // 3)))
        if kind == 0:
            cv2.circle(img, (cx, cy), s, color, -1, lineType=cv2.LINE_8)
        elif kind == 1:
            cv2.rectangle(img, (cx - s, cy - s), (cx + s, cy + s // 2), color, -1)
        else:
            pts = np.array([[cx, cy - s], [cx - s, cy + s], [cx + s, cy + s]], np.int32)
            cv2.fillPoly(img, [pts], color)
    # thin lines (1 px): sensitive to the exact interpolation weights
    for k in range(0, w, 23):
        cv2.line(img, (k, 0), (k, h - 1), (255, 255, 255), 1)
    # a patch of per-pixel noise (high frequency)
    ph, pw = min(h, 48), min(w, 48)
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    img[y0:y0 + ph, x0:x0 + pw] = rng.integers(0, 256, size=(ph, pw, 3), dtype=np.uint8)
    return img


SOURCES = [
    # name, w, h, imwrite params
    ("a_landscape.jpg", 300, 200, [cv2.IMWRITE_JPEG_QUALITY, 90]),
    ("b_portrait.png", 500, 700, [cv2.IMWRITE_PNG_COMPRESSION, 9]),
    ("c_wide.jpg", 1000, 90, [cv2.IMWRITE_JPEG_QUALITY, 90,
                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]),
    ("d_exact.png", 320, 320, [cv2.IMWRITE_PNG_COMPRESSION, 9]),
    ("e_ceil_down.png", 400, 525, [cv2.IMWRITE_PNG_COMPRESSION, 9]),
    ("f_ceil_up.jpg", 98, 147, [cv2.IMWRITE_JPEG_QUALITY, 90]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "letterbox"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    src = out / "src"
    ref = out / "ref320"
    for d in (src, ref):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    for name, w, h, params in SOURCES:
        img = textured(w, h, rng)
        assert cv2.imwrite(str(src / name), img, params), name
    cmd = [sys.executable, str(Path(__file__).with_name("letterbox_reference.py")), "--imgsz", "320",
           "--relative", "--save-decoded", "--out", str(ref), str(src)]
    subprocess.run(cmd, check=True)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size:8d}  {f.relative_to(out)}")
    print(f"total {total} bytes")
    big = [f for f in src.iterdir() if f.stat().st_size > 100_000]
    assert not big, f"source images over 100 KB: {big}"
    assert total < 1_500_000, f"fixture dir is {total} bytes (> 1.5 MB)"
    return 0


if __name__ == "__main__":
    sys.exit(main())
