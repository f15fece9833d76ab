import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "data", "gpt2_tokenizer", "tiktoken_cache")
if os.path.isdir(TIKTOKEN_CACHE):   # the GPT-2 tokenizer's files without the network
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
# CORPUS_DIR: the corpus elsewhere (a GPU machine without ../shared: the unpacked shards)
CORPUS = os.environ.get("CORPUS_DIR", os.path.join(SHARED, "data", "corpus"))


def _have_tokenizer() -> bool:
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:  # noqa: BLE001 - offline without its cached files
        return False


def cores_per_worker() -> int:
    """This machine's cores shared out over the test processes (pytest-xdist's workers run side
    by side; without it there is one process)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


torch.set_num_threads(cores_per_worker())   # workers that share cores slow each other down

needs_corpus = pytest.mark.skipif(not os.path.isdir(CORPUS),
                                  reason=f"needs the shared corpus in {CORPUS} (or CORPUS_DIR)")
needs_tokenizer = pytest.mark.skipif(not _have_tokenizer(),
                                     reason="needs the GPT-2 tokenizer's files (TIKTOKEN_CACHE_DIR)")

# Polar Express coefficients (a, b, c), restated from the specification for the tests
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


@pytest.fixture(autouse=True)
def _same_random_numbers_in_any_order():
    """Every test starts from the same global torch seed: PyTorch seeds its generator anew in
    every process, and a test's draws would also depend on which tests ran before it."""
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def stages_option(preset: str = "smoke", **columns: tuple) -> str:
    """A --stages=... option: the preset's stage rows with some columns replaced, e.g.
    stages_option(batch_tokens=(512, 512, 512))."""
    import train_gpt
    rows = train_gpt.Hyperparameters(**train_gpt.PRESETS[preset]).stages
    rows = [row._replace(**{name: values[k] for name, values in columns.items()})
            for k, row in enumerate(rows)]
    return f"--stages={train_gpt.as_literal(tuple(rows))!r}"
