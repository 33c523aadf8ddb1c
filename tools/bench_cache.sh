#!/usr/bin/env bash
# Cache-fill benchmark (issue 2): `freezesplit cache` with ort against the bare
# ORT loop over already-letterboxed tensors (tools/bench_engine.rs), on the same
# images, run in turns so that drift in the machine's speed hits both alike.
#
#   tools/bench_cache.sh MODEL.onnx DATA.yaml IMAGE_DIR [ROUNDS]
#
# Per round: the bare loop (1 session, all cores, spinning; the engine's best
# setting), then a cold `cache` (fresh directory) of the yaml's train split.
# Prints each run's images/s and CPU seconds per image, then the medians and
# the ratio cache/bare. Needs the release build with the tools feature:
#   cargo build --release --features tools --bins --examples
set -euo pipefail
model=$1; data=$2; images=$3; rounds=${4:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-"$root/target/release/freezesplit"}
bench=${BENCH:-"$root/target/release/examples/bench_engine"}
n=$(find "$images" -maxdepth 1 -type f | wc -l)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bare=(); cache=()
for r in $(seq "$rounds"); do
  line=$(/usr/bin/time -f "cpu %U %S" "$bench" "$model" "$images" ort "$n" "${BARE_BATCH:-8}" 2>"$out/t")
  rate=$(sed -E 's/.*: ([0-9.]+) images\/s.*/\1/' <<<"$line")
  echo "round $r bare : $line; $(cat "$out/t")"
  bare+=("$rate")
  rm -rf "$out/cache"
  /usr/bin/time -f "cpu %U %S" "$bin" cache --weights "$model" --data "$data" --split train --engine ort --device cpu \
    --cache-dir "$out/cache" --json >"$out/j" 2>"$out/t"
  rate=$(python3 -c 'import json,sys; r=list(json.load(open(sys.argv[1]))["splits"].values())[0]; print(round(r["computed"]/r["seconds"], 1))' "$out/j")
  echo "round $r cache: $rate images/s; $(tail -1 "$out/t")"
  cache+=("$rate")
done
python3 - "${bare[*]}" "${cache[*]}" <<'EOF'
import statistics, sys
b = [float(v) for v in sys.argv[1].split()]
c = [float(v) for v in sys.argv[2].split()]
mb, mc = statistics.median(b), statistics.median(c)
print(f"median bare {mb:.1f} images/s, cache {mc:.1f} images/s, ratio {mc / mb:.3f}")
print("paired ratios:", " ".join(f"{y / x:.3f}" for x, y in zip(b, c)))
EOF
