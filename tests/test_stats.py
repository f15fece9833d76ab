"""records/stats.py (t distribution, t-tests, log parsing, table, plot) and run.sh.

Expected numbers come from independent slow restatements in this file: the Student t density
integrated with Simpson's rule, closed forms for 1 and 2 degrees of freedom, and means/deviations
from Python's statistics module.
"""
import importlib.util
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, relative_path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


stats = _load("records_stats", "records/stats.py")


# =================================================================================================
# Independent references
# =================================================================================================

def t_density(x: float, dof: float) -> float:
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return math.exp(log_norm - (dof + 1) / 2 * math.log1p(x * x / dof))


def simpson(f, a: float, b: float, intervals: int = 20_000) -> float:
    h = (b - a) / intervals
    total = f(a) + f(b)
    total += 4 * sum(f(a + i * h) for i in range(1, intervals, 2))
    total += 2 * sum(f(a + i * h) for i in range(2, intervals, 2))
    return total * h / 3


def integrated_t_cdf(t: float, dof: float) -> float:
    """P(T <= t) = 1/2 +- the density's integral between 0 and |t| (the density is symmetric)."""
    half = simpson(lambda x: t_density(x, dof), 0.0, abs(t))
    return 0.5 + half if t >= 0 else 0.5 - half


def standardized(values: list[float]) -> list[float]:
    """values shifted and scaled to mean 0 and sample standard deviation 1."""
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / sd for v in values]


# =================================================================================================
# Student's t CDF
# =================================================================================================

@pytest.mark.parametrize("t, dof", [(0.3, 3), (-1.7, 4), (2.5, 7.5), (-0.9, 23.3), (1.1, 79), (-3.2, 12)])
def test_t_cdf_matches_integrated_density(t, dof):
    assert stats.t_cdf(t, dof) == pytest.approx(integrated_t_cdf(t, dof), abs=1e-9)


def test_t_cdf_classic_table_values():
    assert stats.t_cdf(2.0, 10) == pytest.approx(0.9633, abs=5e-5)
    assert stats.t_cdf(-2.0, 10) == pytest.approx(1 - 0.9633, abs=5e-5)
    assert stats.t_cdf(2.228, 10) == pytest.approx(0.975, abs=1e-4)     # two-sided 5% critical value
    assert stats.t_cdf(-4.0, 79) == pytest.approx(7.1e-5, rel=0.03)
    assert stats.t_cdf(-4.0, 79) == pytest.approx(integrated_t_cdf(-4.0, 79), rel=1e-6)
    assert stats.t_cdf(0.0, 5) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("t", [-50.0, -3.0, -0.4, 0.0, 0.7, 2.0, 1e3])
def test_t_cdf_closed_forms_for_one_and_two_dof(t):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)   # Cauchy
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("t", [-2.5, -1.0, 0.5, 1.96])
def test_t_cdf_tends_to_the_normal_cdf(t):
    normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert stats.t_cdf(t, 1e7) == pytest.approx(normal, abs=1e-6)


def test_t_cdf_limits():
    assert stats.t_cdf(math.inf, 4) == 1.0
    assert stats.t_cdf(-math.inf, 4) == 0.0
    assert math.isnan(stats.t_cdf(math.nan, 4))


# =================================================================================================
# t-tests
# =================================================================================================

def test_one_sample_test_on_80_runs_at_mean_3_2791():
    # A fixed pattern rescaled to mean exactly 3.2791 and sample standard deviation exactly 0.0019.
    pattern = [math.sin(1.7 * i) + 0.3 * (i % 7) for i in range(80)]
    losses = [3.2791 + 0.0019 * z for z in standardized(pattern)]
    assert statistics.mean(losses) == pytest.approx(3.2791, abs=1e-12)
    assert statistics.stdev(losses) == pytest.approx(0.0019, rel=1e-9)
    t, p = stats.one_sample_t_test(losses, 3.28)
    expected_t = -(0.0009 / (0.0019 / math.sqrt(80)))
    assert abs(t - expected_t) < 0.05
    assert p < 1e-4
    assert p == pytest.approx(integrated_t_cdf(expected_t, 79), rel=1e-5)


def test_one_sample_test_matches_direct_formula():
    losses = [3.2783, 3.2789, 3.2795, 3.2786]
    mean, sd = statistics.mean(losses), statistics.stdev(losses)
    expected_t = (mean - 3.28) / (sd / math.sqrt(4))
    t, p = stats.one_sample_t_test(losses, 3.28)
    assert t == pytest.approx(expected_t, rel=1e-9)
    assert p == pytest.approx(integrated_t_cdf(expected_t, 3), abs=1e-9)
    assert p < 0.01  # the seed document's record run: p = 0.0097


def test_one_sample_test_needs_two_values():
    t, p = stats.one_sample_t_test([3.27], 3.28)
    assert math.isnan(t) and math.isnan(p)


@pytest.mark.parametrize("a, b", [
    ([89.803, 89.711, 89.835, 89.849], [88.821, 88.809, 88.806, 88.900]),
    ([10.0, 12.5, 11.1], [10.4, 10.9, 13.8, 9.7, 12.2, 11.0]),
    ([5.0, 5.1], [5.3, 4.7, 5.6, 5.2, 4.4]),
])
def test_welch_matches_slow_direct_computation(a, b):
    se_a2 = statistics.variance(a) / len(a)
    se_b2 = statistics.variance(b) / len(b)
    expected_t = (statistics.mean(b) - statistics.mean(a)) / math.sqrt(se_a2 + se_b2)
    expected_dof = (se_a2 + se_b2) ** 2 / (se_a2 ** 2 / (len(a) - 1) + se_b2 ** 2 / (len(b) - 1))
    expected_p = 2 * integrated_t_cdf(-abs(expected_t), expected_dof)
    t, dof, p = stats.welch_t_test(a, b)
    assert t == pytest.approx(expected_t, rel=1e-9)
    assert dof == pytest.approx(expected_dof, rel=1e-9)
    assert p == pytest.approx(expected_p, abs=1e-8)


# =================================================================================================
# Logs and the table
# =================================================================================================

SOURCE_HEADER = '''import torch
print0(f"step:{step}/{args.num_train_steps} val_loss:{val_loss:.4f} train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms")
====================================================================================================
Running Python 3.12.12
'''


def write_log(path: str, total_steps: int, validations: list[tuple[int, float, int]], every: int = 5) -> None:
    """A log in train_gpt.py's format: header, step lines, val lines as (step, loss, ms)."""
    val_at = {step: (loss, ms) for step, loss, ms in validations}
    last_step = max(val_at)
    lines = [SOURCE_HEADER, "Resetting Model"]
    for step in range(last_step + 1):
        if step in val_at:
            loss, ms = val_at[step]
            lines.append(f"step:{step}/{total_steps} val_loss:{loss:.4f} train_time:{ms}ms "
                         f"step_avg:{ms / max(step, 1):.2f}ms")
        if step < last_step:
            ms = int(val_at[max(s for s in val_at if s <= step)][1] + 3)
            lines.append(f"step:{step + 1}/{total_steps} train_time:{ms}ms step_avg:{ms / (step + 1):.2f}ms")
    lines.append("peak memory allocated: 31254 MiB reserved: 47442 MiB")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_group(folder: str, finals: list[tuple[float, int]], total_steps: int = 20) -> None:
    for i, (loss, ms) in enumerate(finals):
        validations = [(0, 10.8268, 0), (10, 4.5 + 0.01 * i, ms // 2), (total_steps, loss, ms)]
        write_log(os.path.join(folder, f"run{i}.txt"), total_steps, validations)


BASELINE = [(3.2764, 89803), (3.2799, 89711), (3.2773, 89835), (3.2793, 89849)]
CHANGE = [(3.2783, 88821), (3.2789, 88809), (3.2795, 88806)]


def table_rows(output: str) -> dict[str, list[str]]:
    """Table rows keyed by label; the label may contain spaces, the 10 value columns do not."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["Runs", "Steps"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        fields = line.split()
        rows[" ".join(fields[:-10])] = fields[-10:]
    return rows


def test_table_matches_hand_computed_statistics(tmp_path, capsys):
    base_dir, change_dir = tmp_path / "base", tmp_path / "change"
    write_group(str(base_dir), BASELINE)
    write_group(str(change_dir), CHANGE)
    assert stats.main([str(base_dir), str(change_dir), "--label", "Baseline", "--label", "This PR"]) == 0
    output = capsys.readouterr().out
    header = output.splitlines()[0].split()
    assert header == ["Runs", "Steps", "Time", "μ", "Time", "σ", "Time", "+/-", "Loss", "μ", "Loss", "σ",
                      "Loss", "+/-", "p", "Time", "p"]
    rows = table_rows(output)
    assert list(rows) == ["Baseline", "This PR"]

    base_losses, base_times = [l for l, _ in BASELINE], [ms / 1000 for _, ms in BASELINE]
    for label, finals in (("Baseline", BASELINE), ("This PR", CHANGE)):
        losses, times = [l for l, _ in finals], [ms / 1000 for _, ms in finals]
        runs, steps, t_mean, t_sd, t_diff, l_mean, l_sd, l_diff, p, _ = rows[label]
        assert (int(runs), int(steps)) == (len(finals), 20)
        assert float(t_mean) == pytest.approx(statistics.mean(times), abs=5.01e-5)
        assert float(t_sd) == pytest.approx(statistics.stdev(times), abs=5.01e-5)
        assert float(t_diff) == pytest.approx(statistics.mean(times) - statistics.mean(base_times), abs=5.01e-5)
        assert float(l_mean) == pytest.approx(statistics.mean(losses), abs=5.01e-5)
        assert float(l_sd) == pytest.approx(statistics.stdev(losses), abs=5.01e-5)
        assert float(l_diff) == pytest.approx(statistics.mean(losses) - statistics.mean(base_losses), abs=5.01e-5)
        t = (statistics.mean(losses) - 3.28) / (statistics.stdev(losses) / math.sqrt(len(losses)))
        assert float(p) == pytest.approx(integrated_t_cdf(t, len(losses) - 1), rel=0.02)
        assert f"{label}:\n  losses = [{', '.join(f'{x:.4f}' for x in losses)}]\n" \
               f"  times  = [{', '.join(f'{x:.4f}' for x in times)}]" in output
    assert rows["Baseline"][-1] == "-"   # no time test of the baseline against itself
    assert float(rows["Baseline"][4]) == 0.0 and float(rows["Baseline"][7]) == 0.0   # the +/- columns

    # The structured numbers, to full precision.
    groups = stats.collect_groups([str(base_dir), str(change_dir)])
    summary = stats.summarize(groups, 3.28)
    change_times = [ms / 1000 for _, ms in CHANGE]
    assert summary[1].time_std == pytest.approx(statistics.stdev(change_times), rel=1e-9)
    assert summary[1].loss_mean == pytest.approx(statistics.mean([l for l, _ in CHANGE]), rel=1e-12)
    se2 = statistics.variance(base_times) / 4 + statistics.variance(change_times) / 3
    welch_t = (statistics.mean(change_times) - statistics.mean(base_times)) / math.sqrt(se2)
    dof = se2 ** 2 / ((statistics.variance(base_times) / 4) ** 2 / 3 + (statistics.variance(change_times) / 3) ** 2 / 2)
    assert summary[1].time_p == pytest.approx(2 * integrated_t_cdf(-abs(welch_t), dof), rel=1e-6)
    assert float(rows["This PR"][-1]) == pytest.approx(summary[1].time_p, rel=0.1)


def test_last_validation_line_counts(tmp_path):
    path = str(tmp_path / "a" / "log.txt")
    write_log(path, 30, [(0, 10.8, 0), (10, 4.2, 1000), (20, 3.5, 2500), (30, 3.3012, 4321)])
    run = stats.parse_log(path)
    assert (run.steps, run.total_steps, run.val_loss, run.train_time_s) == (30, 30, 3.3012, 4.321)
    assert run.curve == [(0, 10.8), (10, 4.2), (20, 3.5), (30, 3.3012)]


def test_masked_validation_loss(tmp_path):
    """Runs with the validation mask log both losses on one line; --masked reads the second."""
    path = tmp_path / "m" / "log.txt"
    path.parent.mkdir()
    path.write_text("step:0/20 val_loss:10.8000 val_loss_masked:10.7000 train_time:0ms step_avg:0.04ms\n"
                    "step:20/20 val_loss:3.2800 val_loss_masked:3.2610 train_time:9000ms "
                    "step_avg:450.00ms\n")
    plain, masked = stats.parse_log(str(path)), stats.parse_log(str(path), masked=True)
    assert (plain.val_loss, masked.val_loss, masked.train_time_s) == (3.28, 3.261, 9.0)
    assert masked.curve == [(0, 10.7), (20, 3.261)]
    unmasked_run = str(tmp_path / "u" / "log.txt")
    write_log(unmasked_run, 30, [(0, 10.8, 0), (30, 3.3012, 4321)])
    with pytest.raises(stats.StatsError, match="no val_loss_masked"):
        stats.parse_log(unmasked_run, masked=True)


def test_grouping_by_folder_and_default_labels(tmp_path, capsys):
    write_group(str(tmp_path / "alpha"), BASELINE[:2])
    write_group(str(tmp_path / "beta"), CHANGE[:2])
    files = [str(tmp_path / "beta" / "run0.txt"), str(tmp_path / "alpha" / "run1.txt"),
             str(tmp_path / "beta" / "run1.txt"), str(tmp_path / "alpha" / "run0.txt")]
    groups = stats.collect_groups(files)
    assert [g.label for g in groups] == ["beta", "alpha"]      # order of first mention
    assert [len(g.runs) for g in groups] == [2, 2]
    # a folder and a file inside it name the same runs once
    groups = stats.collect_groups([str(tmp_path / "alpha"), str(tmp_path / "alpha" / "run0.txt")])
    assert len(groups) == 1 and len(groups[0].runs) == 2


def test_single_run_group_prints_dashes(tmp_path, capsys):
    write_group(str(tmp_path / "one"), BASELINE[:1])
    assert stats.main([str(tmp_path / "one")]) == 0
    row = table_rows(capsys.readouterr().out)["one"]
    assert row[0] == "1" and row[3] == "-" and row[6] == "-" and row[8] == "-"


def test_early_stopped_run_is_noted(tmp_path, capsys):
    write_log(str(tmp_path / "g" / "short.txt"), 1490, [(0, 10.8, 0), (100, 4.1, 5000)])
    assert stats.main([str(tmp_path / "g")]) == 0
    captured = capsys.readouterr()
    assert "short.txt: last validation at step 100 of 1490" in captured.err
    assert table_rows(captured.out)["g"][1] == "100"


def test_unreadable_log_is_reported_and_skipped(tmp_path, capsys):
    write_group(str(tmp_path / "good"), BASELINE[:2])
    bad = tmp_path / "good" / "crashed.txt"
    bad.write_text(SOURCE_HEADER + "step:1/1490 train_time:80ms step_avg:80.00ms\n")
    assert stats.main([str(tmp_path / "good")]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"skipped: {bad}: no validation line (`step:S/N val_loss:X train_time:Tms " \
                           f"step_avg:Ams`); not a train_gpt.py log, or the run ended before its " \
                           f"first validation\n"
    assert table_rows(captured.out)["good"][0] == "2"


@pytest.mark.parametrize("case", ["no_readable_log", "missing_path", "empty_folder", "label_count"])
def test_errors_name_the_problem(tmp_path, capsys, case):
    write_group(str(tmp_path / "good"), BASELINE[:2])
    if case == "no_readable_log":
        bad = tmp_path / "bad" / "crashed.txt"
        bad.parent.mkdir()
        bad.write_text(SOURCE_HEADER + "step:1/1490 train_time:80ms step_avg:80.00ms\n")
        args, expected = [str(tmp_path / "bad")], f"{tmp_path / 'bad'}: no readable log"
    elif case == "missing_path":
        args, expected = [str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such file or folder"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args, expected = [str(tmp_path / "empty")], f"{tmp_path / 'empty'}: folder holds no .txt logs"
    else:
        args, expected = [str(tmp_path / "good"), "--label", "A", "--label", "B"], "got 2 --label for 1 group(s)"
    assert stats.main(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert expected in err


# =================================================================================================
# Plot
# =================================================================================================

def test_plot_draws_every_run_in_its_group_colour(tmp_path, capsys):
    write_group(str(tmp_path / "base"), BASELINE[:3])
    write_group(str(tmp_path / "change"), CHANGE[:2])
    out = str(tmp_path / "curves.png")
    groups = stats.collect_groups([str(tmp_path / "base"), str(tmp_path / "change")])
    figure = stats.plot_curves(groups, out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    lines = [line for line in figure.axes[0].get_lines() if len(line.get_xdata()) > 2]   # not the target line
    assert len(lines) == 5
    expected_curves = [run.curve for group in groups for run in group.runs]
    for line, curve in zip(lines, expected_curves):
        assert list(zip(line.get_xdata(), line.get_ydata())) == curve
    colours = [line.get_color() for line in lines]
    assert len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1 and colours[0] != colours[3]
    assert stats.main([str(tmp_path / "base"), "--plot", str(tmp_path / "cli.png")]) == 0
    assert os.path.getsize(tmp_path / "cli.png") > 1000


# =================================================================================================
# run.sh (with a stand-in torchrun that writes a log where train_gpt.py would)
# =================================================================================================

FAKE_TORCHRUN = '''#!{python}
import os, sys
calls = os.environ["FAKE_TORCHRUN_CALLS"]
with open(calls, "a") as f:
    f.write(" ".join(sys.argv[1:]) + " | " + os.environ.get("NCCL_NVLS_ENABLE", "?") + " "
            + os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST", "?") + "\\n")
run = sum(1 for _ in open(calls))
log_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--log_dir=")][0]
with open(os.path.join(log_dir, f"run{{run}}.txt"), "w") as f:
    f.write(f"step:0/20 val_loss:10.8000 train_time:0ms step_avg:0.04ms\\n")
    f.write(f"step:20/20 val_loss:3.27{{run}}0 train_time:{{1000 + run}}ms step_avg:50.00ms\\n")
'''


@pytest.fixture
def fake_torchrun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "torchrun"
    script.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    script.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NGPU": "2",
           "FAKE_TORCHRUN_CALLS": str(calls)}
    return env, calls


def test_run_sh_runs_n_times_and_summarises(tmp_path, fake_torchrun):
    env, calls = fake_torchrun
    out_dir = tmp_path / "records" / "x"
    result = subprocess.run([os.path.join(ROOT, "run.sh"), "3", str(out_dir), "--preset=smoke"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    call_lines = calls.read_text().splitlines()
    assert call_lines == [f"--standalone --nproc_per_node=2 train_gpt.py --log_dir={out_dir} --preset=smoke | 0 1"] * 3
    assert sorted(os.listdir(out_dir)) == ["run1.txt", "run2.txt", "run3.txt"]
    row = table_rows(result.stdout)["x"]
    assert row[:2] == ["3", "20"]
    assert float(row[5]) == pytest.approx(statistics.mean([3.271, 3.272, 3.273]), abs=5.01e-5)
    assert "  losses = [3.2710, 3.2720, 3.2730]" in result.stdout


@pytest.mark.parametrize("arg", ["0", "abc", "2x"])
def test_run_sh_rejects_bad_n(fake_torchrun, arg):
    env, calls = fake_torchrun
    result = subprocess.run([os.path.join(ROOT, "run.sh"), arg], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"N must be a positive whole number of runs, got '{arg}'" in result.stderr
    assert "usage: ./run.sh [N] [OUTDIR]" in result.stderr
    assert not calls.exists()


def test_run_sh_rejects_bad_ngpu(fake_torchrun):
    env, calls = fake_torchrun
    result = subprocess.run([os.path.join(ROOT, "run.sh"), "1"], env={**env, "NGPU": "two"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "NGPU must be a positive whole number, got 'two'" in result.stderr
    assert not calls.exists()
