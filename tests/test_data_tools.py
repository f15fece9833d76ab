"""data/cached_fineweb10B.py (with stand-in fetchers, no network) and data/tokenize.py."""
import hashlib
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED, needs_tokenizer
from train_gpt import BOS_ID, load_shard, write_shard

TIKTOKEN_CACHE = os.path.join(SHARED, "data", "gpt2_tokenizer", "tiktoken_cache")

downloader = importlib.import_module("data.cached_fineweb10B")
tokenizer = importlib.import_module("data.tokenize")


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)


def gpt2():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


# =================================================================================================
# Download
# =================================================================================================

class FakeHub:
    """Stands in for hf_hub_download: writes a small valid shard per file and records the calls."""

    def __init__(self, corrupt: set[str] = frozenset(), error: BaseException | None = None):
        self.calls: list[str] = []
        self.corrupt = corrupt
        self.error = error

    def __call__(self, filename: str, dest_dir: str) -> str:
        self.calls.append(filename)
        if self.error is not None:
            raise self.error
        path = os.path.join(dest_dir, filename)
        write_shard(path, np.arange(len(self.calls) * 10, dtype=np.uint16))
        if filename in self.corrupt:
            with open(path, "ab") as f:
                f.write(b"\x00\x01\x02")   # size no longer matches the header
        return path


def expected_names(n: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + ["fineweb_train_%06d.bin" % i for i in range(1, n + 1)]


def test_download_fetches_val_then_train_chunks(tmp_path, capsys):
    hub = FakeHub()
    assert downloader.main(["3"], dest_dir=str(tmp_path), fetch=hub) == 0
    assert hub.calls == expected_names(3)
    assert sorted(os.listdir(tmp_path)) == sorted(expected_names(3))
    assert "4 shards ready (4 downloaded, 0 already present)" in capsys.readouterr().out


def test_download_default_is_103_chunks(tmp_path):
    hub = FakeHub()
    assert downloader.main([], dest_dir=str(tmp_path), fetch=hub) == 0
    assert hub.calls == expected_names(103)


def test_download_skips_valid_files_and_replaces_invalid_ones(tmp_path, capsys):
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(5, dtype=np.uint16))
    write_shard(str(tmp_path / "fineweb_train_000002.bin"), np.arange(5, dtype=np.uint16))
    (tmp_path / "fineweb_train_000001.bin").write_bytes(b"not a shard at all")
    hub = FakeHub()
    counts = downloader.download(3, str(tmp_path), hub)
    assert hub.calls == ["fineweb_train_000001.bin", "fineweb_train_000003.bin"]
    assert counts == {"present": 2, "downloaded": 2}
    assert "fineweb_train_000001.bin: existing file is not a valid shard" in capsys.readouterr().out
    assert len(load_shard(str(tmp_path / "fineweb_val_000000.bin"))) == 5   # untouched


def test_corrupt_download_is_an_error_naming_the_file(tmp_path, capsys):
    hub = FakeHub(corrupt={"fineweb_train_000002.bin"})
    assert downloader.main(["3"], dest_dir=str(tmp_path), fetch=hub) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: downloaded fineweb_train_000002.bin is corrupt") and err.count("\n") == 1
    assert hub.calls == expected_names(2)                     # stops at the bad file
    assert not (tmp_path / "fineweb_train_000002.bin").exists()  # so the next run fetches it again


def _httpx_style_error() -> BaseException:
    connect_error = type("ConnectError", (Exception,), {"__module__": "httpx2._exceptions"})
    try:
        try:
            raise connect_error("[Errno 111] Connection refused")
        except Exception as e:
            raise RuntimeError("request failed") from e
    except RuntimeError as outer:
        return outer


def _hub_offline_error() -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError
    return LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.\nmore")


@pytest.mark.parametrize("make_error", [lambda: ConnectionError("network unreachable"), _httpx_style_error,
                                        _hub_offline_error, lambda: TimeoutError("timed out")])
def test_offline_gives_one_line_and_exit_code_1(tmp_path, capsys, make_error):
    hub = FakeHub(error=make_error())
    assert downloader.main(["2"], dest_dir=str(tmp_path), fetch=hub) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("error: cannot reach the Hugging Face Hub to download fineweb_val_000000.bin")


def test_unrelated_errors_are_not_reported_as_offline(tmp_path):
    with pytest.raises(ZeroDivisionError):
        downloader.download(1, str(tmp_path), FakeHub(error=ZeroDivisionError("a bug")))
    assert not downloader.is_connection_error(ValueError("bad value"))


@pytest.mark.parametrize("bad", ["0", "-2", "abc", "1.5", "104"])
def test_bad_chunk_count_is_a_usage_error(tmp_path, capsys, bad):
    hub = FakeHub()
    with pytest.raises(SystemExit) as exit_info:
        downloader.main([bad], dest_dir=str(tmp_path), fetch=hub)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"expected a whole number of 100M-token chunks from 1 to 103, got '{bad}'" in err
    assert hub.calls == []


def test_hf_fetch_asks_the_dataset_repository(monkeypatch, tmp_path):
    import huggingface_hub
    seen = {}

    def fake_hf_hub_download(**kwargs):
        seen.update(kwargs)
        return os.path.join(kwargs["local_dir"], kwargs["filename"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    path = downloader.hf_fetch("fineweb_train_000007.bin", str(tmp_path))
    assert seen == {"repo_id": "kjj0/fineweb10B-gpt2", "filename": "fineweb_train_000007.bin",
                    "repo_type": "dataset", "local_dir": str(tmp_path)}
    assert path == str(tmp_path / "fineweb_train_000007.bin")


def test_download_script_runs_beside_tokenize_py(tmp_path):
    # data/tokenize.py shadows the standard library's tokenize for scripts in data/; the script must
    # still start (and here stop at the usage error, before any download).
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "cached_fineweb10B.py"), "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "expected a whole number of 100M-token chunks from 1 to 103, got '0'" in result.stderr


# =================================================================================================
# Tokenize
# =================================================================================================

TEXTS = [
    "Hello world. This is the first document.",
    "Ünïcödé test: naïve café — “quotes” and emoji 🚀.",
    "Code-like text: def f(x):\n    return x ** 2\n",
    "A literal <|endoftext|> in text is ordinary text, not the separator.",
    "",
    "Short.",
    "Numbers 1234567890 and   multiple   spaces.\n\nParagraphs too.",
]


def write_corpus(folder, texts=TEXTS) -> list[str]:
    """texts[0..2] as .txt files in folder/txt, the rest as lines of folder/more.jsonl (in order)."""
    import json
    os.makedirs(os.path.join(folder, "txt"), exist_ok=True)
    for i, text in enumerate(texts[:3]):
        with open(os.path.join(folder, "txt", f"doc{i}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(folder, "more.jsonl"), "w", encoding="utf-8") as f:
        for text in texts[3:]:
            f.write(json.dumps({"id": 1, "text": text}) + "\n\n")   # blank lines are skipped
    return [os.path.join(folder, "txt"), os.path.join(folder, "more.jsonl")]


def read_split(out_dir, name, split) -> tuple[list[str], np.ndarray]:
    files = sorted(f for f in os.listdir(out_dir) if f.startswith(f"{name}_{split}_"))
    tokens = np.concatenate([np.asarray(load_shard(os.path.join(out_dir, f))) for f in files])
    return files, tokens


def split_documents(tokens: np.ndarray) -> list[list[int]]:
    """The documents of a token stream: every document starts with BOS."""
    starts = list(np.flatnonzero(tokens == BOS_ID)) + [len(tokens)]
    assert starts[0] == 0, "stream must start with BOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]


@needs_tokenizer
def test_tokens_match_tiktoken_with_bos_before_each_document(tmp_path):
    inputs = write_corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    summary = tokenizer.tokenize(inputs, out, name="t", val_docs=2, workers=1)
    encoded = [gpt2().encode_ordinary(text) for text in TEXTS]
    _, val = read_split(out, "t", "val")
    _, train = read_split(out, "t", "train")
    val_docs, train_docs = split_documents(val), split_documents(train)
    assert len(val_docs) == 2 and len(train_docs) == len(TEXTS) - 2
    # together the splits hold every document once, each split in input order
    assert sorted(val_docs + train_docs) == sorted(encoded)
    assert val_docs == [d for d in encoded if d in val_docs]
    assert train_docs == [d for d in encoded if d in train_docs]
    assert int(np.sum(val == BOS_ID)) == 2 and int(np.sum(train == BOS_ID)) == len(TEXTS) - 2
    assert summary.val.tokens + summary.train.tokens == sum(len(e) + 1 for e in encoded)
    assert (summary.val.documents, summary.train.documents, summary.files) == (2, len(TEXTS) - 2, 4)


def many_texts(n: int) -> list[str]:
    return [f"Document number {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(i % 9 + 3)) for i in range(n)]


@needs_tokenizer
def test_split_is_deterministic_across_workers_and_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "BATCH_CHARS", 100)   # many small worker tasks, several waves
    texts = many_texts(40)
    inputs = write_corpus(str(tmp_path / "in"), texts)
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        tokenizer.tokenize(inputs, out, val_docs=10, seed=3, workers=workers, shard_size=64)
        outputs[workers] = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
    assert outputs[1] == outputs[2]

    def val_documents(out):
        return sorted(split_documents(read_split(out, "custom", "val")[1]))

    reordered = str(tmp_path / "reordered")
    tokenizer.tokenize(list(reversed(inputs)), reordered, val_docs=10, seed=3, workers=2)
    assert val_documents(reordered) == val_documents(str(tmp_path / "out1"))
    other_seed = str(tmp_path / "seed4")
    tokenizer.tokenize(inputs, other_seed, val_docs=10, seed=4, workers=1)
    assert val_documents(other_seed) != val_documents(reordered)


@needs_tokenizer
def test_val_documents_are_the_smallest_seeded_hashes(tmp_path):
    texts = many_texts(25)
    inputs = write_corpus(str(tmp_path / "in"), texts)
    out = str(tmp_path / "out")
    tokenizer.tokenize(inputs, out, val_fraction=0.2, seed=11, workers=1)
    salt = (11).to_bytes(16, "little")
    ranked = sorted(texts, key=lambda t: hashlib.blake2b(t.encode(), digest_size=8, salt=salt).digest()[::-1])
    expected = sorted(gpt2().encode_ordinary(t) for t in ranked[:5])   # round(0.2 * 25) = 5
    assert sorted(split_documents(read_split(out, "custom", "val")[1])) == expected


@needs_tokenizer
def test_shard_boundaries_with_a_small_shard_size(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "BATCH_CHARS", 100)
    texts = many_texts(30)
    inputs = write_corpus(str(tmp_path / "in"), texts)
    out = str(tmp_path / "out")
    summary = tokenizer.tokenize(inputs, out, name="small", shard_size=50, val_docs=6, workers=2)
    for split, first_index, writer in (("val", 0, summary.val), ("train", 1, summary.train)):
        files, stream = read_split(out, "small", split)
        assert files == [f"small_{split}_{first_index + i:06d}.bin" for i in range(len(files))]
        sizes = [len(load_shard(os.path.join(out, f))) for f in files]
        assert all(size == 50 for size in sizes[:-1]) and 0 < sizes[-1] <= 50
        assert len(files) == -(-len(stream) // 50) and len(stream) == writer.tokens
        assert len(files) >= 2   # documents really span shard borders here
    val_docs = split_documents(read_split(out, "small", "val")[1])
    train_docs = split_documents(read_split(out, "small", "train")[1])
    encoded = [gpt2().encode_ordinary(t) for t in texts]
    assert sorted(val_docs + train_docs) == sorted(encoded)
    assert train_docs == [d for d in encoded if d in train_docs]   # input order, across worker tasks


@needs_tokenizer
def test_val_fraction_rounds_but_keeps_at_least_one_document(tmp_path):
    inputs = write_corpus(str(tmp_path / "in"), many_texts(12))
    summary = tokenizer.tokenize(inputs, str(tmp_path / "a"), val_fraction=0.01, workers=1)
    assert (summary.val.documents, summary.train.documents) == (1, 11)
    summary = tokenizer.tokenize(inputs, str(tmp_path / "b"), val_fraction=0.5, workers=1)
    assert (summary.val.documents, summary.train.documents) == (6, 6)


@needs_tokenizer
def test_overwrite_removes_shards_of_an_earlier_run(tmp_path, capsys):
    inputs = write_corpus(str(tmp_path / "in"), many_texts(30))
    out = str(tmp_path / "out")
    tokenizer.tokenize(inputs, out, shard_size=20, workers=1)
    assert tokenizer.main(inputs + ["--out_dir", out, "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{out} already holds" in err and "pass --overwrite" in err
    assert tokenizer.main(inputs + ["--out_dir", out, "--workers", "1", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["custom_train_000001.bin", "custom_val_000000.bin"]


@needs_tokenizer
def test_script_runs_in_parallel_and_prints_a_summary(tmp_path):
    inputs = write_corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "tokenize.py"), *inputs, "--out_dir", out,
                             "--name", "mine", "--val_docs", "3", "--workers", "2"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TIKTOKEN_CACHE_DIR": TIKTOKEN_CACHE})
    assert result.returncode == 0, result.stderr
    total_tokens = sum(len(gpt2().encode_ordinary(t)) + 1 for t in TEXTS)
    val_tokens = len(read_split(out, "mine", "val")[1])
    lines = result.stdout.splitlines()
    assert lines[0] == f"4 file(s), {len(TEXTS)} documents"
    val_row = next(line.split() for line in lines if line.startswith("val "))
    train_row = next(line.split() for line in lines if line.startswith("train "))
    assert val_row[:4] == ["val", "3", f"{val_tokens:,}", "1"]
    assert train_row[:4] == ["train", str(len(TEXTS) - 3), f"{total_tokens - val_tokens:,}", "1"]
    assert "pass --val_tokens=N" in result.stdout


def _write(path, content: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


@pytest.mark.parametrize("case", ["glob", "missing", "no_documents_folder", "unknown_type", "bad_json",
                                  "no_text", "text_not_string", "empty_input", "single_document",
                                  "too_many_val", "not_utf8"])
def test_input_errors_name_the_cause(tmp_path, capsys, case):
    good = _write(tmp_path / "good.txt", b"one document")
    other = _write(tmp_path / "other.txt", b"another document")
    d = tmp_path / "x"
    if case == "glob":
        args, expected = [str(tmp_path / "*.md")], f"{tmp_path / '*.md'}: no such file or folder, and no files match"
    elif case == "missing":
        args, expected = [good, str(d / "nope.txt")], f"{d / 'nope.txt'}: no such file or folder"
    elif case == "no_documents_folder":
        _write(d / "readme.md", b"hi")
        args, expected = [str(d)], f"{d}: folder holds no .txt or .jsonl files"
    elif case == "unknown_type":
        args, expected = [good, _write(d / "notes.md", b"hi")], f"{d / 'notes.md'}: unknown file type"
    elif case == "bad_json":
        bad = _write(d / "a.jsonl", b'{"text": "fine"}\n{"text": broken}\n')
        args, expected = [bad], f"{bad}:2: not valid JSON"
    elif case == "no_text":
        bad = _write(d / "a.jsonl", b'{"text": "fine"}\n\n{"body": "x"}\n')
        args, expected = [bad], f"{bad}:3: expected a JSON object with a \"text\" field"
    elif case == "text_not_string":
        bad = _write(d / "a.jsonl", b'{"text": 5}\n')
        args, expected = [bad], f"{bad}:1: \"text\" must be a string, got int"
    elif case == "empty_input":
        args, expected = [_write(d / "a.jsonl", b"\n\n")], "the inputs hold no documents (1 file(s) read)"
    elif case == "single_document":
        args, expected = [good], "need at least 2 documents"
    elif case == "too_many_val":
        args, expected = [good, other, "--val_docs", "2"], "2 val documents leave none for train (the inputs hold 2)"
    else:
        bad = _write(d / "latin1.txt", "café".encode("latin-1"))
        args, expected = [good, bad], f"{bad}: not UTF-8 text"
    assert tokenizer.main(args + ["--out_dir", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("args, expected", [(["--shard_size", "0"], "expected a positive integer, got '0'"),
                                            (["--val_fraction", "1.5"], "expected a number between 0 and 1"),
                                            (["--workers", "none"], "expected a positive integer, got 'none'"),
                                            (["--val_docs", "2", "--val_fraction", "0.1"], "not allowed with")])
def test_bad_options_are_usage_errors(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main([str(tmp_path)] + args)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err



def test_tokenizer_offline_says_how_to_work_offline(tmp_path, monkeypatch, capsys):
    import tiktoken

    def unreachable(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    monkeypatch.setattr(tokenizer, "_encoder", None)
    doc = tmp_path / "a.txt"
    doc.write_text("Some text.")
    (tmp_path / "b.txt").write_text("More text.")
    code = tokenizer.main([str(doc), str(tmp_path / "b.txt"), "--out_dir", str(tmp_path / "out"),
                           "--val_docs=1", "--workers=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "the GPT-2 encoding could not be loaded (ConnectionError)" in err
    assert "TIKTOKEN_CACHE_DIR" in err
