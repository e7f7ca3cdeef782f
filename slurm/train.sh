#!/usr/bin/env bash
# Multi-node APR training under slurm, with preemption-safe requeue.
#
#   sbatch slurm/train.sh configs/imagenet/resnet50_apr_sp.yaml [--set data.root=/data/imagenet ...]
#   sbatch --nodes=4 slurm/train.sh configs/imagenet/resnet50_apr_sp.yaml
#
# Two minutes before the time limit (or on preemption) slurm sends SIGUSR1 to the batch shell;
# the trap below forwards SIGTERM to the training processes, which save a checkpoint at the
# next step and exit; the job is requeued and `--resume auto` continues from that checkpoint.
#SBATCH --job-name=apr-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch slurm/train.sh CONFIG.yaml [train_imagenet.py options]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s), head $HEAD_NODE"

requeue() {
    echo "$(date): got USR1, asking training to checkpoint and requeueing job $SLURM_JOB_ID"
    kill -TERM "$SRUN_PID" 2>/dev/null || true
    wait "$SRUN_PID" || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$PORT" \
    -m apr.commands.train --config "$CONFIG" --resume auto --no-progress "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
