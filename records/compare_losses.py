"""Train losses of two runs side by side, step by step, and their largest difference.

    python records/compare_losses.py LOG_A LOG_B

Reads the `progress step N/M train_loss:X ...` lines every run log holds; useful to check that a
change meant to keep the math (another world size, a kernel) trains the same.
"""
from __future__ import annotations

import re
import sys

PROGRESS = re.compile(r"^progress step (\d+)/\d+ train_loss:([0-9.]+)")


def train_losses(path: str) -> dict[int, float]:
    with open(path) as f:
        losses = {int(m.group(1)): float(m.group(2)) for m in map(PROGRESS.match, f) if m}
    if not losses:
        raise SystemExit(f"{path}: no progress lines with train_loss found")
    return losses


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python records/compare_losses.py LOG_A LOG_B")
    a, b = (train_losses(p) for p in sys.argv[1:])
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("the two logs share no steps")
    print(f"{'step':>6} {'A':>9} {'B':>9} {'B - A':>9}")
    for s in steps:
        print(f"{s:>6} {a[s]:>9.4f} {b[s]:>9.4f} {b[s] - a[s]:>+9.4f}")
    worst = max(steps, key=lambda s: abs(b[s] - a[s]))
    print(f"largest difference: {abs(b[worst] - a[worst]):.4f} at step {worst} "
          f"(over {len(steps)} steps)")


if __name__ == "__main__":
    main()
