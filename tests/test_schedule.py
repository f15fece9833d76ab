"""Schedule values against the record's published schedule and the configuration parser."""
import os

import pytest

import train_gpt as tg
from conftest import stages_option

# the record's schedule table: step -> (lr multiplier, NorMuon momentum)
SPEC_TABLE = {
    0: (1.0, 0.85), 150: (1.0, 0.90), 300: (1.0, 0.95), 482: (1.0, 0.95), 483: (1.52, 0.95),
    579: (1.52, 0.95), 700: (1.33103, 0.95), 900: (1.01609, 0.95), 966: (0.91216, 0.95),
    967: (1.02717, 0.95), 1100: (0.78563, 0.95), 1300: (0.42241, 0.95), 1440: (0.16816, 0.95),
    1449: (0.15182, 0.932), 1450: (0.15, 0.93), 1489: (0.15, 0.852),
}


@pytest.fixture(scope="module")
def schedule():
    return tg.Schedule(tg.Hyperparameters())


@pytest.mark.parametrize("step", sorted(SPEC_TABLE))
def test_lr_and_momentum_table(schedule, step):
    lr, mom = SPEC_TABLE[step]
    assert schedule.lr_mul(step) == pytest.approx(lr, abs=5e-6)
    assert schedule.muon_momentum(step) == pytest.approx(mom, abs=5e-4)


def test_lr_formula_every_step(schedule):
    stage_mul = lambda s: 1.0 if s < 483 else 1.52 if s < 967 else 1.73  # noqa: E731
    for s in range(1490):
        tau = min(1.0, max(0, s - 580) / 870)
        want = stage_mul(s) if s < 580 else stage_mul(s) * (1 - tau) + 0.15 * tau
        assert schedule.lr_mul(s) == pytest.approx(want, abs=1e-12)
        mom = 0.85 + 0.1 * s / 300 if s < 300 else 0.95 - 0.1 * (s - 1440) / 50 if s > 1440 else 0.95
        assert schedule.muon_momentum(s) == pytest.approx(mom, abs=1e-12)


def test_stage_boundaries(schedule):
    assert schedule.stage_ends == [483, 967, 1450, 1490]
    assert schedule.split_step == 967
    expected = {  # step: (batch tokens, max length, windows in tokens, number of MTP weights)
        482: (131072, 896, (128, 384), 3), 483: (262144, 2048, (384, 896), 2),
        966: (262144, 2048, (384, 896), 2), 967: (393216, 2048, (640, 1408), 1),
        1449: (393216, 2048, (640, 1408), 1), 1450: (393216, 2048, (768, 1664), 1),
        1489: (393216, 2048, (768, 1664), 1),
    }
    for step, (batch, max_len, windows, k) in expected.items():
        st = schedule.at(step)
        assert (st.batch_tokens, st.max_seq_len, st.windows, len(st.mtp_weights)) == \
            (batch, max_len, windows, k), step
    assert schedule.final_val_windows() == (768, 2560)


def test_mtp_weights(schedule):
    for s in (0, 100, 482):
        assert schedule.mtp_weights(s) == pytest.approx((1.0, 0.5, 0.25 * (1 - s / 483)))
    for s in (483, 700, 966):
        assert schedule.mtp_weights(s) == pytest.approx((1.0, 0.5 * (1 - (s - 483) / 484)))
    assert schedule.mtp_weights(1000) == (1.0,) and schedule.mtp_weights(1480) == (1.0,)


def test_warmup_steps(schedule):
    # the first two steps, then the first step of stages 2 and 3 and of the extension
    assert schedule.warmup_steps() == [0, 1, 483, 967, 1450]
    assert schedule.warmup_steps(last_step=200) == [0, 1]        # a short run compiles less
    assert schedule.warmup_steps(last_step=500) == [0, 1, 483]
    assert schedule.later_stage_starts(last_step=500) == [483]   # what a compile helper runs


def test_protocol_t_schedule():
    s = tg.Schedule(tg.parse_config(["--num_scheduled_iterations=150",
                                     "--num_extension_iterations=10"]))
    assert s.stage_ends == [50, 100, 150, 160] and s.split_step == 101


def test_parse_config_overrides_and_errors():
    cfg = tg.parse_config(["--preset=smoke", "--seed=7", stages_option(lr_mul=(1.0, 2.0, 3.0)),
                           "--compile=false", "--adam_lr=1"])
    assert cfg.seed == 7 and [s.lr_mul for s in cfg.stages] == [1.0, 2.0, 3.0]
    assert cfg.compile is False and isinstance(cfg.stages[0], tg.Stage)
    assert cfg.adam_lr == 1.0 and cfg.model_dim == tg.PRESETS["smoke"]["model_dim"]
    for bad in (["--nope=1"], ["--seed=abc"], ["--seed=1.5"], ["--preset=huge"], ["seed=1"],
                ["--compile=maybe"], ["--stages=((1024, 128),)"], ["--stages=5"]):
        with pytest.raises(SystemExit):
            tg.parse_config(bad)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        tg.parse_config(["--help"])
    out = capsys.readouterr().out
    for name in ("train_files", "val_tokens", "muon_lr", "stages", "seed"):
        assert f"--{name}=" in out


def test_step_and_helper_counts_must_be_sensible():
    for option, message in (("--num_scheduled_iterations=0", "at least one step per stage"),
                            ("--num_scheduled_iterations=-5", "at least one step per stage"),
                            ("--num_extension_iterations=-1", "expected 0 or more"),
                            ("--stop_after_steps=-3", "expected 0 or more"),
                            ("--compile_ahead_helpers=0", "compile_ahead_helpers=0: expected 1")):
        with pytest.raises(ValueError, match=message):
            tg.check_config(tg.parse_config([option]), 8)


def test_preset_paths_start_at_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tg.parse_config(["--preset=smoke"])
    assert cfg.train_files == os.path.join(tg.REPO_ROOT, "data/fineweb10B/fineweb_train_*.bin")
    cfg = tg.parse_config(["--preset=smoke", "--val_files=mine/*.bin"])   # the user's: as given
    assert cfg.val_files == "mine/*.bin"
