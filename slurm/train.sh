#!/usr/bin/env bash
# APR training under slurm: one task per GPU on every node, saved and requeued before the time limit.
#
#   sbatch slurm/train.sh apr/configs/imagenet/resnet50_apr_sp.yaml --set data.root=/data/imagenet
#   sbatch --nodes=4 slurm/train.sh apr/configs/imagenet/resnet50_apr_sp.yaml --set data.root=/data/imagenet
#   sbatch --gpus-per-node=4 --ntasks-per-node=4 slurm/train.sh CONFIG ...      # one task per GPU
#   sbatch --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=8 slurm/train.sh CONFIG ...  # CPU-only nodes
#   sbatch --array=0-K slurm/train.sh --args-file FILE   # array task i runs line i (0-based) of FILE:
#                                                        # CONFIG [apr-train options], as shell words
#
# Every #SBATCH line below is only a default: the same option on the sbatch command line wins
# (--partition, --account, --time, --nodes, --gpus-per-node, --ntasks-per-node, --cpus-per-task ...).
#
# srun starts `python -m apr.slurm apr.commands.train ...` once per task; each task takes its rank from
# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (no torchrun), so slurm's signals reach the training
# processes on every node directly:
#   - 120 s before the time limit (--signal=USR1@120) every task saves where it stands (mid-epoch) and
#     exits 0; rank 0 then requeues the job once, and the requeued job resumes (--resume auto);
#   - preemption (SIGTERM, SIGKILL after the partition's GraceTime): every task saves and exits; slurm
#     itself requeues the job;
#   - scancel: the tasks get SIGTERM and stop; the job is not requeued; the run folder's lock is released.
#   - `scancel --signal=USR1 JOBID` = the time-limit path by hand (save, requeue); USR1 sent to this shell
#     only (`--batch`) is forwarded to the tasks.
# See docs/slurm.md.
#SBATCH --job-name=apr-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
PYTHON=${PYTHON:-python}
usage="usage: sbatch slurm/train.sh CONFIG.yaml [apr-train options] | sbatch --array=0-K slurm/train.sh --args-file FILE"

if [ "${1:-}" = "--args-file" ]; then
    ARGS_FILE=${2:?$usage}
    TASK=${SLURM_ARRAY_TASK_ID:?--args-file takes line SLURM_ARRAY_TASK_ID of FILE: submit with sbatch --array=0-K}
    # line TASK (0-based) of FILE, split into shell words (as Python's shlex.join wrote them), NUL-separated
    words=()
    while IFS= read -r -d '' word; do words+=("$word"); done < <("$PYTHON" -c '
import shlex, sys
lines = open(sys.argv[1]).read().splitlines()
i = int(sys.argv[2])
if not 0 <= i < len(lines) or not lines[i].strip():
    sys.exit(f"error: {sys.argv[1]} has no line {i} (0-based; {len(lines)} lines)")
sys.stdout.write("".join(w + "\0" for w in shlex.split(lines[i])))' "$ARGS_FILE" "$TASK")
    [ "${#words[@]}" -gt 0 ] || { echo "error: no arguments for array task $TASK in $ARGS_FILE" >&2; exit 2; }
    set -- "${words[@]}"
fi
CONFIG=${1:?$usage}
shift

TASKS_PER_NODE=${SLURM_TASKS_PER_NODE:-1}  # e.g. "8(x4)": tasks on this job's first node
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${TASKS_PER_NODE%%[(,]*}}
GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-0}
if [ "$GPUS_ON_NODE" -gt 0 ] && [ "$TASKS_PER_NODE" != "$GPUS_ON_NODE" ]; then
    echo "error: one task per GPU: this job has $GPUS_ON_NODE GPU(s) but $TASKS_PER_NODE task(s) per node;" \
         "submit with --ntasks-per-node=$GPUS_ON_NODE" >&2
    exit 2
fi
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x" \
     "$TASKS_PER_NODE task(s), $GPUS_ON_NODE GPU(s) per node, head $MASTER_ADDR:$MASTER_PORT; $CONFIG $*"

trap 'echo "$(date "+%F %T") USR1 to the batch shell: forwarding it to every task"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'echo "$(date "+%F %T") SIGTERM: the tasks save and stop"' TERM
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m apr.slurm apr.commands.train --config "$CONFIG" --resume auto --no-progress "$@" &
SRUN_PID=$!
# `wait` returns early (status > 128) when a trapped signal arrives: wait again until srun is gone
while true; do
    status=0
    wait "$SRUN_PID" || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    break
done
echo "$(date '+%F %T') srun exited with status $status"
exit "$status"
