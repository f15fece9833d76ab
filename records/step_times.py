"""Median step time per schedule stage from run logs (measure.md, Protocol T).

    python records/step_times.py LOG [LOG ...] [--skip 3]

The stage borders are read from the config block every log holds, so a shortened schedule
(--num_scheduled_iterations=150 --num_extension_iterations=10) is handled like the full one.
Each step's time is the difference of consecutive `train_time` values; the first `--skip` steps
after every stage start (recompiles, allocator growth) are left out.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402

STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_time:(\d+)ms")
CONFIG_LINE = re.compile(r"^  (\w+)=(.*)$")


def read_log(path: str) -> tuple[train_gpt.Hyperparameters, dict[int, int]]:
    """Config and {n: cumulative training ms after n completed steps}."""
    fields = {f.name for f in train_gpt.dataclasses.fields(train_gpt.Hyperparameters)}
    overrides, times = {}, {}
    with open(path) as f:
        in_config = False
        for line in f:
            line = line.rstrip("\n")
            if line == "config:":
                in_config = True
                continue
            if in_config:
                m = CONFIG_LINE.match(line)
                if m and m.group(1) in fields:
                    overrides[m.group(1)] = ast.literal_eval(m.group(2))
                    continue
                in_config = False
            if m := STEP_LINE.match(line):
                times[int(m.group(1))] = int(m.group(3))
    if not overrides:
        raise SystemExit(f"{path}: no config block found (is this a train_gpt.py log?)")
    if not times:
        raise SystemExit(f"{path}: no step lines found")
    return train_gpt.Hyperparameters(**overrides), times


def stage_medians(path: str, skip: int) -> list[tuple[int, float | None]]:
    cfg, times = read_log(path)
    schedule = train_gpt.Schedule(cfg)
    per_stage: dict[int, list[int]] = {}
    for s in sorted(times):                  # times[n]: cumulative ms after n completed steps
        if s - 1 not in times and s != 1:
            continue
        step = s - 1                          # the step that took times[s] - times[s - 1]
        stage = schedule.stage_of(step)
        if step - schedule.stage_starts[stage] < skip:
            continue
        per_stage.setdefault(stage, []).append(times[s] - times.get(s - 1, 0))
    return [(len(per_stage.get(k, [])), statistics.median(per_stage[k]) if k in per_stage else None)
            for k in range(len(schedule.stage_ends))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--skip", type=int, default=3,
                        help="steps left out after each stage start (default 3)")
    args = parser.parse_args()
    rows = [(os.path.basename(p), stage_medians(p, args.skip)) for p in args.logs]
    num_stages = max(len(r) for _, r in rows)
    names = [f"stage {k + 1}" for k in range(num_stages - 1)] + ["extension"]
    print(f"{'log':<42}" + "".join(f"{n:>12}" for n in names) + "   (median ms/step, steps)")
    for name, medians in rows:
        cells = "".join(f"{'-':>12}" if m is None else f"{m:>7.1f} ({n:>2})" for n, m in medians)
        print(f"{name:<42}{cells}")


if __name__ == "__main__":
    main()
