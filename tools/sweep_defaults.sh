#!/usr/bin/env bash
# The fine-tuning-defaults sweep: one `freezesplit train` per (setting, dataset), one at
# a time, and a summary line per run.
#
#   tools/sweep_defaults.sh NAME [TRAIN ARGS...]      # e.g. box01 --lr-box 0.1
#   tools/sweep_defaults.sh --summary                 # the table of every run so far
#
# Each run: yolov5n.onnx at 640, batch 16, EPOCHS epochs (default: train's),
# --engine ort, one shared cache (CACHE, default /work/cache), run directories
# PROJECT/NAME-DATASET (default /work/runs-defaults). The datasets (DATASETS, default
# both): vehicles = vehicles_openimages (new class set, 5 classes), coco = coco128
# trained on train2017 and validated on val2017 (data_val2017.yaml, the model's own 80
# classes: plain fine-tuning). The summary reads each run's results.csv and log: best
# epoch's mAP50 and mAP50-95 (the `after` column, weights/best), fitness
# 0.1·mAP50 + 0.9·mAP50-95, the last epoch's mAP50-95 (on coco the pretrained head is
# already good and the best epoch can be the first: the last shows the damage),
# matched-box class accuracy, and the box loss of epoch 0 against the largest of
# epochs 1-4 (the rise the pretrained box rows suffer) and the last, train and val
# (the train loss is a mean over shuffled batches and moves by about 0.001 even when
# the box rows are frozen; the val loss is exact).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-"$root/../shared"}
project=${PROJECT:-/work/runs-defaults}
cache=${CACHE:-/work/cache}
bin=${BIN:-"$root/target/debug/freezesplit"}
datasets=${DATASETS:-"vehicles coco"}
epochs=${EPOCHS:+--epochs $EPOCHS}

data_of() {
  case $1 in
    vehicles) echo "$shared/data/vehicles_openimages/data.yaml" ;;
    coco) echo "$shared/data/coco128/data_val2017.yaml" ;;
    *) echo "unknown dataset $1" >&2; exit 1 ;;
  esac
}

summary_line() { # run dir
  local run=$1 log=$1/train.log
  [ -f "$run/results.csv" ] && [ -f "$log" ] || return 0
  local after50 after acc
  after50=$(awk '$1=="mAP50"{print $3}' "$log" | tail -1)
  after=$(awk '$1=="mAP50-95"{print $3}' "$log" | tail -1)
  acc=$(awk '/^matched-box class accuracy/{print $5}' "$log" | tail -1)
  [ -n "$after" ] || return 0
  awk -F, -v name="$(basename "$run")" -v m50="$after50" -v m="$after" -v acc="$acc" '
    NR==1 {next}
    {e=$1; box[e]=$2; vbox[e]=$9; last=$8; n++}
    END {
      rise=0; vrise=0; for (i=1;i<=4 && i<n;i++) { if (box[i]>rise) rise=box[i]; if (vbox[i]>vrise) vrise=vbox[i] }
      printf "%-24s %3d  %.4f  %.4f  %.4f  %.4f  %6s  %.4f %.4f %.4f  %.4f %.4f %.4f\n", name, n, m50, m, 0.1*m50+0.9*m, last, acc, box[0], rise, box[n-1], vbox[0], vrise, vbox[n-1]
    }' "$run/results.csv"
}

if [ "${1:-}" = --summary ]; then
  printf "%-24s %3s  %-6s  %-6s  %-6s  %-6s  %6s  %s\n" run ep mAP50 mAP50-95 fitness last clsacc "train box e0/max e1-4/last  val box e0/max e1-4/last"
  for run in "$project"/*/; do summary_line "${run%/}"; done
  exit 0
fi

name=$1; shift
for ds in $datasets; do
  run="$project/$name-$ds"
  if [ -f "$run/results.csv" ] && grep -q '^mAP50-95' "$run/train.log" 2>/dev/null; then
    summary_line "$run"; continue   # done before: the sweep can be restarted
  fi
  rm -rf "$run" "$project/$name-$ds.tmp"
  "$bin" train --weights "$shared/models/yolov5n.onnx" --data "$(data_of "$ds")" --batch-size 16 $epochs \
    --engine ort --cache-dir "$cache" --project "$project" --name "$name-$ds.tmp" "$@" >"$project/$name-$ds.log" 2>&1 \
    || { echo "failed: $name-$ds (see $project/$name-$ds.log)" >&2; exit 1; }
  # increment_path may have added a number; the run is named after the setting
  mv "$project/$name-$ds.tmp" "$run" && mv "$project/$name-$ds.log" "$run/train.log"
  summary_line "$run"
done
