#!/usr/bin/env python3
"""What YOLOv5 does with issue 12's request "add Ambulance to the 80 COCO classes":
train.py on vehicles_openimages relabelled into COCO's 80 names plus Ambulance (81
classes), `--freeze 24`, then val.py of the result on coco128 (how much of COCO
survives) and on the vehicles val split (Ambulance's AP50). The counterpart of
`freezesplit train --add-classes` (README, "Adding classes").

    .venv-tools/bin/python tools/yolov5_add_class_peer.py --work /tmp/add81 [--epochs 30]

Writes under --work: vehicles81/ (links to the images, labels remapped Ambulance -> 80,
Bus -> 5, Car -> 2, Motorcycle -> 3, Truck -> 7, and a data.yaml with the 81 names),
coco128-81.yaml (coco128 under the same 81 names: val.py refuses a model whose class
count differs from the yaml's), coco128-80.yaml (its own 80 names, for the original
model), the train.py run, and summary.json. Uses
tools/yolov5_train.py (train.py offline, hyp.no-augmentation.yaml, --cache ram,
--device cpu, batch 16, 640) and yolov5's val.run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# vehicles_openimages' class ids -> COCO's (matched by name, as --add-classes matches them)
REMAP = {0: 80, 1: 5, 2: 2, 3: 3, 4: 7}


def coco_names() -> list[str]:
    import yaml

    names = yaml.safe_load((SHARED / "data" / "coco128" / "data.yaml").read_text())["names"]
    return [names[i] for i in range(80)] if isinstance(names, dict) else list(names)


def write_yaml(path: Path, root: Path, train: str, val: str, names: list[str]) -> None:
    lines = [f"path: {root}", f"train: {train}", f"val: {val}", f"nc: {len(names)}", "names:"]
    lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    path.write_text("\n".join(lines) + "\n")


def vehicles81(work: Path, names: list[str]) -> Path:
    src = SHARED / "data" / "vehicles_openimages"
    dst = work / "vehicles81"
    for split in ("train", "val", "test"):
        # a real folder of per-file links: yolov5 resolves the split folder's path, and a
        # linked folder would lead it to the original labels beside the original images
        imgs = dst / "images" / split
        imgs.mkdir(parents=True, exist_ok=True)
        for f in (src / "images" / split).iterdir():
            if not (imgs / f.name).exists():
                (imgs / f.name).symlink_to(f)
        out = dst / "labels" / split
        out.mkdir(parents=True, exist_ok=True)
        for f in (src / "labels" / split).glob("*.txt"):
            rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
            (out / f.name).write_text("".join(" ".join([str(REMAP[int(r[0])]), *r[1:]]) + "\n" for r in rows))
    yaml_path = dst / "data.yaml"
    write_yaml(yaml_path, dst, "images/train", "images/val", names)
    return yaml_path


def val(weights: Path, data: Path, label: str) -> dict:
    """yolov5's val.run in a child process (its globals stay clean): P, R, mAPs, and the
    Ambulance row of its per-class table where the data has that class."""
    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {str(ROOT / 'tools')!r})
import make_demo_model  # offline patches
if not hasattr(np, 'trapz'): np.trapz = np.trapezoid
from yolov5 import val
r = val.run(data={str(data)!r}, weights={str(weights)!r}, imgsz=640, batch_size=16, device='cpu', project={str(weights.parent / 'val')!r}, name={label!r}, exist_ok=True, plots=False, verbose=True)
p, rc, m50, m = (float(x) for x in r[0][:4])
print('RESULT ' + json.dumps({{'P': p, 'R': rc, 'mAP50': m50, 'mAP50-95': m, 'maps': [float(x) for x in r[1]]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"error: val.py on {data} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    # val.py's per-class table (verbose): Class Images Instances P R mAP50 mAP50-95
    rows = [ln.split() for ln in (out.stdout + out.stderr).splitlines() if ln.strip().startswith("Ambulance ")]
    r["ambulance"] = dict(zip(["images", "instances", "P", "R", "mAP50", "mAP50-95"], map(float, rows[-1][1:7]))) if rows else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=SHARED / "models" / "yolov5n.pt")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    names = coco_names() + ["Ambulance"]
    data = vehicles81(a.work, names)
    coco = a.work / "coco128-81.yaml"
    write_yaml(coco, SHARED / "data" / "coco128", "images/train2017", "images/train2017", names)
    import yolov5

    hyp = Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.no-augmentation.yaml"
    coco80 = a.work / "coco128-80.yaml"  # yolov5 resolves a relative `path` against its package, not the yaml
    write_yaml(coco80, SHARED / "data" / "coco128", "images/train2017", "images/train2017", names[:80])
    before = val(a.weights, coco80, "coco128-original")
    cmd = [sys.executable, str(ROOT / "tools" / "yolov5_train.py"), "--weights", str(a.weights), "--data", str(data), "--freeze", "24",
           "--hyp", str(hyp), "--cache", "ram", "--device", "cpu", "--epochs", str(a.epochs), "--batch-size", "16", "--img", "640",
           "--project", str(a.work / "runs"), "--name", "add81", "--workers", "2", "--exist-ok"]
    subprocess.run(cmd, check=True)
    best = a.work / "runs" / "add81" / "weights" / "best.pt"
    after = val(best, coco, "coco128-81")
    vehicles = val(best, data, "vehicles-81")
    summary = {
        "epochs": a.epochs,
        "coco128_original": {k: before[k] for k in ("P", "R", "mAP50", "mAP50-95")},
        "coco128_after": {k: after[k] for k in ("P", "R", "mAP50", "mAP50-95")},
        "vehicles_val_after": {k: vehicles[k] for k in ("P", "R", "mAP50", "mAP50-95")},
        "vehicles_val_ambulance": vehicles["ambulance"],
    }
    (a.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
