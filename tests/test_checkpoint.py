"""Checkpoints: a resumed run trains exactly like an uninterrupted one (on one process, on two,
and across world sizes), and a checkpoint that does not fit the run, or that would run code when
unpickled, is refused with a clear error."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import CORPUS, ROOT, needs_corpus, needs_tokenizer, stages_option

pytestmark = [needs_corpus, needs_tokenizer]
TINY = ["--preset=smoke", "--model_dim=32", "--head_dim=16", "--qk_head_dim=12", "--mlp_hidden=64",
        stages_option(batch_tokens=(512, 1024, 1024), max_seq_len=(64, 128, 128)),
        "--val_tokens=1024", "--val_batch_tokens=1024", "--val_every=0",
        f"--train_files={CORPUS}/corpus_train_*.bin", f"--val_files={CORPUS}/corpus_val_*.bin"]
PROGRESS = re.compile(r"^progress step (\d+)/\d+ train_loss:([0-9.]+)", re.M)
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:([0-9.]+)", re.M)


def run_main(log_dir, *args):
    tg.main([*TINY, f"--log_dir={log_dir}", *args])
    (log,) = glob.glob(os.path.join(log_dir, "*.txt"))
    with open(log) as f:
        text = f.read()
    return {int(s): float(v) for s, v in PROGRESS.findall(text)}, VAL.findall(text)[-1], text


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # #89's c_proj scales leave their bootstrap after step 1 here, so that the resumed steps
    # take the delayed ones too
    monkeypatch.setattr(tg, "FP8_WEIGHT_BOOTSTRAP_STEPS", 1)
    checkpoints = f"--checkpoint_dir={tmp_path / 'ckpt'}"
    straight, straight_val, _ = run_main(tmp_path / "a", "--stop_after_steps=6",
                                         "--save_checkpoint=true",
                                         f"--checkpoint_dir={tmp_path / 'straight'}")
    first, _, text = run_main(tmp_path / "b", "--stop_after_steps=4", "--save_every=2", checkpoints)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000002.pt"]   # step 4 ends the run
    run_main(tmp_path / "c", "--stop_after_steps=4", "--save_checkpoint=true", checkpoints)
    assert "written in" in text
    resumed, resumed_val, text = run_main(tmp_path / "d", "--stop_after_steps=6", "--resume=latest",
                                          "--save_checkpoint=true", checkpoints)
    assert f"resumed from {tmp_path / 'ckpt' / 'step_000004.pt'} after step 4" in text
    assert sorted(resumed) == [5, 6] and all(first[s] == straight[s] for s in first)
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)
    assert resumed_val == straight_val
    # and ends with the same FP8 state, bit for bit: every micro-batch slot's scales, the e4m3
    # copies of c_proj (#89) and, for the FP8 backward (#344), of c_fc in both layouts, and the
    # packed QKV weights' e4m3 copies (#344)
    straight_end = tg.read_checkpoint(str(tmp_path / "straight" / "step_000006.pt"))
    resumed_end = tg.read_checkpoint(str(tmp_path / "ckpt" / "step_000006.pt"))
    want, got = straight_end["fp8_scales"], resumed_end["fp8_scales"]
    assert want["quantizations"].item() == 7 and want["act_scales"].shape == (11, 4)
    assert {"c_fc_e4m3", "c_fc_e4m3_t", "c_fc_scales", "c_fc_max", "c_proj_e4m3"} <= want.keys()
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    assert want.keys() == got.keys()
    assert all(torch.equal(bits(want[name]), bits(got[name])) for name in want)
    want, got = straight_end["fp8_qkv"], resumed_end["fp8_qkv"]
    assert want["quantizations"].item() == 7
    assert want["weight_e4m3"].shape == (10, 2 * 2 * 12 + 32, 32)
    assert want.keys() == got.keys() == {"weight_e4m3", "weight_e4m3_t", "weight_scales",
                                         "quantizations"}
    assert all(torch.equal(bits(want[name]), bits(got[name])) for name in want)


def torchrun(nproc, log_dir, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train_gpt.py"), *TINY, f"--log_dir={log_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log,) = glob.glob(os.path.join(log_dir, "*.txt"))
    with open(log) as f:
        return {int(s): float(v) for s, v in PROGRESS.findall(f.read())}


def test_resume_on_two_processes_and_on_another_world_size(tmp_path):
    checkpoints = f"--checkpoint_dir={tmp_path / 'ckpt'}"
    straight = torchrun(2, tmp_path / "a", "--stop_after_steps=6", "--save_every=4", checkpoints)
    resumed = torchrun(2, tmp_path / "c", "--stop_after_steps=6", "--resume=latest", checkpoints)
    assert sorted(resumed) == [5, 6]
    assert all(abs(resumed[s] - straight[s]) < 1e-4 for s in resumed), (resumed, straight)
    # the same checkpoint on one process: the same math up to the world sizes' rounding
    one = torchrun(1, tmp_path / "d", "--stop_after_steps=6", "--resume=latest", checkpoints)
    assert all(abs(one[s] - straight[s]) < 0.01 for s in one), (one, straight)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint after 2 steps of the tiny speedrun and one after 3 (not resumable)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    run_main(tmp / "log2", "--stop_after_steps=2", "--save_checkpoint=true", f"--checkpoint_dir={tmp}")
    run_main(tmp / "log3", "--stop_after_steps=3", "--save_checkpoint=true", f"--checkpoint_dir={tmp}")
    return tmp


def resume_error(checkpoint, *args, path="step_000002.pt"):
    with pytest.raises(SystemExit) as e:
        tg.main([*TINY, "--stop_after_steps=4", f"--resume={checkpoint / path}",
                 f"--log_dir={checkpoint / 'resume'}", *args])
    return str(e.value)


def test_checkpoint_from_another_preset_names_the_differences(checkpoint):
    message = resume_error(checkpoint, "--xsa=false", "--mudd_gates=false", "--dc_attention=false")
    assert message.startswith(f"error: {checkpoint / 'step_000002.pt'}: written with ")
    assert "xsa=True (this run: False)" in message and "mudd_gates=True (this run: False)" in message
    assert message.endswith("resume with the same preset and options")


def test_checkpoint_from_other_code_is_refused(checkpoint, monkeypatch):
    monkeypatch.setattr(tg, "code_digest", lambda: "0123456789abcdef")
    message = resume_error(checkpoint)
    assert "written by code version" in message and "this is 0123456789abcdef" in message


def test_checkpoint_after_an_even_step_is_not_resumable(checkpoint):
    message = resume_error(checkpoint, path="step_000003.pt")
    assert "gradients were still pending" in message


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint \\(step_\\*.pt\\) in"):
        tg.main([*TINY, "--resume=latest", f"--checkpoint_dir={tmp_path}", f"--log_dir={tmp_path}"])


class RunsCode:
    """Unpickling this calls os.system: what a checkpoint must never be allowed to do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "step_000002.pt"
    torch.save({"meta": {"format": 1}, "payload": RunsCode(marker)}, path)
    with pytest.raises(tg.CheckpointError, match="not loaded: it holds something other than tensors"):
        tg.read_checkpoint(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)   # plain unpickling really does run it
    assert marker.exists()


def test_sampling_continues_the_prompt(checkpoint, capsys):
    path = str(checkpoint / "step_000002.pt")
    args = ["--sample", f"--checkpoint={path}", "--prompt=The cat sat on the", "--max_new_tokens=5"]
    tg.main([*args, "--seed=1"])
    first = capsys.readouterr()
    tg.main([*args, "--seed=1"])
    assert capsys.readouterr().out == first.out                       # the seed decides
    assert first.out.startswith("The cat sat on the")
    assert re.search(r"^5 tokens in [\d.]+s \([\d.]+ tokens/s, cpu", first.err, re.M)


def test_greedy_sampling_takes_the_most_likely_token(checkpoint):
    model, cfg, windows = tg.model_from_checkpoint(str(checkpoint / "step_000002.pt"),
                                                   torch.device("cpu"), print)
    prompt = [tg.BOS_ID, 464, 3797, 3332]
    (chosen,) = tg.generate(model, cfg, windows, prompt, 1, 0.0, 0, 0)[len(prompt):]
    # the model's own validation loss of prompt + candidate, through the training code's forward
    losses = {}
    for candidate in {chosen, *torch.randint(0, cfg.vocab_size, (20,)).tolist()}:
        ids = torch.tensor(prompt + [candidate])
        inputs, targets = ids[:-1].int(), ids[1:].long()
        bigram = torch.from_numpy(tg.bigram_hash(inputs.numpy(), cfg.bigram_vocab_size))
        cu = torch.tensor([0, len(inputs)], dtype=torch.int32)
        with torch.no_grad():
            losses[candidate] = model(inputs, targets, cu, bigram, None, windows, len(inputs)).item()
    assert min(losses, key=losses.get) == chosen
