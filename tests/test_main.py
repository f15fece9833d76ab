"""The program's entry point on CPU: clear errors for bad settings and data, NaN stops the run."""
import glob
import os
import re

import pytest

import train_gpt as tg
from conftest import CORPUS, needs_corpus, needs_tokenizer, stages_option

TINY = ["--preset=smoke", "--model_dim=32", "--head_dim=16", "--qk_head_dim=12", "--mlp_hidden=64",
        stages_option(batch_tokens=(512, 512, 512), max_seq_len=(64, 128, 128)),
        "--val_tokens=1024", "--val_batch_tokens=1024", "--val_every=0",
        f"--train_files={CORPUS}/corpus_train_*.bin", f"--val_files={CORPUS}/corpus_val_*.bin"]


def run_main(args, tmp_path):
    tg.main([*TINY, f"--log_dir={tmp_path}", *args])
    (log,) = glob.glob(os.path.join(tmp_path, "*.txt"))
    with open(log) as f:
        return f.read()


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, f"--train_files={tmp_path}/nothing_*.bin", f"--log_dir={tmp_path}"])
    assert str(e.value).startswith("error: no files match") and "nothing_*.bin" in str(e.value)


def test_bad_batch_settings_are_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, stages_option(batch_tokens=(510, 512, 512)), f"--log_dir={tmp_path}"])
    assert str(e.value) == ("error: stage 1 batch_tokens=510: expected a positive multiple "
                            "of micro_batches_per_step=4 (world size x grad-accum steps)")


def test_world_size_option_belongs_to_summary():
    with pytest.raises(SystemExit, match="--world_size is an option of --summary"):
        tg.main(["--world_size=2"])


@needs_corpus
@needs_tokenizer
def test_log_holds_code_environment_config_and_reference_lines(tmp_path):
    text = run_main(["--stop_after_steps=3"], tmp_path)
    with open(tg.__file__) as f:
        assert text.startswith(f.read())                       # the full source comes first
    assert "# triton_kernels.py" in text and "Running PyTorch" in text
    assert "  adam_lr=0.024" in text and "  model_dim=32" in text   # the resolved config
    steps = re.findall(r"^step:(\d+)/90 train_time:\d+ms step_avg:\d+\.\d\dms$", text, re.M)
    assert steps == ["1", "2", "3"]
    # the smoke preset runs the current recipe: validation also reports the masked loss (#350)
    assert re.search(r"^step:3/90 val_loss:\d+\.\d{4} val_loss_masked:\d+\.\d{4} "
                     r"train_time:\d+ms step_avg:\d+\.\d\dms$", text, re.M)
    assert len(re.findall(r"^progress step \d+/90 train_loss:", text, re.M)) == 3


@needs_corpus
@needs_tokenizer
def test_compile_only_reports_the_startup_and_trains_no_step(tmp_path):
    text = run_main(["--compile_only"], tmp_path)
    assert "--compile_only: nothing is compiled (--compile=false)" in text   # the smoke preset
    assert re.search(r"^startup: [\d.]+s from launch to the first timed step$", text, re.M)
    assert text.rstrip().endswith("--compile_only: stopping before the first training step")
    assert not re.search(r"^(progress )?step", text, re.M)


@needs_corpus
@needs_tokenizer
def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step \d+"):
        run_main(["--adam_lr=1e30", "--muon_lr=1e30", "--stop_after_steps=8"], tmp_path)


@needs_corpus
@needs_tokenizer
def test_report_and_mfu_against_the_flop_count(tmp_path):
    text = run_main(["--stop_after_steps=3", "--peak_tflops=0.001"], tmp_path)
    cfg = tg.parse_config([*TINY, "--peak_tflops=0.001"])
    settings = tg.Schedule(cfg).at(1)
    for tokens_per_s, mfu in re.findall(r"^progress step \d+/90 .*tokens/s:([\d,]+) mfu:([\d.]+)%",
                                        text, re.M):
        want = tg.flops_per_token(cfg, settings) * int(tokens_per_s.replace(",", "")) / 1e9
        assert float(mfu) == pytest.approx(100 * want, rel=0.01, abs=0.06)
    (report,) = glob.glob(os.path.join(tmp_path, "*_report.md"))
    with open(report) as f:
        table = f.read()
    for key in ("final val loss", "training time", "median step time", "tokens trained", "MFU",
                "peak memory", "Python GC during training", "start-up", "commit", "device",
                "software"):
        assert f"\n| {key}" in table
    assert "| tokens trained | 1,536 |" in table and "  model_dim=32" in table
    assert re.search(r"^report final val loss: \d+\.\d{4} \(masked \d+\.\d{4}\)$", text, re.M)


def test_step_time_on_the_cpu_is_the_host_clock():
    import time
    start = tg.PendingLoss.start_marker(tg.torch.device("cpu"))
    time.sleep(0.05)
    pending = tg.PendingLoss(0, tg.torch.tensor(2.5), None, start)
    assert pending.get() == 2.5 and 50 <= pending.step_ms < 1000


@pytest.mark.gpu
def test_step_time_on_the_gpu_counts_the_work_not_the_launches():
    """A step queued on an idle GPU (as after validation or a checkpoint) is launched long before
    its work ends: its time is the GPU's, from the events around it."""
    import time
    torch, device = tg.torch, tg.torch.device("cuda")
    # the sleep kernel counts clock cycles: time a known count (once loaded: the first launch
    # also loads the kernel, which would make a cycle seem slower than it is)
    torch.cuda._sleep(1000)
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()
    torch.cuda._sleep(10_000_000)
    after.record()
    after.synchronize()
    sleep_cycles = int(10_000_000 * 100 / before.elapsed_time(after))    # about 100 ms
    # one untimed pass: the first pinned copy and the first kernel loads wait for the whole device,
    # as they do once in training, before the timed steps
    tg.PendingLoss(0, torch.ones(1, device=device), None, tg.PendingLoss.start_marker(device)).get()
    torch.cuda.synchronize()
    host_start = time.perf_counter()
    start = tg.PendingLoss.start_marker(device)
    torch.cuda._sleep(sleep_cycles)
    pending = tg.PendingLoss(0, torch.ones(1, device=device), None, start)
    host_ms = 1000 * (time.perf_counter() - host_start)
    assert pending.get() == 1.0
    assert host_ms < 50 and pending.step_ms > 60


def test_training_gc_freezes_what_lives_and_times_each_pass():
    import gc
    frozen_before = gc.get_freeze_count()
    survivor = [object() for _ in range(100)]
    with tg.TrainingGC() as passes:
        assert gc.get_freeze_count() >= frozen_before + len(survivor)
        for _ in range(3):
            cycle = []
            cycle.append(cycle)
            del cycle
            gc.collect()
        assert passes.count >= 3 and passes.total_ms > 0
        assert passes.longest_ms <= passes.total_ms
    counted = passes.count
    gc.collect()
    assert passes.count == counted and gc.get_freeze_count() == frozen_before
    assert re.fullmatch(rf"{counted} passes, [\d.]+ ms in total, longest [\d.]+ ms", passes.summary())


def test_flops_per_token_counts_weights_and_windows():
    cfg = tg.Hyperparameters(**tg.PRESETS["record74"])
    s = tg.Schedule(cfg).at(0)      # stage 1: windows 128 / 384 tokens, documents up to 896
    d, V = 768, 50304
    weights = 10 * 4 * d * d + 11 * 2 * d * 3072 + d * V
    attention = 4 * d * (8 * 128 / 2 + 2 * 384 / 2)   # 8 short-window layers, 2 long-window ones
    assert tg.flops_per_token(cfg, s) == pytest.approx(3 * (2 * weights + attention))


def test_eta_knows_the_stages_cost_different_times():
    cfg = tg.parse_config(["--preset=record74", "--num_scheduled_iterations=30",
                           "--num_extension_iterations=6"])
    schedule = tg.Schedule(cfg)                       # stages 0-9, 10-19, 20-29, extension 30-35
    clock = tg.ProgressClock(schedule, last_step=36)
    clock.update(schedule.at(0), 100.0)               # stage 1: 100 ms for 131,072 tokens
    # the rest of stage 1 at 100 ms, the unseen stages at the same time per token
    want = (9 * 100 + 10 * 200 + 10 * 300 + 6 * 300) / 1000
    assert clock.eta_s(1) == pytest.approx(want)
    clock.update(schedule.at(10), 180.0)              # stage 2 turns out cheaper per token
    assert clock.eta_s(11) == pytest.approx((9 * 180 + 10 * 270 + 6 * 270) / 1000)


def test_progress_is_a_status_bar_on_terminals_only(tmp_path, capsys):
    run = tg.Run(rank=0, world_size=1, device=tg.torch.device("cpu"), grad_accum_steps=1)
    log = tg.Logger(run, str(tmp_path))
    log.interactive = True
    log.progress("progress step 1/9")
    log.progress("progress step 2/9")
    log("step:2/9 val_loss:5.0000")
    out = capsys.readouterr().out
    assert "\r\033[Kprogress step 1/9\r\033[Kprogress step 2/9\nstep:2/9 val_loss:5.0000\n" in out
    log.interactive = False
    log.progress("progress step 3/9")
    assert capsys.readouterr().out == "progress step 3/9\n"
    with open(log.path) as f:   # the file gets every line
        assert f.read().splitlines() == ["progress step 1/9", "progress step 2/9",
                                         "step:2/9 val_loss:5.0000", "progress step 3/9"]


@needs_corpus
def test_preflight_table_and_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:   # the full schedule on one small shard: not enough data
        tg.main(["--preflight", "--preset=smoke_record74", f"--train_files={CORPUS}/corpus_train_*.bin",
                 f"--val_files={CORPUS}/corpus_val_*.bin", "--num_scheduled_iterations=30000",
                 f"--checkpoint_dir={tmp_path}", "--save_every=2"])
    assert e.value.code == 1
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0].strip(): line for line in out[1:]}
    assert "FAILED" in rows["train data covers the schedule"] and "add shards" in rows["train data covers the schedule"]
    assert " ok " in rows["val data"] and " ok " in rows["checkpoint folder"]
    assert rows["path mlp"].split()[-1] != "FAILED"
    tg.main(["--preflight", "--preset=smoke_record74", f"--train_files={CORPUS}/corpus_train_*.bin",
             f"--val_files={CORPUS}/corpus_val_*.bin", "--num_scheduled_iterations=30000",
             "--cycle_train_data=true"])                      # cycling: no failure, no exit
    assert "(cycling on)" in capsys.readouterr().out


@needs_corpus
def test_a_run_checks_first(tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, "--preset=smoke_record74", "--qk_head_dim=0",
                 "--num_scheduled_iterations=30000", f"--log_dir={tmp_path}"])
    assert str(e.value).startswith("error: the schedule reads about ")
    assert str(e.value).endswith("add shards or pass --cycle_train_data=true")
    assert not os.listdir(tmp_path)   # nothing started, no log written


def test_read_ratio_counts_the_cut_tokens(tmp_path):
    path = str(tmp_path / "shard.bin")
    tg.write_shard(path, [tg.BOS_ID, 1, 2, 3, 4, 5, tg.BOS_ID, 6, tg.BOS_ID, 7, 8, 9])
    # documents of 6, 2 and 4 tokens cut at 3: 3 + 2 + 3 used of 12 read
    assert tg.read_ratio(path, 3) == pytest.approx(12 / 8)
