#!/usr/bin/env bash
# Training benchmark: freezesplit against YOLOv5's train.py --freeze 24 on the same data.
#
#   tools/bench_train.sh WEIGHTS.onnx WEIGHTS.pt DATA.yaml [EPOCHS]
#
# freezesplit: the first epoch with a cold cache (one `train --epochs 1`), then a cold
# cache build (fresh cache dir) and EPOCHS epochs over the cache; prints wall time and
# peak RSS (GNU time). YOLOv5: train.py from the `yolov5` PyPI
# package in .venv-tools (tools/setup_tools_venv.sh), no augmentation, RAM cache, CPU.
set -euo pipefail
onnx=$1; pt=$2; data=$3; epochs=${4:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
# BIN=target/debug/freezesplit measures the dev build (opt-level 2, see Cargo.toml);
# ONLY=freezesplit or ONLY=yolov5 runs one side.
bin=${BIN:-"$root/target/release/freezesplit"}
only=${ONLY:-both}
[ "$only" = yolov5 ] || [ -x "$bin" ] || (cd "$root" && cargo build --release --bin freezesplit)

if [ "$only" != yolov5 ]; then
echo "== freezesplit: first epoch with a cold cache (cache build + 1 epoch, one command) =="
/usr/bin/time -f "first epoch: wall %e s, peak RSS %M KB" "$bin" train --weights "$onnx" --data "$data" --epochs 1 \
  --batch-size 16 --cache-dir "$out/cold" --project "$out/runs" --name first --engine auto
rm -rf "$out/cold"
echo "== freezesplit: cache build (cold) =="
/usr/bin/time -f "cache: wall %e s, peak RSS %M KB" "$bin" cache --weights "$onnx" --data "$data" --cache-dir "$out/cache" --engine auto
echo "== freezesplit: $epochs epochs over the cache =="
/usr/bin/time -f "train: wall %e s, peak RSS %M KB" "$bin" train --weights "$onnx" --data "$data" --epochs "$epochs" \
  --batch-size 16 --cache-dir "$out/cache" --project "$out/runs" --name fs
fi
[ "$only" = freezesplit ] && exit 0

echo "== YOLOv5 train.py --freeze 24 =="
py="$root/.venv-tools/bin/python"
hyps=$("$py" -c 'import yolov5, os; print(os.path.join(os.path.dirname(yolov5.__file__), "data/hyps"))')
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1 /usr/bin/time -f "yolov5: wall %e s, peak RSS %M KB" \
  "$py" "$root/tools/yolov5_train.py" --weights "$pt" --data "$data" --freeze 24 --hyp "$hyps/hyp.no-augmentation.yaml" \
  --cache ram --device cpu --epochs "$epochs" --batch-size 16 --img 640 --project "$out/runs" --name yolov5 --workers 2
echo "runs in $out/runs (freezesplit: fs/results.csv, YOLOv5: yolov5/results.csv)"
