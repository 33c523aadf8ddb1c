#!/bin/bash
# Submits the cache-filling array and the training job that waits for it.
#   DATA=... WEIGHTS=... CACHE_DIR=... examples/slurm/submit.sh [extra sbatch flags for the array]
set -euo pipefail
here=$(dirname "$0")
array=$(sbatch --parsable "$@" "$here/fill_cache.sbatch")
array=${array%%;*}   # --parsable prints JOBID[;CLUSTER]
train=$(sbatch --parsable --dependency="afterany:$array" "$here/train.sbatch")
echo "cache array job $array, training job $train (starts when every array task has ended)"
