"""NanoGPT speedrun trainer: a GPT-2-small-class model trained to 3.28 val loss on FineWeb.

Read top to bottom: configuration, execution paths, optimizer, model, data, schedule, training
loop, main(). Importing this file does no work; `python train_gpt.py --help` lists the options.
Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (1, 2, 4 or 8 processes).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import glob
import hashlib
import json
import math
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
import unicodedata
import uuid
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, TextIO

import numpy as np
import torch
import torch._dynamo   # lazily imported by torch on first use; here so the start-up report counts it
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.varlen import varlen_attn

import triton_kernels

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def repo_path(path: str) -> str:
    """A relative path that does not exist from here, taken from the repository's root."""
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO_ROOT, path)


# =================================================================================================
# Configuration
# =================================================================================================

class Stage(NamedTuple):
    """One stage of the batch schedule; the scheduled steps are split evenly over the stages."""
    batch_tokens: int                 # tokens per step, all ranks and micro-batches together
    max_seq_len: int                  # documents are cut into segments of at most this length
    lr_mul: float                     # learning-rate multiplier (before the cooldown)
    windows: tuple[int, int]          # (short, long) attention windows, in window blocks
    mtp_weights: tuple[tuple[float, ...], tuple[float, ...]]  # MTP weights at its start, at its end


@dataclass(frozen=True)
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760            # the first tokens of the val stream
    val_batch_tokens: int = 4 * 64 * 1024 * 8  # tokens per validation step, all ranks together
    cycle_train_data: bool = False          # wrap around to the first shard when data runs out
    # schedule: the stages, of equal length, then an extension at the final learning rate that
    # keeps the last stage's batch and MTP weights
    num_scheduled_iterations: int = 1450
    num_extension_iterations: int = 40
    stop_after_steps: int = 0               # >0: end the run early after this many steps
    micro_batches_per_step: int = 8         # world_size * grad_accum_steps
    stages: tuple = (
        #     batch tokens  max len  lr    windows  MTP weights (start, end)
        Stage(8 * 2048 * 8, 896, 1.0, (1, 3), ((1.0, 0.5, 0.25), (1.0, 0.5, 0.0))),
        Stage(16 * 2048 * 8, 2048, 1.52, (3, 7), ((1.0, 0.5), (1.0, 0.0))),
        Stage(24 * 2048 * 8, 2048, 1.73, (5, 11), ((1.0,), (1.0,))),
    )
    extension_windows: tuple = (6, 13)
    final_val_windows: tuple = (6, 20)      # long window widened for the last validation, no YaRN
    window_block_size: int = 128
    cooldown_frac: float = 0.60
    final_lr_mul: float = 0.15
    val_every: int = 250
    # model
    vocab_size: int = 50257
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    mlp_hidden: int = 3072
    mlp: str = "relu2"                      # experiment, in no preset: "pairwise" MLP (see MLP_KINDS)
    pairwise_rank: int = 79                 # --mlp=pairwise: r features, r (r + 1) / 2 products
    pairwise_fused: bool = False            # --mlp=pairwise on a GPU: the products built inside
                                            # Triton GEMMs (true), or in memory for cuBLAS (false)
    bigram_vocab_mult: float = 5.0          # bigram hash table rows = padded vocab x this
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
    seed: int = 0                           # the initial weights, drawn on the training
                                            # device (a GPU draws other ones than a CPU)
    compile: bool = True
    cuda_graphs: bool = False               # the compiled model as CUDA graphs: one launch
                                            # replays a whole pass (no per-kernel host cost)
    dynamic_stages: bool = False            # one compiled step graph serves every stage (see
                                            # "Start-up" in the README)
    symbolic_windows: bool = False          # the attention windows enter the compiled graphs as
                                            # symbols: the extension reuses stage 3's step graph,
                                            # every validation one graph ("Start-up", README)
    use_triton_kernels: bool = True        # CUDA only; CPU always takes the PyTorch reference paths
    flash_attn3: bool = False               # CUDA: FlashAttention-3 from the HF kernels hub if it loads
    triton_attention: bool = False          # CUDA: attention by triton_kernels.windowed_attention
                                            # instead of torch's flash kernels (same math)
    peak_tflops: float = 0.0                # the device's dense bf16 peak for MFU (0: from the table)
    save_every: int = 0                     # >0: a checkpoint every N steps (N even, see below)
    save_checkpoint: bool = False           # a checkpoint at the end of the run
    checkpoint_dir: str = "checkpoints"
    resume: str = ""                        # a checkpoint to continue, or "latest" in checkpoint_dir
    compile_cache: str = ""                 # a file of compiled graphs: loaded if it fits, else
                                            # written after the warm-up
    compile_ahead: bool = False             # helper processes per rank compile the later
                                            # stages' steps while this one compiles stage 1
                                            # ("Start-up", README)
    compile_ahead_helpers: int = 1          # helpers per rank, each with its share of the stages
    eval: str = ""                          # "hellaswag": score the final model, after the clock
    hellaswag_file: str = "data/hellaswag/hellaswag_val.jsonl"   # from data/hellaswag.py
    log_dir: str = "logs"
    # The changes of the public records after #74. The defaults above and here are record #74;
    # the speedrun preset turns these on, and RECORD_CHANGES says how to turn each off again.
    single_stream: bool = False             # #77: one stream; layers 8-10 attend from layer 7's
    tight_cu_seqlens: bool = False          # #78: cu_seqlens sized to the documents a batch holds
    qk_head_pair_groups: bool = False       # #80: Q and K orthogonalised per head pair
    qk_head_dim: int = 0                    # #344: Q/K head width (0: head_dim); V, O keep head_dim
    mudd: bool = False                      # #81: dynamic dense connections on the last layers
    mudd_gates: bool = False                # #85: per-token gates from two small MLPs
    dc_attention: bool = False              # #85: dynamically composed attention on layer 10
    xsa: bool = False                       # #82/#86: learnable exclusive self-attention
    bigram_sign_trick: bool = False         # #83: a fixed random sign per bigram slot
    fp8_mlp_up: bool = False                # #84: the MLP up-projection in e4m3 (forward only)
    fp8_mlp_down: bool = False              # #89: and its down-projection, at delayed scales
    fp8_mlp_backward: bool = False          # #344: the MLP's backward data gradients in FP8 too,
                                            # its weights quantised once per optimizer update
    fp8_mlp_grad_bound: bool = False        # experiment, in no preset: --fp8_mlp_backward's d_pre
                                            # scaled by a bound known before its GEMM, which then
                                            # writes its e5m2 copy (no quantising pass)
    mlp_pre_from_post: bool = False         # #344: relu(pre) rebuilt as sqrt(post), not kept for
                                            # the backward (the Triton kernels always do)
    fp8_qkv: bool = False                   # #344: Q, K and V in one packed e4m3 GEMM
    fused_qk_prep: bool = False             # #344: QK norm, rotary, offset, padding in one kernel
    prefix_loss_weight: float = 0.0         # #88: prefix-token loss weight (stage 1; to 0 in 2)
    val_mask: bool = False                  # #350: non-canonical token pairs masked at validation
    val_mask_cache: str = "data/cache"      # where the mask is kept, keyed by the tokenizer
    # Experiments (issue 22), in no preset: the attention of the non-paired layers
    attn: str = "standard"                  # "diff", "cmd", "mla", "cmd_mla" (see ATTN_VARIANTS)
    mla_q_rank: int = 384                   # mla, cmd_mla: width of the query latent
    mla_kv_rank: int = 256                  # mla, cmd_mla: width of the key/value latent
    cmd_noise_dim: int = 128                # cmd, cmd_mla: width of the shared noise query and key

    def __post_init__(self):
        # rows given as plain tuples (command line, a log's config block) become Stage records
        try:
            stages = tuple(Stage(*row) for row in self.stages)
        except TypeError:
            raise ValueError(f"stages={self.stages!r}: expected rows of {len(Stage._fields)} "
                             f"entries ({', '.join(Stage._fields)})") from None
        object.__setattr__(self, "stages", stages)
        self._check_qk_head_dim()
        if self.mlp == "pairwise" and (self.fp8_mlp_up or self.fp8_mlp_down or
                                       self.fp8_mlp_backward):
            raise ValueError("mlp=pairwise has no FP8 form of its projections: pass "
                             "--fp8_mlp_up=false --fp8_mlp_down=false --fp8_mlp_backward=false "
                             "with it")
        for switch, needed in SWITCH_REQUIRES.items():
            value = getattr(self, switch)
            shown = str(value).lower() if isinstance(value, bool) else value
            missing = [other for other in needed if not getattr(self, other)]
            if value and missing:
                raise ValueError(f"{switch}={shown} needs "
                                 f"{' '.join(f'--{other}=true' for other in missing)} ({switch} "
                                 f"is built on {' and '.join(needed)})")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r}: expected one of {', '.join(MLP_KINDS)}")
        if not isinstance(self.pairwise_rank, int) or self.pairwise_rank < 1:
            raise ValueError(f"pairwise_rank={self.pairwise_rank!r}: expected a positive integer, "
                             f"the number r of ReLU features whose pairwise products the MLP uses")
        self._check_attention_variant()
        rows = self.padded_vocab_size * self.bigram_vocab_mult
        if rows != round(rows) or rows < 2:
            raise ValueError(f"bigram_vocab_mult={self.bigram_vocab_mult}: the bigram table needs "
                             f"a whole number of rows (padded vocabulary "
                             f"{self.padded_vocab_size} x this)")

    def _check_qk_head_dim(self) -> None:
        width = self.qk_head_dim
        if width != 0 and not (width % 4 == 0 and 8 <= width <= self.head_dim):
            raise ValueError(f"qk_head_dim={width}: expected 0 (as wide as head_dim) or a multiple "
                             f"of 4 from 8 to head_dim={self.head_dim} (rotary turns qk_head_dim/4 "
                             f"pairs of dimensions, at least 2, and leaves the other half alone)")

    def _check_attention_variant(self) -> None:
        if self.attn not in ATTN_VARIANTS:
            raise ValueError(f"attn={self.attn!r}: expected one of {', '.join(ATTN_VARIANTS)}")
        if self.attn != "standard" and self.qk_head_dim:
            raise ValueError(f"attn={self.attn} needs --qk_head_dim=0: the attention variants "
                             f"build their heads with Q and K as wide as V (head_dim)")
        for name in ("mla_q_rank", "mla_kv_rank", "cmd_noise_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive width")
        for name in ("mla_q_rank", "mla_kv_rank"):
            if self.latent_attention and getattr(self, name) > self.model_dim:
                raise ValueError(f"{name}={getattr(self, name)}: expected at most model_dim="
                                 f"{self.model_dim} (a latent wider than the stream compresses "
                                 f"nothing)")

    @property
    def yarn_scale_in_queries(self) -> bool:
        """The stage's YaRN softmax factor scales the queries (a device tensor) rather than being
        the attention's scale constant, so that no compiled graph holds it and a stage that
        differs from another only in its windows and that factor can share its graph."""
        return self.dynamic_stages or self.symbolic_windows

    @property
    def noise_attention(self) -> bool:
        """attn subtracts a second ("noise") attention from the first (diff, cmd, cmd_mla)."""
        return self.attn in ("diff", "cmd", "cmd_mla")

    @property
    def latent_attention(self) -> bool:
        """attn computes Q, K and V from low-rank latents (mla, cmd_mla)."""
        return self.attn in ("mla", "cmd_mla")

    @property
    def qk_width(self) -> int:
        """The width of every Q and K head: qk_head_dim, or head_dim where that is 0."""
        return self.qk_head_dim or self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def bigram_vocab_size(self) -> int:
        return round(self.padded_vocab_size * self.bigram_vocab_mult)

    @property
    def num_train_steps(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations

    @property
    def last_step(self) -> int:
        """The step a run ends at: the schedule's end, or stop_after_steps before it."""
        return min(self.num_train_steps, self.stop_after_steps or self.num_train_steps)


# The MLP of every layer: "relu2" is relu(x W1^T)^2 W2 (every record); "pairwise" is an
# experiment, q(h) W over all products q = (h_i h_j, i <= j) of r = pairwise_rank ReLU features
# h = relu(x U^T) (../shared/spec/seeds.md A).
MLP_KINDS = ("relu2", "pairwise")
# the pairwise layer by Paths.mlp: the reference, the fused kernels, the products in memory
PAIRWISE_LAYERS = dict(torch=triton_kernels.pairwise_mlp_reference,
                       triton=triton_kernels.pairwise_mlp, cublas=triton_kernels.pairwise_mlp_gemm)


class RecordChange(NamedTuple):
    """One change of a public record after #74: the field values that turn it on."""
    record: str
    what: str
    on: dict


RECORD_CHANGES: list[RecordChange] = [
    RecordChange("#77", "One residual stream instead of two lanes; the attention of layers 8-10 "
                 "reads the stream cached after layer 7, and every attention layer has a "
                 "post-attention lambda.", dict(single_stream=True)),
    RecordChange("#78", "NorMuon's second-moment beta 0.95 -> 0.9.", dict(muon_beta2=0.9)),
    RecordChange("#78", "cu_seqlens sized to the documents a micro-batch holds (64 / 96 / 128 "
                 "slots at 16k / 32k / 48k tokens).", dict(tight_cu_seqlens=True)),
    RecordChange("#80", "Q and K stored and orthogonalised per head pair (qk_bank), V and O in "
                 "their own bank.", dict(qk_head_pair_groups=True)),
    RecordChange("#81", "MUDD: two small per-token MLPs mix earlier layers' streams into layer "
                 "10's values and residual and into the output.", dict(mudd=True)),
    RecordChange("#82/#86", "Learnable exclusive self-attention: each head removes a learned "
                 "share of its output along its own value.", dict(xsa=True)),
    RecordChange("#83", "Bigram embedding rows multiplied by a fixed random sign pattern, so "
                 "colliding bigrams interfere less.", dict(bigram_sign_trick=True)),
    RecordChange("#84", "The MLP up-projection in FP8 in the forward pass: input and weights in "
                 "e4m3 with one scale each (max / 448); the backward stays bf16.",
                 dict(fp8_mlp_up=True)),
    RecordChange("#85", "Per-token gates from two small MLPs replace the static XSA, output-gate, "
                 "injection and skip parameters; the bigram table grows to 7.5x the vocabulary.",
                 dict(mudd_gates=True, bigram_vocab_mult=7.5)),
    RecordChange("#85", "Layer 10 adds a dynamically composed attention over a 112-token window.",
                 dict(dc_attention=True)),
    RecordChange("#88", "An auxiliary loss predicts each target's longest prefix token (weight "
                 "0.25 in stage 1, to 0 over stage 2).", dict(prefix_loss_weight=0.25)),
    RecordChange("#350", "Validation masks token pairs the GPT-2 tokenizer never produces.",
                 dict(val_mask=True)),
    RecordChange("#89", "The MLP down-projection in FP8 in the forward pass, at delayed scales: "
                 "post at 1.80 x its previous step's max / 448 per layer and micro-batch slot, "
                 "c_proj re-quantised after every optimizer step at 1.12 x its previous max / "
                 "448; the backward stays bf16.", dict(fp8_mlp_down=True)),
    RecordChange("#344", "Q and K heads 96 wide instead of 128 (V and O keep 128); the attention "
                 "call pads them with zero columns to V's width.", dict(qk_head_dim=96)),
    RecordChange("#344", "The MLP's backward in FP8 too: the gradients entering the GEMMs of dx "
                 "and d_post in e5m2 (exact scales) against e4m3 copies of c_fc and c_proj made "
                 "once per optimizer update in both layouts (c_fc at delayed scales like "
                 "c_proj's); the weight gradients stay bf16.", dict(fp8_mlp_backward=True)),
    RecordChange("#344", "The MLP's backward rebuilds relu(pre) as sqrt(post) instead of keeping "
                 "pre.", dict(mlp_pre_from_post=True)),
    RecordChange("#344", "Q, K and V projected by one packed FP8 GEMM (e4m3; the gradient of "
                 "its input in e5m2), its weights quantised once per optimizer update in both "
                 "layouts; the weight gradient stays bf16.", dict(fp8_qkv=True)),
    RecordChange("#344", "QK RMS norm, rotary, key offset, zero padding and the attention's "
                 "layout in one Triton kernel (on a GPU).", dict(fused_qk_prep=True)),
    RecordChange("#89/#344", "The schedule of #344 with #350's mask: record #89's 1270 scheduled "
                 "steps, then 30 extension steps (#89 had 15).",
                 dict(num_scheduled_iterations=1270, num_extension_iterations=30)),
]
# The attention variants of the `attn` field (issue 22): each replaces the attention of the
# non-paired layers only (VARIANT_ATTN_LAYERS); the paired-head layers keep the standard one.
#   diff:    differential attention: a noise query and key per head, output A v - lambda B v
#   cmd:     common mode: one noise query and key of width cmd_noise_dim shared by all heads
#   mla:     Q, K, V from low-rank latents, the rotating half of each head from its own projection
#   cmd_mla: mla with cmd's noise query and key read from the latents
ATTN_VARIANTS = ("standard", "diff", "cmd", "mla", "cmd_mla")
# A switch that builds on another (a record's code never ran it alone) needs that one on.
SWITCH_REQUIRES = {"mudd": ("single_stream",), "mudd_gates": ("mudd", "xsa"),
                   "dc_attention": ("mudd_gates",), "qk_head_dim": ("qk_head_pair_groups",),
                   "fp8_mlp_down": ("fp8_mlp_up",),
                   "fp8_mlp_backward": ("fp8_mlp_up", "fp8_mlp_down"),
                   "fp8_mlp_grad_bound": ("fp8_mlp_backward",),
                   "fp8_qkv": ("qk_head_pair_groups",)}

# A tiny model and short schedule that trains on two CPU cores in about a minute.
# It reads what `python data/cached_fineweb10B.py 1` downloads (the val shard and one train shard).
SMOKE = dict(
    val_tokens=8192, val_batch_tokens=8192, val_every=30,
    num_scheduled_iterations=84, num_extension_iterations=6, micro_batches_per_step=4,
    stages=(Stage(1024, 128, 1.0, (1, 3), ((1.0, 0.5, 0.25), (1.0, 0.5, 0.0))),
            Stage(1024, 256, 1.52, (3, 7), ((1.0, 0.5), (1.0, 0.0))),
            Stage(1024, 256, 1.73, (5, 11), ((1.0,), (1.0,)))),
    num_heads=2, head_dim=32, model_dim=64, mlp_hidden=256, bigram_vocab_mult=1.0,
    adam_lr=0.024,     # a tiny model on few tokens learns its embeddings faster
    compile=False,
)
SPEEDRUN = {field: value for change in RECORD_CHANGES for field, value in change.on.items()}
# Paths that change no math, on where measured faster: CUDA graphs keep stage 1's short steps
# from waiting on the host (records/2026-12-05_h100_fp8_kernels); the Triton attention takes 0.82x
# torch's flash attention's time in the model, the step 0.97x (records/2026-12-07_h100_triton_
# attention; without CUDA graphs its host cost slows stage 1)
SPEEDRUN_PATHS = dict(cuda_graphs=True, triton_attention=True)
# Fewer compiled graphs: the extension and every validation reuse one (a cold start 0.61x as
# long, step times and Protocol C loss unchanged: records/2026-12-06_startup). It moves the YaRN
# factor from the softmax scale into the queries, which only rounds differently. A helper compiles
# the later stages meanwhile (a cold start 0.73x as long again; warm starts stop it at once).
SPEEDRUN_STARTUP = dict(symbolic_windows=True, compile_ahead=True)
PRESETS: dict[str, dict] = {
    "speedrun": {**SPEEDRUN, **SPEEDRUN_PATHS, **SPEEDRUN_STARTUP},   # the current record's recipe
    "record74": {},                                  # the dataclass defaults
    "smoke": {**SPEEDRUN, **SMOKE, "qk_head_dim": 24},   # #344's 96 of 128, on heads of 32
    "smoke_record74": SMOKE,
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
    values = {**PRESETS[preset], **overrides}
    for name in ("train_files", "val_files"):   # a preset's paths start at the repository
        path = values.get(name, fields[name].default)
        if name not in overrides and not os.path.isabs(path):
            values[name] = os.path.join(REPO_ROOT, path)
    try:
        return Hyperparameters(**values)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None


def _parse_value(key: str, text: str, default: object) -> object:
    """The text of --key=text as the type of the field's default (tuples as Python literals)."""
    if isinstance(default, bool):
        if text.lower() not in ("0", "1", "true", "false"):
            raise SystemExit(f"--{key}={text}: expected true or false")
        return text.lower() in ("1", "true")
    if isinstance(default, str):
        return text
    expected = {int: "an integer", float: "a number", tuple: "a tuple such as (1, 2)"}[type(default)]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SystemExit(f"--{key}={text}: expected {expected}") from None
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if type(value) is not type(default):
        raise SystemExit(f"--{key}={text}: expected {expected}")
    return value


def config_argv(cfg: Hyperparameters) -> list[str]:
    """Options that make parse_config give back `cfg`: one --key=value per field."""
    def text(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return value if isinstance(value, str) else repr(as_literal(value))
    return [f"--{f.name}={text(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)]


def as_literal(value: object) -> object:
    """value with its NamedTuples as plain tuples: its repr is then a Python literal, which the
    command line and the records tools read back."""
    if isinstance(value, tuple):
        return tuple(as_literal(v) for v in value)
    return value


def config_help() -> str:
    lines = ["usage: train_gpt.py [--preset=NAME] [--key=value ...] [--summary [--world_size=K]]",
             f"presets: {', '.join(PRESETS)} (default speedrun)", "options (default):"]
    for f in dataclasses.fields(Hyperparameters):
        lines.append(f"  --{f.name}={as_literal(f.default)!r}")
    return "\n".join(lines)


def check_config(cfg: Hyperparameters, world_size: int) -> int:
    """Check the batch settings against the world size and return grad_accum_steps."""
    micro = cfg.micro_batches_per_step
    if micro < 1:
        raise ValueError(f"micro_batches_per_step={micro}: expected a positive number")
    if world_size < 1 or micro % world_size:
        divisors = [str(d) for d in range(1, micro + 1) if micro % d == 0]
        choices = ", ".join(divisors[:-1]) + " or " if len(divisors) > 1 else ""
        raise ValueError(f"world size {world_size} does not divide {micro}; "
                         f"use {choices}{divisors[-1]} processes")
    if not cfg.stages:
        raise ValueError("stages: expected at least one stage")
    if cfg.num_scheduled_iterations < len(cfg.stages):
        raise ValueError(f"num_scheduled_iterations={cfg.num_scheduled_iterations}: expected at "
                         f"least one step per stage ({len(cfg.stages)})")
    for name in ("num_extension_iterations", "stop_after_steps", "val_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)}: expected 0 or more")
    for k, stage in enumerate(cfg.stages, start=1):
        check_stage(k, stage, micro)
    if cfg.compile_ahead_helpers < 1:
        raise ValueError(f"compile_ahead_helpers={cfg.compile_ahead_helpers}: expected 1 or more")
    if cfg.eval not in ("", "hellaswag"):
        raise ValueError(f"eval={cfg.eval}: expected hellaswag (or nothing)")
    if cfg.save_every < 0 or cfg.save_every % 2:
        raise ValueError(f"save_every={cfg.save_every}: expected 0 or an even number of steps (a "
                         f"checkpoint falls after an Adam step, when no gradient is pending)")
    if cfg.val_batch_tokens < 1 or cfg.val_batch_tokens % micro:
        raise ValueError(f"val_batch_tokens={cfg.val_batch_tokens}: expected a positive multiple "
                         f"of micro_batches_per_step={micro}")
    if cfg.val_tokens < 1 or cfg.val_tokens % cfg.val_batch_tokens:
        raise ValueError(f"val_tokens={cfg.val_tokens}: expected a positive multiple of "
                         f"val_batch_tokens={cfg.val_batch_tokens}")
    return micro // world_size


def check_stage(k: int, stage: Stage, micro: int) -> None:
    """Check one row of the stage table (k counts from 1)."""
    batch, max_len = stage.batch_tokens, stage.max_seq_len
    if not isinstance(batch, int) or batch < 1 or batch % micro:
        raise ValueError(f"stage {k} batch_tokens={batch!r}: expected a positive multiple of "
                         f"micro_batches_per_step={micro} (world size x grad-accum steps)")
    if not isinstance(max_len, int) or not 1 <= max_len <= batch // micro:
        raise ValueError(f"stage {k} max_seq_len={max_len!r}: expected 1 to {batch // micro}, the "
                         f"tokens per rank and micro-batch of a {batch}-token batch")
    if len(stage.windows) != 2 or not 1 <= stage.windows[0] <= stage.windows[1]:
        raise ValueError(f"stage {k} windows={stage.windows!r}: expected (short, long) window "
                         f"blocks with 1 <= short <= long")
    pair = stage.mtp_weights
    if len(pair) != 2 or not pair[0] or len(pair[0]) != len(pair[1]):
        raise ValueError(f"stage {k} mtp_weights={stage.mtp_weights!r}: expected (start, end) "
                         f"weight tuples of one common, positive length")


# =================================================================================================
# Execution paths: which implementation each op runs
# =================================================================================================
# Every fast path (Triton kernel, FP8 GEMM, flash attention, compilation) has a plain PyTorch
# statement of the same math beside it. resolve_paths() decides once per run, from the
# configuration and the device, which one each op takes; the model and the optimizer only read
# the result, and the run log prints it, one line per op. Tests build a Paths directly to force
# either implementation.

@dataclass(frozen=True)
class Paths:
    mlp: str = "torch"            # "triton": linear + ReLU^2 with the activation in the GEMM epilogues,
                                  # or the pairwise MLP's kernels (--mlp=pairwise); "cublas": the
                                  # pairwise MLP's products in memory for cuBLAS GEMMs
    lm_head: str = "bf16"         # "fp8": e4m3 head GEMM, e5m2 logits gradient (training only)
    head_gemm: str = "fp32"       # the bf16 head GEMM's math (exact products summed in fp32,
                                  # rounded to bf16 once) as an fp32 GEMM of the bf16 operands, or
                                  # "bf16": as a bf16 GEMM (the CPU's is several times slower)
    loss: str = "torch"           # "triton": loss and logits gradient in one kernel (FP8 head only)
    attention: str = "dense"      # "varlen" (torch's flash kernels), "flash_attn3" (hub), "triton"
                                  # (triton_kernels.windowed_attention), "dense"
    dc_attention: str = "torch"   # "triton": the composed attention (#85) in one kernel per pass
    optimizer: str = "torch"      # "triton": Gram kernels, fused Polar Express update, transposes
    table_grads: str = "torch"    # "triton": lookup-table gradients by sorted runs of equal ids
    qkv: str = "torch"            # --fp8_qkv: "triton" runs the packed FP8 QKV GEMMs and weight
                                  # quantisation as kernels, "torch" emulates them
    qk_prep: str = "torch"        # "triton": Q/K norm, rotary, offset and padding in one kernel
    compile: bool = False         # torch.compile the model and the optimizer's update math
    cuda_graphs: bool = False     # the compiled model replayed as CUDA graphs
    flash_attn3: Callable | None = dataclasses.field(default=None, compare=False, repr=False)
    why: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        choices = dict(mlp=("torch", "triton", "cublas"), lm_head=("bf16", "fp8"),
                       head_gemm=("fp32", "bf16"),
                       loss=("torch", "triton"),
                       attention=("dense", "varlen", "flash_attn3", "triton"),
                       dc_attention=("torch", "triton"), optimizer=("torch", "triton"),
                       table_grads=("torch", "triton"), qkv=("torch", "triton"),
                       qk_prep=("torch", "triton"))
        for op, allowed in choices.items():
            if getattr(self, op) not in allowed:
                raise ValueError(f"Paths.{op}={getattr(self, op)!r}: expected one of {allowed}")
        if self.loss == "triton" and self.lm_head != "fp8":
            raise ValueError("Paths.loss='triton' needs lm_head='fp8' (the kernel writes the "
                             "e5m2 logits gradient of the FP8 head)")
        if self.cuda_graphs and not self.compile:
            raise ValueError("Paths.cuda_graphs=True needs compile=True (torch.compile makes the "
                             "CUDA graphs)")
        if (self.attention == "flash_attn3") != (self.flash_attn3 is not None):
            raise ValueError("Paths: attention='flash_attn3' needs the loaded function in "
                             "flash_attn3, and no other attention takes one")

    def report(self) -> list[str]:
        """One log line per op: the implementation and why it was chosen."""
        lines = []
        for f in dataclasses.fields(self):
            if f.name in ("flash_attn3", "why"):
                continue
            value = getattr(self, f.name)
            value = ("on" if value else "off") if isinstance(value, bool) else value
            reason = self.why.get(f.name)
            lines.append(f"path {f.name}: {value}" + (f" ({reason})" if reason else ""))
        return lines


def resolve_paths(cfg: Hyperparameters, device: torch.device,
                  log: Callable[[str], None] = print) -> Paths:
    """The implementation of every op for this run: Triton kernels where cfg.use_triton_kernels
    and the device is a GPU (CPU runs take the PyTorch references; tests run the kernels on CPU
    through Triton's interpreter), FP8 where the GPU has it (compute capability 8.9 or newer),
    flash attention on any GPU (FlashAttention-3 when cfg.flash_attn3 and it loads, the Triton
    kernel when cfg.triton_attention), and torch.compile where cfg.compile and the device is a
    GPU."""
    cuda = device.type == "cuda"
    kernels, kernels_why = "torch", "CPU: the PyTorch reference of every kernel"
    if cuda:
        kernels, kernels_why = (("triton", "Triton kernels on CUDA") if cfg.use_triton_kernels
                                else ("torch", "--use_triton_kernels=false"))
    head, head_why = "bf16", "CPU: no FP8"
    mlp, mlp_why = kernels, kernels_why
    if cuda:
        major, minor = torch.cuda.get_device_capability(device)
        head = "fp8" if (major, minor) >= (8, 9) else "bf16"
        head_why = f"compute capability {major}.{minor}" + ("" if head == "fp8" else ": no FP8")
        if cfg.fp8_mlp_up and head != "fp8":
            mlp, mlp_why = "torch", f"{head_why}: the FP8 MLP's math emulated in PyTorch"
        if cfg.mlp == "pairwise" and mlp == "triton" and not cfg.pairwise_fused:
            mlp, mlp_why = "cublas", "--pairwise_fused=false: the products in memory, cuBLAS GEMMs"
    qkv, qkv_why = (kernels, kernels_why) if cfg.fp8_qkv else ("torch", "--fp8_qkv=false: bf16")
    if cfg.fp8_qkv and cuda and head != "fp8":
        qkv, qkv_why = "torch", f"{head_why}: the packed FP8 QKV's math emulated in PyTorch"
    qk_prep, qk_prep_why = ((kernels, kernels_why) if cfg.fused_qk_prep
                            else ("torch", "--fused_qk_prep=false"))
    triton_attention = cfg.triton_attention and kernels == "triton"
    flash_attn3 = (load_flash_attn3(log) if cfg.flash_attn3 and cuda and not triton_attention
                   else None)
    if triton_attention:
        attention, attention_why = "triton", "--triton_attention=true"
    elif flash_attn3 is not None:
        attention, attention_why = "flash_attn3", "--flash_attn3=true, loaded from the kernels hub"
    elif cuda:
        attention = "varlen"
        attention_why = ("FlashAttention-3 did not load" if cfg.flash_attn3 else
                         kernels_why if cfg.triton_attention else "torch.nn.attention.varlen")
    else:
        attention = "dense"
        attention_why = ("--flash_attn3=true needs CUDA; CPU reference" if cfg.flash_attn3 else
                         "CPU reference: one masked softmax per document")
    compile_why = f"--compile={str(cfg.compile).lower()}"
    if cfg.compile and not cuda:
        compile_why = "CPU: the dense attention's loop over documents does not compile"
    compiled = cfg.compile and cuda
    cuda_graphs_why = f"--cuda_graphs={str(cfg.cuda_graphs).lower()}"
    if cfg.cuda_graphs and not compiled:
        cuda_graphs_why = "CUDA graphs are made by torch.compile on CUDA: " + compile_why
    head_gemm, head_gemm_why = (("bf16", "bf16 tensor cores") if cuda else
                                ("fp32", "CPU: faster than its bf16 GEMM, the same sums"))
    loss, loss_why = "torch", "the bf16 head's loss is plain PyTorch"
    if head == "fp8":
        loss, loss_why = kernels, kernels_why
    return Paths(mlp=mlp, lm_head=head, head_gemm=head_gemm, loss=loss, attention=attention,
                 dc_attention=kernels, optimizer=kernels, table_grads=kernels, qkv=qkv,
                 qk_prep=qk_prep, compile=compiled, cuda_graphs=cfg.cuda_graphs and compiled,
                 flash_attn3=flash_attn3,
                 why=dict(mlp=mlp_why, lm_head=head_why, head_gemm=head_gemm_why, loss=loss_why,
                          attention=attention_why, dc_attention=kernels_why,
                          optimizer=kernels_why, table_grads=kernels_why, qkv=qkv_why,
                          qk_prep=qk_prep_why, compile=compile_why, cuda_graphs=cuda_graphs_why))


# =================================================================================================
# Optimizer: NorMuon for the matrix banks, Adam for everything else
# =================================================================================================
# One object owns every parameter and configures each from PARAM_TABLE by its label. Gradient
# reductions are launched asynchronously in table order and awaited in WORK_ORDER, so the small
# updates run while the large reductions are still in flight; sharded parameters are all-gathered
# right after their own update.

@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is optimised and communicated."""
    label: str
    optimizer: str                            # "normuon" or "adam"
    comms: str                                # "sharded", "replicated" or "sharded_sparse"
    betas: tuple[float, float] | None = None  # Adam only
    lr_mul: float = 1.0
    wd_mul: float = 1.0
    odd_matrix_lr_mul: float = 1.0            # NorMuon: extra factor for odd matrix indices


# Every parameter any configuration has (param_labels says which), in scatter (launch) order.
# The NorMuon shape factor sqrt(max(1, rows/cols)) is computed from the matrix shape, so
# mlp_bank's lr_mul is 1 here: the "2" of the record's table is that shape factor.
PARAM_TABLE: list[ParamSpec] = [
    ParamSpec("attn_bank", "normuon", "sharded"),
    ParamSpec("qk_bank", "normuon", "sharded"),     # #80: Q and K head-pair blocks
    ParamSpec("vo_bank", "normuon", "sharded"),     # #80: V and O
    ParamSpec("noise_qk_bank", "normuon", "sharded"),   # attn=diff/cmd: noise Q and K
    ParamSpec("mla_dq_bank", "normuon", "sharded"),     # attn=mla/cmd_mla: the latent factors
    ParamSpec("mla_uq_bank", "normuon", "sharded"),
    ParamSpec("mla_dkv_bank", "normuon", "sharded"),
    ParamSpec("mla_ukv_bank", "normuon", "sharded"),
    ParamSpec("mla_o_bank", "normuon", "sharded"),
    ParamSpec("mlp_bank", "normuon", "sharded", odd_matrix_lr_mul=2.0),  # odd index = c_proj
    # --mlp=pairwise: U (r, d) and W stored transposed (P, d) like c_proj, with c_proj's extra 2x
    ParamSpec("pairwise_u_bank", "normuon", "sharded"),
    ParamSpec("pairwise_w_bank", "normuon", "sharded", lr_mul=2.0),
    ParamSpec("scalars", "adam", "replicated", (0.9, 0.99), lr_mul=5.0, wd_mul=0.0),
    ParamSpec("smear_gate", "adam", "replicated", (0.9, 0.99), lr_mul=0.01, wd_mul=0.0),
    ParamSpec("skip_gate", "adam", "replicated", (0.9, 0.99), lr_mul=0.05, wd_mul=0.0),
    ParamSpec("attn_gate_bank", "adam", "replicated", (0.9, 0.99)),
    ParamSpec("ve_gate_bank", "adam", "replicated", (0.9, 0.99)),
    ParamSpec("lm_head", "adam", "sharded", (0.5, 0.95), wd_mul=150.0),
    ParamSpec("bigram_embed", "adam", "sharded_sparse", (0.75, 0.95), lr_mul=75.0, wd_mul=5.0),
    ParamSpec("post_lambdas", "adam", "replicated", (0.9, 0.95), wd_mul=0.0),
    ParamSpec("x0_lambdas", "adam", "replicated", (0.9, 0.95), wd_mul=0.0),
    ParamSpec("bigram_lambdas", "adam", "replicated", (0.9, 0.95), wd_mul=0.0),
    ParamSpec("resid_lambdas", "adam", "replicated", (0.9, 0.95), lr_mul=5.0, wd_mul=0.0),
    ParamSpec("xsa_alphas", "adam", "replicated", (0.9, 0.95), wd_mul=0.0),           # #82
    ParamSpec("noise_lambdas", "adam", "replicated", (0.9, 0.95), lr_mul=0.1, wd_mul=0.0),  # attn
    ParamSpec("mudd_w1", "adam", "replicated", (0.9, 0.99), lr_mul=0.25),             # #81
    ParamSpec("mudd_w2", "adam", "replicated", (0.9, 0.99), lr_mul=0.25),
    ParamSpec("mudd_b2", "adam", "replicated", (0.9, 0.99), lr_mul=0.25, wd_mul=0.0),
    ParamSpec("gate_w1", "adam", "replicated", (0.9, 0.99), lr_mul=0.1),              # #85
    ParamSpec("gate_w2", "adam", "replicated", (0.9, 0.99), lr_mul=0.1),
    ParamSpec("gate_b2", "adam", "replicated", (0.9, 0.99), lr_mul=0.1, wd_mul=0.0),
    ParamSpec("gate_scales", "adam", "replicated", (0.9, 0.99), lr_mul=0.1, wd_mul=0.0),
    ParamSpec("value_embeds", "adam", "sharded", (0.75, 0.95), lr_mul=75.0, wd_mul=5.0),
    ParamSpec("embed", "adam", "sharded", (0.5, 0.95), wd_mul=150.0),  # skipped while tied
]

# Update order: small parameters first while the big reductions finish; lm_head before embed
# because the tied copy needs the gathered head; the Polar Express banks last.
WORK_ORDER: list[str] = [
    "scalars", "smear_gate", "skip_gate", "attn_gate_bank", "ve_gate_bank", "post_lambdas",
    "x0_lambdas", "bigram_lambdas", "resid_lambdas", "xsa_alphas", "noise_lambdas", "mudd_w1",
    "mudd_w2", "mudd_b2", "gate_w1", "gate_w2", "gate_b2", "gate_scales", "value_embeds",
    "bigram_embed", "lm_head", "embed", "attn_bank", "qk_bank", "vo_bank", "noise_qk_bank",
    "mla_dq_bank", "mla_uq_bank", "mla_dkv_bank", "mla_ukv_bank", "mla_o_bank", "mlp_bank",
    "pairwise_u_bank", "pairwise_w_bank",
]
LATENT_BANKS = ("mla_dq_bank", "mla_uq_bank", "mla_dkv_bank", "mla_ukv_bank", "mla_o_bank")


def param_labels(cfg: Hyperparameters) -> list[str]:
    """The parameters a model of this configuration has, in PARAM_TABLE order."""
    absent = {"qk_bank", "vo_bank"} if not cfg.qk_head_pair_groups else {"attn_bank"}
    if cfg.mudd_gates:   # the gates replace these static parameters
        absent |= {"attn_gate_bank", "skip_gate", "x0_lambdas", "bigram_lambdas", "xsa_alphas"}
    else:
        absent |= {"gate_w1", "gate_w2", "gate_b2", "gate_scales"}
    if not cfg.xsa:
        absent.add("xsa_alphas")
    if not cfg.mudd:
        absent |= {"mudd_w1", "mudd_w2", "mudd_b2"}
    if cfg.mlp == "pairwise":
        absent.add("mlp_bank")
    else:
        absent |= {"pairwise_u_bank", "pairwise_w_bank"}
    if not cfg.noise_attention:
        absent.add("noise_lambdas")
    if cfg.attn not in ("diff", "cmd"):   # cmd_mla reads its noise query and key from the latents
        absent.add("noise_qk_bank")
    if not cfg.latent_attention:
        absent |= set(LATENT_BANKS)
    return [spec.label for spec in PARAM_TABLE if spec.label not in absent]


def comms_mode(spec: ParamSpec, world_size: int, grad_accum_steps: int) -> str:
    """The communication actually used: "none" on one process; the sparse bigram exchange only
    with 8 ranks and one micro-batch per step, plain "sharded" otherwise."""
    if world_size == 1:
        return "none"
    if spec.comms == "sharded_sparse" and not (world_size == 8 and grad_accum_steps == 1):
        return "sharded"
    return spec.comms


def matrix_view(label: str, bank: torch.Tensor) -> torch.Tensor:
    """A NorMuon bank (or its gradient) as the stack of 2-D matrices that get orthogonalised:
    attn_bank (A, 4d, d) -> (4A, d, d) (Q, K, V, O separately), mlp_bank (S, 2, hidden, d) ->
    (2S, hidden, d), the pairwise banks (S, r or P, d) as they are. A view, never a copy."""
    if label == "attn_bank":
        return bank.view(bank.shape[0] * 4, bank.shape[1] // 4, bank.shape[2])
    return bank.view(-1, bank.shape[-2], bank.shape[-1])


# -------------------------------------------------------------------------------------------------
# Update math. Each function is compiled when paths.compile is set; per-step values arrive as
# 0-dim CPU tensors so that new values never trigger a recompile.

POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _gram(X: torch.Tensor, tall: bool, use_kernels: bool) -> torch.Tensor:
    """X^T X for tall X, X X^T otherwise: the smaller Gram matrix (bf16, fp32 accumulation)."""
    if not use_kernels:
        return triton_kernels.XTX_reference(X) if tall else triton_kernels.XXT_reference(X)
    size = X.shape[-1] if tall else X.shape[-2]
    out = X.new_empty(*X.shape[:-2], size, size)
    (triton_kernels.XTX if tall else triton_kernels.XXT)(X, out)
    return out


def _gram_polynomial(A: torch.Tensor, b: float, c: float, use_kernels: bool) -> torch.Tensor:
    """b A + c A A for a symmetric Gram matrix A."""
    if not use_kernels:
        return triton_kernels.ba_plus_cAA_reference(A, c, b)
    out = torch.empty_like(A)
    triton_kernels.ba_plus_cAA(A, c, b, out)
    return out


def polar_express(X: torch.Tensor, use_kernels: bool = False) -> torch.Tensor:
    """Approximate orthogonal polar factor of each matrix in X ((m, n) or (count, m, n), bf16):
    Frobenius-normalise, then apply 5 odd quintics p(X) = a X + b (X X^T) X + c (X X^T)^2 X.
    Singular values in [1e-3, 1] after normalisation land in [0.86, 1.14] (exact arithmetic)."""
    single = X.ndim == 2
    if single:
        X = X.unsqueeze(0)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    fused_update = use_kernels and tall and triton_kernels.polar_update_tall_fits(X)
    # For many rows baddbmm would make a defensive copy of X; a plain matmul into a new buffer
    # followed by an in-place add of a X avoids it.
    split_matmul = X.shape[-2] > 1024
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        B = _gram_polynomial(_gram(X, tall, use_kernels), b, c, use_kernels)
        if fused_update:   # a X + X B in one GEMM, the add in its epilogue
            X = triton_kernels.polar_update_tall(X, B, a, out=torch.empty_like(X))
        elif split_matmul:
            Y = X @ B if tall else B @ X
            X = Y.add_(X, alpha=a)
        else:
            X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X.squeeze(0) if single else X


def nesterov_polar_express(grad: torch.Tensor, momentum_buffer: torch.Tensor,
                           momentum: torch.Tensor | float, use_kernels: bool = False) -> torch.Tensor:
    """Nesterov momentum in fp32 (updates momentum_buffer in place), then Polar Express of
    u = g + mu (M - g) in bf16 (Triton Gram kernels if use_kernels). Returns the orthogonalised
    update (bf16)."""
    g = grad.float()
    momentum_buffer.add_((g - momentum_buffer) * (1 - momentum))
    update = g + momentum * (momentum_buffer - g)
    return polar_express(update.bfloat16(), use_kernels)


def normuon_normalise(X: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """Divide each row (each column when m < n) of every matrix by its running RMS, then rescale
    the matrix back to its Frobenius norm. second_moment is (count, m, 1) or (count, 1, n) fp32
    and is updated in place."""
    reduce_dim = -1 if X.shape[-2] >= X.shape[-1] else -2
    reduced_len = X.shape[reduce_dim]
    row_mean_sq = X.float().square().mean(dim=reduce_dim, keepdim=True)
    norm_before = (row_mean_sq.sum(dim=(-2, -1), keepdim=True) * reduced_len).sqrt()
    second_moment.add_((row_mean_sq - second_moment) * (1 - beta2))
    inv_rms = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((row_mean_sq * inv_rms.square()).sum(dim=(-2, -1), keepdim=True)
                  * reduced_len).sqrt()
    scale = inv_rms * (norm_before / norm_after.clamp_min(1e-10))
    return X * scale.bfloat16()


def cautious_update_with_mantissa(param: torch.Tensor, mantissa: torch.Tensor,
                                  update: torch.Tensor, lr: torch.Tensor | float,
                                  decay: torch.Tensor | float) -> None:
    """P <- P - P * mask * decay - X * lr on the fp32 value P whose high 16 bits are the bf16
    param and whose low 16 bits are the uint16 mantissa; mask = (X * P >= 0). The param keeps
    the truncated high half, so small updates accumulate in the mantissa instead of vanishing."""
    bits = (param.view(torch.int16).to(torch.int32) << 16) | mantissa.to(torch.int32)
    P = bits.view(torch.float32)
    X = update.float()
    mask = X * P >= 0
    P = P - P * mask * decay - X * lr
    bits = P.view(torch.int32)
    param.copy_((bits >> 16).to(torch.int16).view(torch.bfloat16))
    mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, beta1: torch.Tensor | float, beta2: torch.Tensor | float,
                step_size: torch.Tensor | float, decay: torch.Tensor | float, eps: float) -> None:
    """Adam with cautious decoupled weight decay (strict mask: decay only where the update and the
    weight have the same sign). step_size includes the bias correction; fp32 math, the result is
    rounded to the parameter dtype."""
    g = grad.float()
    exp_avg.mul_(beta1).add_((1 - beta1) * g)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * g.square())
    p = param.float()
    update = step_size * exp_avg / (exp_avg_sq.sqrt() + eps)
    update = update + decay * p * (update * p > 0)
    param.copy_(p - update)


# -------------------------------------------------------------------------------------------------
# Communication

# torch 2.13 renamed the single-tensor collectives (the old names now warn); 2.11 has only those.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class MeanCollectives:
    """The asynchronous collectives of the optimizer, averaging over ranks.

    NCCL averages natively (ReduceOp.AVG). Other backends (gloo, used by the CPU tests) may lack
    AVG, so there the inputs are scaled by 1/W and summed: the same pre-multiply-then-sum form
    NCCL uses for AVG on floating types, and exact because W divides 8 (a power of two)."""

    def __init__(self, world_size: int, group: dist.ProcessGroup | None = None):
        self.world_size = world_size
        self.group = group
        self.native_avg = dist.get_backend(group) == "nccl"

    def _mean_op(self, tensor: torch.Tensor) -> dist.ReduceOp:
        if self.native_avg:
            return dist.ReduceOp.AVG
        tensor.mul_(1.0 / self.world_size)
        return dist.ReduceOp.SUM

    def all_reduce_mean(self, tensor: torch.Tensor) -> dist.Work:
        """In place; tensor holds the rank mean once the returned work completes."""
        return dist.all_reduce(tensor, op=self._mean_op(tensor), group=self.group, async_op=True)

    def reduce_scatter_mean(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        """Mean over ranks of this rank's 1/W slice along dim 0 (into a new tensor). The input is
        scaled in place on backends without AVG."""
        shard = tensor.new_empty(tensor.shape[0] // self.world_size, *tensor.shape[1:])
        work = _reduce_scatter_single(shard, tensor, op=self._mean_op(tensor), group=self.group,
                                      async_op=True)
        return shard, work

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> dist.Work:
        """Every rank's shard into `full` along dim 0; shard may be this rank's slice of full."""
        return _all_gather_single(full, shard, group=self.group, async_op=True)


@dataclass
class PendingReduction:
    """A launched gradient reduction; wait() returns this rank's reduced gradient."""
    result: torch.Tensor
    work: dist.Work | None = None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.result


class SparseBigramExchange:
    """Sends only the touched rows of the bigram-embedding gradient to the ranks that own them.
    Used with 8 ranks and one micro-batch per step.

    The training loop calls, every step before the forward, mark(bigram ids of this rank's batch);
    on Adam (odd) steps additionally start_count_exchange() right after marking and
    start_index_exchange() after the forward, before backward. The optimizer then calls
    start_value_exchange(grad) in its launch phase and waits on the result in its work phase.
    Marks accumulate over the even step, whose gradient the odd step's Adam update also sees."""

    def __init__(self, num_rows: int, world_size: int, rank: int, device: torch.device,
                 cpu_group: dist.ProcessGroup | None = None,
                 group: dist.ProcessGroup | None = None):
        if num_rows % world_size:
            raise ValueError(f"bigram_embed has {num_rows} rows, expected a multiple of the world "
                             f"size {world_size} (each rank owns an equal row slice)")
        self.num_rows, self.world_size, self.rank = num_rows, world_size, rank
        self.rows_per_rank = num_rows // world_size
        self.device = torch.device(device)
        self.cpu_group, self.group = cpu_group, group
        self.touched = np.zeros(num_rows, dtype=bool)
        self._clear_exchange()

    def _clear_exchange(self) -> None:
        self._count_work = self._index_work = None
        self._send_counts = self._recv_counts = None
        self._send_rows = self._recv_rows = None

    def reset(self) -> None:
        self.touched[:] = False
        self._clear_exchange()

    def mark(self, bigram_ids_cpu: np.ndarray) -> None:
        """Remember the table rows this rank's batch touches."""
        ids = np.asarray(bigram_ids_cpu).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise ValueError(f"bigram ids span [{ids.min()}, {ids.max()}], expected "
                             f"[0, {self.num_rows})")
        self.touched[ids] = True

    def start_count_exchange(self) -> None:
        """Odd steps, after marking: tell every rank how many rows it will receive from us, and
        upload the sorted row indices we will send (through pinned memory on CUDA)."""
        rows = np.flatnonzero(self.touched)  # sorted
        self.touched[:] = False              # captured: the next accumulation starts empty
        owners = rows // self.rows_per_rank
        others = owners != self.rank         # own rows are already in the local gradient
        counts = np.bincount(owners[others], minlength=self.world_size)
        self._send_counts = torch.from_numpy(counts.astype(np.int64))
        self._recv_counts = torch.empty(self.world_size, dtype=torch.int64)
        # CPU tensors over the gloo group: no device synchronisation
        self._count_work = dist.all_to_all_single(self._recv_counts, self._send_counts,
                                                  group=self.cpu_group, async_op=True)
        send_rows = torch.from_numpy(rows[others].astype(np.int32))
        if self.device.type == "cuda":
            send_rows = send_rows.pin_memory()
        self._send_rows = send_rows.to(self.device, non_blocking=True)

    def start_index_exchange(self) -> None:
        """Odd steps, after the forward: send our row indices to their owners."""
        if self._count_work is None:
            raise RuntimeError("SparseBigramExchange: start_count_exchange() must come first")
        self._count_work.wait()
        self._count_work = None
        self._recv_rows = torch.empty(int(self._recv_counts.sum()), dtype=torch.int32,
                                      device=self.device)
        self._index_work = dist.all_to_all_single(
            self._recv_rows, self._send_rows, self._recv_counts.tolist(),
            self._send_counts.tolist(), group=self.group, async_op=True)

    def start_value_exchange(self, grad: torch.Tensor) -> SparseBigramReduction:
        """Optimizer launch phase: send the gradient rows (bf16) to their owners."""
        if self._index_work is None:
            raise RuntimeError("SparseBigramExchange: on Adam (odd) steps the training loop must "
                               "call start_count_exchange() and start_index_exchange() before "
                               "the optimizer step")
        send_values = grad.index_select(0, self._send_rows)
        recv_values = grad.new_empty(self._recv_rows.shape[0], *grad.shape[1:])
        value_work = dist.all_to_all_single(
            recv_values, send_values, self._recv_counts.tolist(), self._send_counts.tolist(),
            group=self.group, async_op=True)
        reduction = SparseBigramReduction(self, grad, self._recv_rows, recv_values,
                                          [self._index_work, value_work])
        self._clear_exchange()
        return reduction


@dataclass
class SparseBigramReduction:
    """The in-flight row exchange; wait() returns this rank's mean-reduced row slice."""
    exchange: SparseBigramExchange
    grad: torch.Tensor
    recv_rows: torch.Tensor
    recv_values: torch.Tensor
    works: list

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        ex = self.exchange
        self.grad.index_add_(0, self.recv_rows, self.recv_values)
        own = self.grad[ex.rank * ex.rows_per_rank:(ex.rank + 1) * ex.rows_per_rank]
        return own.mul_(1.0 / ex.world_size)


# -------------------------------------------------------------------------------------------------
# The optimizer

@dataclass
class NorMuonState:
    momentum: torch.Tensor       # (count, m, n) fp32
    second_moment: torch.Tensor  # (count, m, 1) or (count, 1, n) fp32
    mantissa: torch.Tensor       # (count, m, n) uint16: low half of the fp32 master weights


@dataclass
class AdamState:
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0                # Adam updates so far (for the bias correction)


class NorMuonAndAdam:
    """NorMuon for the matrix banks, Adam (odd steps only) for everything else.

    params maps every label of param_labels(cfg) to its parameter. Each rank keeps state only
    for its own shard. The optimizer clears the gradients itself: NorMuon's every step, Adam's only after
    an Adam step, so that an Adam update sees the sum of two steps' gradients.
    While `tied`, embed is an exact transposed copy of lm_head: on Adam steps its gradient is
    folded into lm_head's, and it is overwritten with lm_head^T after the update. Call untie()
    right after the step of split_step, and reset() after the warmup."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: Hyperparameters, rank: int,
                 world_size: int, grad_accum_steps: int,
                 cpu_group: dist.ProcessGroup | None = None,
                 sparse_bigram: SparseBigramExchange | None = None, paths: Paths = Paths()):
        labels = param_labels(cfg)
        missing = [label for label in labels if label not in params]
        unknown = [label for label in params if label not in labels]
        if missing or unknown:
            raise ValueError(f"NorMuonAndAdam params: missing labels {missing}, unknown labels "
                             f"{unknown}; expected exactly {labels}")
        self.params = params
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.table = [spec for spec in PARAM_TABLE if spec.label in params]
        self.specs = {spec.label: spec for spec in self.table}
        self.modes = {spec.label: comms_mode(spec, world_size, grad_accum_steps)
                      for spec in self.table}
        self._check_shapes()

        self.sparse_bigram = None
        if self.modes["bigram_embed"] == "sharded_sparse":
            if sparse_bigram is None:
                sparse_bigram = SparseBigramExchange(params["bigram_embed"].shape[0], world_size,
                                                     rank, params["bigram_embed"].device, cpu_group)
            self.sparse_bigram = sparse_bigram
        elif sparse_bigram is not None:
            raise ValueError(f"sparse_bigram given, but bigram_embed's comms mode is "
                             f"{self.modes['bigram_embed']!r} (the sparse exchange needs 8 ranks "
                             f"and grad_accum_steps 1)")
        self.comms = MeanCollectives(world_size) if world_size > 1 else None

        self.state: dict[str, NorMuonState | AdamState] = {}
        for spec in self.table:
            local = self._local_param(spec.label)
            if spec.optimizer == "normuon":
                count, m, n = local.shape
                moment_shape = (count, m, 1) if m >= n else (count, 1, n)
                self.state[spec.label] = NorMuonState(
                    torch.zeros(local.shape, dtype=torch.float32, device=local.device),
                    torch.zeros(moment_shape, dtype=torch.float32, device=local.device),
                    torch.zeros(local.shape, dtype=torch.uint16, device=local.device))
            else:
                self.state[spec.label] = AdamState(
                    torch.zeros(local.shape, dtype=torch.float32, device=local.device),
                    torch.zeros(local.shape, dtype=torch.float32, device=local.device))
        self.tied = True

        if paths.compile:
            # one compiled variant per shard shape: more than dynamo's default limit of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

        def compiled(fn, dynamic=False):
            return torch.compile(fn, fullgraph=True, dynamic=dynamic) if paths.compile else fn
        self._nesterov_polar_express = compiled(nesterov_polar_express)
        self._normuon_normalise = compiled(normuon_normalise)
        # elementwise: one graph with symbolic sizes serves every parameter's shape
        self._cautious_update = compiled(cautious_update_with_mantissa, dynamic=True)
        self._adam_update = compiled(adam_update, dynamic=True)
        self.use_kernels = paths.optimizer == "triton"
        if self.use_kernels:
            self._transpose_add = triton_kernels.transpose_add
            self._transpose_copy = triton_kernels.transpose_copy
        else:
            self._transpose_add = triton_kernels.transpose_add_reference
            self._transpose_copy = triton_kernels.transpose_copy_reference

    # -- layout ---------------------------------------------------------------------------------

    def _check_shapes(self) -> None:
        p = self.params
        for label in (spec.label for spec in self.table if spec.optimizer == "normuon"):
            if p[label].dtype != torch.bfloat16:
                raise ValueError(f"{label}: dtype {p[label].dtype}, expected torch.bfloat16 (the "
                                 f"mantissa buffer extends bf16 weights to fp32)")
        if "attn_bank" in p and (p["attn_bank"].ndim != 3 or p["attn_bank"].shape[1] % 4):
            raise ValueError(f"attn_bank: shape {tuple(p['attn_bank'].shape)}, expected "
                             f"(layers, 4 * d, d)")
        if "mlp_bank" in p and (p["mlp_bank"].ndim != 4 or p["mlp_bank"].shape[1] != 2):
            raise ValueError(f"mlp_bank: shape {tuple(p['mlp_bank'].shape)}, expected "
                             f"(layers, 2, hidden, d)")
        if tuple(p["embed"].shape) != tuple(p["lm_head"].shape[::-1]):
            raise ValueError(f"embed shape {tuple(p['embed'].shape)} must be lm_head's "
                             f"{tuple(p['lm_head'].shape)} transposed")
        if self.world_size == 1:
            return
        for label, mode in self.modes.items():
            if mode not in ("sharded", "sharded_sparse"):
                continue
            if self.specs[label].optimizer == "normuon":
                rows, what = matrix_view(label, p[label]).shape[0], "matrix count"
            else:
                rows, what = p[label].shape[0], "dim 0"
            if rows % self.world_size:
                raise ValueError(f"{label}: {what} {rows} is not divisible by the world size "
                                 f"{self.world_size} (sharded parameters are split evenly)")

    def _full(self, label: str) -> torch.Tensor:
        """The tensor that is sharded along dim 0: the matrix view for NorMuon banks."""
        data = self.params[label].data
        return matrix_view(label, data) if self.specs[label].optimizer == "normuon" else data

    def _local_param(self, label: str) -> torch.Tensor:
        """This rank's part of the parameter (a view): its shard if sharded, else everything."""
        full = self._full(label)
        if self.modes[label] not in ("sharded", "sharded_sparse"):
            return full
        rows = full.shape[0] // self.world_size
        return full[self.rank * rows:(self.rank + 1) * rows]

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, step: int, lr_mul: float, muon_momentum: float) -> None:
        """One optimizer step; lr_mul is the schedule multiplier m(s), muon_momentum mu(s)."""
        do_adam = step % 2 == 1
        # Phase 1: launch the reductions in table order
        pending: dict[str, PendingReduction | SparseBigramReduction] = {}
        for spec in self.table:
            label = spec.label
            if spec.optimizer == "adam" and not do_adam:
                continue  # gradient kept: the next backward adds onto it
            if label == "embed" and self.tied:
                continue
            if label == "lm_head" and self.tied:
                self._fold_embed_grad()
            grad = self.params[label].grad
            if grad is not None:
                pending[label] = self._launch_reduction(label, grad)

        # Phase 2: update in work order as each reduction completes; gather sharded results
        head_gather, gathers = None, []
        momentum = torch.tensor(muon_momentum)
        for label in WORK_ORDER:
            if label not in pending:
                continue
            grad = pending[label].wait()
            if self.specs[label].optimizer == "normuon":
                self._normuon_step(label, grad, lr_mul, momentum)
            else:
                self._adam_step(label, grad, lr_mul)
            if self.modes[label] in ("sharded", "sharded_sparse"):
                work = self.comms.all_gather(self._full(label), self._local_param(label))
                if label == "lm_head":
                    head_gather = work
                else:
                    gathers.append(work)

        # Phase 3: refresh the tied embedding, finish the gathers, clear gradients
        if head_gather is not None:
            head_gather.wait()
        if self.tied and "lm_head" in pending:
            self._transpose_copy(self.params["lm_head"].data, self.params["embed"].data)
        for work in gathers:
            work.wait()
        for spec in self.table:
            if spec.optimizer == "normuon" or do_adam:
                self.params[spec.label].grad = None

    def _fold_embed_grad(self) -> None:
        """Tied Adam step: grad(lm_head) += grad(embed)^T, the shared matrix's total gradient."""
        head, embed = self.params["lm_head"], self.params["embed"]
        if embed.grad is None:
            return
        if head.grad is None:
            head.grad = torch.zeros_like(head)
        self._transpose_add(embed.grad, head.grad)

    def _launch_reduction(self, label: str,
                          grad: torch.Tensor) -> PendingReduction | SparseBigramReduction:
        mode = self.modes[label]
        if self.specs[label].optimizer == "normuon":
            grad = matrix_view(label, grad)
        if mode == "none":
            return PendingReduction(grad)
        if mode == "replicated":
            return PendingReduction(grad, self.comms.all_reduce_mean(grad))
        if mode == "sharded":
            return PendingReduction(*self.comms.reduce_scatter_mean(grad))
        return self.sparse_bigram.start_value_exchange(grad)

    def _normuon_step(self, label: str, grad: torch.Tensor, lr_mul: float,
                      momentum: torch.Tensor) -> None:
        spec, state = self.specs[label], self.state[label]
        update = self._nesterov_polar_express(grad, state.momentum, momentum, self.use_kernels)
        update = self._normuon_normalise(update, state.second_moment, self.cfg.muon_beta2)
        param = self._local_param(label)
        count, m, n = param.shape
        lr_base = self.cfg.muon_lr * lr_mul
        lr = lr_base * max(1.0, m / n) ** 0.5 * spec.lr_mul
        wd_coef = self.cfg.muon_weight_decay * spec.wd_mul * lr_base
        if spec.odd_matrix_lr_mul == 1.0:
            self._cautious_update(param, state.mantissa, update, torch.tensor(lr),
                                  torch.tensor(wd_coef * lr))
            return
        first_index = self.rank * count if self.modes[label] == "sharded" else 0
        for i in range(count):  # one call per matrix: the lr differs between even and odd ones
            matrix_lr = lr * (spec.odd_matrix_lr_mul if (first_index + i) % 2 else 1.0)
            self._cautious_update(param[i], state.mantissa[i], update[i],
                                  torch.tensor(matrix_lr), torch.tensor(wd_coef * matrix_lr))

    def _adam_step(self, label: str, grad: torch.Tensor, lr_mul: float) -> None:
        spec, state, cfg = self.specs[label], self.state[label], self.cfg
        state.step += 1
        beta1, beta2 = spec.betas
        lr = cfg.adam_lr * lr_mul * spec.lr_mul
        step_size = lr * (1 - beta2 ** state.step) ** 0.5 / (1 - beta1 ** state.step)
        decay = lr * lr * cfg.adam_weight_decay * spec.wd_mul
        self._adam_update(self._local_param(label), grad, state.exp_avg, state.exp_avg_sq,
                          torch.tensor(beta1), torch.tensor(beta2), torch.tensor(step_size),
                          torch.tensor(decay), cfg.adam_eps)

    # -- checkpoints ----------------------------------------------------------------------------

    def _state_tensors(self, label: str) -> dict[str, torch.Tensor]:
        state = self.state[label]
        if isinstance(state, NorMuonState):
            return dict(momentum=state.momentum, second_moment=state.second_moment,
                        mantissa=state.mantissa)
        return dict(exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq)

    def full_state(self) -> dict:
        """Every state tensor in the full (unsharded) layout of its parameter (the matrix view for
        NorMuon banks), the Adam step counts and the tie; collective: every rank must call it."""
        labels = {}
        for spec in self.table:
            full = {}
            for name, local in self._state_tensors(spec.label).items():
                if self.modes[spec.label] not in ("sharded", "sharded_sparse"):
                    full[name] = local.clone()
                    continue
                # the 16-bit mantissa travels as float16 bits (NCCL has no uint16)
                wire = local.view(torch.float16) if local.dtype == torch.uint16 else local
                gathered = wire.new_empty(wire.shape[0] * self.world_size, *wire.shape[1:])
                self.comms.all_gather(gathered, wire.contiguous()).wait()
                full[name] = gathered.view(local.dtype)
            step = getattr(self.state[spec.label], "step", None)
            labels[spec.label] = dict(tensors=full, step=step)
        return dict(labels=labels, tied=self.tied)

    def load_full_state(self, saved: dict) -> None:
        """The inverse of full_state: this rank takes its shard of every full state tensor."""
        for spec in self.table:
            entry = saved["labels"][spec.label]
            for name, local in self._state_tensors(spec.label).items():
                full = entry["tensors"][name]
                if self.modes[spec.label] in ("sharded", "sharded_sparse"):
                    rows = local.shape[0]
                    full = full[self.rank * rows:(self.rank + 1) * rows]
                local.copy_(full)
            if entry["step"] is not None:
                self.state[spec.label].step = entry["step"]
        self.tied = saved["tied"]

    # -- untie and reset --------------------------------------------------------------------------

    @torch.no_grad()
    def untie(self) -> None:
        """Make embed an independent parameter; its Adam state continues from lm_head's
        (moments transposed, step counter copied)."""
        if not self.tied:
            raise RuntimeError("NorMuonAndAdam.untie(): already untied")
        head, embed = self.state["lm_head"], self.state["embed"]
        embed.step = head.step
        for name in ("exp_avg", "exp_avg_sq"):
            head_moment, embed_moment = getattr(head, name), getattr(embed, name)
            if self.world_size > 1:
                full = head_moment.new_empty(head_moment.shape[0] * self.world_size,
                                             *head_moment.shape[1:])
                self.comms.all_gather(full, head_moment).wait()
                rows = embed_moment.shape[0]
                embed_moment.copy_(full.T[self.rank * rows:(self.rank + 1) * rows])
            else:
                embed_moment.copy_(head_moment.T)
        self.tied = False

    def reset(self) -> None:
        """Back to the initial state after the warmup: zero state and counters, tied again."""
        for state in self.state.values():
            if isinstance(state, NorMuonState):
                buffers = (state.momentum, state.second_moment, state.mantissa)
            else:
                buffers = (state.exp_avg, state.exp_avg_sq)
                state.step = 0
            for buffer in buffers:
                buffer.zero_()
        self.tied = True
        if self.sparse_bigram is not None:
            self.sparse_bigram.reset()


# =================================================================================================
# Model
# =================================================================================================
# An 11-layer GPT written as one flat forward over parameter banks. Layer map: attention is
# skipped in layer 6, which instead receives the U-net skip from layer 3; some layers use
# paired-head attention, long windows or value embeddings. Record #74 runs layers 7-10 in two
# parallel residual lanes; from #77 (single_stream) one stream, whose late attention layers read
# the stream cached after layer 7. The later records' extras (MUDD, gates, XSA, DC attention)
# are switches of the same forward.

NUM_LAYERS = 11
GATE_WIDTH = 12                  # the first 12 channels of a vector feed every small gate
NO_ATTN_LAYER = 6                # MLP-only layer, where the skip connection is added back
SKIP_SOURCE_LAYER = 3            # its stream is the skip value (#74: before its MLP, #77: after)
CACHED_LAYER = 7                 # its output stream: backout (#74), late attention input (#77)
PAIRED_HEAD_LAYERS = (0, 2, 5, 9)
LONG_WINDOW_LAYERS = (3, 10)     # also the layers with the key offset
VALUE_EMBED_LAYERS = (1, 2, 8, 9, 10)  # layer VALUE_EMBED_LAYERS[k] reads value table k
ATTN_LAYERS = tuple(i for i in range(NUM_LAYERS) if i != NO_ATTN_LAYER)
LATE_ATTN_LAYERS = (8, 9, 10)    # single stream: their attention reads the cached layer-7 stream
XSA_LAYERS = tuple(i for i in ATTN_LAYERS if i not in PAIRED_HEAD_LAYERS)
VARIANT_ATTN_LAYERS = XSA_LAYERS  # cfg.attn replaces their attention; paired layers keep theirs
NOISE_LAMBDA_STD = 0.1            # initial spread of the lambda query vectors (the key ones are 0)
GATED_XSA_LAYERS = (1, 3, 4, 7)  # with the MUDD gates, XSA runs here only
GATED_OUT_LAYERS = (3, 10)       # with the MUDD gates, only these keep an attention output gate
POST_GATE_LAYER = 4              # the post gate reads the stream entering this layer
MUDD_LAYER = 10                  # MUDD block 0 runs at its start
MUDD_HIDDEN = 64
MUDD_SCALE = 0.1                 # coefficients = (w2 gelu(w1 x) + b2) x this
DC_LAYER = 10
DC_WINDOW = 112                  # tokens, the query's own included
BIGRAM_SIGN_ROWS = 8192
VAL_MASK_LOGIT = -60.0           # a masked pair's soft-capped logit at validation (z in (0, 23))
ROTARY_MIN_FREQ = 1 / 1024
INITIAL_ATTN_SCALE = 0.1
YARN_BETA = 32


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def num_scalars(world_size: int) -> int:
    """2 attention lambdas per layer + smear, backout, skip; padded to a multiple of the world size."""
    used = 2 * NUM_LAYERS + 3
    return used + (-used) % world_size


def num_mlp_slots(world_size: int) -> int:
    """MLP layers in the bank, padded so its 2 * slots matrices split evenly over the ranks."""
    slots = NUM_LAYERS
    while (2 * slots) % world_size:
        slots += 1
    return slots


def standard_attn_layers(cfg: Hyperparameters) -> tuple[int, ...]:
    """The attention layers whose Q, K, V and O live in attn_bank (or qk_bank and vo_bank): all,
    except that latent attention keeps its layers' factors in the mla banks."""
    if cfg.latent_attention:
        return tuple(i for i in ATTN_LAYERS if i not in VARIANT_ATTN_LAYERS)
    return ATTN_LAYERS


def variant_bank_shapes(cfg: Hyperparameters) -> dict[str, tuple[int, int, int]]:
    """(matrices, rows, cols) of each bank cfg.attn adds, before the padding to the world size.
    diff: each layer's noise Q and K (d, d), or in head-pair blocks (2 hd, d) like qk_bank;
    cmd: each layer's shared noise query and key (n, d). mla: per layer W_dq (q_rank, d), W_uq
    (d [+ n], q_rank), W_dkv (kv_rank + hd/2, d), W_ukv (d/2 + d [+ n], kv_rank) and W_o (d, d);
    cmd_mla appends the n noise rows to W_uq and W_ukv."""
    d, hd, n = cfg.model_dim, cfg.head_dim, cfg.cmd_noise_dim
    layers = len(VARIANT_ATTN_LAYERS)
    if cfg.attn == "diff":
        rows = 2 * hd if cfg.qk_head_pair_groups else d
        return {"noise_qk_bank": (2 * layers * d // rows, rows, d)}
    if cfg.attn == "cmd":
        return {"noise_qk_bank": (2 * layers, n, d)}
    if not cfg.latent_attention:
        return {}
    noise = n if cfg.attn == "cmd_mla" else 0
    q_rank, kv_rank = cfg.mla_q_rank, cfg.mla_kv_rank
    shapes = [(q_rank, d), (d + noise, q_rank), (kv_rank + hd // 2, d),
              (d // 2 + d + noise, kv_rank), (d, d)]
    return {label: (layers, *shape) for label, shape in zip(LATENT_BANKS, shapes)}


def lambda_init(layer: int) -> float:
    """The Differential Transformer's per-layer lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)), l the
    1-based layer index (Ye et al. 2024, arXiv:2410.05258, section 2.1); `layer` counts from 0."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def differential_lambdas(vectors: torch.Tensor, init: float) -> torch.Tensor:
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (arXiv:2410.05258, eq. 2), one per
    group: vectors (4, G, hd) = (lq1, lk1, lq2, lk2), G = 1 (diff: per layer) or H (cmd: per
    head). The key vectors start at zero, so lambda starts at exactly lambda_init, and the small
    random query vectors give them a gradient (both zero would be a stationary point)."""
    q1, k1, q2, k2 = vectors.float().unbind(0)
    return torch.exp((q1 * k1).sum(-1)) - torch.exp((q2 * k2).sum(-1)) + init


def unpack_mask_rows(bits: torch.Tensor) -> torch.Tensor:
    """Rows of a bit-packed mask, (..., V / 8) uint8 with column 8c + j in bit j of byte c, as
    (..., V) bool."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)


def padded_count(count: int, world_size: int) -> int:
    """count rounded up to a multiple of the world size (matrices of a bank, split over ranks)."""
    return count + (-count) % world_size


class CoefficientLayout:
    """Named columns of a small MLP's output: (name, width, initial value) per field. The initial
    value is what the static parameter the field replaces started at; the MLP's output weights
    start at zero, so its bias alone gives it."""

    def __init__(self, fields: list[tuple[str, int, float]]):
        self.names = [name for name, _, _ in fields]
        self.widths = [width for _, width, _ in fields]
        self.initial = torch.tensor([value for _, width, value in fields for _ in range(width)])

    @property
    def size(self) -> int:
        return sum(self.widths)

    def split(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, out.split(self.widths, dim=-1)))


def mudd_layouts() -> list[CoefficientLayout]:
    """MUDD block 0 (start of layer 10, on the stream h9) and block 1 (after the last layer)."""
    resid = math.sqrt(1.1)
    return [CoefficientLayout([("v_h0", 1, 0.0), ("v_h7", 1, 0.0), ("v_x", 1, 0.0),
                               ("res_h0", 1, 0.0), ("res_h7", 1, 0.0), ("res_x", 1, 0.0),
                               ("ve_gate", 2, 2.0), ("resid_attn", 1, resid), ("post_attn", 1, 1.0),
                               ("x0", 1, 0.0), ("bigram", 1, 0.05), ("resid_mlp", 1, resid),
                               ("post_mlp", 1, 1.0)]),
            CoefficientLayout([("h0", 1, 0.0), ("h7", 1, -0.5), ("h9", 1, 0.0), ("ve0", 1, 0.0),
                               ("h3", 1, 0.0)])]


def gate_layouts(num_heads: int) -> list[CoefficientLayout]:
    """The MUDD-generated gates: pre (from x0) and post (from the stream entering layer 4)."""
    H = num_heads
    return [CoefficientLayout([("xsa_1", H, 0.0), ("xsa_3", H, 0.0), ("out_3", H, 0.25),
                               ("x0", 4, 0.0), ("bigram", 4, 0.05)]),          # layers 0-3
            CoefficientLayout([("xsa_4", H, 0.0), ("xsa_7", H, 0.0), ("out_10", H, 0.25),
                               ("x0", 5, 0.0), ("bigram", 5, 0.05),            # layers 4, 5, 7-9
                               ("skip", 1, 0.5), ("dc_w1", H, 1.0), ("dc_w2", H, 0.0)])]


GATE_INJECTION_LAYERS = ((0, 1, 2, 3), (4, 5, 7, 8, 9))   # the x0 / bigram columns of each gate


def kaiming_uniform(rows: int, cols: int) -> torch.Tensor:
    """nn.Linear's default initialisation of a (rows, cols) weight."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound)


class Rotary(nn.Module):

    """Half-truncated RoPE (upper half of each head never rotates) with YaRN window extension.

    One angle table serves both layouts: normal layers read position t, paired-head layers read
    positions 2t and 2t+1 for the two heads of a group. head_dim is the Q/K width: a narrower one
    (#344: 96) keeps the same shape, its first half turning in head_dim/4 pairs at frequencies
    spread geometrically over the same range [ROTARY_MIN_FREQ, 1] (24 frequencies for 96 instead
    of 32 for 128), so the slowest and the fastest pair turn as at full width.
    """

    def __init__(self, head_dim: int, max_positions: int):
        super().__init__()
        num_freqs = head_dim // 4
        exponents = torch.arange(num_freqs, dtype=torch.float32) / (num_freqs - 1)
        self.register_buffer("base_freqs", ROTARY_MIN_FREQ ** exponents, persistent=False)
        self.register_buffer("freqs", torch.empty(num_freqs), persistent=False)
        self.register_buffer("cos", torch.empty(max_positions, head_dim, dtype=torch.bfloat16),
                             persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim, dtype=torch.bfloat16),
                             persistent=False)
        # attn_scale / INITIAL_ATTN_SCALE on the device: cfg.yarn_scale_in_queries scales the
        # queries by it
        self.register_buffer("query_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.attn_scale = INITIAL_ATTN_SCALE

    @torch.no_grad()
    def reset(self) -> None:
        self.freqs.copy_(self.base_freqs)
        self.attn_scale = INITIAL_ATTN_SCALE
        self._rebuild_tables()

    @torch.no_grad()
    def apply_yarn(self, old_window: int, new_window: int) -> None:
        """Stretch slow frequencies by old/new (fast ones keep theirs) and raise the softmax scale."""
        rotations = old_window * self.freqs / (2 * math.pi)
        ramp = ((rotations - 1) / (YARN_BETA - 1)).clamp(0, 1)
        ratio = old_window / new_window
        self.freqs.mul_(ratio + ramp * (1 - ratio))
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1
        self._rebuild_tables()

    def _rebuild_tables(self) -> None:
        self.query_scale.fill_(self.attn_scale / INITIAL_ATTN_SCALE)
        positions = torch.arange(self.cos.size(0), dtype=torch.float32, device=self.freqs.device)
        rotating = self.freqs.repeat_interleave(2)                     # pairs (2k, 2k+1)
        freqs = torch.cat([rotating, torch.zeros_like(rotating)])
        angles = positions[:, None] * freqs[None, :]
        self.cos.copy_(angles.cos())
        # rotate(u) = cos * u + sin_signed * swap_pairs(u), with the odd entries of sin negated
        sign = torch.tensor([1.0, -1.0], device=angles.device).repeat(freqs.numel() // 2)
        self.sin.copy_(angles.sin() * sign)


def rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    swapped = u.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return u * cos + swapped * sin


def zero_pad_heads(u: torch.Tensor, width: int) -> torch.Tensor:
    """Heads u (T, H, w) with zero columns appended up to `width`. Q and K narrower than V
    (#344) meet it at one width, the one flash attention and the composed-attention kernel take;
    a zero column changes no dot product, so every score stays as it was."""
    return u if u.shape[-1] == width else F.pad(u, (0, width - u.shape[-1]))


def shift_key_halves(k: torch.Tensor) -> torch.Tensor:
    """The key offset of the long-window layers: the non-rotating half of each key (T, H, w)
    becomes the previous token's (token 0 keeps its own)."""
    half = k.shape[-1] // 2
    return torch.cat([k[:, :, :half], torch.cat([k[:1, :, half:], k[:-1, :, half:]])], -1)


def qk_prep_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      paired: bool, key_offset: bool, width: int,
                      q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q and K as attention reads them, by the model's own ops (triton_kernels.qk_prep does the
    same in one kernel): q, k (T, H, w) RMS-normed and turned by rotary at the tables' (cos, sin)
    positions, q times q_scale if given, the key offset if `key_offset`, zero columns up to
    `width`. Paired layers: heads (2g, 2g+1) turn at positions (2t, 2t+1), then token t becomes
    rows 2t (heads 0..H/2-1) and 2t+1 (heads H/2..H-1), so that attention slot j mixes heads j
    and j+H/2: (2T, H/2, width); else (T, H, width)."""
    T, H, w = q.shape
    q, k = rms_norm(q), rms_norm(k)
    if paired:
        cos, sin = cos[:2 * T].view(T, 1, 2, w), sin[:2 * T].view(T, 1, 2, w)
        q = rotate(q.view(T, H // 2, 2, w), cos, sin).view(T, H, w)
        k = rotate(k.view(T, H // 2, 2, w), cos, sin).view(T, H, w)
    else:
        cos, sin = cos[:T, None], sin[:T, None]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if q_scale is not None:
        q = q * q_scale
    if key_offset:
        k = shift_key_halves(k)
    q, k = zero_pad_heads(q, width), zero_pad_heads(k, width)
    if paired:
        return q.reshape(2 * T, H // 2, width), k.reshape(2 * T, H // 2, width)
    return q, k


def document_windows(cu_seqlens: torch.Tensor, window: int
                     ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Each non-empty document's rows, and which keys its rows see (L, L) bool: row i sees rows j
    of the document with i - window <= j <= i. A loop over documents, so the dense references
    only: it reads cu_seqlens on the host."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            pos = torch.arange(end - start, device=cu_seqlens.device)
            delta = pos[:, None] - pos[None, :]
            yield slice(start, end), (delta >= 0) & (delta <= window)


def attention_reference(q, k, v, cu_seqlens, window: int, scale: float) -> torch.Tensor:
    """Causal sliding-window attention within documents, one dense softmax per document (CPU path).

    q, k, v: (rows, heads, head_dim). Row i sees rows j of its own document with i - window <= j <= i.
    """
    out = torch.empty_like(q)
    for doc, visible in document_windows(cu_seqlens, window):
        q_doc, k_doc, v_doc = (t[doc].transpose(0, 1).float() for t in (q, k, v))
        y = F.scaled_dot_product_attention(q_doc, k_doc, v_doc, attn_mask=visible, scale=scale)
        out[doc] = y.transpose(0, 1).to(q.dtype)
    return out


FLASH_ATTN3_HUB_REPO = "varunneal/flash-attention-3"


def load_flash_attn3(log: Callable[[str], None]) -> Callable | None:
    """FlashAttention-3's varlen function from the Hugging Face kernels hub, or None when it cannot
    be had (the optional `kernels` package missing, no network, a GPU it does not support)."""
    try:
        from kernels import get_kernel
        return get_kernel(FLASH_ATTN3_HUB_REPO).flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - any failure means: use torch's varlen attention
        log(f"FlashAttention-3 unavailable ({type(e).__name__}: {e}); using torch varlen_attn")
        return None


def attention(q, k, v, cu_seqlens, max_seqlen: int, window: int, scale: float,
              paths: Paths) -> torch.Tensor:
    """Causal attention within documents over a left window, by paths.attention: FlashAttention-3,
    torch's varlen flash attention, the Triton kernel, or the dense reference (all the same
    function)."""
    if paths.attention == "triton":
        return triton_kernels.windowed_attention(q, k, v, cu_seqlens, window, scale)
    if paths.attention == "flash_attn3":
        out = paths.flash_attn3(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                softmax_scale=scale, causal=True, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out   # some builds also return the lse
    if paths.attention == "varlen":
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                           window_size=(window, 0))
    return attention_reference(q, k, v, cu_seqlens, window, scale)


def noise_attention(q, k, v, cu_seqlens, max_seqlen: int, window: int, scale: float,
                    paths: Paths) -> torch.Tensor:
    """B v (T, H, hd): the values v (T, H, hd) weighted by the noise map of q, k (T, G, n), G = H
    (diff) or 1 (cmd: one pair shared by every head, expanded, since a flash kernel ties each map
    to one value head). Zero columns bring q, k and v to one width; they change no score."""
    T, H, hd = v.shape
    width = max(q.shape[-1], hd)
    if q.shape[-1] < width:
        q, k = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k))
    if hd < width:
        v = F.pad(v, (0, width - hd))
    q, k = (t.expand(T, H, width).contiguous() for t in (q, k))
    return attention(q, k, v, cu_seqlens, max_seqlen, window, scale, paths)[..., :hd]


def differential_combine(signal: torch.Tensor, noise: torch.Tensor, lam: torch.Tensor,
                         init: float) -> torch.Tensor:
    """Head-wise RMSNorm of signal - lambda noise, times (1 - lambda_init) (arXiv:2410.05258,
    eq. 3; weightless, like every norm of this model). signal, noise: (T, H, hd); lam: (1,) or
    (H,)."""
    y = signal.float() - lam[:, None] * noise.float()
    return (rms_norm(y) * (1 - init)).to(signal.dtype)


def differential_attention(q, k, q_noise, k_noise, v, cu_seqlens, max_seqlen: int, window: int,
                           scale: float, noise_scale: float, lam: torch.Tensor, init: float,
                           paths: Paths) -> torch.Tensor:
    """(A - lambda B) v as A v - lambda (B v): two attention() calls, no map materialised, then
    differential_combine. q, k, v: (T, H, hd); q_noise, k_noise: (T, G, n), G = H or 1; lam:
    (1,) or (H,)."""
    signal = attention(q, k, v, cu_seqlens, max_seqlen, window, scale, paths)
    noise = noise_attention(q_noise, k_noise, v, cu_seqlens, max_seqlen, window, noise_scale, paths)
    return differential_combine(signal, noise, lam, init)


def _masked_softmax(q, k, hidden: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax maps (heads, L, L) of one document's q, k (L, heads, n), hidden keys masked."""
    scores = torch.einsum("ign,jgn->gij", q.float(), k.float()) * scale
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)


def differential_attention_reference(q, k, q_noise, k_noise, v, cu_seqlens, window: int,
                                     scale: float, noise_scale: float, lam: torch.Tensor,
                                     init: float) -> torch.Tensor:
    """differential_attention with both maps materialised per document (fp32): M = A - lambda B,
    A the softmax of q k^T x scale and B of q_noise k_noise^T x noise_scale over the keys j of
    row i's document with i - window <= j <= i; out = RMSNorm_head(M v) x (1 - lambda_init).
    Shapes as differential_attention (a shared noise pair broadcasts over the heads)."""
    T, H, hd = v.shape
    out = torch.zeros(T, H, hd, device=v.device)
    for doc, visible in document_windows(cu_seqlens, window):
        A = _masked_softmax(q[doc], k[doc], ~visible, scale)
        B = _masked_softmax(q_noise[doc], k_noise[doc], ~visible, noise_scale)
        maps = A - lam.float()[:, None, None] * B
        out[doc] = torch.einsum("hij,jhd->ihd", maps, v[doc].float())
    return rms_norm(out) * (1 - init)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """y_h minus share_h times its component along the head's own value v_h: y - s (y.v / v.v) v,
    with v.v at least 1e-8. y, v: (T, H, hd); share: (H,) or (T, H)."""
    dot = (y.float() * v.float()).sum(-1)
    den = v.float().square().sum(-1).clamp_min(1e-8)
    return y - ((share * dot / den)[..., None] * v.float()).to(y.dtype)


class AttnWeights(NamedTuple):
    """One attention layer's matrices: standard qkv (2 H qk + d, d), qk = cfg.qk_width, or for
    mla and cmd_mla the latent factors (W_dq, W_uq, W_dkv, W_ukv) of variant_bank_shapes; out
    (d, d); for diff and cmd the noise query and key rows noise_qk (2d or 2n, d)."""
    qkv: torch.Tensor | None
    out: torch.Tensor
    noise_qk: torch.Tensor | None = None
    latent: tuple[torch.Tensor, ...] | None = None


class TableRows(NamedTuple):
    """One micro-batch's rows of the three lookup tables, named after the tables (or the row
    indices, with the same shapes minus the model dimension)."""
    embed: torch.Tensor          # (T, d)
    value_embeds: torch.Tensor   # (len(VALUE_EMBED_LAYERS), T, d)
    bigram_embed: torch.Tensor   # (T, d)


# Record #89's delayed scaling of the FP8 down-projection. A scale known before the forward lets
# the up-projection's kernel quantise post as it writes it, without a pass that finds post's
# maximum first. The margins leave room for growth since the scale was taken (activations move
# more from step to step than weights, hence the wider one); what outgrows them saturates at 448.
FP8_ACT_MARGIN = 1.80
FP8_WEIGHT_MARGIN = 1.12
FP8_INITIAL_ACT_SCALE = 1.0      # a slot's scale before its first forward
# c_proj starts at zero and grows fast at first: the quantisation at the start and those after
# the first 16 optimizer steps take its exact maximum instead of the previous one. With
# --fp8_mlp_backward c_fc is quantised the same way, at the same times: once per optimizer
# update, not in every forward as #84 does (8 times per step with gradient accumulation on one
# GPU); a scale known before the weights are read lets one pass over them find the next maximum
# and write both layouts.
FP8_WEIGHT_BOOTSTRAP_STEPS = 16


def delayed_e4m3_scale(t_max: torch.Tensor, margin: float) -> torch.Tensor:
    """A scale for a later tensor like t: margin x max|t| / 448, in fp32."""
    return (t_max * margin / triton_kernels.E4M3_MAX).clamp_min(triton_kernels.E4M3_SCALE_FLOOR)


def requantized_weights(weights: torch.Tensor, last_max: torch.Tensor, quantizations: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights (L, hidden, d) as (weights in e4m3 (L, hidden, d), their scales (L,), max|weights|
    (L,)). The scale is the delayed one from last_max, the maximum at the previous quantisation,
    except at the bootstrap quantisations (`quantizations` before this one: 0 at the start, then
    1, 2, ... after each optimizer step), which take the exact current maximum."""
    maxima = weights.abs().amax(dim=(1, 2)).float()
    bootstrap = quantizations <= FP8_WEIGHT_BOOTSTRAP_STEPS
    scales = torch.where(bootstrap, triton_kernels.exact_e4m3_scale(maxima),
                         delayed_e4m3_scale(last_max, FP8_WEIGHT_MARGIN))
    return triton_kernels.quantize_e4m3_scaled(weights, scales[:, None, None]), scales, maxima


class FP8DelayedScales(nn.Module):
    """The state of the FP8 down-projection (#89), as buffers, so that the model's state_dict
    (the warm-up's snapshot) holds it. L = NUM_LAYERS.
      act_scales (L, S): post's e4m3 scale per layer and micro-batch slot, S = micro_batches_per_
          step; slot = micro_step x world_size + rank, the micro-batch's place in the step's stream
          (TrainLoader), so that every world size gives a slot the same data, and each slot
          scales by what its own micro-batch saw in the previous step. A rank updates its slots.
      weight_e4m3 (L, d, hidden): c_proj^T in e4m3 at weight_scales (L,); weight_max (L,): the
          max|c_proj| it was made from; quantizations: how many were made.
    With `backward` (--fp8_mlp_backward), the other layouts, made at the same time:
      c_proj_e4m3 (L, hidden, d): c_proj in e4m3 at weight_scales;
      c_fc_e4m3 (L, hidden, d) and c_fc_e4m3_t (L, d, hidden): c_fc and c_fc^T in e4m3 at
          c_fc_scales (L,), delayed like c_proj's from c_fc_max (L,).
    Transient, not saved: `current` (L,), the scales of the slot whose forward runs, and
    `observed` (L,), the largest post of each layer in the latest training forward."""

    def __init__(self, slots: int, hidden: int, d: int, compile_quantize: bool,
                 backward: bool = False):
        super().__init__()
        L = NUM_LAYERS
        self.fp8_backward = backward
        self.register_buffer("act_scales", torch.full((L, slots), FP8_INITIAL_ACT_SCALE))
        self.register_buffer("weight_e4m3", torch.zeros(L, d, hidden).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scales", torch.full((L,), triton_kernels.E4M3_SCALE_FLOOR))
        self.register_buffer("weight_max", torch.zeros(L))
        if backward:
            self.register_buffer("c_proj_e4m3", torch.zeros(L, hidden, d).to(torch.float8_e4m3fn))
            self.register_buffer("c_fc_e4m3", torch.zeros(L, hidden, d).to(torch.float8_e4m3fn))
            self.register_buffer("c_fc_e4m3_t", torch.zeros(L, d, hidden).to(torch.float8_e4m3fn))
            self.register_buffer("c_fc_scales", torch.full((L,), triton_kernels.E4M3_SCALE_FLOOR))
            self.register_buffer("c_fc_max", torch.zeros(L))
        self.register_buffer("quantizations", torch.zeros((), dtype=torch.int64))
        self.register_buffer("current", torch.full((L,), FP8_INITIAL_ACT_SCALE), persistent=False)
        self.register_buffer("observed", torch.zeros(L), persistent=False)
        self._requantized = (torch.compile(requantized_weights, fullgraph=True, dynamic=False)
                             if compile_quantize else requantized_weights)

    def begin_slot(self, slot: int) -> None:
        """Before the training forward of micro-batch slot `slot`: its scales become current."""
        self.current.copy_(self.act_scales[:, slot])

    def end_slot(self, slot: int) -> None:
        """After it: the slot's scales for the next step, from what this forward saw (on the
        device: no synchronisation)."""
        self.act_scales[:, slot] = delayed_e4m3_scale(self.observed, FP8_ACT_MARGIN)

    @torch.no_grad()
    def quantize_weights(self, c_proj: torch.Tensor, c_fc: torch.Tensor | None = None) -> None:
        """c_proj (L, hidden, d) into weight_e4m3, with `backward` also into c_proj_e4m3, and c_fc
        (L, hidden, d) into both its layouts: at the start and after every optimizer step."""
        if self.fp8_backward != (c_fc is not None):
            raise ValueError("quantize_weights: c_fc must be given exactly when backward=True "
                             f"(--fp8_mlp_backward); this one has backward={self.fp8_backward}")
        e4m3, scales, maxima = self._requantized(c_proj, self.weight_max, self.quantizations)
        self.weight_e4m3.copy_(e4m3.mT)
        self.weight_scales.copy_(scales)
        self.weight_max.copy_(maxima)
        if self.fp8_backward:
            self.c_proj_e4m3.copy_(e4m3)
            e4m3, scales, maxima = self._requantized(c_fc, self.c_fc_max, self.quantizations)
            self.c_fc_e4m3.copy_(e4m3)
            self.c_fc_e4m3_t.copy_(e4m3.mT)
            self.c_fc_scales.copy_(scales)
            self.c_fc_max.copy_(maxima)
        self.quantizations += 1

    def layer_weights(self, layer: int) -> triton_kernels.FP8MLPWeights:
        """Layer `layer`'s e4m3 weights for the FP8 backward (with `backward`)."""
        one = slice(layer, layer + 1)
        return triton_kernels.FP8MLPWeights(
            self.c_fc_e4m3[layer], self.c_fc_e4m3_t[layer], self.c_fc_scales[one],
            self.c_proj_e4m3[layer], self.weight_e4m3[layer], self.weight_scales[one])

    def full_state(self, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """The saved buffers on the CPU, act_scales with every rank's slots (collective)."""
        state = {name: t.cpu() for name, t in self.state_dict().items()}
        if world_size > 1:
            mine = torch.zeros_like(self.act_scales)
            mine[:, rank::world_size] = self.act_scales[:, rank::world_size]
            dist.all_reduce(mine)
            state["act_scales"] = mine.cpu()
        return state


class FP8PackedQKV(nn.Module):
    """#344's packed QKV weights in e4m3 (triton_kernels section 12), as buffers, so that the
    model's state_dict (the warm-up's snapshot) and every checkpoint hold them. Remade from the
    weights at the start and after every optimizer update (GPT.requantize_fp8_weights), never
    in a forward. L = the standard attention layers, n = 2 H qk_width + d rows (Q, K, then V):
      weight_e4m3 (L, n, d): W / scale, the forward GEMM's operand; weight_e4m3_t (L, d, n): its
          transpose, the backward's; weight_scales (L,): each layer's exact max|W| / 448 (no
          scale is stated for #344's weights); quantizations: how many were made."""

    def __init__(self, layers: int, rows: int, d: int):
        super().__init__()
        e4m3 = torch.float8_e4m3fn
        self.register_buffer("weight_e4m3", torch.zeros(layers, rows, d).to(e4m3))
        self.register_buffer("weight_e4m3_t", torch.zeros(layers, d, rows).to(e4m3))
        self.register_buffer("weight_scales",
                             torch.full((layers,), triton_kernels.E4M3_SCALE_FLOOR))
        self.register_buffer("quantizations", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def quantize(self, qk: torch.Tensor, v: torch.Tensor, use_kernels: bool) -> None:
        """Every layer's rows [qk; v] from qk (L, 2 H w, d) and v (L, d, d), in both layouts."""
        maxima = torch.maximum(qk.abs().amax(dim=(1, 2)), v.abs().amax(dim=(1, 2)))
        self.weight_scales.copy_(triton_kernels.exact_e4m3_scale(maxima))
        quantize = (triton_kernels.quantize_packed_e4m3 if use_kernels
                    else triton_kernels.quantize_packed_e4m3_reference)
        quantize(qk, v, self.weight_scales, self.weight_e4m3, self.weight_e4m3_t)
        self.quantizations += 1


def window_sizes(windows: tuple[int, int] | torch.Tensor) -> tuple[int, int]:
    """The (short, long) attention windows in tokens, from a pair of ints or from the empty
    tensor whose first two sizes they are (Trainer.graph_windows, --symbolic_windows)."""
    if isinstance(windows, torch.Tensor):
        return windows.size(0), windows.size(1)
    return windows


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters, world_size: int, max_positions: int,
                 paths: Paths = Paths()):
        super().__init__()
        d, H, hd, V = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
        if H * hd != d or H % 2:
            raise ValueError(f"num_heads x head_dim must equal model_dim ({H} x {hd} != {d}) "
                             f"and num_heads must be even")
        self.cfg = cfg
        self.paths = paths
        num_attn, num_standard = len(ATTN_LAYERS), len(standard_attn_layers(cfg))
        bound = math.sqrt(3) * 0.5 / math.sqrt(d)
        # Matrix banks: created in fp32, initialised, then stored in bf16.
        if cfg.qk_head_pair_groups:
            # Q and K as (2 qk_width, d) head-pair blocks, then V and O; zero padding matrices so
            # that every bank splits evenly over the ranks
            pairs = H // 2
            qk_bank = torch.zeros(padded_count(2 * pairs * num_standard, world_size),
                                  2 * cfg.qk_width, d)
            qk_bank[:2 * pairs * num_standard].uniform_(-bound, bound)
            vo_bank = torch.zeros(padded_count(2 * num_standard, world_size), d, d)
            vo_bank[:2 * num_standard].uniform_(-bound, bound)
            self.qk_bank = nn.Parameter(qk_bank.bfloat16())
            self.vo_bank = nn.Parameter(vo_bank.bfloat16())
        else:
            self.attn_bank = nn.Parameter(torch.empty(num_standard, 4 * d, d)
                                          .uniform_(-bound, bound).bfloat16())
        self.fp8_qkv_weights = (FP8PackedQKV(num_standard, 2 * H * cfg.qk_width + d, d)
                                if cfg.fp8_qkv else None)
        # c_fc random, c_proj zero. Padding slots (so the matrices split evenly over the ranks)
        # stay zero and never get a gradient: the initial weights do not depend on the world size.
        if cfg.mlp == "pairwise":
            # U like c_fc, so each feature's pre-activation starts at a ReLU^2 hidden unit's
            # scale; W zero like c_proj, so every MLP starts silent. Padding layers as above.
            slots, r = padded_count(NUM_LAYERS, world_size), cfg.pairwise_rank
            u_bank = torch.zeros(slots, r, d)
            u_bank[:NUM_LAYERS].uniform_(-bound, bound)
            self.pairwise_u_bank = nn.Parameter(u_bank.bfloat16())
            self.pairwise_w_bank = nn.Parameter(
                torch.zeros(slots, triton_kernels.pair_count(r), d, dtype=torch.bfloat16))
        else:
            mlp_bank = torch.zeros(num_mlp_slots(world_size), 2, cfg.mlp_hidden, d)
            mlp_bank[:NUM_LAYERS, 0].uniform_(-bound, bound)
            self.mlp_bank = nn.Parameter(mlp_bank.bfloat16())
        self.fp8_scales = (FP8DelayedScales(cfg.micro_batches_per_step, cfg.mlp_hidden, d,
                                            paths.compile, backward=cfg.fp8_mlp_backward)
                           if cfg.fp8_mlp_down else None)
        # Output head stored transposed (d, V); the input embedding starts as its exact transpose.
        self.lm_head = nn.Parameter(torch.empty(d, V, dtype=torch.bfloat16).normal_(0, 0.005))
        self.embed = nn.Parameter(self.lm_head.detach().T.contiguous())
        self.value_embeds = nn.Parameter(
            0.01 * torch.randn(len(VALUE_EMBED_LAYERS) * V, d, dtype=torch.bfloat16))
        self.bigram_embed = nn.Parameter(torch.zeros(cfg.bigram_vocab_size, d, dtype=torch.bfloat16))
        if not cfg.mudd_gates:
            self.attn_gate_bank = nn.Parameter(
                torch.zeros(num_attn, H, GATE_WIDTH, dtype=torch.bfloat16))
        self.ve_gate_bank = nn.Parameter(
            torch.zeros(len(VALUE_EMBED_LAYERS), H, GATE_WIDTH, dtype=torch.bfloat16))
        self.smear_gate = nn.Parameter(torch.zeros(1, GATE_WIDTH, dtype=torch.bfloat16))
        if not cfg.mudd_gates:
            self.skip_gate = nn.Parameter(torch.zeros(1, GATE_WIDTH, dtype=torch.bfloat16))
        scalars = torch.ones(num_scalars(world_size))
        scalars[0:2 * NUM_LAYERS:2] = 0.5              # QKV weight lambdas (O lambdas stay 1)
        scalars[2 * NUM_LAYERS:2 * NUM_LAYERS + 3] = torch.tensor([0.0, 0.5, -1.5])
        self.scalars = nn.Parameter(scalars)            # ... smear, backout, skip (pre-sigmoid)
        if cfg.single_stream:   # (attention, MLP) write of every layer
            self.post_lambdas = nn.Parameter(torch.ones(NUM_LAYERS, 2))
        else:                   # [layer, sublayer, lane]
            post_lambdas = torch.ones(NUM_LAYERS, 2, 2)
            post_lambdas[CACHED_LAYER:, 0, 1] = 1.5    # attention write into lane 1
            self.post_lambdas = nn.Parameter(post_lambdas)
        if not cfg.mudd_gates:
            self.x0_lambdas = nn.Parameter(torch.zeros(NUM_LAYERS))
            self.bigram_lambdas = nn.Parameter(torch.full((NUM_LAYERS,), 0.05))
        self.resid_lambdas = nn.Parameter(torch.full((NUM_LAYERS, 2), math.sqrt(1.1)))
        self.rotary = Rotary(cfg.qk_width, max_positions)
        if cfg.xsa and not cfg.mudd_gates:
            self.xsa_alphas = nn.Parameter(torch.zeros(NUM_LAYERS, H))
        self.mudd_layouts, self.gate_layouts = mudd_layouts(), gate_layouts(H)
        if cfg.mudd:
            self.mudd_w1, self.mudd_w2, self.mudd_b2 = self._coefficient_mlp(self.mudd_layouts)
        if cfg.mudd_gates:
            self.gate_w1, self.gate_w2, self.gate_b2 = self._coefficient_mlp(self.gate_layouts)
            self.gate_scales = nn.Parameter(torch.full((len(self.gate_layouts),), MUDD_SCALE))
        if cfg.bigram_sign_trick:
            # fixed random signs, the same on every rank and device (a host generator of their own)
            signs = torch.randn(BIGRAM_SIGN_ROWS, d, generator=torch.Generator().manual_seed(83),
                                device="cpu")
            self.register_buffer("bigram_signs",
                                 signs.sign().bfloat16().to(torch.get_default_device()),
                                 persistent=False)
        if cfg.prefix_loss_weight > 0:
            # token -> its longest strict prefix token (-1: none); filled from the tokenizer
            self.register_buffer("prefix_table", torch.full((V,), -1, dtype=torch.int64),
                                 persistent=False)
        self._init_attention_variant(world_size)
        if not self.embed.is_meta:
            self.rotary.reset()

    def _init_attention_variant(self, world_size: int) -> None:
        """The banks and lambda vectors of cfg.attn, made after every other parameter so that
        those start as in the standard model. Down projections start like the standard Q, K, V
        (std 0.5/sqrt(d)), up projections with std 1/sqrt(rank), so the heads start at the standard
        scale; padding matrices stay zero, as in qk_bank."""
        cfg = self.cfg
        for label, (count, rows, cols) in variant_bank_shapes(cfg).items():
            std = (1.0 if label in ("mla_uq_bank", "mla_ukv_bank") else 0.5) / math.sqrt(cols)
            bank = torch.zeros(padded_count(count, world_size), rows, cols)
            bank[:count].uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)
            setattr(self, label, nn.Parameter(bank.bfloat16()))
        if cfg.noise_attention:
            groups = 1 if cfg.attn == "diff" else cfg.num_heads
            vectors = torch.zeros(len(VARIANT_ATTN_LAYERS), 4, groups, cfg.head_dim)
            vectors[:, 0::2].normal_(0, NOISE_LAMBDA_STD)     # lq1, lq2; lk1, lk2 stay zero
            self.noise_lambdas = nn.Parameter(vectors)

    def _coefficient_mlp(self, layouts: list[CoefficientLayout]) -> tuple[nn.Parameter, ...]:
        """w1 (blocks, MUDD_HIDDEN, d), w2 (all outputs, MUDD_HIDDEN) zero and b2 (all outputs)
        for the blocks of `layouts`, their outputs stacked in order."""
        d = self.cfg.model_dim
        w1 = torch.stack([kaiming_uniform(MUDD_HIDDEN, d) for _ in layouts])
        b2 = torch.cat([layout.initial for layout in layouts]) / MUDD_SCALE
        return (nn.Parameter(w1.bfloat16()),
                nn.Parameter(torch.zeros(len(b2), MUDD_HIDDEN, dtype=torch.bfloat16)),
                nn.Parameter(b2))

    # --- sublayers ---------------------------------------------------------------------------

    def mlp_layer_weights(self) -> list:
        """The MLP weights of every layer: its (2, hidden, d) slice of mlp_bank (c_fc, c_proj), or
        with --mlp=pairwise its (U (r, d), W (P, d)) slices of the pairwise banks."""
        if self.cfg.mlp == "pairwise":
            return list(zip(self.pairwise_u_bank.unbind(0), self.pairwise_w_bank.unbind(0)))
        return self.mlp_bank.unbind(0)

    def mlp(self, layer: int, weights, x: torch.Tensor) -> torch.Tensor:
        """weights: this layer's entry of mlp_layer_weights()."""
        if self.cfg.mlp == "pairwise":
            return PAIRWISE_LAYERS[self.paths.mlp](x, *weights)
        c_fc, c_proj = weights.unbind(0)
        if self.cfg.fp8_mlp_down:
            return self.mlp_fp8(layer, x, c_fc, c_proj)
        if self.cfg.fp8_mlp_up:
            if self.paths.mlp == "triton":
                return triton_kernels.linear_relu_square_fp8_up(x, c_fc, c_proj)
            return triton_kernels.linear_relu_square_fp8_up_reference(
                x, c_fc, c_proj, pre_from_post=self.cfg.mlp_pre_from_post)
        if self.paths.mlp == "triton":
            return triton_kernels.linear_relu_square(x, c_fc, c_proj)
        return triton_kernels.linear_relu_square_reference(
            x, c_fc, c_proj, pre_from_post=self.cfg.mlp_pre_from_post)

    def mlp_fp8(self, layer: int, x: torch.Tensor, c_fc: torch.Tensor,
                c_proj: torch.Tensor) -> torch.Tensor:
        """#89: both projections in e4m3. Training scales post by the running slot's delayed
        scale and records its largest post. Evaluation quantises post at the exact scale of the
        pass instead (just in time), so that a val loss does not depend on which slot ran last,
        and records nothing."""
        scales = self.fp8_scales
        act_scale = scales.current[layer:layer + 1] if self.training else None
        if self.cfg.fp8_mlp_backward:
            out, post_max = self.mlp_fp8_backward(layer, x, c_fc, c_proj, act_scale)
        elif self.paths.mlp == "triton":
            out, post_max = triton_kernels.linear_relu_square_fp8(
                x, c_fc, c_proj, scales.weight_e4m3[layer], scales.weight_scales[layer:layer + 1],
                act_scale)
        else:
            out, post_max = triton_kernels.linear_relu_square_fp8_reference(
                x, c_fc, c_proj, scales.weight_e4m3[layer], scales.weight_scales[layer:layer + 1],
                act_scale, pre_from_post=self.cfg.mlp_pre_from_post)
        if self.training:
            scales.observed[layer:layer + 1].copy_(post_max)
        return out

    def mlp_fp8_backward(self, layer: int, x: torch.Tensor, c_fc: torch.Tensor,
                         c_proj: torch.Tensor, act_scale: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """#344: #89's forward from c_fc's stored e4m3 copy, and the backward in FP8 as well."""
        weights = self.fp8_scales.layer_weights(layer)
        if self.paths.mlp == "triton":
            return triton_kernels.linear_relu_square_fp8_backward(
                x, c_fc, c_proj, weights, act_scale, grad_bound=self.cfg.fp8_mlp_grad_bound)
        return triton_kernels.linear_relu_square_fp8_backward_reference(
            x, c_fc, c_proj, weights, act_scale, pre_from_post=self.cfg.mlp_pre_from_post,
            grad_bound=self.cfg.fp8_mlp_grad_bound)

    def qkv_weight_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The standard attention layers' Q and K rows (L, 2 H qk_width, d), each layer's head-pair
        blocks of qk_bank in a row, and their V (L, d, d) in vo_bank: views, no copies."""
        L, H, d = len(standard_attn_layers(self.cfg)), self.cfg.num_heads, self.cfg.model_dim
        return self.qk_bank[:H * L].view(L, H * self.qk_bank.shape[1], d), self.vo_bank[0:2 * L:2]

    @torch.no_grad()
    def requantize_fp8_weights(self) -> None:
        """The e4m3 copies of the current weights, at the start and after every optimizer step:
        #89's c_proj (with --fp8_mlp_backward c_fc's and c_proj's other layouts too) and #344's
        packed QKV weights, each where its switch is on."""
        if self.fp8_scales is not None:
            bank = self.mlp_bank[:NUM_LAYERS]
            self.fp8_scales.quantize_weights(bank[:, 1], bank[:, 0] if self.cfg.fp8_mlp_backward
                                             else None)
        if self.fp8_qkv_weights is not None:
            self.fp8_qkv_weights.quantize(*self.qkv_weight_views(), self.paths.qkv == "triton")

    def qkv_rows(self, layer: int, W: torch.Tensor, qkv_lambda: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        """The Q, K and V rows (T, n) of the normed x: x (qkv_lambda W)^T for the layer's packed
        weights W (n, d), with fp8_qkv (#344) through the FP8 GEMM against W's e4m3 copies."""
        if not self.cfg.fp8_qkv:
            return F.linear(x, qkv_lambda * W)
        fp8, j = self.fp8_qkv_weights, standard_attn_layers(self.cfg).index(layer)
        project = (triton_kernels.packed_qkv_fp8 if self.paths.qkv == "triton"
                   else triton_kernels.packed_qkv_fp8_reference)
        return project(x, W, qkv_lambda, fp8.weight_e4m3[j], fp8.weight_e4m3_t[j],
                       fp8.weight_scales[j:j + 1])

    def attention_weights(self) -> dict[int, AttnWeights]:
        """The matrices of every attention layer. The banks are unbound rather than indexed per
        layer: the backward then assembles each bank's gradient as one stack."""
        d = self.cfg.model_dim
        layers = standard_attn_layers(self.cfg)
        if not self.cfg.qk_head_pair_groups:
            weights = {i: AttnWeights(*w.split((3 * d, d)))
                       for i, w in zip(layers, self.attn_bank.unbind(0))}
        else:
            blocks = self.cfg.num_heads   # Q's head pairs, then K's, per layer
            qk, vo = self.qk_bank.unbind(0), self.vo_bank.unbind(0)
            weights = {i: AttnWeights(torch.cat([*qk[blocks * j:blocks * (j + 1)], vo[2 * j]]),
                                      vo[2 * j + 1]) for j, i in enumerate(layers)}
        return self.variant_attention_weights(weights)

    def variant_attention_weights(self, weights: dict[int, AttnWeights]) -> dict[int, AttnWeights]:
        """weights with cfg.attn's matrices added to (diff, cmd) or set for (mla, cmd_mla) the
        layers of VARIANT_ATTN_LAYERS."""
        shapes = variant_bank_shapes(self.cfg)
        if "noise_qk_bank" in shapes:
            per_layer = shapes["noise_qk_bank"][0] // len(VARIANT_ATTN_LAYERS)
            noise = self.noise_qk_bank.unbind(0)
            for j, i in enumerate(VARIANT_ATTN_LAYERS):
                weights[i] = weights[i]._replace(
                    noise_qk=torch.cat(noise[per_layer * j:per_layer * (j + 1)]))
        if self.cfg.latent_attention:
            *factors, out = (getattr(self, label).unbind(0) for label in LATENT_BANKS)
            for j, i in enumerate(VARIANT_ATTN_LAYERS):
                weights[i] = AttnWeights(None, out[j], latent=tuple(f[j] for f in factors))
        return weights

    def static_ve_gate(self, layer: int, x: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        """Record #74's value-embedding gate (T, H), in [0, 2]."""
        G = self.ve_gate_bank[VALUE_EMBED_LAYERS.index(layer)]
        paired = layer in PAIRED_HEAD_LAYERS
        gate_in = x[:, :GATE_WIDTH] if paired else torch.cat([x[:, :6], ve[:, :6]], dim=-1)
        return 2 * torch.sigmoid(F.linear(gate_in, G))

    def static_out_gate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Record #74's attention output gate (T, H), in [0, 1]."""
        slot = ATTN_LAYERS.index(layer)
        return torch.sigmoid(F.linear(x[:, :GATE_WIDTH], self.attn_gate_bank[slot]))

    def attn(self, layer: int, weights: AttnWeights, x: torch.Tensor,
             ve: torch.Tensor | None, ve_gate: torch.Tensor | None, cu_seqlens: torch.Tensor,
             max_seqlen: int, window: int, out_gate: torch.Tensor | None,
             xsa_share: torch.Tensor | None = None, v_extra: torch.Tensor | None = None,
             dc_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One attention sublayer on the normed stream x (T, d). ve (T, d) is added to the values
        scaled per head by ve_gate (T, H), and v_extra (T, d) unscaled; weights.noise_qk (or, for
        cmd_mla, the latents) make it differential; xsa_share (H,) or (T, H) applies exclusive
        self-attention; dc_weights (w1, w2) add the composed attention; the heads' outputs are
        multiplied by out_gate (T, H) if given. Q and K heads are cfg.qk_width wide, V heads
        head_dim; Q and K are padded to V's width once, after rotary, for every attention call."""
        T, d = x.shape
        H, hd, qk = self.cfg.num_heads, self.cfg.head_dim, self.cfg.qk_width
        qkv_lambda, out_lambda = self.scalars[2 * layer], self.scalars[2 * layer + 1]
        if weights.latent is not None:
            q, k, v, noise = self.latent_heads(weights.latent, qkv_lambda, x)
        else:
            rows = self.qkv_rows(layer, weights.qkv, qkv_lambda, x)
            q, k, v = rows.split((H * qk, H * qk, d), dim=-1)
            q, k, v = q.view(T, H, qk), k.view(T, H, qk), v.view(T, H, hd)
            # QK-norm makes the noise pair scale-free: no qkv_lambda needed
            noise = None if weights.noise_qk is None else F.linear(x, weights.noise_qk)
        paired = layer in PAIRED_HEAD_LAYERS
        # the softmax scale, kept at a narrower Q/K (#344 states no other); see
        # yarn_scale_in_queries
        scale, q_scale = self.rotary.attn_scale, None
        if self.cfg.yarn_scale_in_queries:
            scale, q_scale = INITIAL_ATTN_SCALE, self.rotary.query_scale
        qk_prep = triton_kernels.qk_prep if self.paths.qk_prep == "triton" else qk_prep_reference
        q, k = qk_prep(q, k, self.rotary.cos, self.rotary.sin, paired, layer in LONG_WINDOW_LAYERS,
                       hd, q_scale)
        if ve is not None:
            v = v + ve_gate[..., None] * ve.view(T, H, hd)
        if v_extra is not None:
            v = v + v_extra.view(T, H, hd)
        if paired:
            y = attention(q, k, v.reshape(2 * T, H // 2, hd), 2 * cu_seqlens, 2 * max_seqlen,
                          window, scale, self.paths).reshape(T, H, hd)
        elif noise is not None:
            init = lambda_init(layer)
            lam = differential_lambdas(self.noise_lambdas[VARIANT_ATTN_LAYERS.index(layer)], init)
            q_noise, k_noise, noise_scale = self.noise_heads(layer, noise, scale, q_scale)
            y = differential_attention(q, k, q_noise, k_noise, v, cu_seqlens, max_seqlen, window,
                                       scale, noise_scale, lam, init, self.paths)
        else:
            y = attention(q, k, v, cu_seqlens, max_seqlen, window, scale, self.paths)
        if xsa_share is not None:
            y = exclusive_self_attention(y, v, xsa_share)
        if dc_weights is not None:
            dc_attention = (triton_kernels.dc_attention if self.paths.dc_attention == "triton"
                            else triton_kernels.dc_attention_reference)
            y = y + dc_attention(q, k, v, cu_seqlens, scale, *dc_weights, window=DC_WINDOW)
        if out_gate is not None:
            y = y * out_gate[..., None]
        return F.linear(y.reshape(T, d), out_lambda * weights.out)

    def noise_heads(self, layer: int, noise: torch.Tensor, scale: float,
                    q_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The normed noise query and key (T, G, n) from their rows noise (T, 2 G n), and their
        softmax scale, the signal heads' (scale, and q_scale on the queries as they take it).
        diff: G = H heads of hd that rotate and take the key offset like the signal heads. cmd,
        cmd_mla: one pair of width n for all heads, without position (the "common mode"
        background), scaled so its logits span the signal heads' range."""
        T, H, hd = noise.shape[0], self.cfg.num_heads, self.cfg.head_dim
        if self.cfg.attn == "diff":
            q, k = noise.view(T, 2 * H, hd).split(H, dim=1)
            q, k = qk_prep_reference(q, k, self.rotary.cos, self.rotary.sin, False,
                                     layer in LONG_WINDOW_LAYERS, hd, q_scale)
            return q, k, scale
        n = self.cfg.cmd_noise_dim
        q, k = noise.view(T, 2, 1, n).unbind(1)
        q = rms_norm(q) if q_scale is None else rms_norm(q) * q_scale
        return q, rms_norm(k), scale * hd / n

    def latent_heads(self, factors: tuple[torch.Tensor, ...], qkv_lambda: torch.Tensor,
                     x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (T, H, hd) from the latents c_q = x W_dq and c_kv = x W_dkv, and for cmd_mla
        the noise rows (T, 2n) from the same latents (else None).

        Decoupled RoPE: the half-truncated rotary rotates dims [0, hd/2) of every head and leaves
        [hd/2, hd) alone, so the decoupled RoPE slice is exactly that rotating half: the query's
        per head from c_q (rows of W_uq), the key's one vector shared by all heads from x (the
        last hd/2 rows of W_dkv), rotated later with the same YaRN tables. The non-rotating half
        is the content part from the latents (and takes the key offset in the long layers). The
        head width stays hd, so the attention call is the standard one."""
        W_dq, W_uq, W_dkv, W_ukv = factors
        T, d = x.shape
        H, hd, half = self.cfg.num_heads, self.cfg.head_dim, self.cfg.head_dim // 2
        c_q = F.linear(x, qkv_lambda * W_dq)
        c_kv, k_rope = F.linear(x, qkv_lambda * W_dkv).split((self.cfg.mla_kv_rank, half), dim=-1)
        q_rows, kv_rows = F.linear(c_q, W_uq), F.linear(c_kv, W_ukv)
        q = q_rows[:, :d].view(T, H, hd)
        k_content = kv_rows[:, :d // 2].view(T, H, half)
        k = torch.cat([k_rope[:, None].expand(T, H, half), k_content], dim=-1)
        v = kv_rows[:, d // 2:d // 2 + d].view(T, H, hd)
        noise = None
        if self.cfg.attn == "cmd_mla":
            noise = torch.cat([q_rows[:, d:], kv_rows[:, d // 2 + d:]], dim=-1)
        return q, k, v, noise

    def coefficients(self, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     layouts: list[CoefficientLayout], block: int, x: torch.Tensor,
                     scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """Block `block` of a coefficient MLP on x (T, d): (w2 gelu(w1 x) + b2) x scale, split
        into its named (T, width) columns."""
        start = sum(layout.size for layout in layouts[:block])
        rows = slice(start, start + layouts[block].size)
        hidden = F.gelu(F.linear(x, w1[block]))
        out = (F.linear(hidden, w2[rows]) + b2[rows].to(x.dtype)) * scale
        return layouts[block].split(out)

    def mudd_coefficients(self, block: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.coefficients(self.mudd_w1, self.mudd_w2, self.mudd_b2, self.mudd_layouts,
                                 block, x, MUDD_SCALE)

    def gates(self, block: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.gate_scales[block].to(x.dtype)
        return self.coefficients(self.gate_w1, self.gate_w2, self.gate_b2, self.gate_layouts,
                                 block, x, scale)

    # --- forward -----------------------------------------------------------------------------

    def table_indices(self, inputs: torch.Tensor, bigram_ids: torch.Tensor) -> TableRows:
        """The rows a micro-batch reads from each lookup table: all value tables in one lookup
        (table k starts at row k x V)."""
        table_offsets = torch.arange(len(VALUE_EMBED_LAYERS), device=inputs.device)
        table_offsets *= self.cfg.padded_vocab_size
        return TableRows(inputs, inputs[None, :] + table_offsets[:, None], bigram_ids)

    def lookup(self, inputs: torch.Tensor, bigram_ids: torch.Tensor) -> TableRows:
        """The looked-up rows of every table, differentiable (dense table gradients)."""
        indices = self.table_indices(inputs, bigram_ids)
        return TableRows(*(F.embedding(ids, getattr(self, name))
                           for name, ids in zip(TableRows._fields, indices)))

    def bigram_sign_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """The fixed sign pattern (T, d) of each position's bigram: row (previous id XOR id) mod
        BIGRAM_SIGN_ROWS, row 0 at the first position."""
        ids = inputs.long()
        rows = torch.cat([ids.new_zeros(1), (ids[:-1] ^ ids[1:]) % BIGRAM_SIGN_ROWS])
        return self.bigram_signs[rows]

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                bigram_ids: torch.Tensor, mtp_weights: torch.Tensor | None,
                windows: tuple[int, int] | torch.Tensor, max_seqlen: int, grad_scale: float = 1.0,
                rows: TableRows | None = None, prefix_weight: torch.Tensor | None = None,
                val_mask_bits: torch.Tensor | None = None) -> torch.Tensor:
        """Training (mtp_weights given): token-summed multi-token loss x grad_scale, plus the
        prefix-token loss with prefix_weight (1,) when given.
        Evaluation (mtp_weights None): mean next-token cross-entropy; with val_mask_bits, the
        packed rows (T, V/8) of the validation mask, the pair (plain, masked).
        `rows`, when given, replaces the table lookup of inputs and bigram_ids (SparseTableGrads)."""
        h = self.hidden_states(inputs, bigram_ids, cu_seqlens, windows, max_seqlen, rows)
        if mtp_weights is None:
            return self.eval_loss(h, targets, val_mask_bits)
        return self.head_loss(h, targets, mtp_weights, grad_scale, prefix_weight)

    def hidden_states(self, inputs: torch.Tensor, bigram_ids: torch.Tensor,
                      cu_seqlens: torch.Tensor, windows: tuple[int, int] | torch.Tensor,
                      max_seqlen: int, rows: TableRows | None = None) -> torch.Tensor:
        """The normalised stream (T, d) that feeds the output head, from the token ids."""
        if rows is None:
            rows = self.lookup(inputs, bigram_ids)
        if self.cfg.bigram_sign_trick:
            rows = rows._replace(bigram_embed=rows.bigram_embed * self.bigram_sign_rows(inputs))
        return self.final_hidden(rows, cu_seqlens, windows, max_seqlen)

    def final_hidden(self, rows: TableRows, cu_seqlens: torch.Tensor,
                     windows: tuple[int, int] | torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """The normalised stream that feeds the output head, (T, d)."""
        cfg = self.cfg
        short_window, long_window = window_sizes(windows)
        bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
        resid, post = bf16(self.resid_lambdas), bf16(self.post_lambdas)
        smear_lambda, backout_lambda, skip_lambda = self.scalars[2 * NUM_LAYERS:2 * NUM_LAYERS + 3]

        # rows from SparseTableGrads come in fp32, so that their gradients leave the graph in fp32
        e, value_embeds, bigram = (r.to(self.embed.dtype) for r in rows)
        # smear: every token adds a gated share of the previous one (across document borders)
        smear = smear_lambda * torch.sigmoid(F.linear(e[1:, :GATE_WIDTH], self.smear_gate))
        e = torch.cat([e[:1], e[1:] + smear * e[:-1]])
        x0 = rms_norm(e)

        # per layer: the weights of the x0 and bigram injections, the skip weight
        if cfg.mudd_gates:
            gates = self.gates(0, x0)
            x0_w = dict(zip(GATE_INJECTION_LAYERS[0], gates["x0"].split(1, dim=-1)))
            bigram_w = dict(zip(GATE_INJECTION_LAYERS[0], gates["bigram"].split(1, dim=-1)))
        else:
            x0_w = dict(enumerate(bf16(self.x0_lambdas)))
            bigram_w = dict(enumerate(bf16(self.bigram_lambdas)))
            skip_weight = torch.sigmoid(skip_lambda) * 2 * torch.sigmoid(
                F.linear(x0[:, :GATE_WIDTH], self.skip_gate))

        attn_weights = self.attention_weights()
        mlp_weights = self.mlp_layer_weights()
        x = x0 + bigram_w[0] * bigram       # the stream entering layer 0 (lane 0 of record #74)
        h0, lane1, skip, h7, h7_normed, h9, block0 = x, None, None, None, None, None, None
        for i in range(NUM_LAYERS):
            r_attn, r_mlp = resid[i, 0], resid[i, 1]
            p_attn, p_mlp = (post[i, 0], post[i, 1]) if cfg.single_stream else (None, post[i, 1, 0])
            if cfg.mudd_gates and i == POST_GATE_LAYER:
                gates.update(self.gates(1, x))
                x0_w.update(zip(GATE_INJECTION_LAYERS[1], gates["x0"].split(1, dim=-1)))
                bigram_w.update(zip(GATE_INJECTION_LAYERS[1], gates["bigram"].split(1, dim=-1)))
                skip_weight = torch.sigmoid(skip_lambda) * gates["skip"]
            inject_x0 = x0
            if cfg.mudd and i == MUDD_LAYER:   # block 0 mixes earlier streams into this layer
                h9, block0 = x, self.mudd_coefficients(0, x)
                x = (1 + block0["res_x"]) * x + block0["res_h0"] * h0 + block0["res_h7"] * h7
                r_attn, p_attn = block0["resid_attn"], block0["post_attn"]
                r_mlp, p_mlp = block0["resid_mlp"], block0["post_mlp"]
                x0_w[i], bigram_w[i], inject_x0 = block0["x0"], block0["bigram"], h0
            if i == NO_ATTN_LAYER:
                x = x + skip_weight * skip
                x = r_mlp * x + p_mlp * self.mlp(i, mlp_weights[i], rms_norm(x))
                continue
            if i == CACHED_LAYER and not cfg.single_stream:
                lane1 = x
            attn_in = h7_normed if cfg.single_stream and i in LATE_ATTN_LAYERS else rms_norm(x)
            a = self.attn(i, attn_weights[i], attn_in, **self.attn_extras(
                i, attn_in, value_embeds, gates if cfg.mudd_gates else None, block0, h0, h7, h9),
                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                window=long_window if i in LONG_WINDOW_LAYERS else short_window)
            inject = x0_w[i] * inject_x0 + (bigram_w[i] * bigram if i > 0 else 0)
            if lane1 is None:
                x = r_attn * x + (a if p_attn is None else p_attn * a) + inject
                if i == SKIP_SOURCE_LAYER and not cfg.single_stream:
                    skip = x
                x = r_mlp * x + p_mlp * self.mlp(i, mlp_weights[i], rms_norm(x))
            else:
                x = r_attn * x + post[i, 0, 0] * a + inject
                lane1 = r_attn * lane1 + post[i, 0, 1] * a
                m = self.mlp(i, mlp_weights[i], rms_norm(lane1))
                x = r_mlp * x + p_mlp * m
                lane1 = r_mlp * lane1 + post[i, 1, 1] * m
            if i == SKIP_SOURCE_LAYER and cfg.single_stream:
                skip = x
            if i == CACHED_LAYER:
                h7 = x
                h7_normed = rms_norm(h7) if cfg.single_stream else None
        if cfg.mudd:    # block 1 replaces the backout
            c = self.mudd_coefficients(1, x)
            x = (x + c["h0"] * h0 + c["h7"] * h7 + c["h9"] * h9 + c["ve0"] * value_embeds[0]
                 + c["h3"] * skip)
            return rms_norm(x)
        if lane1 is not None:
            x = (x + lane1) / 2
        return rms_norm(x - backout_lambda * h7)

    def attn_extras(self, layer: int, x: torch.Tensor, value_embeds: torch.Tensor,
                    gates: dict | None, block0: dict | None, h0, h7, h9) -> dict:
        """The keyword arguments of attn() for `layer`: value embedding and its gate, XSA share,
        output gate, MUDD value correction and DC weights, from whichever switch provides them."""
        cfg, H = self.cfg, self.cfg.num_heads
        extras = dict(ve=None, ve_gate=None, out_gate=None)
        if layer in VALUE_EMBED_LAYERS:
            ve = value_embeds[VALUE_EMBED_LAYERS.index(layer)]
            extras["ve"] = ve
            if cfg.mudd and layer == MUDD_LAYER:
                extras["ve_gate"] = block0["ve_gate"].repeat_interleave(H // 2, dim=-1)
            else:
                extras["ve_gate"] = self.static_ve_gate(layer, x, ve)
        if cfg.mudd and layer == MUDD_LAYER:
            extras["v_extra"] = block0["v_h0"] * h0 + block0["v_h7"] * h7 + block0["v_x"] * h9
        if gates is None:
            extras["out_gate"] = self.static_out_gate(layer, x)
            if cfg.xsa and layer in XSA_LAYERS:
                extras["xsa_share"] = torch.tanh(self.xsa_alphas[layer]).to(x.dtype)
            return extras
        if layer in GATED_OUT_LAYERS:
            extras["out_gate"] = gates[f"out_{layer}"]
        if layer in GATED_XSA_LAYERS:
            extras["xsa_share"] = torch.tanh(gates[f"xsa_{layer}"])
        if cfg.dc_attention and layer == DC_LAYER:
            extras["dc_weights"] = (gates["dc_w1"], gates["dc_w2"])
        return extras

    def head_loss(self, h, targets, mtp_weights, grad_scale: float,
                  prefix_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The token-summed training loss x grad_scale: multi-token, plus the prefix-token term."""
        cfg = self.cfg
        prefix_targets = None if prefix_weight is None else self.prefix_table[targets]
        if self.paths.lm_head == "fp8":
            loss = triton_kernels.softcapped_mtp_cross_entropy(
                h, targets, mtp_weights, self.lm_head, cfg.head_x_scale, cfg.head_w_scale,
                cfg.head_grad_scale, use_kernels=self.paths.loss == "triton",
                extra_targets=prefix_targets, extra_weight=prefix_weight)
        else:
            loss = triton_kernels.softcapped_mtp_losses_reference(
                self.head_logits(h), targets, mtp_weights, prefix_targets, prefix_weight).sum()
        return loss * grad_scale

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h @ lm_head by the path's GEMM (Paths.head_gemm): for bf16 operands the two differ only
        in the order of the fp32 sums."""
        if self.paths.head_gemm == "fp32":
            return (h.float() @ self.lm_head.float()).to(h.dtype)
        return h @ self.lm_head

    def eval_loss(self, h, targets, val_mask_bits: torch.Tensor | None) -> torch.Tensor:
        """bf16 head, plain next-token cross-entropy over every column; with the packed mask rows
        (T, V/8), also with each masked column's soft-capped logit set to VAL_MASK_LOGIT."""
        z = triton_kernels.softcap(self.head_logits(h)).float()
        loss = F.cross_entropy(z, targets)
        if val_mask_bits is None:
            return loss
        return torch.stack([loss, F.cross_entropy(z.masked_fill(unpack_mask_rows(val_mask_bits),
                                                                VAL_MASK_LOGIT), targets)])


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
    """Write tokens (all < 2**16) as a shard, through a temporary file so that a crash never
    leaves a half-written shard under the final name."""
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


BOS_INDEX_PREFIX_TOKENS = 6_000_000  # document starts indexed at once when a shard is opened


def bigram_hash(ids: np.ndarray, table_size: int) -> np.ndarray:
    """Rows of the bigram embedding: a hash of each token and the one before it, modulo the table
    size less one. The first position gets the reserved last row; the hash runs across document
    starts (a BOS pairs with the previous document)."""
    reserved = table_size - 1
    ids = np.asarray(ids, dtype=np.int32)
    rows = np.empty(len(ids), dtype=np.int32)
    rows[:1] = reserved
    # int32 suffices: ids <= 50256 keep both products below 2**31
    rows[1:] = ((np.int32(36313) * ids[1:]) ^ (np.int32(27191) * ids[:-1])) % reserved
    return rows


# #78: slots for the most documents a training micro-batch of these sizes held in FineWeb's first
# ten shards (56 / 90 / 121 at 16k / 32k / 48k tokens); attention's cost grows with the slots.
TIGHT_CU_SEQLENS = {16384: 64, 32768: 96, 49152: 128}


def cu_seqlens_length(tokens_per_rank: int, tight: bool = False) -> int:
    """Fixed cu_seqlens length D for a T-token buffer (static shapes for the compiler): room for
    one sequence per 300 tokens, rounded up to a multiple of 128, and at least 128; with `tight`,
    TIGHT_CU_SEQLENS where it names T."""
    if tight and tokens_per_rank in TIGHT_CU_SEQLENS:
        return TIGHT_CU_SEQLENS[tokens_per_rank]
    return max(1, -(-(tokens_per_rank // 300) // 128)) * 128


class Batch(NamedTuple):
    """One rank's micro-batch; the tensors are on the training device."""
    inputs: torch.Tensor        # int32 (T,)
    targets: torch.Tensor       # int64 (T,), the inputs shifted left by one
    cu_seqlens: torch.Tensor    # int32 (D,): sequence starts, then T, padded with T
    bigram_ids: torch.Tensor    # int32 (T,) rows of the bigram embedding
    bigram_ids_cpu: np.ndarray  # the same rows on the host, for the sparse gradient exchange


def _tokens_per_rank(batch_tokens: int, world_size: int, grad_accum_steps: int, name: str) -> int:
    parts = world_size * grad_accum_steps
    if grad_accum_steps < 1 or batch_tokens < 1 or batch_tokens % parts:
        raise ValueError(f"{name}={batch_tokens}: expected a positive multiple of world size "
                         f"{world_size} x grad-accum steps {grad_accum_steps} = {parts}")
    return batch_tokens // parts


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # from pinned host memory the upload is asynchronous and overlaps with compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _make_batch(tokens: np.ndarray, starts: np.ndarray, device: torch.device,
                bigram_table_size: int, tight_cu_seqlens: bool = False) -> Batch:
    """A batch from a rank's T + 1 tokens (int32) and the offsets where its sequences start."""
    T = len(tokens) - 1
    D = cu_seqlens_length(T, tight_cu_seqlens)
    if len(starts) > D - 1:
        raise DataError(f"a {T}-token batch holds {len(starts)} sequences but cu_seqlens (length "
                        f"{D}) has room for {D - 1}: the documents are too short for this batch")
    cu_seqlens = np.full(D, T, dtype=np.int32)
    cu_seqlens[:len(starts)] = starts
    bigram_ids = bigram_hash(tokens[:-1], bigram_table_size)
    tokens_on_device = _to_device(tokens, device)
    return Batch(inputs=tokens_on_device[:-1], targets=tokens_on_device[1:].to(torch.int64),
                 cu_seqlens=_to_device(cu_seqlens, device),
                 bigram_ids=_to_device(bigram_ids, device), bigram_ids_cpu=bigram_ids)


def _read_tokens(path: str) -> np.ndarray:
    """All tokens of a shard, read into memory."""
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_INTS * 4)
    if len(tokens) != num_tokens:
        raise DataError(f"{path}: read {len(tokens)} of its {num_tokens} tokens")
    return tokens


def _bos_positions(tokens: np.ndarray) -> np.ndarray:
    return np.flatnonzero(tokens == BOS_ID)


class _Shard:
    """A shard's tokens and the positions of its document starts (BOS tokens).

    Only the first `prefix_tokens` are indexed at once; the full index is built in the background.
    Its first entries equal the prefix index, so answering from the prefix index where it has the
    entry, and waiting for the full one beyond, gives the same answers whatever the timing.
    """

    def __init__(self, path: str, executor: ThreadPoolExecutor, prefix_tokens: int):
        self.path = path
        self.tokens = _read_tokens(path)
        self._bos = _bos_positions(self.tokens[:prefix_tokens])
        self._full_bos: Future | None = None
        if prefix_tokens < len(self.tokens):
            self._full_bos = executor.submit(_bos_positions, self.tokens)

    def bos(self, i: int) -> int | None:
        """Position of the i-th document start, or None if the shard has no more."""
        if i >= len(self._bos) and self._full_bos is not None:
            self._bos, self._full_bos = self._full_bos.result(), None
        return int(self._bos[i]) if i < len(self._bos) else None


class TrainLoader:
    """One rank's training micro-batches, packed from documents.

    Every rank builds the same global micro-batch, ranks 0..W-1 in order with T + 1 tokens each,
    and keeps its own slice. A rank's tokens are segments: each starts at a BOS and ends at the
    next BOS, at max_seq_len tokens or where the rank's budget is full, whichever comes first; the
    rest of a cut document is skipped. When a shard has no more document starts, its remaining
    tokens are dropped and the rank keeps filling its budget from the next shard's first BOS
    (nothing collected is discarded, so the stream of segments is the same for every world size).
    The next shard is read and indexed in the background while the current one is used.
    """

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device | str,
                 bigram_table_size: int, cycle: bool = False, log: Callable[[str], None] = print,
                 bos_prefix_tokens: int = BOS_INDEX_PREFIX_TOKENS, tight_cu_seqlens: bool = False):
        if not files:
            raise DataError("no train shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world size {world_size}")
        for path in files:  # a bad shard fails now, not hours into the run
            read_shard_header(path)
        self.files = list(files)  # reading order; find_shards returns them sorted
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.bigram_table_size = bigram_table_size
        self.cycle, self.log = cycle, log
        self.tight_cu_seqlens = tight_cu_seqlens
        self.epoch = 1
        self.tokens_used = 0  # tokens handed out in segments, all ranks together
        self._prefix_tokens = bos_prefix_tokens
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="train-shards")
        self._shard_index = 0
        self._shard = _Shard(self.files[0], self._executor, bos_prefix_tokens)
        self._cursor = 0  # index of the next document start in the current shard
        self._segments_this_epoch = 0
        self._next_shard: Future | None = self._prefetch(1)

    def next_batch(self, batch_tokens: int, max_seq_len: int, grad_accum_steps: int) -> Batch:
        """This rank's next micro-batch of T = batch_tokens / (world size x grad_accum_steps)."""
        T = _tokens_per_rank(batch_tokens, self.world_size, grad_accum_steps, "batch_tokens")
        if not 1 <= max_seq_len <= T:
            raise ValueError(f"max_seq_len={max_seq_len}: expected 1 to {T}, the tokens per rank "
                             f"and micro-batch")
        for r in range(self.world_size):
            segments = self._take_segments(T + 1, max_seq_len)
            if r == self.rank:
                mine = segments
        tokens = np.concatenate(mine).astype(np.int32)
        # segment lengths sum to T + 1; the last one ends at T because its last token is only a target
        starts = np.cumsum([0] + [len(s) for s in mine[:-1]])
        return _make_batch(tokens, starts, self.device, self.bigram_table_size, self.tight_cu_seqlens)

    def _take_segments(self, budget: int, max_seq_len: int) -> list[np.ndarray]:
        segments = []
        while budget > 0:
            start = self._shard.bos(self._cursor)
            if start is None:
                self._advance_shard()
                continue
            following = self._shard.bos(self._cursor + 1)
            document_end = len(self._shard.tokens) if following is None else following
            end = min(document_end, start + max_seq_len, start + budget)
            segments.append(self._shard.tokens[start:end])
            self._cursor += 1
            self._segments_this_epoch += 1
            self.tokens_used += end - start
            budget -= end - start
        return segments

    def _prefetch(self, index: int) -> Future | None:
        if index == len(self.files):
            if not self.cycle:
                return None
            index = 0
        return self._executor.submit(_Shard, self.files[index], self._executor, self._prefix_tokens)

    def state(self) -> dict:
        """The position in the stream (plain data), from which restore() continues exactly."""
        return dict(files=list(self.files), shard_index=self._shard_index, cursor=self._cursor,
                    epoch=self.epoch, tokens_used=self.tokens_used,
                    segments_this_epoch=self._segments_this_epoch)

    def restore(self, state: dict) -> None:
        if state["files"] != self.files:
            raise DataError(f"the checkpoint's loader read the train shards {state['files']}, this "
                            f"run has {self.files}; resume with the same --train_files")
        self._shard_index, self._cursor = state["shard_index"], state["cursor"]
        self.epoch, self.tokens_used = state["epoch"], state["tokens_used"]
        self._segments_this_epoch = state["segments_this_epoch"]
        self._shard = _Shard(self.files[self._shard_index], self._executor, self._prefix_tokens)
        self._next_shard = self._prefetch(self._shard_index + 1)

    def _advance_shard(self) -> None:
        if self._next_shard is None:
            total = sum(read_shard_header(path) for path in self.files)
            raise DataError(f"training data ran out after {total:,} tokens read from "
                            f"{len(self.files)} shards ({self.tokens_used:,} of them went into "
                            f"batches); add shards or pass --cycle_train_data=true")
        self._shard_index = (self._shard_index + 1) % len(self.files)
        if self._shard_index == 0:
            if self._segments_this_epoch == 0:
                raise DataError(f"no document start (BOS {BOS_ID}) in any of the train shards "
                                f"{self.files}")
            self.epoch += 1
            self._segments_this_epoch = 0
            self.log(f"data: wrapped around to the first train shard (epoch {self.epoch})")
        self._shard = self._next_shard.result()
        self._cursor = 0
        self._next_shard = self._prefetch(self._shard_index + 1)


def val_batches(files: list[str], val_tokens: int, val_batch_tokens: int, rank: int,
                world_size: int, grad_accum_steps: int, device: torch.device | str,
                bigram_table_size: int) -> Iterator[Batch]:
    """One rank's validation micro-batches over the first val_tokens tokens.

    Per micro-batch the ranks read consecutive chunks of T tokens (plus one for the last target),
    rank r at pos + r * T; pos advances by world_size * T. No BOS alignment: cu_seqlens starts a
    sequence at every BOS in the inputs (a BOS at offset 0 gives an empty first sequence).
    """
    T = _tokens_per_rank(val_batch_tokens, world_size, grad_accum_steps, "val_batch_tokens")
    if val_tokens < 1 or val_tokens % val_batch_tokens:
        raise ValueError(f"val_tokens={val_tokens}: expected a positive multiple of "
                         f"val_batch_tokens={val_batch_tokens}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank}: expected 0 <= rank < world size {world_size}")
    stream = _read_stream(files, val_tokens + 1)
    device = torch.device(device)

    def batches() -> Iterator[Batch]:
        for pos in range(rank * T, val_tokens, world_size * T):
            tokens = stream[pos:pos + T + 1].astype(np.int32)
            starts = np.concatenate(([0], np.flatnonzero(tokens[:-1] == BOS_ID)))
            yield _make_batch(tokens, starts, device, bigram_table_size)

    return batches()


def _read_stream(files: list[str], count: int) -> np.ndarray:
    """The first `count` tokens of the shards read one after another."""
    pieces, have = [], 0
    for path in files:
        if have == count:
            break
        shard = load_shard(path)
        pieces.append(np.array(shard[:count - have]))
        have += len(pieces[-1])
    if have < count:
        raise DataError(f"validation needs val_tokens + 1 = {count:,} tokens but the val shards "
                        f"{files} hold only {have:,}; lower --val_tokens (a multiple of "
                        f"--val_batch_tokens) or add val data")
    return np.concatenate(pieces)



# =================================================================================================
# Tokenizer tables: prefix tokens (#88) and the validation mask (#350)
# =================================================================================================
# Both come from the GPT-2 byte-pair encoding's vocabulary (token bytes -> id).

def gpt2_vocabulary() -> dict[bytes, int]:
    """The GPT-2 tokenizer's token bytes -> id (tiktoken; the files download once, or come from
    TIKTOKEN_CACHE_DIR)."""
    try:
        import tiktoken
        return dict(tiktoken.get_encoding("gpt2")._mergeable_ranks)
    except Exception as e:  # noqa: BLE001 - network, cache or package: one message for all
        raise DataError(f"the GPT-2 tokenizer could not be loaded ({type(e).__name__}); "
                        f"offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 "
                        f"files, or run once with internet access") from None


def prefix_token_table(vocabulary: dict[bytes, int], size: int) -> np.ndarray:
    """table[t] = the id of the longest token whose bytes are a strict prefix of token t's, -1 when
    none is (or t is not in the vocabulary). In byte order every prefix of a string sorts before
    it, so a stack holds the chain of prefixes of the current token."""
    table = np.full(size, -1, dtype=np.int64)
    chain: list[bytes] = []
    for token in sorted(vocabulary):
        while chain and not token.startswith(chain[-1]):
            chain.pop()
        if chain:
            table[vocabulary[token]] = vocabulary[chain[-1]]
        chain.append(token)
    return table


# The regex that splits text into chunks before BPE can cut between two letters only after an
# English contraction chunk, and the tokens that can end such a chunk are its suffixes.
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
CONTRACTION_TAILS = frozenset(c[i:].encode() for c in CONTRACTIONS for i in range(len(c)))
VAL_MASK_VERSION = 1             # part of the cache key: bump when the rule below changes


def _edge_char(data: bytes, last: bool) -> str | None:
    """The first (last) character of UTF-8 bytes, or None when it is cut by the token edge."""
    for size in range(1, min(4, len(data)) + 1):
        try:
            char = (data[-size:] if last else data[:size]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return char if len(char) == 1 else None
    return None


def _chunk_class(char: str | None) -> str | None:
    """letter / number / symbol as the chunking regex sees them; None for whitespace, controls and
    characters cut by a token edge, where a chunk border cannot be ruled out."""
    if char is None:
        return None
    category = unicodedata.category(char)
    if category[0] == "L":
        return "letter"
    if category[0] == "N":
        return "number"
    if char.isspace() or category[0] in "CZ":
        return None
    return "symbol"


def _same_chunk(left: bytes, right: bytes) -> bool:
    """Whether the characters either side of the border between two tokens must lie in one regex
    chunk: both letters (unless the left token can end a contraction chunk), both digits, both
    symbols, or a plain space before a non-space (the space always opens the next word's chunk)."""
    p, q = _edge_char(left, last=True), _edge_char(right, last=False)
    p_class, q_class = _chunk_class(p), _chunk_class(q)
    if p == " ":
        return q_class is not None
    if p_class is None or p_class != q_class:
        return False
    return not (p_class == "letter" and left in CONTRACTION_TAILS)


def val_mask_pairs(vocabulary: dict[bytes, int]) -> np.ndarray:
    """(previous token, next token) pairs the GPT-2 tokenizer never emits, (n, 2) int32.

    BPE merges adjacent pieces of a chunk while any two of them concatenate to a token, so the
    tokens of one chunk never do; a pair (a, b) whose bytes concatenate to a token can therefore
    be adjacent only across a chunk border, and it is masked where no border can fall between
    them (_same_chunk). Pairs across documents go through the separator token, never masked."""
    pairs = []
    for token in vocabulary:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocabulary and right in vocabulary and _same_chunk(left, right):
                pairs.append((vocabulary[left], vocabulary[right]))
    return np.array(sorted(set(pairs)), dtype=np.int32).reshape(-1, 2)


def load_val_mask_pairs(cache_dir: str, log: Callable[[str], None]) -> np.ndarray:
    """val_mask_pairs of the GPT-2 vocabulary, from a cache file keyed by the vocabulary and the
    rule's version (built and written on the first use)."""
    vocabulary = gpt2_vocabulary()
    digest = hashlib.sha256(repr(sorted(vocabulary.items())).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"val_mask_gpt2_v{VAL_MASK_VERSION}_{digest}.npy")
    start = time.perf_counter()
    if os.path.exists(path):
        pairs = np.load(path)
        log(f"val mask: {len(pairs):,} pairs read from {path} in {time.perf_counter() - start:.2f}s")
        return pairs
    pairs = val_mask_pairs(vocabulary)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, pairs)
    os.replace(tmp, path)
    log(f"val mask: {len(pairs):,} pairs built in {time.perf_counter() - start:.2f}s (before the "
        f"clock starts) and cached in {path}")
    return pairs


def packed_mask_table(pairs: np.ndarray, size: int) -> np.ndarray:
    """The pairs as a (size, size / 8) uint8 table: bit j of byte c of row a is set when (a, 8c + j)
    is masked (the layout unpack_mask_rows reads)."""
    if size % 8:
        raise ValueError(f"the mask table needs a vocabulary size divisible by 8, got {size}")
    table = np.zeros((size, size // 8), dtype=np.uint8)
    np.bitwise_or.at(table, (pairs[:, 0], pairs[:, 1] // 8), (1 << (pairs[:, 1] % 8)).astype(np.uint8))
    return table


# =================================================================================================
# Schedule
# =================================================================================================

@dataclass(frozen=True)
class StepSettings:
    """Everything the schedule decides for one training step."""
    stage: int
    batch_tokens: int
    max_seq_len: int
    windows: tuple[int, int]        # (short, long) attention windows in tokens
    mtp_weights: tuple[float, ...]
    prefix_weight: float            # of the prefix-token loss (#88)
    lr_mul: float
    muon_momentum: float


class Schedule:
    """Equal stages over the scheduled steps (batch size, sequence length, windows, MTP weights
    and lr multiplier change at their borders, cfg.stages), then an extension at the final lr.
    Stage index len(cfg.stages) is the extension."""

    def __init__(self, cfg: Hyperparameters):
        self.cfg = cfg
        n = cfg.num_scheduled_iterations
        num_stages = len(cfg.stages)
        self.stage_ends = [round((k + 1) / num_stages * n) for k in range(num_stages)]
        self.stage_ends.append(cfg.num_train_steps)                    # the extension
        self.stage_starts = [0] + self.stage_ends[:-1]
        self.cooldown_start = int(n * (1 - cfg.cooldown_frac))
        # embed and lm_head untie after this (odd, so Adam) step: the start of the last stage
        self.split_step = self.stage_starts[num_stages - 1] | 1

    def stage_of(self, step: int) -> int:
        return next(k for k, end in enumerate(self.stage_ends) if step < end or
                    k == len(self.stage_ends) - 1)

    def stage_name(self, stage: int) -> str:
        return "extension" if stage == len(self.cfg.stages) else f"stage {stage + 1}"

    def row(self, stage: int) -> Stage:
        """The stage's row of cfg.stages; the extension keeps the last one."""
        return self.cfg.stages[min(stage, len(self.cfg.stages) - 1)]

    def lr_mul(self, step: int) -> float:
        cfg = self.cfg
        stage_mul = self.row(self.stage_of(step)).lr_mul
        if step < self.cooldown_start:
            return stage_mul
        tau = min(1.0, (step - self.cooldown_start) /
                  (cfg.num_scheduled_iterations - self.cooldown_start))
        return stage_mul * (1 - tau) + cfg.final_lr_mul * tau

    def muon_momentum(self, step: int) -> float:
        cfg = self.cfg
        lo, hi = cfg.muon_momentum_min, cfg.muon_momentum_max
        cooldown_start = cfg.num_train_steps - cfg.muon_momentum_cooldown_steps
        if step < cfg.muon_momentum_warmup_steps:
            return lo + (hi - lo) * step / cfg.muon_momentum_warmup_steps
        if step > cooldown_start:
            return hi - (hi - lo) * (step - cooldown_start) / cfg.muon_momentum_cooldown_steps
        return hi

    def mtp_weights(self, step: int) -> tuple[float, ...]:
        stage = self.stage_of(step)
        start_w, end_w = self.row(stage).mtp_weights
        t = (step - self.stage_starts[stage]) / (self.stage_ends[stage] - self.stage_starts[stage])
        if stage == len(self.stage_ends) - 1:
            t = 1.0                                     # the extension keeps the final weights
        return tuple(a + (b - a) * t for a, b in zip(start_w, end_w))

    def prefix_weight(self, step: int) -> float:
        """The prefix-token loss weight: cfg.prefix_loss_weight through stage 1, falling linearly
        to 0 over stage 2, 0 after."""
        stage = self.stage_of(step)
        if stage > 1:
            return 0.0
        if stage == 0:
            return self.cfg.prefix_loss_weight
        t = (step - self.stage_starts[1]) / (self.stage_ends[1] - self.stage_starts[1])
        return self.cfg.prefix_loss_weight * (1 - t)

    def windows(self, step: int) -> tuple[int, int]:
        cfg, stage = self.cfg, self.stage_of(step)
        blocks = cfg.stages[stage].windows if stage < len(cfg.stages) else cfg.extension_windows
        return blocks[0] * cfg.window_block_size, blocks[1] * cfg.window_block_size

    def final_val_windows(self) -> tuple[int, int]:
        short, long = self.cfg.final_val_windows
        return short * self.cfg.window_block_size, long * self.cfg.window_block_size

    def at(self, step: int) -> StepSettings:
        stage = self.stage_of(step)
        row = self.row(stage)
        return StepSettings(stage=stage, batch_tokens=row.batch_tokens, max_seq_len=row.max_seq_len,
                            windows=self.windows(step), mtp_weights=self.mtp_weights(step),
                            prefix_weight=self.prefix_weight(step), lr_mul=self.lr_mul(step),
                            muon_momentum=self.muon_momentum(step))

    def warmup_steps(self, last_step: int | None = None) -> list[int]:
        """Steps whose shapes and code paths cover every compiled variant: the first two (a
        NorMuon-only and an Adam step) and the first of every later stage (that a run ending at
        last_step reaches): its new batch shape and windows. Nothing else compiles anew, not the
        untie nor the schedule's changing values, which reach the graphs as tensors
        (tests/test_recipe.py counts the graphs of each step)."""
        return [0, 1] + self.later_stage_starts(last_step)

    def later_stage_starts(self, last_step: int | None = None) -> list[int]:
        """The first step of every stage after the first that a run ending at last_step
        reaches (the warm-up steps the --compile_ahead helpers run)."""
        return [x for x in self.stage_starts[1:] if x > 1 and (last_step is None or x < last_step)]


def replay_yarn(rotary: Rotary, schedule: Schedule, step: int) -> int:
    """Rotary as training leaves it when it reaches `step`: reset, then one YaRN update at every
    long-window change up to that step (updates compose, so each is applied in turn). Returns the
    long window of `step`."""
    rotary.reset()
    window = schedule.windows(0)[1]
    for s in range(1, min(step, schedule.cfg.num_train_steps - 1) + 1):
        new = schedule.windows(s)[1]
        if new != window:
            rotary.apply_yarn(window, new)
            window = new
    return window


# =================================================================================================
# Training loop
# =================================================================================================

def process_age_s() -> float:
    """Seconds since this process started (from Linux's /proc; 0 where that is not available)."""
    try:
        with open("/proc/self/stat") as f:
            # the fields after the parenthesised command name; the 20th is the start time in ticks
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


class StartupClock:
    """Where the time from launch to the first timed step goes: seconds per phase, in order.
    Launch is the process start. A stretch of at least GAP_S between two phases is reported on
    its own, named by them, so that work no phase names still shows where it happens; the rest
    is reported as "other"."""

    GAP_S = 0.5

    def __init__(self):
        age = process_age_s()
        self.last_name, self.last_end = "interpreter start and imports", time.perf_counter()
        self.start = self.last_end - age
        self.phases: dict[str, float] = {self.last_name: age}

    def record(self, name: str, seconds: float) -> None:
        """A phase of `seconds` that has just ended."""
        now = time.perf_counter()
        gap = now - seconds - self.last_end
        if gap >= self.GAP_S:
            between = f"between {self.last_name} and {name}"
            self.phases[between] = self.phases.get(between, 0.0) + gap
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.last_name, self.last_end = name, now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - begin)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def report(self, total_s: float) -> list[str]:
        lines = [f"startup: {total_s:.1f}s from launch to the first timed step"]
        lines += [f"startup phase {name}: {seconds:.2f}s" for name, seconds in self.phases.items()]
        lines.append(f"startup phase other: {total_s - sum(self.phases.values()):.2f}s")
        return lines


@dataclass
class Run:
    """What one process knows about its place in the job."""
    rank: int
    world_size: int
    device: torch.device
    grad_accum_steps: int
    cpu_group: object = None        # gloo group for CPU-side collectives (sparse bigram counts)
    startup: StartupClock = dataclasses.field(default_factory=StartupClock)

    @property
    def is_master(self) -> bool:
        return self.rank == 0


class Logger:
    """Rank 0 writes the log file (full code, environment, config, then step lines); console gets
    the lines marked for it. Other ranks stay silent."""

    def __init__(self, run: Run, log_dir: str):
        self.enabled = run.is_master
        self.path = None
        self.interactive = sys.stdout.isatty()
        self._bar_shown = False
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, f"{uuid.uuid4()}.txt")
            print(f"logging to {self.path}", flush=True)

    def __call__(self, line: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            if self._bar_shown:
                print(flush=True)
                self._bar_shown = False
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def progress(self, line: str) -> None:
        """A progress line: on an interactive terminal it overwrites the previous one (a status
        bar); the log file, and a console that is not a terminal, get every line."""
        if not self.enabled:
            return
        if not self.interactive:
            self(line)
            return
        print("\r\033[K" + line, end="", flush=True)
        self._bar_shown = True
        with open(self.path, "a") as f:
            f.write(line + "\n")


def git_commit() -> str:
    """The checkout's commit, marked when files differ from it ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def environment_report() -> str:
    parts = []
    for i, name in enumerate(("train_gpt.py", "triton_kernels.py")):
        if i:
            parts.append("\n\n" + "-" * 40 + f"\n# {name}\n" + "-" * 40 + "\n\n")
        with open(os.path.join(REPO_ROOT, name)) as f:
            parts.append(f.read())
    import triton
    parts += ["\n" + "=" * 100,
              f"Commit {git_commit()}",
              f"Running Python {sys.version}",
              f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}",
              f"Running Triton version {triton.__version__}"]
    try:
        parts.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                    timeout=30).stdout)
    except (OSError, subprocess.TimeoutExpired):
        parts.append("nvidia-smi: not available")
    parts.append("=" * 100)
    return "\n".join(parts)


def config_report(cfg: Hyperparameters, run: Run) -> str:
    lines = [f"world_size={run.world_size} grad_accum_steps={run.grad_accum_steps} "
             f"device={run.device}", "config:"]
    lines += [f"  {f.name}={as_literal(getattr(cfg, f.name))!r}" for f in dataclasses.fields(cfg)]
    return "\n".join(lines)


def setup_distributed() -> Run:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cpu_group = None
    if world_size > 1:
        timeout = datetime.timedelta(minutes=int(os.environ.get("DIST_TIMEOUT_MINUTES", 20)))
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
            cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            cpu_group = dist.group.WORLD
        dist.barrier()
    return Run(rank, world_size, device, grad_accum_steps=0, cpu_group=cpu_group)


class SparseTableGrads:
    """Gradients of the lookup tables (embed, value_embeds, bigram_embed), accumulated by row.

    Autograd would build each table's full dense gradient in every micro-batch (425M entries at
    the speedrun's size, nearly all zero), then add it onto .grad. Here the looked-up rows enter
    the model as leaves instead; after backward their gradients are scatter-added into an fp32 sum
    per table, which becomes the table's bf16 .grad when the optimizer consumes it. The same sum,
    rounded once.

    The leaves are one fp32 tensor per table and batch shape, refilled by every lookup: a graph
    replayed by CUDA graphs copies each input into its own memory first unless the input stays at
    one address (torch._dynamo.mark_static_address). A micro-batch's rows go through backward and
    accumulate() before the next lookup overwrites them."""

    def __init__(self, model: GPT, use_kernels: bool):
        self.model = model
        self.use_kernels = use_kernels
        self.index_add_rows = (triton_kernels.index_add_rows if use_kernels
                               else triton_kernels.index_add_rows_reference)
        self.tables = {name: getattr(model, name) for name in TableRows._fields}
        self.sums = {name: torch.zeros(table.shape, dtype=torch.float32, device=table.device)
                     for name, table in self.tables.items()}
        self.leaves: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.pending: tuple[TableRows, TableRows] | None = None   # (indices, rows) awaiting backward

    def leaf(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The fp32 leaf that holds `name`'s rows of a micro-batch of this shape."""
        if (name, shape) not in self.leaves:
            leaf = torch.empty(shape, dtype=torch.float32, device=self.tables[name].device)
            torch._dynamo.mark_static_address(leaf)
            self.leaves[name, shape] = leaf.requires_grad_()
        return self.leaves[name, shape]

    @torch.no_grad()
    def lookup(self, inputs: torch.Tensor, bigram_ids: torch.Tensor) -> TableRows:
        """This micro-batch's rows, in the fp32 leaves whose .grad accumulate() collects."""
        if self.pending is not None:
            raise RuntimeError("SparseTableGrads.lookup: the previous micro-batch's rows await "
                               "accumulate(), and this lookup would overwrite them")
        indices = self.model.table_indices(inputs, bigram_ids)
        rows = TableRows(*(self.leaf(name, (*ids.shape, self.tables[name].shape[-1]))
                           .copy_(self.tables[name][ids])
                           for name, ids in zip(TableRows._fields, indices)))
        self.pending = (indices, rows)
        return rows

    @torch.no_grad()
    def accumulate(self) -> None:
        """After backward: add the rows' gradients into the sums (with the kernel, by sorted runs
        of equal ids: one atomic add per run instead of one per row)."""
        if self.pending is None:
            return
        indices, rows = self.pending
        # embed and the value tables read the same token ids: the kernel sorts them once
        token_sort = torch.sort(indices.embed) if self.use_kernels else None
        for name, ids, row in zip(TableRows._fields, indices, rows):
            if row.grad is None:
                continue
            total = self.sums[name]
            if ids.dim() == 2:
                # the value tables: table k starts at row k x V and reads the same token as the
                # others, so a (count, V, d) view takes the token ids once for all of them
                total, ids = total.view(ids.shape[0], -1, total.shape[-1]), ids[0]
            self.index_add_rows(total, ids, row.grad, None if name == "bigram_embed" else token_sort)
            row.grad = None
        self.pending = None

    @torch.no_grad()
    def flush(self) -> None:
        """Hand the sums to the optimizer as the tables' .grad, and start new sums."""
        for name, table in self.tables.items():
            table.grad = self.sums[name].to(table.dtype, copy=True)
            self.sums[name].zero_()

    def reset(self) -> None:
        self.pending = None
        for leaf in self.leaves.values():
            leaf.grad = None
        for total in self.sums.values():
            total.zero_()


def owned_first_gradient(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A parameter's incoming gradient, copied when it is the first of a step. A CUDA-graph
    backward writes its outputs into memory that its next replay overwrites, and autograd keeps a
    first gradient as .grad without copying it; the later micro-batches' gradients are added into
    .grad before that replay, so they need no copy."""
    return grad.clone() if param.grad is None else grad


class Trainer:
    """Owns the model, optimizer, schedule and data of one rank and runs steps on them.
    `paths` forces the implementation of each op; by default resolve_paths() decides."""

    def __init__(self, cfg: Hyperparameters, run: Run, log: Logger, paths: Paths | None = None):
        self.cfg, self.run, self.log = cfg, run, log
        phase = run.startup.phase
        with phase("data open"):
            self.train_files = find_shards(cfg.train_files)   # missing data fails first
            self.val_files = find_shards(cfg.val_files)
        self.paths = resolve_paths(cfg, run.device, log) if paths is None else paths
        for line in self.paths.report():
            log(line)
        self.schedule = Schedule(cfg)
        self.val_tokens_per_rank = cfg.val_batch_tokens // cfg.micro_batches_per_step
        max_train_tokens = max(s.batch_tokens for s in cfg.stages) // cfg.micro_batches_per_step
        # paired-head layers index rotary positions up to twice the sequence length
        max_positions = 2 * max(self.val_tokens_per_rank, max_train_tokens)
        # built where it trains: a GPU draws the initial weights in milliseconds, where the host
        # (one thread per rank under torchrun) takes seconds. The draws therefore depend on the
        # device type: a seed gives other initial weights on a GPU than on a CPU.
        with phase("model build"), torch.device(run.device):
            torch.manual_seed(cfg.seed)
            self.model = GPT(cfg, run.world_size, max_positions, self.paths)
            synchronize(run.device)
        self.val_mask_table = None
        if cfg.prefix_loss_weight > 0 or cfg.val_mask:
            with phase("tokenizer tables"):
                self.load_tokenizer_tables()
        with phase("model broadcast"):
            if run.world_size > 1:
                for p in self.model.parameters():
                    dist.broadcast(p.detach(), 0)
            synchronize(run.device)
        with phase("FP8 weight copies"):    # the first compiles the quantization
            self.model.requantize_fp8_weights()
        self.forward = self.model
        if self.paths.compile:
            cache_graphs_with_autograd_functions()
            # dynamic=True: the batch length, windows and max_seqlen are symbolic from the first
            # compile, so one graph serves every stage
            self.forward = torch.compile(self.model, fullgraph=True, dynamic=cfg.dynamic_stages,
                                         mode="reduce-overhead" if self.paths.cuda_graphs else None)
            if cfg.dynamic_stages:
                # floats stay constants: Dynamo cannot lift a symbolic float into the graph of
                # an autograd function (the FP8 MLP's), and no float changes between stages
                self.forward = torch._dynamo.config.patch(specialize_float=True)(self.forward)
        if self.paths.cuda_graphs:
            for param in self.model.parameters():
                if param.requires_grad:
                    param.register_hook(functools.partial(owned_first_gradient, param))
        with phase("optimizer build"):
            self.table_grads = SparseTableGrads(self.model, self.paths.table_grads == "triton")
            self.sparse_bigram = None
            params = dict(self.model.named_parameters())
            spec = next(s for s in PARAM_TABLE if s.label == "bigram_embed")
            if comms_mode(spec, run.world_size, run.grad_accum_steps) == "sharded_sparse":
                self.sparse_bigram = SparseBigramExchange(
                    params["bigram_embed"].size(0), run.world_size, run.rank, run.device,
                    run.cpu_group)
            self.optimizer = NorMuonAndAdam(params, cfg, run.rank, run.world_size,
                                            run.grad_accum_steps, cpu_group=run.cpu_group,
                                            sparse_bigram=self.sparse_bigram, paths=self.paths)
        self.long_window = self.schedule.windows(0)[1]
        self.window_carriers: dict[tuple[int, int], torch.Tensor] = {}
        self.longest_mtp = max(len(w) for stage in cfg.stages for w in stage.mtp_weights)
        with phase("data open"):
            self.loader = self.new_train_loader()

    def load_tokenizer_tables(self) -> None:
        """The prefix-token table (#88) into the model, the validation mask (#350) onto the device;
        both before the clock starts."""
        start = time.perf_counter()
        vocabulary = gpt2_vocabulary()
        V = self.cfg.padded_vocab_size
        if self.cfg.prefix_loss_weight > 0:
            self.model.prefix_table.copy_(torch.from_numpy(prefix_token_table(vocabulary, V)))
            self.log(f"prefix tokens: table built in {time.perf_counter() - start:.2f}s")
        if self.cfg.val_mask:
            cache_dir = os.path.join(REPO_ROOT, self.cfg.val_mask_cache)
            pairs = load_val_mask_pairs(cache_dir, self.log if self.run.is_master else lambda _: None)
            self.val_mask_table = torch.from_numpy(packed_mask_table(pairs, V)).to(self.run.device)

    def new_train_loader(self) -> TrainLoader:
        run = self.run
        return TrainLoader(self.train_files, run.rank, run.world_size, run.device,
                           self.cfg.bigram_vocab_size, cycle=self.cfg.cycle_train_data,
                           log=self.log, tight_cu_seqlens=self.cfg.tight_cu_seqlens)

    def symbolic_windows(self) -> bool:
        """Whether the compiled graphs take the windows as symbols: then one evaluation graph
        serves every stage (its batch keeps its shape)."""
        return self.cfg.symbolic_windows and self.paths.compile

    def graph_windows(self, windows: tuple[int, int]) -> tuple[int, int] | torch.Tensor:
        """windows as the model's compiled graphs take them. Dynamo bakes a Python int into a
        graph as a constant, so with --symbolic_windows they travel as the sizes of an empty
        tensor whose first two dimensions are marked dynamic, and one graph serves all pairs."""
        if not self.symbolic_windows():
            return windows
        if windows not in self.window_carriers:     # made once: every micro-batch passes one
            carrier = torch.empty(*windows, 0, device=self.run.device)
            torch._dynamo.mark_dynamic(carrier, [0, 1])
            self.window_carriers[windows] = carrier
        return self.window_carriers[windows]

    def advance(self, step: int) -> StepSettings:
        """Settings of `step`; a change of the long window rescales rotary (YaRN) on the way."""
        settings = self.schedule.at(step)
        new_long = settings.windows[1]
        if new_long != self.long_window:
            self.model.rotary.apply_yarn(self.long_window, new_long)
            self.long_window = new_long
        return settings

    def train_step(self, step: int, settings: StepSettings) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss over all
        ranks (a device tensor, not synchronised)."""
        run = self.run
        grad_scale = 1.0 / run.grad_accum_steps
        # through pinned memory like the batches: an upload from pageable memory may wait for
        # the GPU's queue to drain, and the host must stay ahead of the GPU
        mtp = settings.mtp_weights
        if self.cfg.dynamic_stages:   # one length in every stage: a zero weight adds nothing
            mtp += (0.0,) * (self.longest_mtp - len(mtp))
        mtp_weights = _to_device(np.array(mtp, dtype=np.float32), run.device)
        prefix_weight = None
        if self.cfg.prefix_loss_weight > 0:
            prefix_weight = _to_device(np.array([settings.prefix_weight], dtype=np.float32),
                                       run.device)
        is_adam_step = step % 2 == 1
        fp8_scales = self.model.fp8_scales
        total = torch.zeros((), device=run.device)
        for micro_step in range(run.grad_accum_steps):
            # the micro-batch's place in the step's stream: the loader deals ranks in turn
            slot = micro_step * run.world_size + run.rank
            batch = self.loader.next_batch(settings.batch_tokens, settings.max_seq_len,
                                           run.grad_accum_steps)
            if self.sparse_bigram is not None:
                self.sparse_bigram.mark(batch.bigram_ids_cpu)
                if is_adam_step:
                    self.sparse_bigram.start_count_exchange()
            rows = self.table_grads.lookup(batch.inputs, batch.bigram_ids)
            if fp8_scales is not None:
                fp8_scales.begin_slot(slot)
            loss = self.forward(batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram_ids,
                                mtp_weights, self.graph_windows(settings.windows),
                                settings.max_seq_len, grad_scale, rows, prefix_weight=prefix_weight)
            if fp8_scales is not None:
                fp8_scales.end_slot(slot)
            if self.sparse_bigram is not None and is_adam_step:
                self.sparse_bigram.start_index_exchange()
            loss.backward()
            self.table_grads.accumulate()
            total += loss.detach()
        if is_adam_step:   # the tables are Adam parameters: their gradient spans two steps
            self.table_grads.flush()
        self.optimizer.step(step, settings.lr_mul, settings.muon_momentum)
        self.model.requantize_fp8_weights()
        if step == self.schedule.split_step:
            self.optimizer.untie()
        if run.world_size > 1:
            dist.all_reduce(total)
        # per token and per unit of loss weight, so it reads like a cross-entropy
        weight = sum(settings.mtp_weights) + settings.prefix_weight
        return total / (grad_scale * settings.batch_tokens * weight)

    @torch.no_grad()
    def eval_forward(self, batch: Batch, windows: tuple[int, int]) -> torch.Tensor:
        """The mean next-token loss of a validation batch; with the mask, (plain, masked)."""
        bits = None if self.val_mask_table is None else self.val_mask_table[batch.inputs.long()]
        self.model.eval()
        loss = self.forward(batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram_ids, None,
                            self.graph_windows(windows), self.val_tokens_per_rank,
                            val_mask_bits=bits)
        self.model.train()
        return loss

    def validate(self, windows: tuple[int, int]) -> tuple[float, float | None]:
        """The val loss, and the masked one when the validation mask is on (else None)."""
        run, cfg = self.run, self.cfg
        total, batches = 0.0, 0
        for batch in val_batches(self.val_files, cfg.val_tokens, cfg.val_batch_tokens, run.rank,
                                 run.world_size, run.grad_accum_steps, run.device,
                                 cfg.bigram_vocab_size):
            # summed at once: under CUDA graphs the next batch's replay reuses the output's memory
            total = total + self.eval_forward(batch, windows)
            batches += 1
        val_loss = total / batches
        if run.world_size > 1:
            dist.all_reduce(val_loss, op=dist.ReduceOp.SUM)
            val_loss /= run.world_size
        values = val_loss.tolist()
        return (values[0], values[1]) if isinstance(values, list) else (values, None)

    def no_rank_compiled(self, misses: float) -> bool:
        """Whether `misses` (Inductor compiles) is 0 on every rank: the helpers of
        --compile_ahead are stopped on all ranks or none, since they share process groups."""
        total = torch.tensor([misses], dtype=torch.float64)
        if self.run.world_size > 1:
            dist.all_reduce(total, group=self.run.cpu_group)
        return total.item() == 0

    def first_val_batch(self) -> Batch:
        """The validation batch the warm-up steps evaluate (to compile the evaluation graph)."""
        cfg, run = self.cfg, self.run
        return next(iter(val_batches(self.val_files, cfg.val_batch_tokens, cfg.val_batch_tokens,
                                     run.rank, run.world_size, run.grad_accum_steps, run.device,
                                     cfg.bigram_vocab_size)))

    def warmup_step(self, step: int, val_batch: Batch | None) -> StepSettings:
        """A warm-up step: the evaluation of `val_batch` (unless None) and the training step of
        `step`, done on the device."""
        settings = self.advance(step)
        if val_batch is not None:
            self.eval_forward(val_batch, settings.windows)
        self.train_step(step, settings)
        synchronize(self.run.device)
        return settings

    def warmup(self, last_step: int, ahead: CompileAhead | None = None) -> None:
        """Run real steps around every schedule transition so that every compiled variant exists
        before the clock starts, then restore the initial state. With `ahead`, each later
        stage's step first waits for a helper to have compiled it; after a step 0 that compiled
        nothing (warm caches) the helpers are stopped instead."""
        steps = self.schedule.warmup_steps(last_step)
        self.log("Compiling model and warming up kernels (~7 minutes on first execution)")
        self.log(f"Sampling steps {steps} for warmup")
        startup = self.run.startup
        with startup.phase("state snapshot"):
            initial_state = copy.deepcopy(self.model.state_dict())
            val_batch = self.first_val_batch()
        for step in steps:
            if ahead is not None and step > 1:
                with startup.phase("waiting for the compile-ahead helpers"):
                    ahead.wait_for(self.schedule.stage_of(step))
            begin, graphs_before, compiles_before = (time.perf_counter(), compiled_graphs(),
                                                     compile_totals())
            settings = self.warmup_step(step, val_batch)
            seconds = time.perf_counter() - begin
            startup.record(f"warm-up step {step} ({self.schedule.stage_name(settings.stage)}, "
                           f"{compiled_graphs() - graphs_before} graphs compiled)", seconds)
            self.log(f"warm-up step {step}: "
                     f"{compile_summary(compiles_before, compile_totals(), seconds)}")
            if ahead is not None and step == 0 and self.no_rank_compiled(
                    compile_totals()["inductor miss"] - compiles_before["inductor miss"]):
                ahead.stop("step 0 compiled nothing: the caches hold every graph")
                ahead = None
        self.log("Resetting Model")
        with startup.phase("state restore"):
            self.model.zero_grad(set_to_none=True)
            self.table_grads.reset()
            self.model.load_state_dict(initial_state)
            self.optimizer.reset()
            self.long_window = replay_yarn(self.model.rotary, self.schedule, 0)
            self.loader = self.new_train_loader()


# =================================================================================================
# Checkpoints
# =================================================================================================
# One file per checkpoint, written by rank 0 under a temporary name and then renamed, so that a
# crash never leaves a half-written checkpoint under a final name. It holds the model and the
# optimizer state in a form that does not depend on the world size (shards gathered, the padding
# rows that only make banks split evenly left out), the loader's position, the step, the clock,
# the RNG states, the FP8 down-projection's delayed scales (#89: every rank's slots gathered), the
# e4m3 copies of the packed QKV weights (#344) and what wrote it: the configuration and a digest
# of the code. It is written after an Adam (odd) step only, when no gradient is pending. Reading
# it loads tensors and plain data only, never code.

CHECKPOINT_FORMAT = 1
# Fields that do not change the training math: a checkpoint may be resumed with other values.
RUN_ONLY_FIELDS = frozenset({
    "val_files", "val_tokens", "val_batch_tokens", "val_every", "stop_after_steps", "seed",
    "compile", "cuda_graphs", "use_triton_kernels", "flash_attn3", "triton_attention",
    "save_every", "save_checkpoint",
    "checkpoint_dir", "resume", "log_dir", "val_mask", "val_mask_cache", "peak_tflops",
    "compile_cache", "compile_ahead", "compile_ahead_helpers", "eval", "hellaswag_file"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the difference."""


def code_digest() -> str:
    """sha256 of the two source files: a checkpoint resumes only under the code that wrote it."""
    digest = hashlib.sha256()
    for name in ("train_gpt.py", "triton_kernels.py"):
        with open(os.path.join(REPO_ROOT, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def unpadded_rows(label: str, cfg: Hyperparameters, matrices: bool = False) -> int | None:
    """The rows of a parameter along dim 0 (of its matrix view if `matrices`) that exist on every
    world size; None where nothing is padding."""
    num_standard = len(standard_attn_layers(cfg))
    rows = {"scalars": 2 * NUM_LAYERS + 3, "mlp_bank": NUM_LAYERS,
            "qk_bank": cfg.num_heads * num_standard, "vo_bank": 2 * num_standard,
            "pairwise_u_bank": NUM_LAYERS, "pairwise_w_bank": NUM_LAYERS,
            **{bank: shape[0] for bank, shape in variant_bank_shapes(cfg).items()}}.get(label)
    if rows is not None and matrices and label == "mlp_bank":
        rows *= 2
    return rows


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:06d}.pt")


def latest_checkpoint(directory: str) -> str:
    paths = glob.glob(os.path.join(directory, "step_*.pt"))
    if not paths:
        raise CheckpointError(f"--resume=latest: no checkpoint (step_*.pt) in {directory!r}")
    return max(paths)


def save_checkpoint(trainer: Trainer, step: int, training_ms: float) -> str | None:
    """The state after `step` completed steps into checkpoint_dir (rank 0 writes; collective)."""
    cfg, run = trainer.cfg, trainer.run
    optimizer = trainer.optimizer.full_state()   # every rank takes part in the gathers
    fp8_scales = trainer.model.fp8_scales
    fp8_state = None if fp8_scales is None else fp8_scales.full_state(run.rank, run.world_size)
    fp8_qkv = trainer.model.fp8_qkv_weights
    fp8_qkv_state = (None if fp8_qkv is None
                     else {name: t.cpu() for name, t in fp8_qkv.state_dict().items()})
    if not run.is_master:
        return None
    for label, entry in optimizer["labels"].items():
        rows = unpadded_rows(label, cfg, matrices=trainer.optimizer.specs[label].optimizer == "normuon")
        entry["tensors"] = {name: t[:rows].cpu() for name, t in entry["tensors"].items()}
    model = {name: p.detach()[:unpadded_rows(name, cfg)].cpu()
             for name, p in trainer.model.named_parameters()}
    rng = dict(cpu=torch.get_rng_state())
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    meta = dict(format=CHECKPOINT_FORMAT, code=code_digest(), step=step,
                resumable=step % 2 == 0, world_size=run.world_size,
                config={f.name: as_literal(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
    data = dict(meta=meta, model=model, optimizer=optimizer, loader=trainer.loader.state(),
                training_ms=training_ms, rng=rng, fp8_scales=fp8_state, fp8_qkv=fp8_qkv_state)
    os.makedirs(cfg.checkpoint_dir, exist_ok=True)
    path = checkpoint_path(cfg.checkpoint_dir, step)
    tmp = f"{path}.tmp"
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents: tensors and plain data only (no code runs while loading)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind: one message
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not loaded: it holds something other than tensors and "
                              f"plain data, or is damaged ({first_line})") from None
    if not isinstance(data, dict) or "meta" not in data:
        raise CheckpointError(f"{path}: not a train_gpt.py checkpoint")
    return data


def check_resumable(meta: dict, cfg: Hyperparameters, path: str) -> None:
    """A clear error if the checkpoint was written by other code or for other math."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, this code reads "
                              f"format {CHECKPOINT_FORMAT}")
    if meta["code"] != code_digest():
        raise CheckpointError(f"{path}: written by code version {meta['code']}, this is "
                              f"{code_digest()} (train_gpt.py or triton_kernels.py changed); resume "
                              f"with the code that wrote it")
    if not meta["resumable"]:
        raise CheckpointError(f"{path}: written after step {meta['step']}, an even step whose "
                              f"gradients were still pending; training resumes only from an even "
                              f"step count")
    differences = [f"{name}={value!r} (this run: {as_literal(getattr(cfg, name))!r})"
                   for name, value in meta["config"].items()
                   if name not in RUN_ONLY_FIELDS and value != as_literal(getattr(cfg, name))]
    if differences:
        raise CheckpointError(f"{path}: written with {', '.join(differences)}; resume with the same "
                              f"preset and options")


def load_model_state(model: GPT, data: dict) -> None:
    """A checkpoint's parameters (the padding rows stay zero), FP8 scales and e4m3 QKV weights
    into `model`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p[:unpadded_rows(name, model.cfg)].copy_(data["model"][name])
    if model.fp8_scales is not None:
        model.fp8_scales.load_state_dict(data["fp8_scales"])
    if model.fp8_qkv_weights is not None:
        model.fp8_qkv_weights.load_state_dict(data["fp8_qkv"])


def load_checkpoint(trainer: Trainer, path: str) -> tuple[int, float]:
    """Continue from a checkpoint: model, optimizer, loader and RNG state, the rotary schedule
    replayed up to the step. Returns (steps completed, training ms so far)."""
    cfg, run = trainer.cfg, trainer.run
    data = read_checkpoint(path)
    meta = data["meta"]
    check_resumable(meta, cfg, path)
    if meta["world_size"] != run.world_size:
        trainer.log(f"resuming a checkpoint of {meta['world_size']} processes on {run.world_size}: "
                    f"the same math, the state split anew")
    load_model_state(trainer.model, data)
    optimizer = trainer.optimizer
    for label, entry in data["optimizer"]["labels"].items():
        sharded = optimizer.modes[label] in ("sharded", "sharded_sparse")
        for name, local in optimizer._state_tensors(label).items():
            full = local.new_zeros(local.shape[0] * (run.world_size if sharded else 1), *local.shape[1:])
            saved = entry["tensors"][name]
            full[:saved.shape[0]].copy_(saved)
            entry["tensors"][name] = full
    optimizer.load_full_state(data["optimizer"])
    trainer.loader.restore(data["loader"])
    torch.set_rng_state(data["rng"]["cpu"])
    if run.device.type == "cuda" and "cuda" in data["rng"]:
        torch.cuda.set_rng_state(data["rng"]["cuda"], run.device)
    step = meta["step"]
    trainer.long_window = replay_yarn(trainer.model.rotary, trainer.schedule, step)
    return step, data["training_ms"]


# =================================================================================================
# Compile cache
# =================================================================================================
# torch.compile keeps what it builds in caches local to the machine, so every fresh node starts
# cold. --compile_cache=PATH carries them in one file, through PyTorch's own cache-artifact save
# and load, headed by what they were built for: code, software, GPU, world size and every field
# that can change a graph. A file built for anything else is reported in one line and rebuilt.
# (PyTorch keys each artifact exactly too, so even a file that got past this check could only
# miss, never be used for the wrong graph.) The file holds compiled code: load only your own.
# Beside the artifacts it lists the specialisations of triton_kernels.py's kernels the run
# compiled, which Triton caches on its own: a run that loads the file compiles them in worker
# processes while it traces its graphs, rather than one after another at their first launches
# (Triton keys its cache exactly as well).

COMPILE_CACHE_MAGIC = b"train_gpt.py compile cache 2\n"
# Fields that cannot change a compiled graph: a cache built under other values still fits.
NOT_GRAPH_FIELDS = frozenset({
    "train_files", "val_files", "val_tokens", "cycle_train_data", "stop_after_steps", "val_every",
    "seed", "peak_tflops", "save_every", "save_checkpoint", "checkpoint_dir", "resume", "log_dir",
    "val_mask_cache", "compile_cache", "compile_ahead", "compile_ahead_helpers", "eval",
    "hellaswag_file"})


def cache_graphs_with_autograd_functions() -> None:
    """Let AOTAutograd's cache keep graphs that call this file's autograd functions (the Triton
    and FP8 paths). Dynamo traces their forward and backward into the graph, so their code is
    part of the cache key; without this the training graph bypasses the cache and is traced and
    partitioned anew on every start. The flag is PyTorch's own, off by default while it is
    rolled out."""
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (model and optimizer together)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# Dynamo's timers (seconds per named region, summed over the process) that a compile splits into:
# a graph's compile is its trace and then the backend's work, its backward's at the first backward
INDUCTOR_GRAPH_TIMER = "compile_fx_inner"     # one entry per graph (a backward is a graph of its own)
COMPILE_TIMERS = {"compile": ("_compile.compile_inner", "backward._backward_impl"),
                  "tracing": ("bytecode_tracing",), "inductor": (INDUCTOR_GRAPH_TIMER,)}
COMPILE_CACHES = {"inductor": "fxgraph_cache", "aot_autograd": "autograd_cache"}


def compile_totals() -> dict[str, float]:
    """Compile seconds (COMPILE_TIMERS) and cache outcomes (hit, miss, bypass of each of
    COMPILE_CACHES) of this process so far; the difference of two tells what happened between."""
    metrics, counters = torch._dynamo.utils.compilation_time_metrics, torch._dynamo.utils.counters
    totals = {name: sum(sum(metrics.get(timer, ())) for timer in timers)
              for name, timers in COMPILE_TIMERS.items()}
    for group, prefix in COMPILE_CACHES.items():
        for outcome in ("hit", "miss", "bypass"):
            totals[f"{group} {outcome}"] = counters[group][f"{prefix}_{outcome}"]
    totals["inductor graphs"] = len(metrics.get(INDUCTOR_GRAPH_TIMER, ()))
    return totals


def compile_summary(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """Where a warm-up step's `seconds` went: compiling (Dynamo's tracing, Inductor, the rest:
    AOTAutograd and guards) or running (CUDA graph capture, autotuning, the step itself); which
    compiles the caches served; and Inductor's seconds for each graph it compiled, largest first
    (a forward and its backward count apart)."""
    d = {name: after[name] - before[name] for name in after}
    rest = d["compile"] - d["tracing"] - d["inductor"]
    caches = ", ".join(f"{group} {d[f'{group} hit']:.0f} hit / {d[f'{group} miss']:.0f} miss / "
                       f"{d[f'{group} bypass']:.0f} bypass" for group in COMPILE_CACHES)
    graph_seconds = torch._dynamo.utils.compilation_time_metrics.get(INDUCTOR_GRAPH_TIMER, [])
    per_graph = sorted(graph_seconds[int(before["inductor graphs"]):int(after["inductor graphs"])],
                       reverse=True)
    per_graph_text = " ".join(f"{t:.2f}" for t in per_graph) or "none"
    return (f"compiling {d['compile']:.2f}s (tracing {d['tracing']:.2f}s, inductor "
            f"{d['inductor']:.2f}s, rest {rest:.2f}s), running {seconds - d['compile']:.2f}s; "
            f"caches: {caches}; inductor per graph (s): {per_graph_text}")


def compile_cache_key(cfg: Hyperparameters, run: Run) -> dict[str, str]:
    """What the compiled graphs of this run depend on, as strings."""
    import triton
    device = "cpu"
    if run.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(run.device)
        device = f"{torch.cuda.get_device_name(run.device)} (compute capability {major}.{minor})"
    key = {"code": code_digest(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": str(torch.version.cuda), "device": device, "world_size": str(run.world_size)}
    key.update((f.name, repr(as_literal(getattr(cfg, f.name)))) for f in dataclasses.fields(cfg)
               if f.name not in NOT_GRAPH_FIELDS)
    return key


def load_compile_cache(path: str, key: dict[str, str], log: Callable[[str], None]
                       ) -> list[list[str]] | None:
    """Hot-load the artifacts in `path` into torch.compile's caches if they were built for `key`,
    and return its Triton kernel specialisations ([name, data] pairs). A missing, unreadable or
    mismatched file gets one log line and None: the run compiles."""
    if not os.path.exists(path):
        log(f"compile cache {path}: not there yet; compiling, then writing it")
        return None
    try:
        with open(path, "rb") as f:
            if f.readline() != COMPILE_CACHE_MAGIC:
                raise ValueError("not a compile cache of train_gpt.py in this version")
            built_for = json.loads(f.readline())
            kernels = json.loads(f.readline())
            artifacts = f.read()
    except (OSError, ValueError) as e:
        log(f"compile cache {path}: unreadable ({e}); compiling afresh and replacing it")
        return None
    differences = [f"{name} {built_for.get(name, '(none)')} -> {key.get(name, '(none)')}"
                   for name in sorted(key.keys() | built_for.keys())
                   if key.get(name) != built_for.get(name)]
    if differences:
        log(f"compile cache {path}: built for another run ({'; '.join(differences)}); "
            f"compiling afresh and replacing it")
        return None
    torch.compiler.load_cache_artifacts(artifacts)
    log(f"compile cache {path}: loaded {len(artifacts) / 2**20:.1f} MiB and "
        f"{len(kernels)} Triton kernel specialisations")
    return kernels


def save_compile_cache(path: str, key: dict[str, str], kernels: list[list[str]],
                       log: Callable[[str], None]) -> None:
    """Write everything torch.compile built or loaded in this process to `path`, with the
    Triton kernel specialisations `kernels` (write, then rename: an interrupted write never
    leaves a broken cache)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log(f"compile cache {path}: nothing was compiled; not written")
        return
    artifacts = saved[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(COMPILE_CACHE_MAGIC + json.dumps(key).encode() + b"\n"
                + json.dumps(kernels).encode() + b"\n" + artifacts)
    os.replace(tmp, path)
    log(f"compile cache {path}: written, {len(artifacts) / 2**20:.1f} MiB and "
        f"{len(kernels)} Triton kernel specialisations")


def record_triton_kernels() -> list[list[str]]:
    """From now on, every specialisation of a triton_kernels.py kernel this process compiles:
    [kernel name, Triton's specialisation data] pairs, appended by Triton's JIT hook."""
    import triton
    record: list[list[str]] = []
    chained = triton.knobs.runtime.jit_post_compile_hook

    def hook(*, fn, compile, **kwargs):
        data = compile.get("specialization_data")
        if getattr(fn, "module", None) == triton_kernels.__name__ and data is not None:
            if [fn.name, data] not in record:
                record.append([fn.name, data])
        return None if chained is None else chained(fn=fn, compile=compile, **kwargs)

    triton.knobs.runtime.jit_post_compile_hook = hook
    return record


class TritonPrecompile:
    """Worker processes that compile recorded kernel specialisations (record_triton_kernels)
    into Triton's on-disk cache while this process traces its graphs. A kernel launched before
    its worker is done just compiles at its launch, as without them. Each rank takes its share;
    the ranks of a machine share the cache."""

    def __init__(self, kernels: list[list[str]], run: Run):
        share = kernels[run.rank::run.world_size]
        workers = max(1, min(len(share), (os.cpu_count() or 1) // (2 * run.world_size)))
        # spawned: a process that has used CUDA cannot fork
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.workers = workers
        self.futures = [self.pool.submit(triton_kernels.preload_specialization,
                                         run.device.index or 0, name, data)
                        for name, data in share]

    def finish(self, log: Callable[[str], None]) -> None:
        """Wait for the workers (done by now, as a rule) and say in one line how it went."""
        errors = [error for future in self.futures if (error := future.exception()) is not None]
        self.pool.shutdown()
        if errors:
            log(f"compile cache: {len(errors)} of {len(self.futures)} Triton kernel "
                f"specialisations were not precompiled ({errors[0]!r}); they compiled at their "
                f"first launch")
        else:
            log(f"compile cache: {len(self.futures)} Triton kernel specialisations precompiled in "
                f"{self.workers} worker processes")


# =================================================================================================
# The timed run
# =================================================================================================

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PendingLoss:
    """A step's loss and time, read once the device has finished the step: the next step is queued
    by then, so reading never stalls the queue. On a GPU the time runs between events on the stream
    at the step's start and end; the host's clock would count only the launches of a step that
    follows a synchronisation (validation, a checkpoint), with nothing queued ahead of it."""

    def __init__(self, step: int, loss: torch.Tensor, settings: StepSettings,
                 start: torch.cuda.Event | float):
        self.step, self.settings, self.start = step, settings, start
        self.value = loss.to("cpu", non_blocking=True)
        self.end = None
        if isinstance(start, torch.cuda.Event):
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.step_ms = 1000 * (time.perf_counter() - start)

    @staticmethod
    def start_marker(device: torch.device) -> torch.cuda.Event | float:
        """Where a step starts: an event on the GPU's stream, or the host's clock."""
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def get(self) -> float:
        if self.end is not None:
            self.end.synchronize()
            self.step_ms = self.start.elapsed_time(self.end)
        return self.value.item()


class TrainingGC:
    """Python's garbage collector during the timed steps. What lives on entry (model, compiled
    graphs and their guards) lives to the end: frozen, the collector's passes skip it. A pass
    stops the host, and a host that stops long enough leaves the GPU idle, so every pass is
    counted and timed."""

    def __init__(self):
        self.count, self.total_ms, self.longest_ms = 0, 0.0, 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = 1000 * (time.perf_counter() - self._start)
        self.count += 1
        self.total_ms += ms
        self.longest_ms = max(self.longest_ms, ms)

    def __enter__(self) -> TrainingGC:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
        gc.unfreeze()

    def summary(self) -> str:
        return (f"{self.count} passes, {self.total_ms:.1f} ms in total, longest "
                f"{self.longest_ms:.1f} ms")


# -------------------------------------------------------------------------------------------------
# Throughput, progress and the run report

# Dense bf16 peak of each device (datasheet, TFLOP/s), matched against the device's name;
# --peak_tflops overrides it.
PEAK_BF16_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("RTX 4090", 165.2))


def peak_tflops(cfg: Hyperparameters, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def mlp_weights_per_layer(cfg: Hyperparameters) -> int:
    """The matrix weights of one MLP: c_fc and c_proj, or U (r x d) and W (d x P). The pairwise
    MLP's P products per token (one multiply each, ~0.1% of its GEMMs) are not counted, as
    neither is the ReLU^2."""
    d = cfg.model_dim
    if cfg.mlp == "pairwise":
        return (cfg.pairwise_rank + triton_kernels.pair_count(cfg.pairwise_rank)) * d
    return 2 * d * cfg.mlp_hidden


def flops_per_token(cfg: Hyperparameters, settings: StepSettings) -> float:
    """Training FLOPs per token (forward and backward, 3 x the forward): 2 per weight of every
    matrix a token passes through, and attention's QK^T and PV over half of each layer's window
    (the mean context of a causal window), the window capped by the stage's longest document.
    Q and K count at their own width (cfg.qk_width), not at the zero-padded one attention runs."""
    d = cfg.model_dim
    qk = cfg.num_heads * cfg.qk_width    # the width of all Q (or K) heads of a layer together
    weights = len(standard_attn_layers(cfg)) * 2 * (qk + d) * d
    weights += NUM_LAYERS * mlp_weights_per_layer(cfg)
    weights += sum(count * rows * cols for count, rows, cols in variant_bank_shapes(cfg).values())
    weights += d * cfg.padded_vocab_size
    for on, layouts in ((cfg.mudd, mudd_layouts()), (cfg.mudd_gates, gate_layouts(cfg.num_heads))):
        if on:
            weights += sum(MUDD_HIDDEN * (d + layout.size) for layout in layouts)
    short, long = settings.windows
    context = [min(long if i in LONG_WINDOW_LAYERS else short, settings.max_seq_len) / 2
               for i in ATTN_LAYERS]
    if cfg.dc_attention:
        context.append(DC_WINDOW / 2)
    attention = sum(2 * (qk + d) * c for c in context)
    if cfg.noise_attention:   # the noise call, its heads as wide as noise_attention makes them
        width = cfg.head_dim if cfg.attn == "diff" else max(cfg.cmd_noise_dim, cfg.head_dim)
        attention += sum(4 * cfg.num_heads * width * c
                         for i, c in zip(ATTN_LAYERS, context) if i in VARIANT_ATTN_LAYERS)
    return 3 * (2 * weights + attention)


class ProgressClock:
    """A smoothed ETA that knows the stages cost different times: an exponential average of the
    step time in each stage; a stage not run yet is estimated from the latest stage's time per
    token times its batch."""

    def __init__(self, schedule: Schedule, last_step: int):
        self.schedule, self.last_step = schedule, last_step
        self.stage_ms: dict[int, float] = {}
        self.ms_per_token = 0.0

    def update(self, settings: StepSettings, step_ms: float) -> None:
        previous = self.stage_ms.get(settings.stage)
        self.stage_ms[settings.stage] = step_ms if previous is None else 0.9 * previous + 0.1 * step_ms
        self.ms_per_token = self.stage_ms[settings.stage] / settings.batch_tokens

    def eta_s(self, next_step: int) -> float:
        ms = 0.0
        for stage, (start, end) in enumerate(zip(self.schedule.stage_starts, self.schedule.stage_ends)):
            steps = max(0, min(end, self.last_step) - max(start, next_step))
            if steps:
                step_ms = self.stage_ms.get(stage)
                if step_ms is None:
                    step_ms = self.ms_per_token * self.schedule.row(stage).batch_tokens
                ms += steps * step_ms
        return ms / 1000


def run_report(lines: dict[str, str], config: str) -> str:
    """The end-of-run summary as markdown: a two-column table, then the configuration."""
    table = ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in lines.items()]
    return "\n".join(["# Run report", "", *table, "", "## Configuration", "", "```", config, "```", ""])


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# The helpers of --compile_ahead are this file, run with the same configuration and this mode:
# each runs the warm-up steps that one variable lists and reports the stage of each as a line on
# the pipe whose descriptor the other names.
COMPILE_AHEAD_MODE = "--compile_ahead_helper"
COMPILE_AHEAD_FD = "TRAIN_GPT_COMPILE_AHEAD_FD"
COMPILE_AHEAD_STEPS = "TRAIN_GPT_COMPILE_AHEAD_STEPS"


class CompileAhead:
    """--compile_ahead: while this process compiles stage 1's graphs, helper processes run the
    warm-up step of every later stage, and so compile those stages' graphs into this machine's
    Inductor and AOTAutograd caches (shared through the file system). This process's own warm-up
    steps of those stages then load them. Much of compiling is Python work in one thread, so
    processes overlap on a machine's cores. The later stages are split into
    --compile_ahead_helpers consecutive shares, one helper each: consecutive, so that the
    extension, which runs stage 3's graph under --symbolic_windows, follows stage 3 in one helper.
    With several ranks, every rank starts the same helpers, and the k-th helpers of all ranks
    form a process group of their own, on a port rank 0 picks: that way they build the same
    graphs (shapes depend on the world size). A helper that fails or is stopped costs only its
    time: this process compiles whatever is missing itself."""

    def __init__(self, processes: list[subprocess.Popen], reports: TextIO, output_dir: str,
                 log: Callable[[str], None]):
        self.processes, self.reports, self.output_dir, self.log = processes, reports, output_dir, log
        self.stages_done: set[int] = set()
        self.failed = False

    @staticmethod
    def shares(steps: list[int], helpers: int) -> list[list[int]]:
        """`steps` in at most `helpers` consecutive shares, the later ones the larger by one."""
        helpers = min(helpers, len(steps))
        size, larger = divmod(len(steps), helpers)
        bounds = [0]
        for k in range(helpers):
            bounds.append(bounds[-1] + size + (k >= helpers - larger))
        return [steps[a:b] for a, b in zip(bounds, bounds[1:])]

    @staticmethod
    def command(cfg: Hyperparameters, rank: int, world_size: int, port: int, report_fd: int,
                steps: list[int], helper: int) -> tuple[list[str], dict[str, str], str]:
        """The command line, environment and output file of this rank's helper number `helper`,
        which runs `steps`: this run's configuration, logging to log_dir/compile_ahead/helper<k>,
        without a compile cache file of its own."""
        log_dir = os.path.join(cfg.log_dir, "compile_ahead", f"helper{helper}")
        helper_cfg = dataclasses.replace(cfg, compile_ahead=False, compile_cache="", log_dir=log_dir)
        argv = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *config_argv(helper_cfg),
                COMPILE_AHEAD_MODE]
        env = {**os.environ, COMPILE_AHEAD_FD: str(report_fd),
               COMPILE_AHEAD_STEPS: ",".join(map(str, steps))}
        if world_size > 1:   # a rendezvous of their own: rank 0's helper serves the store
            env.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False",
                       DIST_TIMEOUT_MINUTES="5")   # one helper's failure ends the others soon
        return argv, env, os.path.join(log_dir, f"rank{rank}.out")

    @classmethod
    def launch(cls, cfg: Hyperparameters, run: Run, steps: list[int],
               log: Callable[[str], None]) -> CompileAhead:
        shares = cls.shares(steps, cfg.compile_ahead_helpers)
        ports = free_ports(len(shares)) if run.is_master else [0] * len(shares)
        if run.world_size > 1:
            dist.broadcast_object_list(ports, src=0)
        read_fd, write_fd = os.pipe()     # one pipe for all: each report is one short write
        processes = []
        for helper, (share, port) in enumerate(zip(shares, ports)):
            argv, env, output_path = cls.command(cfg, run.rank, run.world_size, port, write_fd,
                                                 share, helper)
            os.makedirs(os.path.dirname(output_path), exist_ok=True)
            with open(output_path, "w") as output:
                processes.append(subprocess.Popen(argv, env=env, pass_fds=(write_fd,),
                                                  stdout=output, stderr=subprocess.STDOUT))
        os.close(write_fd)
        output_dir = os.path.join(cfg.log_dir, "compile_ahead")
        log(f"compile ahead: helpers compile the later stages' warm-up steps {shares} "
            f"(output: {output_dir})")
        return cls(processes, os.fdopen(read_fd), output_dir, log)

    def wait_for(self, stage: int) -> None:
        """Until a helper has compiled `stage`'s step, or all have ended without it."""
        while stage not in self.stages_done and (line := self.reports.readline()):
            self.stages_done.add(int(line))
        if stage not in self.stages_done and not self.failed:
            self.failed = True
            codes = ", ".join(str(process.wait()) for process in self.processes)
            self.log(f"compile ahead: the helpers ended (exit codes {codes}, see "
                     f"{self.output_dir}) before stage {stage}; compiling the rest here")

    def stop(self, reason: str) -> None:
        """End the helpers that still run (they must not share the GPU with the timed steps)."""
        running = [process for process in self.processes if process.poll() is None]
        for process in running:
            process.kill()
        if running:
            self.log(f"compile ahead: stopped {len(running)} of {len(self.processes)} helpers "
                     f"({reason})")
        for process in self.processes:
            process.wait()
        self.reports.close()


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:      # all bound at once, so the system hands out distinct ports
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def compile_later_stages(cfg: Hyperparameters, run: Run, log: Logger, paths: Paths) -> None:
    """A helper of --compile_ahead: the warm-up steps of its share, each reported on the pipe when
    done and logged with the helper's age, to set beside the run's own start-up report."""
    trainer = Trainer(cfg, run, log, paths)
    # Under symbolic windows the run's own step 0 compiles the one evaluation graph of every
    # stage; evaluating here would compile it again and hold a validation batch's logits (24.6
    # GiB at world size 1) beside the run's memory.
    val_batch = None if trainer.symbolic_windows() else trainer.first_val_batch()
    with os.fdopen(int(os.environ[COMPILE_AHEAD_FD]), "w") as reports:
        for step in map(int, os.environ[COMPILE_AHEAD_STEPS].split(",")):
            settings = trainer.warmup_step(step, val_batch)
            print(settings.stage, file=reports, flush=True)
            log(f"compile ahead: step {step} ({trainer.schedule.stage_name(settings.stage)}) "
                f"done {run.startup.elapsed_s():.1f}s after the helper's launch")


class TrainingRun:
    """The timed loop around a Trainer: the clock (validation and checkpoints stay off it), the
    progress lines, the checkpoints and the report at the end."""

    def __init__(self, cfg: Hyperparameters, run: Run, log: Logger, paths: Paths | None = None):
        self.cfg, self.run, self.log = cfg, run, log
        paths = resolve_paths(cfg, run.device, log) if paths is None else paths
        self.total_steps = cfg.num_train_steps
        self.last_step = cfg.last_step
        if paths.compile:
            self.compile_and_warm_up(paths)
        else:
            self.trainer = Trainer(cfg, run, log, paths)
            if cfg.compile_cache:
                log(f"compile cache {cfg.compile_cache}: not used (nothing is compiled: "
                    f"{paths.why['compile']})")
        self.start_step, self.training_ms = 0, 0.0
        if cfg.resume:
            path = latest_checkpoint(cfg.checkpoint_dir) if cfg.resume == "latest" else cfg.resume
            with run.startup.phase("checkpoint restore"):
                self.start_step, self.training_ms = load_checkpoint(self.trainer, path)
            log(f"resumed from {path} after step {self.start_step}")
        self.clock = ProgressClock(self.trainer.schedule, self.last_step)
        self.peak = peak_tflops(cfg, run.device)
        self.pending: PendingLoss | None = None
        self.step_ms: dict[int, list[float]] = {}     # per stage
        self.mfu: list[float] = []
        self.flops: dict[tuple, float] = {}          # FLOPs per token by stage shape
        self.tokens = 0
        self.val_text = "none"
        self.hellaswag_text = "not run (--eval=hellaswag runs it)"
        self.t0 = 0.0

    def compile_and_warm_up(self, paths: Paths) -> None:
        """Build the trainer and compile every graph variant in warm-up steps, from
        --compile_cache where it fits; write the cache (rank 0) when it was missing, did not fit
        or lacked a graph. The --compile_ahead helpers, or the precompile of the file's Triton
        kernels, start first, to overlap the most."""
        cfg, run, log = self.cfg, self.run, self.log
        kernels, precompile = None, None
        if cfg.compile_cache:
            key = compile_cache_key(cfg, run)
            record = record_triton_kernels()
            with run.startup.phase("compile cache load"):
                kernels = load_compile_cache(cfg.compile_cache, key, log)
            if kernels and run.device.type == "cuda":
                with run.startup.phase("Triton precompile start"):
                    precompile = TritonPrecompile(kernels, run)
        loaded = kernels is not None
        misses = compile_totals()["inductor miss"]     # graphs Inductor compiled, no cache held
        ahead = None
        later_steps = Schedule(cfg).later_stage_starts(self.last_step)
        if cfg.compile_ahead and not loaded and later_steps:
            with run.startup.phase("compile-ahead helpers start"):
                ahead = CompileAhead.launch(cfg, run, later_steps, log)
        try:
            self.trainer = Trainer(cfg, run, log, paths)
            self.trainer.warmup(self.last_step, ahead)
        finally:
            if ahead is not None:
                ahead.stop("the warm-up is over")
            if precompile is not None:
                with run.startup.phase("Triton precompile end"):
                    precompile.finish(log)
        log(f"compiled graphs: {compiled_graphs()}")
        if cfg.compile_cache and run.is_master and (
                not loaded or compile_totals()["inductor miss"] > misses):
            with run.startup.phase("compile cache save"):
                save_compile_cache(cfg.compile_cache, key, record, log)

    def stop_before_training(self) -> None:
        """--compile_only: the start-up report, and no step. The machine's compile caches and
        --compile_cache now hold every graph, so the next run on this machine (or one that loads
        the file) starts warm."""
        if not self.trainer.paths.compile:
            self.log(f"--compile_only: nothing is compiled ({self.trainer.paths.why['compile']})")
        for line in self.run.startup.report(self.run.startup.elapsed_s()):
            self.log(line)
        self.log("--compile_only: stopping before the first training step")

    @contextlib.contextmanager
    def off_the_clock(self) -> Iterator[None]:
        synchronize(self.run.device)
        self.training_ms += 1000 * (time.perf_counter() - self.t0)
        yield
        synchronize(self.run.device)
        self.t0 = time.perf_counter()

    def train(self) -> None:
        with contextlib.ExitStack() as stack:
            # a full collection over everything compiling left behind, once before the clock
            with self.run.startup.phase("garbage collection"):
                self.gc_passes = stack.enter_context(TrainingGC())
            synchronize(self.run.device)
            self.startup_s = self.run.startup.elapsed_s()
            for line in self.run.startup.report(self.startup_s):
                self.log(line)
            settings = self.timed_loop()
        if self.cfg.save_checkpoint:
            self.checkpoint(self.last_step)
        if self.cfg.eval == "hellaswag":
            self.evaluate_hellaswag(settings)
        self.finish()

    def timed_loop(self) -> StepSettings:
        """The steps from start_step to last_step, and validation on its schedule; returns the
        last step's settings."""
        cfg, trainer = self.cfg, self.trainer
        self.t0 = time.perf_counter()
        for step in range(self.start_step, self.last_step + 1):
            settings = trainer.advance(min(step, self.total_steps - 1))
            is_last = step == self.last_step
            if is_last or (cfg.val_every > 0 and step % cfg.val_every == 0):
                with self.off_the_clock():
                    self.validate(step, settings)
            if is_last:
                break
            if cfg.save_every and step > self.start_step and step % cfg.save_every == 0:
                with self.off_the_clock():
                    self.checkpoint(step)
            self.train_step(step, settings)
        if self.pending is not None:
            self.report_step(self.pending)
        return settings

    def evaluate_hellaswag(self, settings: StepSettings) -> None:
        """HellaSwag on the trained model, after the clock, each rank a share of the examples."""
        start, run, trainer = time.perf_counter(), self.run, self.trainer
        examples = read_hellaswag(repo_path(self.cfg.hellaswag_file), gpt2_encode())
        final = self.last_step == self.total_steps
        windows = trainer.schedule.final_val_windows() if final else settings.windows
        counts = hellaswag_counts(trainer.model, self.cfg, windows, examples, run.rank,
                                  run.world_size)
        if run.world_size > 1:
            dist.all_reduce(counts)
        acc, acc_norm = (counts / len(examples)).tolist()
        self.hellaswag_text = f"acc {acc:.4f}, acc_norm {acc_norm:.4f} ({len(examples)} examples)"
        self.log(f"hellaswag acc:{acc:.4f} acc_norm:{acc_norm:.4f} examples:{len(examples)} "
                 f"({time.perf_counter() - start:.1f}s, after the clock)")

    def validate(self, step: int, settings: StepSettings) -> None:
        final = step == self.total_steps
        windows = self.trainer.schedule.final_val_windows() if final else settings.windows
        val_loss, masked = self.trainer.validate(windows)
        masked_text = "" if masked is None else f" val_loss_masked:{masked:.4f}"
        self.val_text = f"{val_loss:.4f}" + ("" if masked is None else f" (masked {masked:.4f})")
        self.log(f"step:{step}/{self.total_steps} val_loss:{val_loss:.4f}{masked_text} "
                 f"train_time:{self.training_ms:.0f}ms step_avg:{self.training_ms / max(step, 1):.2f}ms")

    def checkpoint(self, completed: int) -> None:
        start = time.perf_counter()
        path = save_checkpoint(self.trainer, completed, self.training_ms)
        if path is not None:
            self.log(f"checkpoint: {path} written in {time.perf_counter() - start:.1f}s "
                     f"(off the clock)")

    def train_step(self, step: int, settings: StepSettings) -> None:
        start = PendingLoss.start_marker(self.run.device)
        loss = self.trainer.train_step(step, settings)
        now = time.perf_counter()
        elapsed_ms = self.training_ms + 1000 * (now - self.t0)
        self.log(f"step:{step + 1}/{self.total_steps} train_time:{elapsed_ms:.0f}ms "
                 f"step_avg:{elapsed_ms / (step + 1):.2f}ms", console=False)
        # report the previous step: its loss is ready by now without waiting on this one
        if self.pending is not None:
            self.report_step(self.pending)
        self.pending = PendingLoss(step, loss, settings, start)

    def report_step(self, p: PendingLoss) -> None:
        loss = p.get()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {p.step}; stopping")
        settings = p.settings
        self.clock.update(settings, p.step_ms)
        self.step_ms.setdefault(settings.stage, []).append(p.step_ms)
        self.tokens += settings.batch_tokens
        tokens_per_s = settings.batch_tokens / p.step_ms * 1000
        mfu_text = ""
        if self.peak:
            key = (settings.windows, settings.max_seq_len)   # all the count depends on
            if key not in self.flops:
                self.flops[key] = flops_per_token(self.cfg, settings)
            mfu = self.flops[key] * tokens_per_s / (self.peak * 1e12 * self.run.world_size)
            self.mfu.append(mfu)
            mfu_text = f" mfu:{100 * mfu:.1f}%"
        self.log.progress(f"progress step {p.step + 1}/{self.total_steps} train_loss:{loss:.4f} "
                          f"tokens/s:{tokens_per_s:,.0f}{mfu_text} step_time:{p.step_ms:.1f}ms "
                          f"eta:{format_duration(self.clock.eta_s(p.step + 1))}")

    def finish(self) -> None:
        """The report: one block in the log, and report.md beside it."""
        run = self.run
        memory = "n/a (CPU)"
        if run.device.type == "cuda":
            memory = (f"{torch.cuda.max_memory_allocated() // 2**20:,} MiB allocated, "
                      f"{torch.cuda.max_memory_reserved() // 2**20:,} MiB reserved")
            self.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                     f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        stage_name = self.trainer.schedule.stage_name
        stage_times = ", ".join(f"{stage_name(k)} {statistics.median(ms):.1f}"
                                for k, ms in sorted(self.step_ms.items()))
        device = (torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU")
        import triton
        lines = {
            "final val loss": self.val_text,
            "HellaSwag": self.hellaswag_text,
            "steps": f"{self.last_step} of {self.total_steps}",
            "training time": f"{self.training_ms / 1000:.2f} s (validation and checkpoints excluded)",
            "median step time (ms)": stage_times or "no steps",
            "tokens trained": f"{self.tokens:,}",
            "MFU": (f"{100 * statistics.mean(self.mfu):.1f}% of {self.peak:g} TFLOP/s x "
                    f"{run.world_size}" if self.mfu else "n/a (no peak rate for this device)"),
            "peak memory": memory,
            "Python GC during training": self.gc_passes.summary(),
            "start-up": f"{self.startup_s:.1f} s from launch to the first timed step",
            "commit": git_commit(),
            "device": f"{device} x {run.world_size}",
            "software": f"Python {sys.version.split()[0]}, PyTorch {torch.__version__}, "
                        f"Triton {triton.__version__}",
        }
        for key, value in lines.items():
            self.log(f"report {key}: {value}")
        if self.log.path is not None:
            path = self.log.path.removesuffix(".txt") + "_report.md"
            with open(path, "w") as f:
                f.write(run_report(lines, config_report(self.cfg, run)))
            self.log(f"report written to {path}")


def train(cfg: Hyperparameters, run: Run, log: Logger, paths: Paths | None = None,
          only_compile: bool = False) -> None:
    training = TrainingRun(cfg, run, log, paths)
    if only_compile:
        training.stop_before_training()
    else:
        training.train()


# =================================================================================================
# Preflight: what a long run needs, checked in seconds before it starts
# =================================================================================================

class Check(NamedTuple):
    name: str
    ok: bool
    detail: str


def read_ratio(path: str, max_seq_len: int) -> float:
    """Shard tokens the loader reads per token it trains on when documents are cut at
    max_seq_len (the rest of a longer document is skipped), from one shard's documents."""
    tokens = load_shard(path)
    starts = np.flatnonzero(np.asarray(tokens) == BOS_ID)
    lengths = np.diff(np.append(starts, len(tokens)))
    used = np.minimum(lengths, max_seq_len).sum()
    return float(lengths.sum() / used) if used else float("inf")


def data_coverage(cfg: Hyperparameters, files: list[str]) -> Check:
    """The training tokens the schedule reads, estimated from the first shard's document lengths,
    against the tokens the shards hold."""
    schedule = Schedule(cfg)
    needed = 0.0
    for stage, (start, end) in enumerate(zip(schedule.stage_starts, schedule.stage_ends)):
        steps = max(0, min(end, cfg.last_step) - start)
        row = schedule.row(stage)
        needed += steps * row.batch_tokens * read_ratio(files[0], row.max_seq_len)
    available = sum(read_shard_header(path) for path in files)
    detail = (f"the schedule reads about {needed / 1e6:,.1f}M train tokens, the {len(files)} "
              f"shards hold {available / 1e6:,.1f}M")
    if cfg.cycle_train_data:
        return Check("train data covers the schedule", True, detail + " (cycling on)")
    if needed > available:
        return Check("train data covers the schedule", False,
                     detail + ": add shards or pass --cycle_train_data=true")
    return Check("train data covers the schedule", True, detail)


def preflight(cfg: Hyperparameters, run: Run, paths: Paths) -> list[Check]:
    """Data, tokenizer, execution paths, communication and checkpoint folder, each a Check."""
    checks = []
    try:
        files = find_shards(cfg.train_files)
        for path in files:
            read_shard_header(path)
        checks.append(Check("train shards", True, f"{len(files)} valid ({cfg.train_files})"))
        checks.append(data_coverage(cfg, files))
    except DataError as e:
        checks.append(Check("train shards", False, str(e)))
    try:
        _read_stream(find_shards(cfg.val_files), cfg.val_tokens + 1)
        checks.append(Check("val data", True, f"{cfg.val_tokens:,} tokens ({cfg.val_files})"))
    except DataError as e:
        checks.append(Check("val data", False, str(e)))
    if cfg.prefix_loss_weight > 0 or cfg.val_mask:
        try:
            gpt2_vocabulary()
            checks.append(Check("GPT-2 tokenizer", True, "for the prefix-token loss / val mask"))
        except DataError as e:
            checks.append(Check("GPT-2 tokenizer", False, str(e)))
    for line in paths.report():
        op, _, detail = line.removeprefix("path ").partition(": ")
        checks.append(Check(f"path {op}", True, detail))
    if run.world_size > 1:
        total = torch.ones((), device=run.device)
        dist.all_reduce(total)
        checks.append(Check("all-reduce", int(total.item()) == run.world_size,
                            f"{int(total.item())} of {run.world_size} ranks answered"))
    if cfg.eval == "hellaswag":
        path = repo_path(cfg.hellaswag_file)
        checks.append(Check("HellaSwag file", os.path.isfile(path),
                            path if os.path.isfile(path) else
                            f"{path}: missing (`python data/hellaswag.py` downloads it)"))
    if cfg.save_every or cfg.save_checkpoint:
        try:
            os.makedirs(cfg.checkpoint_dir, exist_ok=True)
            probe = os.path.join(cfg.checkpoint_dir, f".write_test_{run.rank}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
            checks.append(Check("checkpoint folder", True, f"{cfg.checkpoint_dir} is writable"))
        except OSError as e:
            checks.append(Check("checkpoint folder", False, f"{cfg.checkpoint_dir}: {e.strerror}"))
    return checks


def preflight_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {'ok' if c.ok else 'FAILED':<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


# =================================================================================================
# Sampling from a checkpoint
# =================================================================================================

SAMPLE_OPTIONS = dict(checkpoint="", prompt="", max_new_tokens=64, temperature=0.8, top_k=50,
                      seed=0)
SAMPLE_CONTEXT = 1024            # tokens the model sees when it predicts the next one


def model_from_checkpoint(path: str, device: torch.device, log: Callable[[str], None]
                          ) -> tuple[GPT, Hyperparameters, tuple[int, int]]:
    """The model of a checkpoint on one process, its configuration, and the attention windows of
    the step it was written at (rotary rescaled as training had left it)."""
    data = read_checkpoint(path)
    meta = data["meta"]
    if meta["code"] != code_digest():
        log(f"note: {path} was written by code version {meta['code']}, this is {code_digest()}")
    cfg = Hyperparameters(**{**meta["config"], "compile": False})
    paths = resolve_paths(cfg, device, log)
    torch.manual_seed(0)
    # paired-head layers read rotary positions up to twice a forward pass's tokens
    max_positions = 2 * max(SAMPLE_CONTEXT, HELLASWAG_PACK_TOKENS)
    with torch.device(device):     # built where it samples; the checkpoint overwrites its weights
        model = GPT(cfg, world_size=1, max_positions=max_positions, paths=paths)
    load_model_state(model, data)
    model.eval()
    schedule, step = Schedule(cfg), meta["step"]
    replay_yarn(model.rotary, schedule, step)
    windows = schedule.final_val_windows() if step >= cfg.num_train_steps else schedule.windows(step)
    return model, cfg, windows


@torch.no_grad()
def generate(model: GPT, cfg: Hyperparameters, windows: tuple[int, int], prompt_ids: list[int],
             max_new_tokens: int, temperature: float, top_k: int, seed: int) -> list[int]:
    """Continue prompt_ids (a document start first) token by token: each step recomputes the
    whole context, at most SAMPLE_CONTEXT tokens (no KV cache: the model is a training model, and
    a short continuation costs seconds). temperature 0 picks the most likely token."""
    device = model.embed.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = np.array(ids[-SAMPLE_CONTEXT:], dtype=np.int32)
        T = len(context)
        inputs = torch.from_numpy(context).to(device)
        bigram_ids = torch.from_numpy(bigram_hash(context, cfg.bigram_vocab_size)).to(device)
        cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
        h = model.hidden_states(inputs, bigram_ids, cu_seqlens, windows, T)
        logits = triton_kernels.softcap(h[-1].float() @ model.lm_head.float())[:cfg.vocab_size]
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if 0 < top_k < logits.numel():
            logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return ids


def sample(argv: list[str]) -> None:
    """train_gpt.py --sample --checkpoint=PATH --prompt=TEXT [--max_new_tokens --temperature
    --top_k --seed]: print a continuation of the prompt."""
    options = dict(SAMPLE_OPTIONS)
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in SAMPLE_OPTIONS or not _:
            raise SystemExit(f"argument {arg!r}: --sample takes --key=value options "
                             f"{', '.join('--' + k for k in SAMPLE_OPTIONS)}")
        options[key] = _parse_value(key, value, SAMPLE_OPTIONS[key])
    if not options["checkpoint"]:
        raise SystemExit("--sample needs --checkpoint=PATH (a checkpoint of --save_checkpoint or "
                         "--save_every)")
    if options["temperature"] < 0 or options["max_new_tokens"] < 1:
        raise SystemExit("--temperature must be 0 or more and --max_new_tokens at least 1")
    import tiktoken
    encoding = tiktoken.get_encoding("gpt2")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, windows = model_from_checkpoint(options["checkpoint"], device,
                                                    lambda line: print(line, file=sys.stderr))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    prompt_ids = [BOS_ID] + encoding.encode_ordinary(options["prompt"])
    start = time.perf_counter()
    ids = generate(model, cfg, windows, prompt_ids, options["max_new_tokens"],
                   options["temperature"], options["top_k"], options["seed"])
    seconds = time.perf_counter() - start
    print(options["prompt"] + encoding.decode(ids[len(prompt_ids):]))
    print(f"{len(ids) - len(prompt_ids)} tokens in {seconds:.1f}s "
          f"({(len(ids) - len(prompt_ids)) / seconds:.1f} tokens/s, {device.type}, the whole context "
          f"recomputed for every token)", file=sys.stderr)


# =================================================================================================
# HellaSwag
# =================================================================================================
# Each example is a context and four endings, one of them right. Every ending is scored by the
# log-likelihood the model gives its tokens after the context: acc counts the examples whose right
# ending scores highest, acc_norm the same with each score divided by the ending's length in
# characters (lm-evaluation-harness's normalisation). A candidate is the document [BOS, context,
# ending] after two documents of one BOS each. Its first token then sees a BOS before it (smear,
# bigram, key offset), as a training document's first token sees the previous document's last one;
# and that BOS depends on nothing else (a one-token document attends only to itself, and its own
# predecessor is the other BOS), so no path through the model connects the candidates of a packed
# batch. Only the FP8 MLP's (#84) one scale per forward pass still does, by a little: so the packs
# are the same for every world size (consecutive examples in file order, dealt to the ranks in
# turn), and the result is the same on every run and world size.

HELLASWAG_PACK_TOKENS = 2048     # tokens per forward pass; an example's four candidates must fit
SEPARATOR_DOCUMENTS = 2


class HellaSwagExample(NamedTuple):
    context: list[int]
    endings: list[list[int]]     # four, each tokenised with its leading space
    ending_chars: list[int]
    label: int


def read_hellaswag(path: str, encode: Callable[[str], list[int]]) -> list[HellaSwagExample]:
    """The examples of a HellaSwag .jsonl file (one JSON object per line with ctx, endings, label)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no HellaSwag file (`python data/hellaswag.py` downloads it)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                item = json.loads(line)
                ctx, endings, label = item["ctx"], item["endings"], int(item["label"])
                if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                        and all(isinstance(e, str) for e in endings) and 0 <= label < 4):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {number}: expected a JSON object with ctx (a text), "
                                f"endings (4 texts) and label (0-3)") from None
            examples.append(HellaSwagExample(encode(ctx), [encode(" " + e) for e in endings],
                                             [len(e) for e in endings], label))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def candidate_tokens(example: HellaSwagExample) -> int:
    return sum(SEPARATOR_DOCUMENTS + 1 + len(example.context) + len(ending)
               for ending in example.endings)


def hellaswag_packs(examples: list[HellaSwagExample], max_tokens: int
                    ) -> Iterator[list[HellaSwagExample]]:
    """Consecutive examples in groups of at most max_tokens candidate tokens."""
    pack, tokens = [], 0
    for example in examples:
        size = candidate_tokens(example)
        if size > max_tokens:
            raise DataError(f"a HellaSwag example of {size} tokens (context "
                            f"{len(example.context)}) exceeds the {max_tokens} of one forward pass")
        if tokens + size > max_tokens:
            yield pack
            pack, tokens = [], 0
        pack.append(example)
        tokens += size
    if pack:
        yield pack


@torch.no_grad()
def ending_log_likelihoods(model: GPT, cfg: Hyperparameters, windows: tuple[int, int],
                           examples: list[HellaSwagExample]) -> torch.Tensor:
    """(examples, 4): the summed log-probability of each ending's tokens after its context."""
    tokens, doc_lengths, spans = [], [], []
    for example in examples:
        for ending in example.endings:
            document = [BOS_ID, *example.context, *ending]
            tokens += [BOS_ID] * SEPARATOR_DOCUMENTS
            doc_lengths += [1] * SEPARATOR_DOCUMENTS
            start = len(tokens)
            # position p predicts token p + 1: the ending's predictors end one before the document
            spans.append((start + len(example.context), start + len(document) - 1))
            tokens += document
            doc_lengths.append(len(document))
    device = model.embed.device
    ids = np.array(tokens, dtype=np.int32)
    inputs = torch.from_numpy(ids).to(device)
    targets = torch.roll(inputs, -1).long()
    bigram_ids = torch.from_numpy(bigram_hash(ids, cfg.bigram_vocab_size)).to(device)
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(doc_lengths)]), dtype=torch.int32,
                              device=device)
    h = model.hidden_states(inputs, bigram_ids, cu_seqlens, windows, max(doc_lengths))
    logits = triton_kernels.softcap(model.head_logits(h)).float()
    log_probs = -F.cross_entropy(logits, targets, reduction="none").double()
    totals = torch.cat([log_probs.new_zeros(1), log_probs.cumsum(0)])
    starts, ends = (torch.tensor(column, device=device) for column in zip(*spans))
    return (totals[ends] - totals[starts]).view(len(examples), 4)


def hellaswag_counts(model: GPT, cfg: Hyperparameters, windows: tuple[int, int],
                     examples: list[HellaSwagExample], rank: int = 0, world_size: int = 1
                     ) -> torch.Tensor:
    """This rank's share (every world_size-th pack from `rank`): a float64 tensor of (right by
    acc, right by acc_norm); summed over the ranks and divided by len(examples), the accuracies."""
    device = model.embed.device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    max_tokens = min(HELLASWAG_PACK_TOKENS, model.rotary.cos.size(0) // 2)  # paired heads: 2T
    was_training = model.training
    model.eval()
    for pack in list(hellaswag_packs(examples, max_tokens))[rank::world_size]:
        scores = ending_log_likelihoods(model, cfg, windows, pack)
        labels = torch.tensor([example.label for example in pack], device=device)
        chars = torch.tensor([example.ending_chars for example in pack], device=device)
        counts[0] += (scores.argmax(1) == labels).sum()
        counts[1] += ((scores / chars).argmax(1) == labels).sum()
    model.train(was_training)
    return counts


def gpt2_encode() -> Callable[[str], list[int]]:
    import tiktoken
    return tiktoken.get_encoding("gpt2").encode_ordinary


def evaluate_checkpoint(argv: list[str]) -> None:
    """train_gpt.py --eval=hellaswag --checkpoint=PATH [--hellaswag_file=F]: print the accuracies
    of a checkpoint's model."""
    options = dict(eval="", checkpoint="", hellaswag_file=Hyperparameters.hellaswag_file)
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in options or not _:
            raise SystemExit(f"argument {arg!r}: evaluating a checkpoint takes "
                             f"{', '.join('--' + k + '=...' for k in options)}")
        options[key] = value
    if options["eval"] != "hellaswag":
        raise SystemExit(f"--eval={options['eval']}: expected hellaswag")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        examples = read_hellaswag(repo_path(options["hellaswag_file"]), gpt2_encode())
        model, cfg, windows = model_from_checkpoint(options["checkpoint"], device,
                                                    lambda line: print(line, file=sys.stderr))
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    start = time.perf_counter()
    acc, acc_norm = (hellaswag_counts(model, cfg, windows, examples) / len(examples)).tolist()
    print(f"hellaswag acc:{acc:.4f} acc_norm:{acc_norm:.4f} examples:{len(examples)} "
          f"({time.perf_counter() - start:.1f}s, {device.type})")


def print_summary(cfg: Hyperparameters, world_size: int) -> None:
    """Every parameter with its optimizer settings, built on the meta device (no memory)."""
    if world_size < 1 or cfg.micro_batches_per_step % world_size:
        raise SystemExit(f"--world_size={world_size}: expected a divisor of "
                         f"{cfg.micro_batches_per_step}")
    grad_accum = cfg.micro_batches_per_step // world_size
    with torch.device("meta"):
        model = GPT(cfg, world_size, max_positions=2)
    specs = {s.label: s for s in PARAM_TABLE}
    print(f"world size {world_size} (--world_size=K for another; the banks' padding depends on it)")
    print(f"{'label':<16} {'shape':<22} {'dtype':<9} {'optimizer':<9} {'lr_mul':>7} {'wd_mul':>7}"
          f"  comms")
    total = 0
    for label, p in model.named_parameters():
        s = specs[label]
        total += p.numel()
        print(f"{label:<16} {str(tuple(p.shape)):<22} {str(p.dtype).removeprefix('torch.'):<9} "
              f"{s.optimizer:<9} {s.lr_mul:>7g} {s.wd_mul:>7g}  "
              f"{comms_mode(s, world_size, grad_accum)}")
    print(f"total parameters: {total:,}")


def main(argv: list[str] | None = None) -> None:
    startup = StartupClock()
    argv = sys.argv[1:] if argv is None else argv
    if "--sample" in argv:
        sample([arg for arg in argv if arg != "--sample"])
        return
    if any(arg.startswith("--checkpoint=") for arg in argv):
        evaluate_checkpoint(argv)
        return
    only_preflight, only_compile = "--preflight" in argv, "--compile_only" in argv
    compile_helper = COMPILE_AHEAD_MODE in argv
    argv = [arg for arg in argv if arg not in ("--preflight", "--compile_only", COMPILE_AHEAD_MODE)]
    summary = "--summary" in argv
    world_args = [arg for arg in argv if arg.startswith("--world_size=")]
    if world_args and not summary:
        raise SystemExit("--world_size is an option of --summary (a training run takes its "
                         "world size from torchrun)")
    cfg = parse_config([arg for arg in argv if arg != "--summary" and arg not in world_args])
    if summary:
        # the world size of this machine unless given: torchrun's, else one process per GPU
        world_size = int(os.environ.get("WORLD_SIZE", 0)) or torch.cuda.device_count() or 1
        if world_args:
            world_size = _parse_value("world_size", world_args[-1].split("=", 1)[1], 8)
        print_summary(cfg, world_size)
        return
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    torch._dynamo.config.recompile_limit = 64
    with startup.phase("distributed set-up"):
        run = setup_distributed()
    run.startup = startup
    try:
        try:
            run.grad_accum_steps = check_config(cfg, run.world_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        notes: list[str] = []   # FlashAttention-3's, when it does not load
        with startup.phase("preflight"):
            paths = resolve_paths(cfg, run.device, notes.append)
            checks = preflight(cfg, run, paths)
        if only_preflight:
            if run.is_master:
                print(preflight_table(checks))
            if not all(check.ok for check in checks):
                raise SystemExit(1)
            return
        failed = [check for check in checks if not check.ok]
        if failed:
            raise SystemExit("error: " + "; ".join(check.detail for check in failed))
        with startup.phase("log header"):   # reads git and nvidia-smi
            log = Logger(run, cfg.log_dir)
            if run.is_master:
                log(environment_report(), console=False)
                log(config_report(cfg, run))
                log("preflight:\n" + preflight_table(checks), console=False)
        for note in notes:
            log(note)
        if compile_helper:
            compile_later_stages(cfg, run, log, paths)
            return
        train(cfg, run, log, paths, only_compile)
    except (DataError, CheckpointError) as e:   # bad data or checkpoint: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
