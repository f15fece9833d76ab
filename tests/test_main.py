"""The program's entry point on CPU: clear errors for bad settings and data, NaN stops the run."""
import glob
import os
import re

import pytest

import train_gpt as tg
from conftest import SHARED, stages_option

CORPUS = os.path.join(SHARED, "data", "corpus")
TINY = ["--preset=smoke", "--model_dim=32", "--head_dim=16", "--mlp_hidden=64",
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


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step \d+"):
        run_main(["--adam_lr=1e30", "--muon_lr=1e30", "--stop_after_steps=8"], tmp_path)
