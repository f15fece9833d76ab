#!/usr/bin/env bash
# The single-GPU measurement protocols on the shared corpus (gradient accumulation 8, so one GPU
# runs the math of eight).
#
#   records/measure.sh T|L|C|S|smoke OUTDIR [extra train_gpt.py options]
#
# Expects the compressed corpus shards (corpus_val_000000.bin.xz, corpus_train_00000N.bin.xz) in
# $SHARDS (default .shards) and unpacks them next to themselves on first use.
#   T: timing at the real shapes - 150 scheduled + 10 extension steps (stages end at 50/100/150),
#      data allowed to cycle since only the time counts.
#   L: early loss - the full schedule stopped after step 200, validation every 50 steps, no data
#      repeated (the run stops with an error rather than repeat).
#   C: the whole schedule compressed to 210 scheduled + 6 extension steps (stages end at
#      70/140/210; untie and momentum cooldown follow), validation every 70 steps, no data repeated
#      (it needs all 10 corpus train shards).
#   S: start-up - Protocol T three times, with the compile caches as a cold machine, a warm one
#      and a fresh machine with a shipped --compile_cache file find them (the log's "startup" lines
#      give the time to the first step and its phases). S_RUNS="cold warm" picks scenarios; all
#      three take about 11 minutes on one H200.
# Validation always reads the first 2,097,152 tokens of the corpus val shard.
# TRAIN_GPT (default train_gpt.py; absolute, or from the repository root) names the trainer to
# run: another checkout's, for a baseline timed back to back with this one under the same
# protocol, e.g.
#   git worktree add /tmp/at_3dfa78e 3dfa78e && TRAIN_GPT=/tmp/at_3dfa78e/train_gpt.py records/measure.sh T OUT
set -euo pipefail
cd "$(dirname "$0")/.."
protocol=${1:?usage: records/measure.sh T|L|C|S|smoke OUTDIR [options]}
outdir=${2:?usage: records/measure.sh T|L|C|S|smoke OUTDIR [options]}
shift 2
case "$protocol" in
    T|S) args=(--num_scheduled_iterations=150 --num_extension_iterations=10 --val_every=0
               --cycle_train_data=true) ;;
    L) args=(--stop_after_steps=200 --val_every=50) ;;
    C) args=(--num_scheduled_iterations=210 --num_extension_iterations=6 --val_every=70) ;;
    smoke) args=(--num_scheduled_iterations=30 --num_extension_iterations=4 --val_every=0
                 --cycle_train_data=true) ;;
    *) echo "unknown protocol '$protocol' (expected T, L, C, S or smoke)" >&2; exit 2 ;;
esac
train_gpt=${TRAIN_GPT:-train_gpt.py}
[ -f "$train_gpt" ] || { echo "TRAIN_GPT='$train_gpt': no such file (expected a checkout's train_gpt.py)" >&2; exit 2; }
source records/unpack_shards.sh
common=(--train_files="$shards/corpus_train_*.bin" --val_files="$shards/corpus_val_*.bin"
        --val_tokens=2097152 --log_dir="$outdir")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
launch() { torchrun --standalone --nproc_per_node="${NGPU:-1}" "$train_gpt" "${common[@]}" "${args[@]}" "$@"; }
if [ "$protocol" != S ]; then
    launch "$@"
    exit
fi
# cold: empty local caches (it also writes the shipped file); warm: the same caches again;
# shipped: empty local caches and the file the cold run wrote
caches="$outdir/caches" shipped_file="$outdir/compile_cache.bin"
for scenario in ${S_RUNS:-cold warm shipped}; do
    case "$scenario" in
        cold) rm -rf "$caches/local" "$shipped_file"; dir="$caches/local"; cache=(--compile_cache="$shipped_file") ;;
        warm) dir="$caches/local"; cache=() ;;
        shipped) rm -rf "$caches/fresh"; dir="$caches/fresh"; cache=(--compile_cache="$shipped_file") ;;
        *) echo "unknown S scenario '$scenario' (expected cold, warm or shipped)" >&2; exit 2 ;;
    esac
    TORCHINDUCTOR_CACHE_DIR="$dir/inductor" TRITON_CACHE_DIR="$dir/triton" \
        launch --log_dir="$outdir/$scenario" "${cache[@]}" "$@"
done
