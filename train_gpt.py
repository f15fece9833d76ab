"""NanoGPT speedrun trainer: a GPT-2-small-class model trained to 3.28 val loss on FineWeb.

Read top to bottom: configuration, FP8 custom ops, optimizer, model, data, schedule, training
loop, main(). Importing this file does no work; `python train_gpt.py --help` lists the options.
Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (1, 2, 4 or 8 processes).
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

# =================================================================================================
# Configuration
# =================================================================================================

@dataclass(frozen=True)
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760            # the first tokens of the val stream
    val_batch_tokens: int = 4 * 64 * 1024 * 8  # tokens per validation step, all ranks together
    cycle_train_data: bool = False          # wrap around to the first shard when data runs out
    # schedule: three stages of equal length, then an extension at the final learning rate
    num_scheduled_iterations: int = 1450
    num_extension_iterations: int = 40
    stop_after_steps: int = 0               # >0: end the run early after this many steps
    micro_batches_per_step: int = 8         # world_size * grad_accum_steps
    stage_batch_tokens: tuple = (8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8)
    stage_max_seq_len: tuple = (896, 2048, 2048)
    stage_lr_mul: tuple = (1.0, 1.52, 1.73)
    stage_windows: tuple = ((1, 3), (3, 7), (5, 11))   # (short, long) attention windows, in blocks
    extension_windows: tuple = (6, 13)
    final_val_windows: tuple = (6, 20)      # long window widened for the last validation, no YaRN
    window_block_size: int = 128
    # multi-token prediction weights per stage: (weights at the stage start, at its end)
    stage_mtp_weights: tuple = (((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
                                ((1.0, 0.5), (1.0, 0.0)),
                                ((1.0,), (1.0,)))
    cooldown_frac: float = 0.60
    final_lr_mul: float = 0.15
    val_every: int = 250
    # model
    vocab_size: int = 50257
    num_layers: int = 11
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    mlp_hidden: int = 3072
    bigram_vocab_mult: int = 5              # bigram hash table rows = padded vocab x this
    # optimizer
    adam_lr: float = 0.008
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.005
    muon_lr: float = 0.023
    muon_beta2: float = 0.95
    muon_weight_decay: float = 1.2
    muon_momentum_min: float = 0.85
    muon_momentum_max: float = 0.95
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 50
    # FP8 output head scales (divided by the e4m3 max 448)
    head_x_scale: float = 100 / 448
    head_w_scale: float = 1.6 / 448
    head_grad_scale: float = 0.75 / 448
    # run
    seed: int = 0
    compile: bool = True
    save_checkpoint: bool = False
    log_dir: str = "logs"

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def bigram_vocab_size(self) -> int:
        return self.padded_vocab_size * self.bigram_vocab_mult

    @property
    def num_train_steps(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations


# A tiny model and short schedule that trains on two CPU cores in about a minute.
PRESETS: dict[str, dict] = {
    "speedrun": {},
    "smoke": dict(
        train_files="../shared/data/corpus/corpus_train_*.bin",
        val_files="../shared/data/corpus/corpus_val_*.bin",
        val_tokens=65_536, val_batch_tokens=32_768,
        num_scheduled_iterations=120, num_extension_iterations=6, val_every=30,
        stage_batch_tokens=(4096, 8192, 12288), stage_max_seq_len=(256, 512, 512),
        num_heads=2, head_dim=64, model_dim=128, mlp_hidden=512, bigram_vocab_mult=1,
        compile=False,
    ),
}


def parse_config(argv: list[str]) -> Hyperparameters:
    """`--preset=name` picks a preset, then every `--key=value` overrides one field."""
    overrides: dict[str, object] = {}
    preset = "speedrun"
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help())
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"argument {arg!r}: expected --key=value (see --help)")
        key, value = arg[2:].split("=", 1)
        if key == "preset":
            if value not in PRESETS:
                raise SystemExit(f"--preset={value}: expected one of {sorted(PRESETS)}")
            preset = value
            continue
        if key not in fields:
            raise SystemExit(f"--{key}: unknown option (see --help)")
        overrides[key] = _parse_value(key, value, fields[key].default)
    return Hyperparameters(**{**PRESETS[preset], **overrides})


def _parse_value(key: str, text: str, default: object) -> object:
    if isinstance(default, bool):
        if text.lower() not in ("0", "1", "true", "false"):
            raise SystemExit(f"--{key}={text}: expected true or false")
        return text.lower() in ("1", "true")
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SystemExit(f"--{key}={text}: expected a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if type(value) is not type(default):
        raise SystemExit(f"--{key}={text}: expected a {type(default).__name__}")
    return value


def config_help() -> str:
    lines = ["usage: train_gpt.py [--preset=NAME] [--key=value ...] [--summary [--world_size=K]]",
             f"presets: {', '.join(PRESETS)} (default speedrun)", "options (default):"]
    for f in dataclasses.fields(Hyperparameters):
        lines.append(f"  --{f.name}={f.default!r}")
    return "\n".join(lines)


# =================================================================================================
# FP8 custom ops
# =================================================================================================


# =================================================================================================
# Optimizer: NorMuon for the matrix banks, Adam for everything else
# =================================================================================================


# =================================================================================================
# Model
# =================================================================================================


# =================================================================================================
# Data: token shards and the distributed loaders
# =================================================================================================

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
BOS_ID = 50256


class DataError(ValueError):
    """A data file or data setting that cannot be used; the message names it."""


def read_shard_header(path: str) -> int:
    """Check a shard's header against its size and return its token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(header) < SHARD_HEADER_INTS:
        raise DataError(f"{path}: truncated header ({size} bytes, expected at least "
                        f"{SHARD_HEADER_INTS * 4})")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: not a token shard (magic {header[0]}, expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * num_tokens
    if size != expected:
        raise DataError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file "
                        f"has {size} bytes (truncated or corrupt)")
    return num_tokens


def load_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens (uint16) after checking its header."""
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(num_tokens,))


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write tokens (all < 2**16) as a shard; the header is written last-to-disk atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def find_shards(pattern: str) -> list[str]:
    """Sorted shard files matching a glob pattern; an error if there are none."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no files match {pattern!r} (download them with "
                        f"`python data/cached_fineweb10B.py 9` or pass --train_files/--val_files)")
    return files



# =================================================================================================
# Schedule
# =================================================================================================


# =================================================================================================
# Training loop
# =================================================================================================


def main(argv: list[str] | None = None) -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
