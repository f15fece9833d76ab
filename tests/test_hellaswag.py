"""HellaSwag: the data script's checks, the file reader, and the scoring, against the likelihoods
restated here from the model's own forward, one candidate at a time."""
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT, needs_corpus, needs_tokenizer
from test_checkpoint import TINY

spec = importlib.util.spec_from_file_location("hellaswag_data", os.path.join(ROOT, "data", "hellaswag.py"))
hellaswag_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hellaswag_data)

EXAMPLES = [
    {"ind": 4, "ctx": "A man is sitting on a roof. he", "label": 3, "split": "val",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 5, "ctx": "The cat", "label": 0,
     "endings": ["sat on the mat.", "flew", "is a very long ending about nothing at all", "ran"]},
    {"ind": 6, "ctx": "She opened the door and", "label": 2,
     "endings": ["left.", "saw the rain outside.", "smiled", "closed it again behind her."]},
]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)


# -------------------------------------------------------------------------------------------------
# data/hellaswag.py

def test_verify_accepts_the_pinned_file_and_names_a_different_one(tmp_path):
    path = write_examples(tmp_path / "val.jsonl")
    data = open(path, "rb").read()
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    hellaswag_data.verify(path, size, sha)
    with open(path, "r+b") as f:                 # one byte changed, same size
        f.write(b"[")
    with pytest.raises(hellaswag_data.HellaSwagDataError, match=f"{path}: SHA-256 [0-9a-f]{{64}}, expected {sha}"):
        hellaswag_data.verify(path, size, sha)
    with pytest.raises(hellaswag_data.HellaSwagDataError, match=f"{path}: {size:,} bytes, expected"):
        hellaswag_data.verify(path, size + 1, sha)


def test_download_keeps_only_a_checked_file(tmp_path):
    source = write_examples(tmp_path / "source.jsonl")
    data = open(source, "rb").read()
    dest = str(tmp_path / "hellaswag" / "val.jsonl")
    url = f"file://{source}"
    with pytest.raises(hellaswag_data.HellaSwagDataError, match="SHA-256"):
        hellaswag_data.download(dest, url, len(data), "0" * 64)
    assert os.listdir(tmp_path / "hellaswag") == []          # nothing left behind
    assert hellaswag_data.download(dest, url, len(data), hashlib.sha256(data).hexdigest()) == dest
    assert open(dest, "rb").read() == data


def test_download_offline_is_one_clear_error(tmp_path):
    dest = str(tmp_path / "val.jsonl")
    with pytest.raises(hellaswag_data.HellaSwagDataError,
                       match=f"cannot download http://127.0.0.1:9/x.jsonl .*put it at {dest}"):
        hellaswag_data.download(dest, "http://127.0.0.1:9/x.jsonl")


def test_pinned_values_are_those_of_the_public_file():
    assert hellaswag_data.URL.endswith("rowanz/hellaswag/master/data/hellaswag_val.jsonl")
    assert hellaswag_data.SIZE == 12_246_618
    assert hellaswag_data.SHA256 == "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


# -------------------------------------------------------------------------------------------------
# Reading

def fake_encode(text):
    return [ord(c) % 1000 for c in text]


def test_reader_tokenises_context_and_spaced_endings(tmp_path):
    examples = tg.read_hellaswag(write_examples(tmp_path / "val.jsonl"), fake_encode)
    assert len(examples) == 3
    assert examples[0].context == fake_encode("A man is sitting on a roof. he")
    assert examples[0].endings[1] == fake_encode(" is ripping level tiles off.")
    assert examples[1].ending_chars == [15, 4, 42, 3]
    assert [e.label for e in examples] == [3, 0, 2]


@pytest.mark.parametrize("bad", [
    "not json", json.dumps({"ctx": "a", "endings": ["b", "c", "d"], "label": 0}),
    json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}),
    json.dumps({"endings": ["b", "c", "d", "e"], "label": 1})])
def test_reader_names_the_bad_line(tmp_path, bad):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + bad + "\n")
    with pytest.raises(tg.DataError, match=f"{path} line 2: expected a JSON object with ctx"):
        tg.read_hellaswag(str(path), fake_encode)


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(tg.DataError, match="data/hellaswag.py` downloads it"):
        tg.read_hellaswag(str(tmp_path / "none.jsonl"), fake_encode)


# -------------------------------------------------------------------------------------------------
# Scoring

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a few steps, saved, with HellaSwag scored at the end of its run."""
    tmp = tmp_path_factory.mktemp("hellaswag")
    data = write_examples(tmp / "val.jsonl")
    tg.main([*TINY, f"--log_dir={tmp}", "--stop_after_steps=4", "--save_checkpoint=true",
             f"--checkpoint_dir={tmp / 'ckpt'}", "--eval=hellaswag", f"--hellaswag_file={data}"])
    (log,) = glob.glob(str(tmp / "*.txt"))
    return tmp / "ckpt" / "step_000004.pt", data, open(log).read()


def likelihood_alone(model, cfg, windows, context, ending):
    """The ending's summed log-probability, the candidate run by itself (two one-BOS documents,
    then [BOS, context, ending]), in float64 from the model's logits."""
    ids = [tg.BOS_ID, tg.BOS_ID, tg.BOS_ID, *context, *ending]
    inputs = torch.tensor(ids, dtype=torch.int32)
    bigram = torch.from_numpy(tg.bigram_hash(inputs.numpy(), cfg.bigram_vocab_size))
    cu = torch.tensor([0, 1, 2, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        h = model.hidden_states(inputs, bigram, cu, windows, len(ids) - 2)
        logits = tg.triton_kernels.softcap(h @ model.lm_head).double()
    log_probs = F.log_softmax(logits, -1)
    first = 3 + len(context)                 # the position of the ending's first token
    return sum(float(log_probs[p - 1, ids[p]]) for p in range(first, len(ids)))


@needs_corpus
@needs_tokenizer
def test_scores_are_each_candidates_own_likelihood(trained):
    path, data, _ = trained
    model, cfg, windows = tg.model_from_checkpoint(str(path), torch.device("cpu"), print)
    # the FP8 MLP's one scale per pass couples rows
    model.cfg = dataclasses.replace(cfg, fp8_mlp_up=False, fp8_mlp_down=False,
                                    fp8_mlp_backward=False)
    examples = tg.read_hellaswag(data, tg.gpt2_encode())
    packed = tg.ending_log_likelihoods(model, cfg, windows, examples)
    alone = torch.tensor([[likelihood_alone(model, cfg, windows, e.context, ending)
                           for ending in e.endings] for e in examples], dtype=torch.float64)
    # the same sums up to bf16 rounding, which depends on the absolute positions (a token
    # misplaced by one would change a sum by several nats per token)
    assert torch.allclose(packed, alone, rtol=2e-3, atol=5e-2), (packed, alone)


@needs_corpus
@needs_tokenizer
def test_a_neighbour_in_the_pack_changes_no_score(trained):
    """Example A after B or after C (same lengths, other tokens), at the same positions: A's
    scores must be identical, bit for bit. Weights made large and random, so that any path from a
    neighbour would show. (The FP8 MLP's and the FP8 QKV's one input scale per forward pass are
    such paths, by design: they are off here.)"""
    model, cfg, windows = tg.model_from_checkpoint(str(trained[0]), torch.device("cpu"), print)
    model.cfg = dataclasses.replace(cfg, fp8_mlp_up=False, fp8_mlp_down=False,
                                    fp8_mlp_backward=False, fp8_qkv=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 if p.dim() < 2 else min(p.shape[-2:]) ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * scale)

    def example(seed):
        g = torch.Generator().manual_seed(seed)
        tokens = lambda n: torch.randint(0, 50000, (n,), generator=g).tolist()  # noqa: E731
        return tg.HellaSwagExample(tokens(7), [tokens(3), tokens(5), tokens(2), tokens(4)],
                                   [9, 20, 6, 14], 1)

    A, B, C = example(1), example(2), example(3)
    after_b = tg.ending_log_likelihoods(model, cfg, windows, [B, A])
    after_c = tg.ending_log_likelihoods(model, cfg, windows, [C, A])
    assert not torch.equal(after_b[0], after_c[0])          # B and C do score differently
    assert torch.equal(after_b[1], after_c[1])


@needs_corpus
@needs_tokenizer
def test_accuracies_and_their_split_over_ranks(trained):
    """The counts from the scores of every pack; on 2 or 3 ranks the same packs, so the same
    counts (the FP8 MLP's per-pass scale included)."""
    path, data, _ = trained
    model, cfg, windows = tg.model_from_checkpoint(str(path), torch.device("cpu"), print)
    examples = tg.read_hellaswag(data, tg.gpt2_encode()) * 40   # packs of 36, 36, 36 and 12
    packs = list(tg.hellaswag_packs(examples, tg.HELLASWAG_PACK_TOKENS))
    assert len(packs) >= 3
    scores = torch.cat([tg.ending_log_likelihoods(model, cfg, windows, pack) for pack in packs])
    labels = torch.tensor([e.label for e in examples])
    chars = torch.tensor([e.ending_chars for e in examples], dtype=torch.float64)
    want = [float((scores.argmax(1) == labels).sum()), float(((scores / chars).argmax(1) == labels).sum())]
    assert tg.hellaswag_counts(model, cfg, windows, examples).tolist() == want
    for world_size in (2, 3):
        split = sum(tg.hellaswag_counts(model, cfg, windows, examples, rank, world_size)
                    for rank in range(world_size))
        assert split.tolist() == want


@needs_corpus
@needs_tokenizer
def test_end_of_training_score_equals_the_checkpoints(trained, capsys):
    path, data, log = trained
    (line,) = re.findall(r"^hellaswag acc:\S+ acc_norm:\S+ examples:3", log, re.M)
    assert "| HellaSwag | acc " in open(glob.glob(str(path.parent.parent / "*_report.md"))[0]).read()
    tg.main(["--eval=hellaswag", f"--checkpoint={path}", f"--hellaswag_file={data}"])
    assert capsys.readouterr().out.startswith(line + " (")


def test_eval_option_is_checked(tmp_path):
    with pytest.raises(SystemExit, match="eval=mmlu: expected hellaswag"):
        tg.main([*TINY, "--eval=mmlu", f"--log_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--top_k=3.*evaluating a checkpoint takes"):
        tg.main(["--eval=hellaswag", "--checkpoint=x.pt", "--top_k=3"])
