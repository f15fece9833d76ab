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
# PRECOMPILE_PER_GPU=N (default 0: off; not with S) first compiles each group's configuration with
# train_gpt.py --compile_only, N at once per GPU: compiling is mostly CPU work, so the runs that
# follow start with their graphs in the machine's caches. Each pass runs the warm-up steps, so N
# of them must fit a GPU's memory together; their logs go to OUTDIR/.precompile. Runs and passes
# that share a GPU (PER_GPU or PRECOMPILE_PER_GPU above 1) get --compile_ahead=false.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: records/measure_many.sh L|C|T|S OUTDIR RUNS_FILE"
protocol=${1:?$usage} outdir=${2:?$usage} runs_file=${3:?$usage}
fail() { echo "measure_many.sh: $*" >&2; exit 2; }
per_gpu=${PER_GPU:-1} precompile=${PRECOMPILE_PER_GPU:-0}
case "$protocol" in
    L|C) ;;
    T|S) [ "$per_gpu" = 1 ] || fail "PER_GPU=$per_gpu with protocol $protocol: timings need a GPU each (PER_GPU=1)" ;;
    *) fail "unknown protocol '$protocol' (expected L, C, T or S)" ;;
esac
[ -f "$runs_file" ] || fail "no runs file '$runs_file'"
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || fail "GPUS='$gpus': expected the number of GPUs to use (nvidia-smi lists none)"
[[ "$per_gpu" =~ ^[1-9][0-9]*$ ]] || fail "PER_GPU='$per_gpu': expected a positive number of runs per GPU"
[[ "$precompile" =~ ^[0-9]+$ ]] || fail "PRECOMPILE_PER_GPU='$precompile': expected a number of compile passes per GPU (0: none)"
precompile=$((10#$precompile))
[ "$protocol" != S ] || [ "$precompile" = 0 ] || fail "PRECOMPILE_PER_GPU with protocol S: it measures the compiles"

mapfile -t runs < <(grep -Ev '^[[:space:]]*(#|$)' "$runs_file")
[ ${#runs[@]} -gt 0 ] || fail "'$runs_file' names no run"
declare -A count
labels=()     # GROUP.k of each run
firsts=()     # the index of each group's first run
for i in "${!runs[@]}"; do
    read -r group _ <<< "${runs[i]}"
    [[ "$group" =~ ^[A-Za-z0-9._-]+$ ]] || fail "group name '$group' in '$runs_file': expected letters, digits, '.', '_' or '-'"
    count[$group]=$((${count[$group]:-0} + 1))
    labels+=("$group.${count[$group]}")
    [ "${count[$group]}" = 1 ] && firsts+=("$i")
done

# the shards unpacked here, once, rather than by every run at the same time
source records/unpack_shards.sh
mkdir -p "$outdir"

# run_slots DIR SLOTS_PER_GPU EXTRA_OPTION INDEX...: the runs of the given indices, run i' (the
# i'-th given) in slot i' mod (GPUS x SLOTS_PER_GPU); logs under DIR; fails if one failed
run_slots() {
    local dir=$1 slots=$(($2 * gpus)) extra=$3 alone=""
    # runs that share a GPU start no --compile_ahead helper: it would need memory beside them
    [ "$2" = 1 ] || alone=--compile_ahead=false
    shift 3
    local chosen=("$@") pids=() slot status=0 finished=${extra:+compiled}
    finished=${finished:-done}
    for ((slot = 0; slot < slots && slot < ${#chosen[@]}; slot++)); do
        (
            failed=0
            for ((c = slot; c < ${#chosen[@]}; c += slots)); do
                i=${chosen[c]}
                read -r -a words <<< "${runs[i]}"     # an array: globs in the options stay as written
                gpu=$((slot % gpus)) label=${labels[i]}
                if CUDA_VISIBLE_DEVICES=$gpu records/measure.sh "$protocol" "$dir/${words[0]}" \
                        "${words[@]:1}" $extra $alone > "$dir/$label.out" 2>&1; then
                    echo "$label: $finished (GPU $gpu)"
                else
                    echo "$label: ${extra:+compile pass }FAILED with exit status $? (GPU $gpu), see $dir/$label.out"
                    failed=1
                fi
            done
            exit $failed
        ) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || status=1
    done
    return $status
}

if [ "$precompile" != 0 ]; then
    # a failed compile pass is reported; its runs then fail (or compile) on their own
    mkdir -p "$outdir/.precompile"
    run_slots "$outdir/.precompile" "$precompile" --compile_only "${firsts[@]}" || true
fi
run_slots "$outdir" "$per_gpu" "" "${!runs[@]}"
