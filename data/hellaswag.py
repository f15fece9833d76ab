"""Download the HellaSwag validation set for `train_gpt.py --eval=hellaswag`.

    python data/hellaswag.py

fetches hellaswag_val.jsonl (10,042 examples, MIT licence) from the dataset's public repository
into data/hellaswag/ and checks it against the pinned size and SHA-256 (the values Hugging Face's
`datasets` recorded for the same URL). A file already there is checked and kept. Offline, download
the file on another machine and put it at data/hellaswag/hellaswag_val.jsonl; it is checked the
same way.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SIZE = 12_246_618
SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag",
                            "hellaswag_val.jsonl")


class HellaSwagDataError(RuntimeError):
    """A file that is not the pinned one, or a download that failed; one line naming the file."""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str, size: int = SIZE, sha256: str = SHA256) -> None:
    """Raise HellaSwagDataError unless `path` has exactly the pinned size and checksum."""
    actual_size = os.path.getsize(path)
    if actual_size != size:
        raise HellaSwagDataError(f"{path}: {actual_size:,} bytes, expected {size:,} (not the "
                                 f"HellaSwag validation file of {URL}); delete it and download again")
    actual = sha256_of(path)
    if actual != sha256:
        raise HellaSwagDataError(f"{path}: SHA-256 {actual}, expected {sha256} (not the HellaSwag "
                                 f"validation file of {URL}); delete it and download again")


def download(path: str = DEFAULT_PATH, url: str = URL, size: int = SIZE,
             sha256: str = SHA256) -> str:
    """The checked file at `path`, downloaded first when missing (into a temporary name, renamed
    only once it checks out)."""
    if os.path.exists(path):
        verify(path, size, sha256)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise HellaSwagDataError(f"cannot download {url} ({e}); offline, fetch it on another "
                                 f"machine and put it at {path}") from None
    try:
        verify(tmp, size, sha256)
    except HellaSwagDataError:
        os.remove(tmp)
        raise
    os.replace(tmp, path)
    return path


def main() -> None:
    try:
        path = download()
    except HellaSwagDataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{path}: checked (SHA-256 {SHA256[:16]}...)")


if __name__ == "__main__":
    main()
