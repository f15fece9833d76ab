"""Summarise speedrun logs: final val loss and train time per group of runs, with t-tests.

    python records/stats.py PATH... [--label NAME ...] [--target 3.28] [--plot curves.png]

PATH is a train_gpt.py log or a folder of them (its *.txt files, not recursive). Runs are grouped
by the folder they sit in; groups keep the order in which the paths name them, and the first group
is the baseline the others are compared with. --label names the groups, once per group in order
(default: the folder names).

From each log the LAST validation line `step:S/N val_loss:X train_time:Tms step_avg:Ams` gives the
run's final val loss X, its train time T/1000 s and its step count S (= N for a finished run).
Columns: Runs, Steps, mean and sample standard deviation (ddof=1) of time and loss, the
difference of each mean from the baseline's (+/-), p = one-sided one-sample t-test that the mean
loss is below --target (the record rule asks for p < 0.01), and Time p = Welch's two-sided t-test
of the difference in mean time from the baseline. '-' marks a value that needs more runs.
--plot draws every validation of every run (step vs val loss), one colour per group. With
--masked the masked val loss of runs with the validation mask (`val_loss_masked:Y` on the same
line) is used instead.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DEFAULT_TARGET = 3.28
NUMBER = r"(\d+\.\d+|nan|inf)"
VAL_LINE = re.compile(rf"^step:(\d+)/(\d+) val_loss:{NUMBER}(?: val_loss_masked:{NUMBER})? "
                      rf"train_time:(\d+)ms step_avg:(\d+\.\d+)ms$")


class StatsError(ValueError):
    """Input that cannot be summarised; the message names it."""


# =================================================================================================
# Student's t distribution
# =================================================================================================
# P(T <= t) for T ~ t(dof) is 1 - I_x(dof/2, 1/2) / 2 for t >= 0 (mirrored for t < 0) with
# x = dof / (dof + t^2), where I is the regularized incomplete beta function. I is evaluated by its
# continued fraction (modified Lentz), which converges fast for x < (a+1)/(a+b+2); above that the
# symmetry I_x(a, b) = 1 - I_{1-x}(b, a) brings x back into that range.

_TINY = 1e-300


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))) with the d_n of the incomplete beta expansion."""
    f = c = _TINY
    d = 0.0
    for n in range(1, 10_000):
        if n == 1:
            numerator = 1.0
        else:
            k = n - 1
            if k % 2 == 1:
                m = (k - 1) // 2
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:
                m = k // 2
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + numerator / c
        c = c if abs(c) > _TINY else _TINY
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < 1e-15:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    front = math.exp(log_front)  # x^a (1-x)^b / B(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t distribution with dof > 0 degrees of freedom (any real dof)."""
    if math.isnan(t) or not dof > 0:
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(dof / (dof + t * t), dof / 2.0, 0.5)  # P(T <= -|t|)
    return tail if t < 0 else 1.0 - tail


def _ratio(difference: float, scale: float) -> float:
    """difference / scale, where a zero scale gives +-inf (or nan for 0/0) instead of an exception."""
    if scale > 0:
        return difference / scale
    return math.copysign(math.inf, difference) if difference else math.nan


def one_sample_t_test(values: Sequence[float], target: float) -> tuple[float, float]:
    """(t, p) of the one-sided test that the mean is below target: t = (mean - target) / (s / sqrt(n)),
    p = P(T <= t) with n - 1 dof. Both are nan for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    t = _ratio(float(np.mean(values)) - target, float(np.std(values, ddof=1)) / math.sqrt(n))
    return t, t_cdf(t, n - 1)


def welch_t_test(baseline: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """(t, dof, p) of Welch's two-sided test that mean(other) differs from mean(baseline); the dof is
    Welch-Satterthwaite's. All nan unless both samples have at least two values."""
    n_a, n_b = len(baseline), len(other)
    if n_a < 2 or n_b < 2:
        return math.nan, math.nan, math.nan
    var_a = float(np.var(baseline, ddof=1)) / n_a  # squared standard errors of the two means
    var_b = float(np.var(other, ddof=1)) / n_b
    se2 = var_a + var_b
    t = _ratio(float(np.mean(other)) - float(np.mean(baseline)), math.sqrt(se2))
    if se2 == 0:
        return t, math.nan, (math.nan if math.isnan(t) else 0.0)
    dof = se2 ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    return t, dof, 2.0 * t_cdf(-abs(t), dof)


# =================================================================================================
# Logs
# =================================================================================================

@dataclass
class Run:
    path: str
    steps: int                 # step of the last validation
    total_steps: int           # N of `step:S/N`
    val_loss: float
    train_time_s: float
    curve: list[tuple[int, float]]   # (step, val loss) of every validation


@dataclass
class Group:
    label: str
    folder: str
    runs: list[Run] = field(default_factory=list)


def parse_log(path: str, masked: bool = False) -> Run:
    """The validations of one log; its last one gives the final loss and time. With `masked`, the
    loss is the masked validation loss (runs with the validation mask, #350)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            matches = [m for m in map(VAL_LINE.match, f.read().splitlines()) if m]
    except OSError as e:
        raise StatsError(f"{path}: cannot read ({e.strerror})") from None
    if not matches:
        raise StatsError(f"{path}: no validation line (`step:S/N val_loss:X train_time:Tms step_avg:Ams`); "
                         f"not a train_gpt.py log, or the run ended before its first validation")
    column = 4 if masked else 3
    if masked and matches[-1][4] is None:
        raise StatsError(f"{path}: no val_loss_masked (the run had no validation mask); drop --masked")
    last = matches[-1]
    return Run(path=path, steps=int(last[1]), total_steps=int(last[2]), val_loss=float(last[column]),
               train_time_s=int(last[5]) / 1000,
               curve=[(int(m[1]), float(m[column])) for m in matches if m[column] is not None])


def collect_groups(paths: Sequence[str], labels: Sequence[str] | None = None,
                   masked: bool = False) -> list[Group]:
    """Parse the logs named by paths into groups by folder, in order of first mention."""
    groups: dict[str, Group] = {}
    for path in paths:
        if os.path.isdir(path):
            folder, files = path, sorted(glob.glob(os.path.join(glob.escape(path), "*.txt")))
            if not files:
                raise StatsError(f"{path}: folder holds no .txt logs")
        elif os.path.isfile(path):
            folder, files = os.path.dirname(path) or os.curdir, [path]
        else:
            raise StatsError(f"{path}: no such file or folder")
        group = groups.setdefault(os.path.realpath(folder), Group(label="", folder=folder))
        known = {os.path.realpath(run.path) for run in group.runs}
        for f in files:
            if os.path.realpath(f) in known:
                continue
            try:
                group.runs.append(parse_log(f, masked))
            except StatsError as e:   # one bad log does not sink its group
                print(f"skipped: {e}", file=sys.stderr)
    for group in groups.values():
        if not group.runs:
            raise StatsError(f"{group.folder}: no readable log")
    result = list(groups.values())
    for group in result:
        group.runs.sort(key=lambda run: run.path)
    if labels:
        if len(labels) != len(result):
            raise StatsError(f"got {len(labels)} --label for {len(result)} group(s) "
                             f"({', '.join(g.folder for g in result)})")
        for group, label in zip(result, labels):
            group.label = label
    else:
        names = [os.path.basename(os.path.abspath(g.folder)) for g in result]
        unique = len(set(names)) == len(names)
        for group, name in zip(result, names):
            group.label = name if unique else group.folder
    return result


# =================================================================================================
# Table
# =================================================================================================

@dataclass
class GroupStats:
    label: str
    runs: int
    steps: str
    time_mean: float
    time_std: float
    time_diff: float
    time_p: float              # Welch, two-sided, against the first group
    loss_mean: float
    loss_std: float
    loss_diff: float
    loss_t: float
    loss_p: float              # one-sided, mean loss < target
    losses: list[float]
    times: list[float]


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def summarize(groups: Sequence[Group], target: float = DEFAULT_TARGET) -> list[GroupStats]:
    baseline_times = [run.train_time_s for run in groups[0].runs]
    baseline_loss = float(np.mean([run.val_loss for run in groups[0].runs]))
    result = []
    for index, group in enumerate(groups):
        losses = [run.val_loss for run in group.runs]
        times = [run.train_time_s for run in group.runs]
        step_counts = sorted({run.steps for run in group.runs})
        loss_t, loss_p = one_sample_t_test(losses, target)
        result.append(GroupStats(
            label=group.label, runs=len(group.runs),
            steps=str(step_counts[0]) if len(step_counts) == 1 else f"{step_counts[0]}-{step_counts[-1]}",
            time_mean=float(np.mean(times)), time_std=_std(times),
            time_diff=float(np.mean(times)) - float(np.mean(baseline_times)),
            time_p=math.nan if index == 0 else welch_t_test(baseline_times, times)[2],
            loss_mean=float(np.mean(losses)), loss_std=_std(losses),
            loss_diff=float(np.mean(losses)) - baseline_loss, loss_t=loss_t, loss_p=loss_p,
            losses=losses, times=times))
    return result


def _number(value: float, width: int) -> str:
    return f"{'-' if math.isnan(value) else f'{value:.4f}':>{width}}"


def _p_value(value: float, width: int) -> str:
    if math.isnan(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}" if value >= 1e-3 else f"{value:>{width}.1e}"


def format_table(stats: Sequence[GroupStats], target: float = DEFAULT_TARGET) -> str:
    label_width = max(22, max(len(s.label) for s in stats) + 2)
    steps_width = max(7, max(len(str(s.steps)) for s in stats) + 2)  # ranges like "160-200"
    header = (f"{'':<{label_width}}{'Runs':>6}{'Steps':>{steps_width}}{'Time μ':>10}{'Time σ':>9}{'Time +/-':>10}"
              f"{'Loss μ':>9}{'Loss σ':>9}{'Loss +/-':>10}{'p':>9}{'Time p':>9}")
    lines = [header]
    for s in stats:
        lines.append(f"{s.label:<{label_width}}{s.runs:>6}{s.steps:>{steps_width}}"
                     f"{_number(s.time_mean, 10)}"
                     f"{_number(s.time_std, 9)}{_number(s.time_diff, 10)}{_number(s.loss_mean, 9)}"
                     f"{_number(s.loss_std, 9)}{_number(s.loss_diff, 10)}{_p_value(s.loss_p, 9)}"
                     f"{_p_value(s.time_p, 9)}")
    lines.append("")
    lines.append(f"p: one-sided t-test that the mean loss is below {target}; "
                 f"Time p: Welch's two-sided t-test of the time difference to {stats[0].label}")
    for s in stats:
        lines += ["", f"{s.label}:",
                  f"  losses = [{', '.join(f'{x:.4f}' for x in s.losses)}]",
                  f"  times  = [{', '.join(f'{x:.4f}' for x in s.times)}]"]
    return "\n".join(lines)


# =================================================================================================
# Plot
# =================================================================================================

def plot_curves(groups: Sequence[Group], out_path: str, target: float = DEFAULT_TARGET):
    """Write a PNG of every run's validation curve, one colour per group; returns the figure."""
    try:
        import matplotlib
    except ImportError:
        raise StatsError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(9, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, group in enumerate(groups):
        for run_index, run in enumerate(group.runs):
            steps, losses = zip(*run.curve)
            axes.plot(steps, losses, color=colours[index % len(colours)], alpha=0.8, linewidth=1.2,
                      label=group.label if run_index == 0 else None)
    axes.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target}")
    axes.set_yscale("log")  # the first validation (~10.8) would otherwise flatten the end game
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("step")
    axes.set_ylabel("val loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return figure


# =================================================================================================
# Command line
# =================================================================================================

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="log files or folders of logs")
    parser.add_argument("--label", action="append", help="name of the next group (once per group, in order)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="val loss target (default 3.28)")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw the val loss curves into this file")
    parser.add_argument("--masked", action="store_true",
                        help="use the masked val loss (runs with the validation mask, #350)")
    args = parser.parse_args(argv)
    try:
        groups = collect_groups(args.paths, args.label, args.masked)
        for group in groups:
            for run in group.runs:
                if run.steps != run.total_steps:
                    print(f"note: {run.path}: last validation at step {run.steps} of {run.total_steps} "
                          f"(stopped early or crashed); its numbers are used as they are", file=sys.stderr)
        print(format_table(summarize(groups, args.target), args.target))
        if args.plot:
            plot_curves(groups, args.plot, args.target)
            print(f"\nplot: {args.plot}")
    except StatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
