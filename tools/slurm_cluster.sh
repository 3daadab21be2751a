#!/bin/bash
# SLURM example: MiniClustering / MaxiClustering on N nodes x 8 GPUs with accelerate launch.
#   sbatch --nodes=2 tools/slurm_cluster.sh configs/imagenet_lt_maxi.yaml runs/byol runs/maxi
# One task per node starts accelerate, which starts one process per GPU. SLURM sends SIGUSR1 to this
# script (--signal=B:...) 5 minutes before the time limit; it passes SIGTERM down (srun -> accelerate's
# agent -> every rank), every rank writes a checkpoint at the next step boundary and exits 0, and the
# job requeues itself: `--resume auto` then continues from that checkpoint. torch's agent kills ranks
# 30 s after passing a SIGTERM on, so one training step must take less than that.
# Not run here (no SLURM on the development machines); the multi-process path it launches is tested
# with two CPU ranks (tests/test_parallel.py).
#SBATCH --job-name=mcscale
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch tools/slurm_cluster.sh CONFIG ENCODER_DIR OUT_DIR [key=value ...]}
ENCODER=${2:?encoder folder written by mcscale pretrain}
OUT=${3:?run folder}
shift 3

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
NODE0=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
RESUME=()
if ls "$OUT"/ckpt-*.pt >/dev/null 2>&1; then RESUME=(--resume auto); fi

# the batch script receives the signal (B:); forward it to the launchers, which pass it to the ranks
trap 'echo "SIGUSR1: checkpointing"; kill -TERM $(jobs -p) 2>/dev/null; wait; scontrol requeue "$SLURM_JOB_ID"' USR1

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $NODE0 --main_process_port $PORT \
    --mixed_precision no --dynamo_backend no \
    -m mcscale cluster --config $CONFIG --encoder $ENCODER --out $OUT ${RESUME[*]} $*" &
wait
