#!/usr/bin/env bash
# Time N speedrun runs on all visible GPUs, collect their logs in OUTDIR and summarise them.
#
#   ./run.sh [N] [OUTDIR] [train_gpt.py options...]
#   ./run.sh                          one run, logs in records/<today>_run
#   ./run.sh 4 records/my_change      four runs
#   ./run.sh 3 records/x --preset=smoke
#
# Paths are relative to the repository root. NGPU=K overrides the GPU count (default: every GPU
# torch can see, so CUDA_VISIBLE_DEVICES is respected).
set -euo pipefail

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

cd "$(dirname "$0")"

num_runs=1
if [[ $# -gt 0 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -gt 0 && "$1" != -* ]]; then
    if ! [[ "$1" =~ ^[0-9]+$ ]] || (( 10#$1 < 1 )); then
        echo "error: N must be a positive whole number of runs, got '$1'" >&2
        echo "usage: ./run.sh [N] [OUTDIR] [train_gpt.py options...]  (./run.sh --help for more)" >&2
        exit 2
    fi
    num_runs=$((10#$1))
    shift
fi
out_dir="records/$(date +%F)_run"
if [[ $# -gt 0 && "$1" != -* ]]; then
    out_dir="$1"
    shift
fi

if [[ -n "${NGPU:-}" ]]; then
    if ! [[ "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NGPU must be a positive whole number, got '$NGPU'" >&2
        exit 2
    fi
    num_gpus=$NGPU
else
    num_gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    if (( num_gpus < 1 )); then
        echo "error: no CUDA GPU visible (set NGPU to override)" >&2
        exit 1
    fi
fi

# NVLink multicast (NVLS) is off on the machines these runs target.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1

mkdir -p "$out_dir"
earlier_logs=$(find "$out_dir" -maxdepth 1 -name '*.txt' | wc -l)
if (( earlier_logs > 0 )); then
    echo "note: $out_dir already holds $earlier_logs log(s); the summary includes them"
fi

for ((run = 1; run <= num_runs; run++)); do
    echo "=== run $run/$num_runs on $num_gpus GPU(s), logs in $out_dir ==="
    torchrun --standalone --nproc_per_node="$num_gpus" train_gpt.py --log_dir="$out_dir" "$@"
done

python3 records/stats.py "$out_dir"
