"""Download the FineWeb-10B GPT-2 token shards from the Hugging Face Hub.

    python data/cached_fineweb10B.py [NUM_CHUNKS]

fetches fineweb_val_000000.bin and fineweb_train_000001.bin .. fineweb_train_{NUM_CHUNKS:06d}.bin
(100M tokens each; 103 = the whole 10B-token sample, the default) from the dataset repository
kjj0/fineweb10B-gpt2 into data/fineweb10B/. A speedrun reads about 0.4B tokens, so 9 chunks are
enough. Shards already present with a valid header are kept; every new one is checked.
"""
from __future__ import annotations

import os
import sys

# data/tokenize.py shadows the standard library's `tokenize` (imported by inspect, dataclasses and
# torch): when run as a script this folder must leave the import path before anything is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT_DIRS = {os.path.realpath(_HERE), os.path.dirname(os.path.realpath(__file__))}  # also when symlinked
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) not in _SCRIPT_DIRS]
REPO_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import socket  # noqa: E402
from typing import Callable  # noqa: E402

from train_gpt import DataError, read_shard_header  # noqa: E402

HF_REPO_ID = "kjj0/fineweb10B-gpt2"
MAX_CHUNKS = 103                      # train chunks in the repository
DEFAULT_DEST_DIR = os.path.join(_HERE, "fineweb10B")

Fetch = Callable[[str, str], str]     # (file name, destination folder) -> path of the local file


class DownloadError(RuntimeError):
    """A download that cannot go on; the message is one line naming the file."""


def shard_names(num_chunks: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_chunks + 1)]


def hf_fetch(filename: str, dest_dir: str) -> str:
    """Download one file of the dataset repository into dest_dir (huggingface_hub shows progress)."""
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=HF_REPO_ID, filename=filename, repo_type="dataset", local_dir=dest_dir)


# =================================================================================================
# Error classification
# =================================================================================================
# huggingface_hub reports an unreachable Hub as LocalEntryNotFoundError (nothing cached) or raises
# the HTTP client's own error; which client (requests, httpx, httpx2) depends on its version, so
# those are recognised by module and class name rather than imported.

_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3")
_NETWORK_CLASS_NAMES = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "ProxyError",
                        "ReadTimeout", "Timeout", "TimeoutException", "NewConnectionError"}
_HUB_OFFLINE_CLASS_NAMES = {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}


def is_connection_error(exc: BaseException) -> bool:
    """True if exc, or an exception it was raised from, means the Hub could not be reached."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        for cls in type(e).__mro__:
            root_module = cls.__module__.split(".")[0]
            if root_module == "huggingface_hub" and cls.__name__ in _HUB_OFFLINE_CLASS_NAMES:
                return True
            if root_module in _NETWORK_MODULES and cls.__name__ in _NETWORK_CLASS_NAMES:
                return True
        stack += [e.__cause__, e.__context__]
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# =================================================================================================
# Download
# =================================================================================================

def valid_shard(path: str) -> bool:
    try:
        read_shard_header(path)
        return True
    except DataError:
        return False


def download(num_chunks: int, dest_dir: str = DEFAULT_DEST_DIR, fetch: Fetch = hf_fetch) -> dict[str, int]:
    """Make dest_dir hold the val shard and the first num_chunks train shards, all with valid headers.

    Returns counts {"present": kept as they were, "downloaded": fetched now}.
    Raises DownloadError (one line) when the Hub cannot be reached or a download is corrupt.
    """
    os.makedirs(dest_dir, exist_ok=True)
    names = shard_names(num_chunks)
    counts = {"present": 0, "downloaded": 0}
    for index, name in enumerate(names, start=1):
        path = os.path.join(dest_dir, name)
        if os.path.exists(path):
            if valid_shard(path):
                counts["present"] += 1
                continue
            print(f"{path}: existing file is not a valid shard, downloading it again", flush=True)
            os.remove(path)
        print(f"[{index}/{len(names)}] downloading {name}", flush=True)
        try:
            local_path = fetch(name, dest_dir)
        except Exception as e:
            if is_connection_error(e):
                raise DownloadError(f"cannot reach the Hugging Face Hub to download {name} "
                                    f"({_first_line(e)}); check the internet connection") from None
            if type(e).__module__.split(".")[0] == "huggingface_hub":
                raise DownloadError(f"download of {name} from {HF_REPO_ID} failed: {_first_line(e)}") from None
            raise
        try:
            read_shard_header(local_path)
        except DataError as e:
            os.remove(local_path)  # a corrupt file must not pass as "present" on the next run
            raise DownloadError(f"downloaded {name} is corrupt and was removed, run again: {e}") from None
        counts["downloaded"] += 1
    return counts


# =================================================================================================
# Command line
# =================================================================================================

def _num_chunks(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CHUNKS:
        raise argparse.ArgumentTypeError(f"expected a whole number of 100M-token chunks from 1 to "
                                         f"{MAX_CHUNKS}, got {text!r}")
    return value


def main(argv: list[str] | None = None, dest_dir: str = DEFAULT_DEST_DIR, fetch: Fetch = hf_fetch) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_chunks", nargs="?", type=_num_chunks, default=MAX_CHUNKS,
                        help=f"train chunks of 100M tokens to fetch (default {MAX_CHUNKS})")
    args = parser.parse_args(argv)
    try:
        counts = download(args.num_chunks, dest_dir, fetch)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{dest_dir}: {args.num_chunks + 1} shards ready "
          f"({counts['downloaded']} downloaded, {counts['present']} already present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
