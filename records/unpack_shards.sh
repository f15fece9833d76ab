# Sourced by measure.sh and measure_many.sh: sets `shards` to $SHARDS (default .shards) and
# unpacks each compressed corpus shard there next to itself, once.
shards=${SHARDS:-.shards}
shopt -s nullglob
for f in "$shards"/*.bin.xz; do
    [ -f "${f%.xz}" ] || xz -dk "$f"
done
