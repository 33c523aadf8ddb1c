#!/usr/bin/env python3
"""Issue 11's --freeze benchmark: freezesplit against the PyTorch cached peer, per N.

For each freeze boundary N (default 24, 20, 17, 13, 10) and each repetition, in
interleaved order (ours N, peer N, ours next N, ...) so that the machine's drift hits
both sides alike:
* freezesplit: ``inspect --freeze N --json`` (cache bytes per image, f16; trainable
  parameters), then ``train --freeze N --epochs E`` on an already filled cache (the
  fill, if any, is timed apart by the tool and reported), under GNU time: seconds of
  training and of validation per epoch (from the epoch lines), peak RSS, final val
  mAP50-95;
* the peer: ``tools/peer_cached_train.py --freeze N --epochs E --json`` (training
  seconds per epoch, peak RSS of training; no validation: its ``--val`` is yolov5's
  full-model val.run, another job).
Prints one row per (side, N) with the median over repetitions of each epoch's
median, and the load average before each run. Standard library only.

Usage (repository root; the peer needs .venv-tools, see tools/README.md):
    python3 tools/bench_freeze.py --bin target/debug/freezesplit --freeze 24,17,10 --epochs 2 --reps 2
    python3 tools/bench_freeze.py --epochs 30 --no-peer          # the 30-epoch accuracy column
    python3 tools/bench_freeze.py --freeze 20,10 --precision bf16,f32 --reps 2   # train's --precision, both
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"mAP50-95 ([0-9.]+) .*\(([0-9.]+)s train \+ ([0-9.]+)s val\)")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(cmd: list[str], env=None) -> tuple[str, int]:
    """Runs cmd under GNU time; returns (stdout+stderr, peak RSS in MB)."""
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *cmd], capture_output=True, text=True, env=env)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {p.returncode}:\n{out[-3000:]}")
    rss = int(re.findall(r"PEAK_RSS_KB (\d+)", out)[-1]) // 1024
    return out, rss


def ours(a, n: int, runs: Path, rep: int, precision: str) -> dict:
    info = json.loads(subprocess.run([a.bin, "inspect", a.weights, "--freeze", str(n), "--json"], capture_output=True, text=True, check=True).stdout)
    cut = info["freeze"]
    out, rss = timed([a.bin, "train", "--weights", a.weights, "--data", a.data, "--freeze", str(n), "--epochs", str(a.epochs),
                      "--batch-size", "16", "--precision", precision, *(["--cache-dir", a.cache_dir] if a.cache_dir else []), "--project", str(runs),
                      "--name", f"n{n}-{precision}-r{rep}", "--exist-ok"])
    rows = [(float(m), float(t), float(v)) for m, t, v in EPOCH_LINE.findall(out)]
    if not rows:
        sys.exit(f"error: no epoch lines in freezesplit's output:\n{out[-3000:]}")
    return {"train_s": statistics.median(r[1] for r in rows), "val_s": statistics.median(r[2] for r in rows),
            "rss_mb": rss, "map": rows[-1][0], "bytes": cut["bytes_per_image_f16"], "params": cut["trainable_params"]}


def peer(a, n: int) -> dict:
    py = str(ROOT / ".venv-tools" / "bin" / "python")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # no busy-waiting threads stealing the other side's cores
    out, _ = timed([py, str(ROOT / "tools" / "peer_cached_train.py"), "--weights", a.pt, "--data", a.data, "--freeze", str(n),
                    "--epochs", str(a.epochs), "--json"], env=env)
    s = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    ep = s["epochs"]
    return {"train_s": statistics.median(e["train_s"] for e in ep), "val_s": None, "rss_mb": round(max(e["peak_rss_mb"] for e in ep)), "map": None,
            "bytes": None, "params": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "freezesplit"))
    ap.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov5n.onnx"))
    ap.add_argument("--pt", default=str(ROOT.parent / "shared" / "models" / "yolov5n.pt"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "vehicles_openimages" / "data.yaml"))
    ap.add_argument("--freeze", default="24,20,17,13,10")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--cache-dir", help="freezesplit's cache (default: its own default)")
    ap.add_argument("--precision", default="auto", help="train's --precision; several, comma-separated (e.g. bf16,f32), each run in turn before the peer")
    a = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="bench-freeze-"))
    results: dict[tuple[str, int], list[dict]] = {}
    for rep in range(a.reps):
        for n in [int(v) for v in a.freeze.split(",")]:
            precisions = a.precision.split(",")
            label = lambda p: "freezesplit" if len(precisions) == 1 else f"ours-{p}"  # noqa: E731
            sides = [(label(p), lambda p=p: ours(a, n, runs, rep, p)) for p in precisions] + ([] if a.no_peer else [("peer", lambda: peer(a, n))])
            for side, run in sides:
                before = load()
                r = run()
                r["load"] = before
                results.setdefault((side, n), []).append(r)
                print(f"rep {rep} {side:11} N={n:2}  train {r['train_s']:7.2f} s/epoch  load before {before}", flush=True)
    print(f"\n{a.epochs} epochs per run, {a.reps} repetition(s), medians; runs in {runs}")
    print(f"{'side':11} {'N':>3} {'cache B/img':>12} {'params':>8} {'train s/ep':>10} {'val s/ep':>9} {'peak RSS MB':>11} {'mAP50-95':>9}")
    for (side, n), rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None  # noqa: E731
        fmt = lambda v, f: format("-", ">" + f.split(".")[0].rstrip("df")) if v is None else format(v, f)  # noqa: E731
        print(f"{side:11} {n:3} {fmt(rs[0]['bytes'], '12d')} {fmt(rs[0]['params'], '8d')} {fmt(med('train_s'), '10.2f')} "
              f"{fmt(med('val_s'), '9.2f')} {fmt(max(r['rss_mb'] for r in rs), '11d')} {fmt(rs[-1]['map'], '9.4f')}")


if __name__ == "__main__":
    main()
