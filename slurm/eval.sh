#!/usr/bin/env bash
# Evaluation under slurm: one task per GPU, stopped cleanly before the time limit, requeued, resumed.
#
#   sbatch slurm/eval.sh --module MODULE [ARGS...]     # runs `python -m MODULE ARGS...` in every task, MODULE one of
#                                                      # apr.commands.evaluate, apr.ood, apr.adversarial, apr.report
#   sbatch slurm/eval.sh --module apr.commands.evaluate --checkpoint runs/apr_sp/best.pt \
#       --imagenet-c /data/ImageNet-C --val /data/imagenet/val --out eval/imagenet
#   sbatch --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=16 slurm/eval.sh --module ...   # CPU-only node
#
# Or the older form, paths in environment variables and checkpoints as arguments (apr.commands.evaluate):
#   IMAGENET_C=/data/ImageNet-C IMAGENET_VAL=/data/imagenet/val OUT=eval/imagenet \
#   BASELINE=resnet50_none sbatch slurm/eval.sh runs/resnet50_none/best.pt runs/resnet50_apr_sp/best.pt
#   CIFAR_C=/data/CIFAR-10-C CIFAR=/data/cifar OUT=eval/cifar sbatch --gpus-per-node=1 --ntasks-per-node=1 \
#       slurm/eval.sh runs/wrn40_2_apr_sp/best.pt
#   IMAGENET_C=/data/ImageNet-C IMAGENET_VAL=/data/imagenet/val \
#   SUITES="imagenet-r=/data/imagenet-r imagenet-a=/data/imagenet-a imagenet-sketch=/data/sketch" \
#   MODEL=resnet50 WEIGHTS=/models/augmix_resnet50.pth.tar sbatch slurm/eval.sh runs/resnet50_apr_sp/best.pt
#
# Variables of the older form:
#   IMAGENET_C, IMAGENET_VAL  ImageNet-C root (<corruption>/<severity>/<wnid>/*.JPEG) and clean val folder
#                             (IMAGENET_VAL alone: the clean error and class list beside SUITES)
#   CIFAR_C, CIFAR            instead: folder with <corruption>.npy + labels.npy, and the CIFAR python folder
#   SUITES                    distribution-shift suites, "NAME=FOLDER ..." (imagenet-r, imagenet-a,
#                             imagenet-sketch, imagenet-v2, imagenet-c-bar, cifar10.1)
#   MODEL, WEIGHTS            third-party weights files (space-separated) of the timm architecture MODEL
#   OUT                       results folder (default: eval)
#   BASELINE                  optional: run name or results JSON to normalise CE/mCE by (default: AlexNet)
#   GPUS                      tasks (processes) to start (default: every task of the job, one per GPU)
#   BATCH_SIZE (256), BACKEND (auto: DALI where installed), WORKERS (8 per task), PRECISION (auto: bf16 on a GPU, fp32 on a CPU)
#   EXTRA_ARGS                anything else for apr.commands.evaluate, e.g. "--extra --allow-partial"
#
# Every cell is split across the tasks; rank 0 rewrites the results JSON after EVERY cell. 120 s before the
# time limit (--signal=USR1@120) every task stops, rank 0 requeues the job once, and the requeued job skips the
# finished cells. Preemption (SIGTERM): the tasks stop, slurm requeues. scancel: the tasks stop, no requeue.
# Every #SBATCH line is only a default: the same option on the sbatch command line wins. See docs/slurm.md.
#SBATCH --job-name=apr-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=06:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
PYTHON=${PYTHON:-python}

if [ "${1:-}" = "--module" ]; then
    MODULE=${2:?usage: sbatch slurm/eval.sh --module MODULE [ARGS...]}
    shift 2
    args=("$@")
else
    MODULE=apr.commands.evaluate
    if [ "$#" -lt 1 ] && [ -z "${WEIGHTS:-}" ]; then
        echo "usage: sbatch slurm/eval.sh --module MODULE [ARGS...] | sbatch slurm/eval.sh CHECKPOINT.pt [MORE.pt ...]" \
             "(paths in IMAGENET_C/IMAGENET_VAL or CIFAR_C/CIFAR, SUITES; third-party weights in MODEL/WEIGHTS)" >&2
        exit 2
    fi
    args=()
    if [ "$#" -ge 1 ]; then
        args=(--checkpoint "$@")
    fi
    if [ -n "${WEIGHTS:-}" ]; then
        # shellcheck disable=SC2206  # WEIGHTS is a space-separated list of files
        args+=(--model "${MODEL:?set MODEL to the architecture of WEIGHTS, e.g. resnet50}" --weights $WEIGHTS)
    fi
    if [ -n "${CIFAR_C:-}" ]; then
        args+=(--cifar-c "$CIFAR_C" --cifar "${CIFAR:?set CIFAR to the CIFAR python folder}")
    elif [ -n "${IMAGENET_C:-}" ] || [ -z "${SUITES:-}" ]; then
        args+=(--imagenet-c "${IMAGENET_C:?set IMAGENET_C to the ImageNet-C root}"
               --val "${IMAGENET_VAL:?set IMAGENET_VAL to the clean ImageNet val folder}")
    elif [ -n "${IMAGENET_VAL:-}" ]; then
        args+=(--val "$IMAGENET_VAL")
    elif [ -n "${CIFAR:-}" ]; then
        args+=(--cifar "$CIFAR")
    fi
    if [ -n "${SUITES:-}" ]; then
        # shellcheck disable=SC2206  # SUITES is a space-separated list of NAME=FOLDER
        args+=(--suite $SUITES)
    fi
    if [ -n "${BASELINE:-}" ]; then
        args+=(--baseline "$BASELINE")
    fi
    # shellcheck disable=SC2206  # EXTRA_ARGS is meant to split into words
    args+=(--out "${OUT:-eval}" --batch-size "${BATCH_SIZE:-256}" --backend "${BACKEND:-auto}"
           --workers "${WORKERS:-8}" --precision "${PRECISION:-auto}" ${EXTRA_ARGS:-})
fi

TASKS=${GPUS:-${SLURM_NTASKS:-1}}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $TASKS task(s) on $SLURM_NNODES node(s);" \
     "python -m $MODULE ${args[*]}"

trap 'echo "$(date "+%F %T") USR1 to the batch shell: forwarding it to every task"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'echo "$(date "+%F %T") SIGTERM: the tasks stop"' TERM
srun --kill-on-bad-exit=1 --ntasks="$TASKS" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m apr.slurm "$MODULE" "${args[@]}" &
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
