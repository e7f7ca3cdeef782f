#!/usr/bin/env bash
# Evaluate trained checkpoints on ImageNet-C (or CIFAR-10-C / CIFAR-100-C) with all GPUs of one node.
#
# Every corruption cell is split across the GPUs (torchrun, one process per GPU); rank 0 writes one
# results JSON per checkpoint into $OUT after EVERY cell, so a preempted or timed-out job loses at most
# one cell: resubmit the same command (or let --requeue do it) and finished cells are skipped (cells whose
# files changed since, or that come from another tree, are evaluated again; the log names them).
# After the last checkpoint, $OUT/report.md (tables + plots) is written.
#
# Usage (paths through environment variables, checkpoints as arguments):
#   IMAGENET_C=/data/ImageNet-C IMAGENET_VAL=/data/imagenet/val OUT=eval/imagenet \
#   BASELINE=resnet50_none sbatch slurm/eval.sh runs/resnet50_none/best.pt runs/resnet50_apr_sp/best.pt
#
#   CIFAR_C=/data/CIFAR-10-C CIFAR=/data/cifar OUT=eval/cifar sbatch --gpus-per-node=1 slurm/eval.sh runs/wrn40_2_apr_sp/best.pt
#
#   # distribution-shift suites, and a released third-party ResNet-50 beside a project checkpoint
#   IMAGENET_C=/data/ImageNet-C IMAGENET_VAL=/data/imagenet/val \
#   SUITES="imagenet-r=/data/imagenet-r imagenet-a=/data/imagenet-a imagenet-sketch=/data/sketch" \
#   MODEL=resnet50 WEIGHTS=/models/augmix_resnet50.pth.tar sbatch slurm/eval.sh runs/resnet50_apr_sp/best.pt
#
# Variables:
#   IMAGENET_C, IMAGENET_VAL  ImageNet-C root (<corruption>/<severity>/<wnid>/*.JPEG) and clean val folder
#                             (IMAGENET_VAL alone: the clean error and class list beside SUITES)
#   CIFAR_C, CIFAR            instead: folder with <corruption>.npy + labels.npy, and the CIFAR python folder
#   SUITES                    distribution-shift suites, "NAME=FOLDER ..." (imagenet-r, imagenet-a,
#                             imagenet-sketch, imagenet-v2, imagenet-c-bar, cifar10.1)
#   MODEL, WEIGHTS            third-party weights files (space-separated) of the timm architecture MODEL
#   OUT                       results folder (default: eval)
#   BASELINE                  optional: run name or results JSON to normalise CE/mCE by (default: AlexNet)
#   GPUS                      processes on the node (default: the GPUs slurm gave the job)
#   BATCH_SIZE (256), BACKEND (dali; torchvision where DALI is not installed), WORKERS (8 per GPU),
#   PRECISION (bf16)
#   EXTRA_ARGS                anything else for eval_imagenet_c.py, e.g. "--extra --allow-partial"
#
#SBATCH --job-name=apr-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ "$#" -lt 1 ] && [ -z "${WEIGHTS:-}" ]; then
    echo "usage: sbatch slurm/eval.sh CHECKPOINT.pt [MORE.pt ...]  (paths in IMAGENET_C/IMAGENET_VAL or CIFAR_C/CIFAR," \
         "SUITES; third-party weights in MODEL/WEIGHTS)" >&2
    exit 2
fi

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

data_args=()
if [ -n "${CIFAR_C:-}" ]; then
    data_args=(--cifar-c "$CIFAR_C" --cifar "${CIFAR:?set CIFAR to the CIFAR python folder}")
elif [ -n "${IMAGENET_C:-}" ] || [ -z "${SUITES:-}" ]; then
    data_args=(--imagenet-c "${IMAGENET_C:?set IMAGENET_C to the ImageNet-C root}"
               --val "${IMAGENET_VAL:?set IMAGENET_VAL to the clean ImageNet val folder}")
elif [ -n "${IMAGENET_VAL:-}" ]; then
    data_args=(--val "$IMAGENET_VAL")
elif [ -n "${CIFAR:-}" ]; then
    data_args=(--cifar "$CIFAR")
fi
model_args=()
if [ "$#" -ge 1 ]; then
    model_args=(--checkpoint "$@")
fi
if [ -n "${WEIGHTS:-}" ]; then
    # shellcheck disable=SC2206  # WEIGHTS is a space-separated list of files
    model_args+=(--model "${MODEL:?set MODEL to the architecture of WEIGHTS, e.g. resnet50}" --weights $WEIGHTS)
fi
if [ -n "${SUITES:-}" ]; then
    # shellcheck disable=SC2206  # SUITES is a space-separated list of NAME=FOLDER
    data_args+=(--suite $SUITES)
fi
# (expanded as ${a[@]+"${a[@]}"}: under set -u, bash < 4.4 calls an empty array unbound)
baseline_args=()
if [ -n "${BASELINE:-}" ]; then
    baseline_args=(--baseline "$BASELINE")
fi

# GPUs of this job: SLURM_GPUS_ON_NODE (newer slurm) or the CUDA_VISIBLE_DEVICES list slurm sets.
if [ -z "${GPUS:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        GPUS=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | wc -l)
    else
        GPUS=1
    fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "apr eval: $# checkpoint(s) ${WEIGHTS:+and weights $WEIGHTS }on $GPUS GPU(s) of $(hostname), results in ${OUT:-eval}"
# --standalone: a single-node rendezvous on a free local port (no head-node address needed).
# shellcheck disable=SC2086  # EXTRA_ARGS is meant to split into words
srun --ntasks=1 torchrun --standalone --nnodes 1 --nproc_per_node "$GPUS" \
    eval_imagenet_c.py "${model_args[@]}" ${data_args[@]+"${data_args[@]}"} --out "${OUT:-eval}" ${baseline_args[@]+"${baseline_args[@]}"} \
    --batch-size "${BATCH_SIZE:-256}" --backend "${BACKEND:-dali}" --workers "${WORKERS:-8}" \
    --precision "${PRECISION:-bf16}" ${EXTRA_ARGS:-}
