#!/usr/bin/env python3
"""YOLOv5's own train.py (PyPI `yolov5` 7.0.14), offline: the reference side of
tools/bench_train.sh.

    .venv-tools/bin/python tools/yolov5_train.py --weights yolov5n.pt --data data.yaml \
        --freeze 24 --hyp hyp.no-augmentation.yaml --cache ram --device cpu --epochs 2 ...

Every argument goes to yolov5.train.run as keyword (``--foo-bar V`` -> foo_bar=V;
numbers parsed; ``--freeze 24`` -> freeze=[24]). The offline patches (no downloads,
stand-ins for the optional integrations train.py imports, numpy 2 compatibility) are
tools/make_demo_model.py's, imported from there.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_model  # noqa: E402,F401  (applies the offline patches)
from yolov5 import train as yolov5_train  # noqa: E402


def parse(argv):
    kw, i = {}, 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("-", "_")
        val = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        i += 1 if val is True else 2
        if isinstance(val, str):
            for cast in (int, float):
                try:
                    val = cast(val)
                    break
                except ValueError:
                    pass
        kw[key] = val
    if "freeze" in kw:
        kw["freeze"] = [kw["freeze"]]
    if "img" in kw:
        kw["imgsz"] = kw.pop("img")
    return kw


def absolute_data(data: str) -> str:
    """A copy of data.yaml whose `path` is absolute: these datasets give `path`
    relative to the yaml file, YOLOv5 would resolve it against its own package."""
    import tempfile

    import yaml

    d = yaml.safe_load(Path(data).read_text())
    d["path"] = str((Path(data).resolve().parent / d.get("path", ".")).resolve())
    out = Path(tempfile.mkdtemp()) / Path(data).name
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(out)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    kw = parse(sys.argv[1:])
    kw["data"] = absolute_data(kw["data"])
    yolov5_train.run(**kw)
