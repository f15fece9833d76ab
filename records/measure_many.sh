#!/usr/bin/env bash
# Several runs of one measurement protocol at once, spread over this machine's GPUs. A loss
# comparison needs two or more runs of every configuration; each run needs one GPU.
#
#   records/measure_many.sh L|C|T|S OUTDIR RUNS_FILE
#
# RUNS_FILE holds one run per line, a group name and then that run's train_gpt.py options,
# separated by spaces ('#' starts a comment line):
#   speedrun  --seed=0
#   speedrun  --seed=1
#   record74  --preset=record74 --seed=0
# The runs of a group log to OUTDIR/GROUP, so `records/stats.py OUTDIR/*/` compares the groups;
# the k-th run of a group prints to OUTDIR/GROUP.k.out. GPUS (default: the GPUs nvidia-smi lists)
# and PER_GPU (default 1; two C runs fit one 141 GB H200) set how many run at once: run i goes to
# slot i mod (GPUS x PER_GPU), which runs its share one after the other on GPU slot mod GPUS.
# Timings (T, S) need PER_GPU=1: runs that share a GPU slow each other down.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: records/measure_many.sh L|C|T|S OUTDIR RUNS_FILE"
protocol=${1:?$usage} outdir=${2:?$usage} runs_file=${3:?$usage}
fail() { echo "measure_many.sh: $*" >&2; exit 2; }
per_gpu=${PER_GPU:-1}
case "$protocol" in
    L|C) ;;
    T|S) [ "$per_gpu" = 1 ] || fail "PER_GPU=$per_gpu with protocol $protocol: timings need a GPU each (PER_GPU=1)" ;;
    *) fail "unknown protocol '$protocol' (expected L, C, T or S)" ;;
esac
[ -f "$runs_file" ] || fail "no runs file '$runs_file'"
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || fail "GPUS='$gpus': expected the number of GPUs to use (nvidia-smi lists none)"
[[ "$per_gpu" =~ ^[1-9][0-9]*$ ]] || fail "PER_GPU='$per_gpu': expected a positive number of runs per GPU"

mapfile -t runs < <(grep -Ev '^[[:space:]]*(#|$)' "$runs_file")
[ ${#runs[@]} -gt 0 ] || fail "'$runs_file' names no run"
declare -A count
labels=()     # GROUP.k of each run
for line in "${runs[@]}"; do
    read -r group _ <<< "$line"
    [[ "$group" =~ ^[A-Za-z0-9._-]+$ ]] || fail "group name '$group' in '$runs_file': expected letters, digits, '.', '_' or '-'"
    count[$group]=$((${count[$group]:-0} + 1))
    labels+=("$group.${count[$group]}")
done

# the shards unpacked here, once, rather than by every run at the same time
source records/unpack_shards.sh
mkdir -p "$outdir"

slots=$((gpus * per_gpu))
pids=()
for ((slot = 0; slot < slots && slot < ${#runs[@]}; slot++)); do
    (
        failed=0
        for ((i = slot; i < ${#runs[@]}; i += slots)); do
            read -r -a words <<< "${runs[i]}"     # an array: globs in the options stay as written
            gpu=$((slot % gpus)) label=${labels[i]}
            if CUDA_VISIBLE_DEVICES=$gpu records/measure.sh "$protocol" "$outdir/${words[0]}" \
                    "${words[@]:1}" > "$outdir/$label.out" 2>&1; then
                echo "$label: done (GPU $gpu)"
            else
                echo "$label: FAILED with exit status $? (GPU $gpu), see $outdir/$label.out"
                failed=1
            fi
        done
        exit $failed
    ) &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
