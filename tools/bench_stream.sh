#!/usr/bin/env bash
# Out-of-memory epoch benchmark (issue 13): an epoch over a feature cache that
# is bigger than the memory the process may use, against the time to read the
# same bytes sequentially from the same disk.
#
#   tools/bench_stream.sh MODEL.onnx DATA.yaml CACHE_ROOT DTYPE LIMIT [EPOCHS]
#
# CACHE_ROOT must hold this one model's cache, already filled for the train
# split (`freezesplit cache --split train`); DATA.yaml's val split should be a
# few of the train images (the same files, so the same entries): then the
# entries under CACHE_ROOT are exactly the bytes an epoch reads. LIMIT is a
# cgroup v1 memory limit (e.g. 1500M), charged with the page cache too; needs
# root and /sys/fs/cgroup/memory. Per run, with the page cache dropped first
# (`echo 3 > /proc/sys/vm/drop_caches`; if that is refused the script says so
# and relies on the limit alone):
#   1. `cat` of every entry in storage order (by the physical block where each
#      starts, from filefrag; by inode without it), inside the cgroup;
#   2. `freezesplit train --epochs EPOCHS` (default 2) inside the cgroup: its
#      wall time (with the setup pass that checksums every entry) and each
#      epoch's train seconds.
# Prints the sequential read's MB/s, each epoch's seconds and its ratio to
# the read, and the peak RssAnon / RssFile of the trainer (sampled every
# 0.2 s from /proc/PID/status) and the cgroup's peak usage. Run it with the
# build you measure: BIN=target/debug/freezesplit by default.
set -euo pipefail
model=$1; data=$2; root=$3; dtype=$4; limit=$5; epochs=${6:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-"$repo/target/debug/freezesplit"}
cg=/sys/fs/cgroup/memory/freezesplit-bench-$$
[ -d /sys/fs/cgroup/memory ] || { echo "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory: this benchmark needs one" >&2; exit 2; }
dirs=("$root"/*/"$dtype")
[ ${#dirs[@]} -eq 1 ] && [ -d "${dirs[0]}" ] || { echo "$root must hold exactly one model's cache with a $dtype directory (found: ${dirs[*]})" >&2; exit 2; }
out=$(mktemp -d)
cleanup() { rm -rf "$out"; [ -d "$cg" ] && { cat "$cg/tasks" 2>/dev/null | while read -r p; do echo "$p" >/sys/fs/cgroup/memory/cgroup.procs; done; rmdir "$cg"; }; }
trap cleanup EXIT
mkdir "$cg"
echo "$limit" >"$cg/memory.limit_in_bytes"

# entries in storage order: by the physical block of their first extent
# (filefrag's FIEMAP), else by inode number
sync  # delayed allocation: blocks are placed at writeback
find "${dirs[0]}" -name '*.feat' -printf '%i %s %p\n' >"$out/found"
if command -v filefrag >/dev/null; then
  awk '{print $3}' "$out/found" | xargs -d '\n' filefrag -v 2>/dev/null |
    awk '/^File size of / {f = $4} /^ +0: / && f != "" {split($0, p, ":"); split(p[3], b, "."); print b[1] + 0, f; f = ""}' | sort -n >"$out/phys"
  awk 'NR == FNR {order[$2] = $1; next} {print (($3 in order) ? order[$3] : 0), $2, $3}' "$out/phys" "$out/found" | sort -n >"$out/entries"
else
  sort -n "$out/found" >"$out/entries"
fi
n=$(wc -l <"$out/entries")
bytes=$(awk '{s += $2} END {printf "%.0f", s}' "$out/entries")
echo "cache: $n entries, $bytes bytes ($(awk -v b="$bytes" -v n="$n" 'BEGIN {printf "%.0f", b / n}') bytes/entry) in ${dirs[0]}; limit $limit; $(uptime | sed 's/.*load/load/')"

drop() {
  sync
  if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo "note: dropping the page cache was refused; relying on the cgroup limit alone" >&2; fi
  echo 0 >"$cg/memory.max_usage_in_bytes" 2>/dev/null || true
}
# runs "$@" inside the cgroup
in_cg() { sh -c 'echo $$ >"$0/tasks"; exec "$@"' "$cg" "$@"; }

drop
t0=$(date +%s.%N)
awk '{print $3}' "$out/entries" | in_cg nice -n 10 xargs -d '\n' cat >/dev/null
t1=$(date +%s.%N)
seq_s=$(echo "$t1 - $t0" | bc -l)
printf 'sequential cat (storage order): %.2f s, %.0f MB/s\n' "$seq_s" "$(echo "$bytes / $seq_s / 1000000" | bc -l)"

drop
t0=$(date +%s.%N)
# not through in_cg: $! must be the process that becomes the trainer
sh -c 'echo $$ >"$0/tasks"; exec "$@"' "$cg" nice -n 10 "$bin" train --weights "$model" --data "$data" --cache-dir "$root" --dtype "$dtype" --epochs "$epochs" \
  --project "$out" --name run 2>"$out/log" >/dev/null &
pid=$!
anon=0; file=0
while kill -0 "$pid" 2>/dev/null; do
  if read -r a f < <(awk '/^RssAnon/ {a = $2} /^RssFile/ {f = $2} END {print a + 0, f + 0}' "/proc/$pid/status" 2>/dev/null); then
    [ "$a" -gt "$anon" ] && anon=$a
    [ "$f" -gt "$file" ] && file=$f
  fi
  sleep 0.2
done
wait "$pid" || { echo "train failed:" >&2; tail -20 "$out/log" >&2; exit 1; }
wall=$(echo "$(date +%s.%N) - $t0" | bc -l)
peak=$(cat "$cg/memory.max_usage_in_bytes")
grep -E '^ +[0-9]+/[0-9]+ ' "$out/log" | sed -E 's/.*\(([0-9.]+)s train \+ ([0-9.]+)s val\)/\1 \2/' >"$out/epochs"
grep -E 'epochs completed|cached .* new images' "$out/log" || true
printf 'train wall %.1f s (the rest beyond the epochs: the setup pass that checksums every entry, the validation before training, the exports)\n' "$wall"
e=0
while read -r train val; do
  printf 'epoch %d: %.2f s train (%.2f x the sequential read) + %.2f s val\n' "$e" "$train" "$(echo "$train / $seq_s" | bc -l)" "$val"
  e=$((e + 1))
done <"$out/epochs"
echo "peak RssAnon $((anon / 1024)) MB, RssFile $((file / 1024)) MB (trainer); cgroup peak $((peak >> 20)) MB; $(uptime | sed 's/.*load/load/')"
