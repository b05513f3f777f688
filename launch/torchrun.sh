#!/usr/bin/env bash
# Train on every GPU of this node (or N CPU processes) with the same entry point as a single run:
#
#   launch/torchrun.sh experiment=cpu_demo                 # all local GPUs
#   NPROC=4 launch/torchrun.sh model=llama_125m parallel=ddp
#
# Everything after the script name is a Hydra override for megalite-train.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi

# On CPU each rank gets an equal share of the cores instead of all of them.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi

exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node="$NPROC" -m megalite.train "$@"
