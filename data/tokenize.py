"""Tokenize your own text into GPT-2 token shards that train_gpt.py can read.

    python data/tokenize.py INPUT... [--out_dir DIR] [--name NAME] [--val_fraction F | --val_docs K]

INPUT: .txt files (one document each), .jsonl files (one document per line, in its "text" field),
folders (searched recursively for .txt and .jsonl files; other files there are ignored) or glob
patterns. Every document becomes [50256] + tiktoken gpt2 encode_ordinary(text); the documents are
packed into shards of --shard_size tokens (a document may span two shards):
OUT_DIR/NAME_val_000000.bin, ... and OUT_DIR/NAME_train_000001.bin, ...

The val/train split is by document: the val documents are the K with the smallest seeded hash of
their text. The same inputs and --seed give identical shards whatever the worker count, and a
document's split does not depend on where it sits in the inputs. Within each split the documents
keep their input order.
Train on the result with: train_gpt.py --train_files='OUT_DIR/NAME_train_*.bin'
--val_files='OUT_DIR/NAME_val_*.bin' [--val_tokens=...]
"""
from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (imported by inspect, linecache,
# dataclasses and torch): when run as a script its folder must leave the import path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT_DIRS = {os.path.realpath(_HERE), os.path.dirname(os.path.realpath(__file__))}  # also when symlinked
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) not in _SCRIPT_DIRS]
REPO_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Iterator  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from train_gpt import BOS_ID, DataError, write_shard  # noqa: E402

DOCUMENT_SUFFIXES = (".txt", ".jsonl")
DEFAULT_VAL_TOKENS = 10_485_760      # what train_gpt.py evaluates unless --val_tokens says otherwise
BATCH_CHARS = 1_000_000              # text per worker task: large enough to amortise the IPC


# =================================================================================================
# Inputs: paths -> files -> documents
# =================================================================================================

def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by the inputs, in input order, each once. Errors name the input at fault."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                           if name.endswith(DOCUMENT_SUFFIXES))
            if not found:
                raise DataError(f"{item}: folder holds no .txt or .jsonl files")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{item}: no such file or folder, and no files match it as a pattern")
        for path in found:
            if not path.endswith(DOCUMENT_SUFFIXES):
                raise DataError(f"{path}: unknown file type (expected .txt or .jsonl)")
        files += found
    unique: dict[str, str] = {}
    for path in files:
        unique.setdefault(os.path.realpath(path), path)  # a file named twice is read once
    return list(unique.values())


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def iter_documents(files: list[str]) -> Iterator[str]:
    """Every document of the files, in order. Blank lines of .jsonl files are skipped."""
    for path in files:
        if path.endswith(".txt"):
            yield _read_text(path)
            continue
        for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}:{line_number}: expected a JSON object with a \"text\" field")
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{line_number}: \"text\" must be a string, "
                                f"got {type(record['text']).__name__}")
            yield record["text"]


# =================================================================================================
# Split
# =================================================================================================

def document_key(text: str, seed: int) -> int:
    """Seeded 64-bit hash of a document's text: the split does not depend on where the document sits."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little")).digest()
    return int.from_bytes(digest, "little")


def choose_val_documents(files: list[str], seed: int, val_fraction: float, val_docs: int | None) -> np.ndarray:
    """A boolean mask over all documents in input order: True for the val documents, the ones with
    the smallest seeded hashes (ties, i.e. duplicate texts, broken by input order)."""
    keys = np.fromiter((document_key(text, seed) for text in iter_documents(files)), dtype=np.uint64)
    num_docs = len(keys)
    if num_docs == 0:
        raise DataError(f"the inputs hold no documents ({len(files)} file(s) read)")
    if num_docs < 2:
        raise DataError("need at least 2 documents: one for the val split and one for train")
    num_val = val_docs if val_docs is not None else max(1, round(val_fraction * num_docs))
    if num_val >= num_docs:
        raise DataError(f"{num_val} val documents leave none for train (the inputs hold {num_docs}); "
                        f"lower --val_docs or --val_fraction")
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[np.argsort(keys, kind="stable")[:num_val]] = True
    return is_val


# =================================================================================================
# Tokenization (worker processes)
# =================================================================================================

_encoder = None


def _gpt2_encoder():
    global _encoder
    if _encoder is None:
        import tiktoken
        try:
            _encoder = tiktoken.get_encoding("gpt2")
        except Exception as e:  # noqa: BLE001 - network or cache: one message for all
            raise DataError(f"the GPT-2 encoding could not be loaded ({type(e).__name__}); "
                            f"tiktoken downloads it once and caches it. Offline, set "
                            f"TIKTOKEN_CACHE_DIR to a folder that holds its cached files") from None
    return _encoder


def encode_documents(texts: list[str]) -> list[np.ndarray]:
    """[BOS] + encode_ordinary(text) for every text, as uint16 arrays."""
    encoder = _gpt2_encoder()
    return [np.array([BOS_ID] + encoder.encode_ordinary(text), dtype=np.uint16) for text in texts]


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_stream(texts: Iterator[str], workers: int) -> Iterator[np.ndarray]:
    """Token arrays of the texts, in order. Works in waves of batches so memory stays bounded."""
    if workers == 1:
        for batch in _batches(texts):
            yield from encode_documents(batch)
        return
    with multiprocessing.Pool(workers) as pool:
        batches = _batches(texts)
        while True:
            wave = [batch for _, batch in zip(range(2 * workers), batches)]
            if not wave:
                return
            for encoded in pool.map(encode_documents, wave):
                yield from encoded


# =================================================================================================
# Output
# =================================================================================================

class ShardWriter:
    """Packs token arrays into shards of exactly shard_size tokens (the last one holds the rest)."""

    def __init__(self, out_dir: str, name: str, split: str, first_index: int, shard_size: int):
        self.out_dir, self.name, self.split = out_dir, name, split
        self.next_index = first_index
        self.shard_size = shard_size
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.paths: list[str] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= self.shard_size:
            buffer = np.concatenate(self.pending)
            full = len(buffer) // self.shard_size * self.shard_size
            for start in range(0, full, self.shard_size):
                self._write(buffer[start:start + self.shard_size])
            self.pending = [buffer[full:]]
            self.pending_tokens = len(buffer) - full

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = os.path.join(self.out_dir, f"{self.name}_{self.split}_{self.next_index:06d}.bin")
        write_shard(path, tokens)
        self.paths.append(path)
        self.next_index += 1


def existing_shards(out_dir: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(name)}_val_*.bin")) +
                  glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(name)}_train_*.bin")))


# =================================================================================================
# Driver
# =================================================================================================

@dataclass
class Summary:
    files: int
    val: ShardWriter
    train: ShardWriter


def tokenize(inputs: list[str], out_dir: str, name: str = "custom", shard_size: int = 100_000_000,
             val_fraction: float = 0.01, val_docs: int | None = None, seed: int = 0, workers: int = 1,
             overwrite: bool = False, progress: bool = False) -> Summary:
    files = expand_inputs(inputs)
    stale = existing_shards(out_dir, name)
    if stale and not overwrite:
        raise DataError(f"{out_dir} already holds {len(stale)} {name}_* shard(s) (e.g. {stale[0]}); "
                        f"pass --overwrite to replace them or choose another --name")
    is_val = choose_val_documents(files, seed, val_fraction, val_docs)
    os.makedirs(out_dir, exist_ok=True)
    for path in stale:  # left over from an earlier, possibly larger, run: they would mix in
        os.remove(path)
    val = ShardWriter(out_dir, name, "val", 0, shard_size)
    train = ShardWriter(out_dir, name, "train", 1, shard_size)
    encoded = encode_stream(iter_documents(files), workers)
    for index, tokens in enumerate(tqdm(encoded, total=len(is_val), unit="doc", disable=not progress)):
        (val if is_val[index] else train).add(tokens)
    val.close()
    train.close()
    return Summary(len(files), val, train)


def format_summary(summary: Summary) -> str:
    lines = [f"{summary.files} file(s), {summary.val.documents + summary.train.documents:,} documents",
             f"{'split':<6}{'documents':>12}{'tokens':>16}{'shards':>8}  files"]
    for writer in (summary.val, summary.train):
        first = writer.paths[0]
        files = first if len(writer.paths) == 1 else f"{first} .. {os.path.basename(writer.paths[-1])}"
        lines.append(f"{writer.split:<6}{writer.documents:>12,}{writer.tokens:>16,}{len(writer.paths):>8}  {files}")
    if summary.val.tokens < DEFAULT_VAL_TOKENS:
        lines.append(f"note: train_gpt.py evaluates {DEFAULT_VAL_TOKENS:,} val tokens by default; "
                     f"this val split has {summary.val.tokens:,}, so pass --val_tokens=N with N <= that")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt/.jsonl files, folders or glob patterns")
    parser.add_argument("--out_dir", default=os.path.join(_HERE, "custom"), help="output folder (default data/custom)")
    parser.add_argument("--name", default="custom", help="shard name prefix (default custom)")
    parser.add_argument("--shard_size", type=_positive_int, default=100_000_000, help="tokens per shard")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val_fraction", type=_fraction, default=0.01,
                       help="fraction of the documents for val, at least one (default 0.01)")
    split.add_argument("--val_docs", type=_positive_int, help="exact number of val documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split hash (default 0)")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing NAME_* shards in --out_dir")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**64:
        parser.error(f"argument --seed: expected an integer from 0 to 2**64-1, got {args.seed}")
    try:
        summary = tokenize(args.inputs, args.out_dir, args.name, args.shard_size, args.val_fraction,
                           args.val_docs, args.seed, args.workers, args.overwrite, progress=True)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
