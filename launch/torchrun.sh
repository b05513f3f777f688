#!/usr/bin/env bash
# Train on every GPU of this node (or N CPU processes) with the same entry point as a single run:
#
#   launch/torchrun.sh experiment=cpu_demo                 # all local GPUs
#   NPROC=4 launch/torchrun.sh model=llama_125m parallel=ddp
#   MAX_RESTARTS=0 NPROC=2 launch/torchrun.sh ...          # no elastic restarts
#
# Everything after the script name is a Hydra override for megalite-train. `megalite-launch local`
# runs the same command (`megalite-launch local --dry-run` prints it).
#
# A worker that dies takes its group down; torchrun restarts the group (up to MAX_RESTARTS times)
# and the new workers resume from the newest checkpoint, which is why runs started here default to
# train.resume=auto (an override of train.resume given here wins: Hydra keeps the last value).
# SIGUSR1 or SIGTERM to torchrun is passed to the workers: they finish the step, checkpoint,
# write <run_dir>/PREEMPTED and exit; SHUTDOWN_TIMEOUT is how long torchrun waits for that.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}

# On CPU each rank gets an equal share of the cores instead of all of them.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi
# Each rendezvous round gets its own TCP store: with torchrun's shared store, restarted workers
# can be handed stale addresses ("Gloo connectFullMesh failed ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec "${TORCHRUN:-torchrun}" \
  --standalone \
  --nproc-per-node="$NPROC" \
  --max-restarts="$MAX_RESTARTS" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
  -m megalite.train train.resume=auto "$@"
