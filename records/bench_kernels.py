"""Benchmark of triton_kernels.py at the speedrun shapes (CUDA only).

Each kernel is timed (median of many launches, triton.testing.do_bench) against the best
PyTorch form of the same math, run eagerly and through torch.compile. Achieved throughput is
given against the device's ceilings, measured at the start of the same run: a bf16 and an FP8
8192^3 matrix product and a 4 GiB device copy (bytes read + written).
The table is printed and written as markdown to records/kernels/<device>_<date>.md.

    python3 records/bench_kernels.py [--out-dir records/kernels] [--cases NAME ...] [--sweeps NAME ...]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEVICE = "cuda"


@dataclass(frozen=True)
class Ceilings:
    bf16_tflops: float
    fp8_tflops: float
    copy_gbps: float


def measure_ceilings() -> Ceilings:
    """The device's measured peak rates: large matrix products on random data, a large copy."""
    n = 8192
    a, b = randn_bf16(n, n), randn_bf16(n, n)
    bf16_ms = bench(lambda: a @ b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=DEVICE)
    fp8_ms = bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                            use_fast_accum=True))
    src = torch.empty(2 ** 30, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    flops = 2 * n ** 3
    return Ceilings(flops / bf16_ms * 1e-9, flops / fp8_ms * 1e-9, 2 * src.nbytes / copy_ms * 1e-6)

from train_gpt import POLAR_EXPRESS_COEFFICIENTS as POLAR_EXPRESS_COEFFS, git_commit  # noqa: E402


@dataclass
class Result:
    name: str
    shape: str
    ours_ms: float           # do_bench: launch included, L2 flushed
    eager_ms: float
    compiled_ms: float
    ours_gpu_ms: float | None      # CUDA-graph replay: GPU time only (warm L2)
    best_ref_gpu_ms: float | None  # best of eager / compiled PyTorch, same way
    ours_host_us: float      # host time per call of ours (Python, dispatch, launch)
    work: float              # FLOPs or bytes of one call
    unit: str                # "TFLOP/s" or "GB/s"
    ceiling: str             # which of the measured Ceilings: "bf16", "fp8" or "copy"
    note: str = ""

    def row(self, ceilings: Ceilings) -> str:
        scale = 1e-12 if self.unit == "TFLOP/s" else 1e-9
        gpu_ms = self.ours_gpu_ms or self.ours_ms
        achieved = self.work * scale / (gpu_ms * 1e-3)
        ceiling = {"bf16": ceilings.bf16_tflops, "fp8": ceilings.fp8_tflops,
                   "copy": ceilings.copy_gbps}[self.ceiling]
        best = min(self.eager_ms, self.compiled_ms)
        us = lambda ms: "n/a" if ms is None else f"{ms * 1e3:.1f}"   # noqa: E731
        gpu_speedup = ("n/a" if not (self.ours_gpu_ms and self.best_ref_gpu_ms)
                       else f"{self.best_ref_gpu_ms / self.ours_gpu_ms:.2f}x")
        return (f"| {self.name} | {self.shape} | {us(self.ours_ms)} | {us(self.eager_ms)} | "
                f"{us(self.compiled_ms)} | {best / self.ours_ms:.2f}x | {us(self.ours_gpu_ms)} | "
                f"{us(self.best_ref_gpu_ms)} | {gpu_speedup} | {achieved:.0f} {self.unit} | "
                f"{100 * achieved / ceiling:.0f}% | {self.ours_host_us:.0f} | {self.note} |")


HEADER = ("| kernel | shape | ours (us) | PyTorch eager (us) | torch.compile (us) | speedup | "
          "ours GPU-only (us) | best PyTorch GPU-only (us) | GPU-only speedup | achieved (GPU-only) | "
          "% of ceiling | ours host us/call | note |\n" + "|---" * 13 + "|")


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn, launch overhead included (do_bench flushes L2 between calls)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_gpu(fn: Callable[[], object]) -> float | None:
    """Median milliseconds of fn replayed from a CUDA graph: GPU time without host overhead."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as error:   # not capturable: report n/a rather than lose the row
        print(f"  CUDA-graph timing unavailable: {type(error).__name__}: {str(error).splitlines()[0]}")
        return None


def host_us(fn: Callable[[], object], calls: int = 30) -> float:
    """Host microseconds per call, with the GPU queue not yet full."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def fwd_bwd(forward: Callable, inputs: tuple, wrt: tuple, grad_out: torch.Tensor) -> Callable[[], object]:
    """A call of forward(*inputs) followed by its backward pass with respect to wrt."""
    def run():
        return torch.autograd.grad(forward(*inputs), wrt, grad_out)
    return run


def measure(name, shape, ours, eager, compiled, work, unit, ceiling, note="") -> Result:
    """Three zero-argument callables: our kernel, the PyTorch form eagerly and compiled."""
    times = [bench(fn) for fn in (ours, eager, compiled)]
    gpu_times = [bench_gpu(fn) for fn in (ours, eager, compiled)]
    ref_gpu = [t for t in gpu_times[1:] if t is not None]
    return Result(name, shape, *times, gpu_times[0], min(ref_gpu) if ref_gpu else None,
                  host_us(ours), work, unit, ceiling, note)


def compare(name, shape, ours, reference, args, work, unit, ceiling, note="") -> Result:
    """ours(*args) against reference(*args), eager and compiled (same arguments)."""
    compiled = torch.compile(reference)
    return measure(name, shape, lambda: ours(*args), lambda: reference(*args), lambda: compiled(*args),
                   work, unit, ceiling, note)


def randn_bf16(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).bfloat16()


def small_weight_bf16(rows, cols):
    """A weight uniform in [-1/32, 1/32], as the kernels' tests draw them."""
    return ((torch.rand(rows, cols, device=DEVICE) * 2 - 1) / 32).bfloat16()


def e4m3_layouts(tk, W):
    """W in e4m3 at its exact scale, row-major and transposed, and the scale (1,)."""
    scale = tk.exact_e4m3_scale(W.detach().abs().amax()).reshape(1)
    W8 = tk.quantize_e4m3_scaled(W.detach(), scale)
    return W8, W8.t().contiguous(), scale


# =================================================================================================
# Cases
# =================================================================================================

def case_xxt(tk, batch, m, k):
    A, out = randn_bf16(batch, m, k), torch.empty(batch, m, m, dtype=torch.bfloat16, device=DEVICE)
    return compare("XXT", f"({batch}, {m}, {k})", lambda A: tk.XXT(A, out), lambda A: A @ A.mT, (A,),
                   batch * m * m * k, "TFLOP/s", "bf16", "FLOPs: symmetric half")


def case_xtx(tk, batch, m, k):
    A, out = randn_bf16(batch, m, k), torch.empty(batch, k, k, dtype=torch.bfloat16, device=DEVICE)
    return compare("XTX", f"({batch}, {m}, {k})", lambda A: tk.XTX(A, out), lambda A: A.mT @ A, (A,),
                   batch * k * k * m, "TFLOP/s", "bf16", "FLOPs: symmetric half")


def case_ba_plus_caa(tk, batch, m):
    x = torch.randn(batch, m, m, device=DEVICE)
    A = ((x + x.mT) / 64).bfloat16()
    out = torch.empty_like(A)
    a, b, c = POLAR_EXPRESS_COEFFS[1]
    return compare("ba_plus_cAA", f"({batch}, {m}, {m})", lambda A: tk.ba_plus_cAA(A, c, b, out),
                   lambda A: torch.baddbmm(A, A, A, beta=b, alpha=c), (A,),
                   batch * m * m * m, "TFLOP/s", "bf16", "FLOPs: symmetric half")


def case_mlp(tk, T, d, hidden):
    x = randn_bf16(T, d).requires_grad_()
    W1 = small_weight_bf16(hidden, d).requires_grad_()
    W2 = small_weight_bf16(hidden, d).requires_grad_()
    dY = randn_bf16(T, d)
    fwd_op = torch.ops.nanogpt_triton.linear_relu_square_forward
    bwd_op = torch.ops.nanogpt_triton.linear_relu_square_backward
    shape = f"T={T}, d={d}, hidden={hidden}"
    gemm = 2 * T * d * hidden
    with torch.no_grad():
        post = fwd_op(x, W1)

        def forward_ref(x, W1):
            return torch.relu(x @ W1.t()).square()

        def backward_ref(dY, W2, post):
            return 2 * (dY @ W2.t()) * post.sqrt()

        results = [
            compare("linear_relu_square fwd kernel", shape, fwd_op, forward_ref, (x, W1),
                    gemm, "TFLOP/s", "bf16", "post"),
            compare("linear_relu_square bwd kernel", shape, bwd_op, backward_ref, (dY, W2, post),
                    gemm, "TFLOP/s", "bf16", "d_pre"),
        ]
    leaves = (x, W1, W2)
    compiled_ref = torch.compile(tk.linear_relu_square_reference)
    results.append(measure(
        "MLP fwd+bwd (autograd)", shape,
        fwd_bwd(tk.linear_relu_square, leaves, leaves, dY),
        fwd_bwd(tk.linear_relu_square_reference, leaves, leaves, dY),
        fwd_bwd(compiled_ref, leaves, leaves, dY),
        6 * gemm, "TFLOP/s", "bf16", "6 GEMMs"))
    return results


def case_mlp_fp8(tk, T, d, hidden):
    """The MLP's four forms, forward + backward through autograd (bf16 kernels; #84's e4m3
    up-projection; #89's e4m3 down-projection too, at a delayed scale; #344's FP8 backward, with
    the weights' e4m3 copies made beforehand as once per optimizer step), then #89's FP8 down GEMM
    alone against cuBLAS's scaled matmul of the same operands."""
    x = randn_bf16(T, d).requires_grad_()
    W1 = small_weight_bf16(hidden, d).requires_grad_()
    W2 = small_weight_bf16(hidden, d).requires_grad_()
    dY = randn_bf16(T, d)
    act_scale = torch.tensor([0.02], device=DEVICE)
    weights = tk.FP8MLPWeights(*e4m3_layouts(tk, W1), *e4m3_layouts(tk, W2))

    def fp8_down(fn):
        return lambda x, W1, W2: fn(x, W1, W2, weights.W2_8t, weights.w2_scale, act_scale)[0]

    def fp8_backward(fn):
        return lambda x, W1, W2: fn(x, W1, W2, weights, act_scale)[0]

    forms = (("MLP fwd+bwd, bf16", tk.linear_relu_square, tk.linear_relu_square_reference, ""),
             ("MLP fwd+bwd, #84 FP8 up", tk.linear_relu_square_fp8_up,
              tk.linear_relu_square_fp8_up_reference, "1 of 6 GEMMs FP8"),
             ("MLP fwd+bwd, #89 FP8 up+down", fp8_down(tk.linear_relu_square_fp8),
              fp8_down(tk.linear_relu_square_fp8_reference), "2 of 6 GEMMs FP8"),
             ("MLP fwd+bwd, #344 FP8 backward", fp8_backward(tk.linear_relu_square_fp8_backward),
              fp8_backward(tk.linear_relu_square_fp8_backward_reference), "4 of 6 GEMMs FP8"))
    leaves, shape = (x, W1, W2), f"T={T}, d={d}, hidden={hidden}"
    results = []
    for name, ours, reference, note in forms:
        results.append(measure(name, shape, fwd_bwd(ours, leaves, leaves, dY),
                               fwd_bwd(reference, leaves, leaves, dY),
                               fwd_bwd(torch.compile(reference), leaves, leaves, dY),
                               relu2_mlp_flops(T, d, hidden), "TFLOP/s", "bf16", note))
        ratio = f"{time_ratio(results[-1], results[0])} the bf16 MLP's time"
        results[-1].note = f"{note}; {ratio}" if note else ratio
    post8 = randn_bf16(T, hidden).abs().to(torch.float8_e4m3fn)
    one = torch.ones(1, device=DEVICE)
    results.append(compare(
        "#89 FP8 down GEMM (STORE epilogue)", f"T={T}, hidden={hidden}, d={d}",
        torch.ops.nanogpt_triton.fp8_linear,
        lambda a8, b8, s: torch._scaled_mm(a8, b8.t(), scale_a=s, scale_b=one,
                                           out_dtype=torch.bfloat16, use_fast_accum=True),
        (post8, weights.W2_8t, one), 2 * T * d * hidden, "TFLOP/s", "fp8", "vs cuBLAS scaled_mm"))
    return results


def case_qkv_fp8(tk, T, d, H, w):
    """#344's packed QKV projection, forward + backward through autograd, against the bf16
    projection it replaces (x (lambda W)^T, eager and compiled); then the once-per-step
    quantisation of every layer's weights into both e4m3 layouts (10 layers) against PyTorch."""
    n = 2 * H * w + d
    x, W = randn_bf16(T, d).requires_grad_(), small_weight_bf16(n, d).requires_grad_()
    lam = torch.tensor([0.7], device=DEVICE, requires_grad=True)
    dY = randn_bf16(T, n)
    W8, W8t, scale = e4m3_layouts(tk, W)

    def bf16_projection(x, W, lam):
        return torch.nn.functional.linear(x, lam.bfloat16() * W)

    leaves, shape = (x, W, lam), f"T={T}, d={d}, n={n}"
    results = [measure("packed QKV fwd+bwd, FP8 (#344)", shape,
                       fwd_bwd(lambda x, W, lam: tk.packed_qkv_fp8(x, W, lam, W8, W8t, scale),
                               leaves, leaves, dY),
                       fwd_bwd(bf16_projection, leaves, leaves, dY),
                       fwd_bwd(torch.compile(bf16_projection), leaves, leaves, dY),
                       6 * T * n * d, "TFLOP/s", "bf16",
                       "2 of 3 GEMMs FP8; vs the bf16 projection")]
    L = 10
    with torch.no_grad():
        top, bottom = small_weight_bf16(L * 2 * H * w, d).view(L, 2 * H * w, d), \
            small_weight_bf16(2 * L * d, d).view(2 * L, d, d)[::2]
        scales = torch.full((L,), 1 / 448 / 32, device=DEVICE)
        out = torch.empty(L, n, d, dtype=torch.float8_e4m3fn, device=DEVICE)
        out_t = torch.empty(L, d, n, dtype=torch.float8_e4m3fn, device=DEVICE)
        moved = L * n * d * (2 + 1 + 1 + 1)   # bf16 read, e4m3 written, read and written again
        results.append(compare("quantize_packed_e4m3 (10 layers)", f"L={L}, n={n}, d={d}",
                               tk.quantize_packed_e4m3, tk.quantize_packed_e4m3_reference,
                               (top, bottom, scales, out, out_t), moved, "GB/s", "copy",
                               "once per optimizer step"))
    return results


def case_qk_prep(tk, T, H, w, width):
    """#344's Q/K preparation (norm, rotary, key offset, padding, layout), forward + backward,
    against the model's own ops (train_gpt.qk_prep_reference), on a plain and a paired layer."""
    import train_gpt as tg
    rotary = tg.Rotary(w, 2 * T).to(DEVICE)
    rotary.reset()
    rows = randn_bf16(T, 2 * H * w + H * width)   # V's columns follow: q and k are strided views
    q = rows[:, :H * w].view(T, H, w).detach().requires_grad_()
    k = rows[:, H * w:2 * H * w].view(T, H, w).detach().requires_grad_()
    grads = [randn_bf16(T, H, width)] * 2
    moved = 2 * (2 * 2 * T * H * w + 2 * 2 * T * H * width)   # fwd + bwd: q, k in, out, bf16
    results = []
    for paired, key_offset in ((False, True), (True, False)):
        def prep(fn, q, k):
            return [t.view(T, H, width) for t in fn(q, k, rotary.cos, rotary.sin, paired,
                                                     key_offset, width)]
        kernel = lambda q, k: prep(tk.qk_prep, q, k)                       # noqa: E731
        reference = lambda q, k: prep(tg.qk_prep_reference, q, k)         # noqa: E731
        compiled = torch.compile(reference)

        def run(fn):
            return lambda: torch.autograd.grad(fn(q, k), (q, k), grads)

        results.append(measure(f"qk_prep fwd+bwd, {'paired' if paired else 'plain'} layer",
                               f"T={T}, H={H}, w={w}, width={width}", run(kernel),
                               run(reference), run(compiled), moved, "GB/s", "copy",
                               "vs the model's ops"))
    return results


def case_dc_attention(tk, T, H, hd, window):
    """Layer 10's composed attention, forward and backward, documents of about 400 tokens."""
    q, k, v = (randn_bf16(T, H, hd).requires_grad_() for _ in range(3))
    w1, w2 = (randn_bf16(T, H).requires_grad_() for _ in range(2))
    cu = torch.arange(0, T + 1, 400, device=DEVICE, dtype=torch.int32)
    cu = torch.cat([cu, cu.new_tensor([T])]) if cu[-1] != T else cu
    scale = 0.12
    dY = randn_bf16(T, H, hd)
    leaves = (q, k, v, w1, w2)
    shape = f"T={T}, H={H}, hd={hd}, window={window}"

    def with_args(fn):
        return lambda q, k, v, w1, w2: fn(q, k, v, cu, scale, w1, w2, window=window)

    # the work a window-bound kernel cannot avoid: per query, window keys x (scores of H heads
    # + H value sums) forward, twice that backward
    work = 3 * 2 * 2 * T * window * H * hd
    compiled_ref = torch.compile(with_args(tk.dc_attention_reference))
    return [measure("dc_attention fwd+bwd (autograd)", shape,
                    fwd_bwd(with_args(tk.dc_attention), leaves, leaves, dY),
                    fwd_bwd(with_args(tk.dc_attention_reference), leaves, leaves, dY),
                    fwd_bwd(compiled_ref, leaves, leaves, dY),
                    work, "TFLOP/s", "bf16", "banded PyTorch reference")]


def attention_batch(T, mean_length=756, longest=2048, seed=0):
    """cu_seqlens (int32) of documents like stage 3's: lengths drawn from an exponential of the
    corpus's mean (756 tokens), cut at the stage's 2,048, the last one cut at T."""
    generator = torch.Generator().manual_seed(seed)
    draws = 4 * T // mean_length + 8          # far more than T needs
    lengths = (torch.empty(draws).exponential_(1 / mean_length, generator=generator)
               .clamp(1, longest).int())
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int32), lengths]), 0)
    starts = starts[starts < T]
    return torch.cat([starts, starts.new_tensor([T])]).int().to(DEVICE)


def attention_forward_flops(cu, window, H, hd) -> int:
    """QK^T and PV over the (query, key) pairs the window and the documents allow."""
    from profile_steps import causal_window_pairs
    lengths = (cu[1:] - cu[:-1]).tolist()
    return 4 * H * hd * sum(causal_window_pairs(n, window) for n in lengths)


def flash_attention(cu, window):
    """torch's flash attention (varlen_attn, what the trainer runs without --triton_attention)
    over these documents and window, as a function of q, k and v."""
    from torch.nn.attention.varlen import varlen_attn
    longest = int((cu[1:] - cu[:-1]).max())
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, scale=0.12,
                                       window_size=(window, 0))


def case_attention(tk, T, H, hd, window):
    """The Triton windowed attention against torch's flash attention, forward alone and forward +
    backward; useful work only (pairs inside documents and windows; the backward does 2.5 times
    the forward's)."""
    cu = attention_batch(T)
    q, k, v = (randn_bf16(T, H, hd).requires_grad_() for _ in range(3))
    dY = randn_bf16(T, H, hd)
    flash = flash_attention(cu, window)

    def ours(q, k, v):
        return tk.windowed_attention(q, k, v, cu, window, 0.12)

    leaves, shape = (q, k, v), f"T={T}, H={H}, hd={hd}, window={window}, {len(cu) - 1} documents"
    flops = attention_forward_flops(cu, window, H, hd)
    with torch.no_grad():
        forward = compare("windowed_attention fwd", shape, ours, flash, leaves, flops, "TFLOP/s",
                          "bf16", "vs torch's flash attention")
    return [forward, measure("windowed_attention fwd+bwd (autograd)", shape,
                             fwd_bwd(ours, leaves, leaves, dY), fwd_bwd(flash, leaves, leaves, dY),
                             fwd_bwd(torch.compile(flash), leaves, leaves, dY),
                             3.5 * flops, "TFLOP/s", "bf16", "vs torch's flash attention")]


def relu2_mlp_flops(T, d, hidden):
    """Forward + backward of the ReLU^2 MLP: 6 GEMMs of 2 T d hidden FLOPs (x W1^T and its two
    gradients, post W2 and its two); the elementwise activation is not counted."""
    return 6 * 2 * T * d * hidden


def pairwise_mlp_flops(T, d, r):
    """Forward + backward of the pairwise MLP, useful work only: per token the GEMMs h = x U^T
    (2 r d) and y = q W (2 P d), each again twice in the backward (dU, dx; dW, G = dY W^T), the P
    products in the forward, again for dW, and 2 FMAs per pair contracting G into dh (4 P). Not
    counted: the products of the tiles' padding (~10-20% more at PAIR_BLOCK 8)."""
    P = r * (r + 1) // 2
    return T * (3 * 2 * (r + P) * d + 6 * P)


def case_pairwise(tk, T, d, ranks, hidden):
    """The pairwise MLP (fused kernels, the cuBLAS form, and the reference eager and compiled)
    against the ReLU^2 MLP at the same tokens: forward + backward through autograd, as in
    training."""
    dY = randn_bf16(T, d)
    x = randn_bf16(T, d).requires_grad_()
    W1 = small_weight_bf16(hidden, d).requires_grad_()
    W2 = small_weight_bf16(hidden, d).requires_grad_()
    leaves = (x, W1, W2)
    relu2 = measure(
        "ReLU^2 MLP fwd+bwd (autograd)", f"T={T}, d={d}, hidden={hidden}",
        fwd_bwd(tk.linear_relu_square, leaves, leaves, dY),
        fwd_bwd(tk.linear_relu_square_reference, leaves, leaves, dY),
        fwd_bwd(torch.compile(tk.linear_relu_square_reference), leaves, leaves, dY),
        relu2_mlp_flops(T, d, hidden), "TFLOP/s", "bf16", "the baseline of the pairwise rows")
    results = [relu2]
    for r in ranks:
        U = small_weight_bf16(r, d).requires_grad_()
        W = small_weight_bf16(tk.pair_count(r), d).requires_grad_()
        leaves = (x, U, W)
        result = measure(
            "pairwise MLP fwd+bwd (autograd)", f"T={T}, d={d}, r={r}, P={tk.pair_count(r)}",
            fwd_bwd(tk.pairwise_mlp, leaves, leaves, dY),
            fwd_bwd(tk.pairwise_mlp_reference, leaves, leaves, dY),
            fwd_bwd(torch.compile(tk.pairwise_mlp_reference), leaves, leaves, dY),
            pairwise_mlp_flops(T, d, r), "TFLOP/s", "bf16")
        result.note = f"{time_ratio(result, relu2)} the ReLU^2 MLP's time (kernels, GPU-only)"
        results.append(result)
        # the cuBLAS form compiled, as training runs it
        gemm = measure(
            "pairwise MLP fwd+bwd, cuBLAS form (compiled)",
            f"T={T}, d={d}, r={r}, P={tk.pair_count(r)}",
            fwd_bwd(torch.compile(tk.pairwise_mlp_gemm), leaves, leaves, dY),
            fwd_bwd(tk.pairwise_mlp_reference, leaves, leaves, dY),
            fwd_bwd(torch.compile(tk.pairwise_mlp_reference), leaves, leaves, dY),
            pairwise_mlp_flops(T, d, r), "TFLOP/s", "bf16")
        gemm.note = f"{time_ratio(gemm, relu2)} the ReLU^2 MLP's time (GPU-only)"
        results.append(gemm)
    return results


def time_ratio(result: Result, baseline: Result) -> str:
    """Our time over the baseline's, GPU-only where both have it."""
    if result.ours_gpu_ms and baseline.ours_gpu_ms:
        return f"{result.ours_gpu_ms / baseline.ours_gpu_ms:.2f}x"
    return f"{result.ours_ms / baseline.ours_ms:.2f}x (with launch)"


def case_cross_entropy(tk, T, d, V):
    shape = f"T={T}, V={V}, K=3"
    logits = randn_bf16(T, V, scale=3.0)
    targets = torch.randint(0, V, (T,), device=DEVICE)
    w = torch.tensor([1.0, 0.5, 0.25], device=DEVICE)
    grad_scale = 0.75 / 448
    results = [
        compare("MTP CE loss + grad kernel", shape,
                lambda l, t, w: tk.softcapped_mtp_losses_and_grad(l, t, w, grad_scale),
                lambda l, t, w: tk.softcapped_mtp_losses_and_grad_reference(l, t, w, grad_scale),
                (logits, targets, w),
                T * V * 3, "GB/s", "copy", "bf16 logits -> losses, e5m2 grad"),
    ]
    del logits
    h = randn_bf16(T, d).requires_grad_()
    W_head = randn_bf16(d, V, scale=0.005).requires_grad_()
    x_scale, w_scale = 100 / 448, 1.6 / 448
    dloss = torch.tensor(0.125, device=DEVICE)   # the gradient-accumulation factor of one GPU

    def fp8_loss(h, W_head):
        return tk.softcapped_mtp_cross_entropy(h, targets, w, W_head, x_scale, w_scale, grad_scale)

    def bf16_loss(h, W_head):
        return tk.softcapped_mtp_cross_entropy_reference(h, targets, w, W_head)

    compiled_ref = torch.compile(bf16_loss)
    leaves = (h, W_head)
    results.append(measure(
        "FP8 head + MTP CE fwd+bwd", f"T={T}, d={d}, V={V}, K=3",
        fwd_bwd(fp8_loss, leaves, leaves, dloss), fwd_bwd(bf16_loss, leaves, leaves, dloss),
        fwd_bwd(compiled_ref, leaves, leaves, dloss),
        3 * 2 * T * d * V, "TFLOP/s", "fp8", "vs bf16-head PyTorch; 3 GEMMs"))
    return results


def case_transposes(tk, m, n):
    shape = f"({m}, {n}) -> ({n}, {m})"
    src = randn_bf16(m, n)
    dst = torch.empty(n, m, dtype=torch.bfloat16, device=DEVICE)
    src8 = src.to(torch.float8_e4m3fn)
    dst8 = torch.empty(n, m, dtype=torch.float8_e4m3fn, device=DEVICE)
    embed_grad = randn_bf16(n, m, scale=1e-3)
    head_grad = randn_bf16(m, n, scale=1e-3)
    copy_ref = lambda s, d: d.copy_(s.t())               # noqa: E731
    return [
        compare("transpose_copy bf16", shape, tk.transpose_copy, copy_ref, (src, dst),
                2 * 2 * m * n, "GB/s", "copy"),
        compare("transpose_copy fp8", shape, tk.transpose_copy, copy_ref, (src8, dst8),
                2 * m * n, "GB/s", "copy"),
        compare("transpose_add bf16", f"({n}, {m})^T + ({m}, {n})", tk.transpose_add,
                lambda s, d: d.add_(s.t()), (embed_grad, head_grad), 3 * 2 * m * n, "GB/s", "copy"),
    ]


def case_index_add_rows(tk, tables, T, V, d):
    # token ids with a Zipf-like law, as in text: a few ids take a large share of the positions
    index = torch.multinomial(1.0 / (torch.arange(V, device=DEVICE) + 10.0), T, replacement=True)
    out = torch.zeros(tables, V, d, device=DEVICE)
    src = torch.randn(tables, T, d, device=DEVICE)
    return compare("index_add_rows (fp32)", f"({tables}, {T}, {d}) into ({tables}, {V}, {d})",
                   tk.index_add_rows, lambda out, index, src: out.index_add_(1, index, src), (out, index, src),
                   4 * tables * T * d, "GB/s", "copy", "bytes: src rows read (Zipf-like index)")


def polar_express_kernels(tk, G):
    """Tall form with the kernels, as train_gpt runs it: A = X^T X, B = b A + c A A, and
    X = a X + X B in one GEMM with the add in its epilogue."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    A = X.new_empty(X.shape[0], X.shape[2], X.shape[2])
    B = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        tk.XTX(X, A)
        tk.ba_plus_cAA(A, c, b, B)
        X = tk.polar_update_tall(X, B, a, torch.empty_like(X))
    return X


def polar_express_torch(G):
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X.mT @ X
        B = b * A + c * (A @ A)
        X = a * X + X @ B
    return X


def symmetric_bf16(batch, n):
    x = torch.randn(batch, n, n, device=DEVICE)
    return ((x + x.mT) / 64).bfloat16()


def case_polar_update(tk, batch, m, n):
    X, B = randn_bf16(batch, m, n), symmetric_bf16(batch, n)
    out = torch.empty_like(X)
    a = POLAR_EXPRESS_COEFFS[1][0]
    return compare("polar_update_tall", f"({batch}, {m}, {n}) tall",
                   lambda X, B: tk.polar_update_tall(X, B, a, out), lambda X, B: a * X + X @ B, (X, B),
                   2 * batch * m * n * n, "TFLOP/s", "bf16", "a X + X B, the add in the GEMM epilogue")


def case_polar_express(tk, batch, m, n):
    G = torch.randn(batch, m, n, device=DEVICE)
    ours = torch.compile(lambda G: polar_express_kernels(tk, G), fullgraph=True)
    compiled = torch.compile(polar_express_torch, fullgraph=True)
    flops = 5 * batch * (4 * m * n * n + 2 * n ** 3)
    return measure("Polar Express, 5 steps (compiled)", f"({batch}, {m}, {n}) tall",
                   lambda: ours(G), lambda: polar_express_torch(G), lambda: compiled(G),
                   flops, "TFLOP/s", "bf16", "FLOPs: full-GEMM count; target >= 1.3x")


def gram_config_sweep(tk) -> list[str]:
    """GPU-only microseconds of every Gram tiling at the optimizer's shapes, and cuBLAS's."""
    x = torch.randn(5, 768, 768, device=DEVICE)
    sym5 = ((x + x.mT) / 64).bfloat16()
    cases = [   # (label, A, out, transposed, add_beta_a, PyTorch form)
        ("XXT (5, 768, 768)", randn_bf16(5, 768, 768), False, False, lambda A: A @ A.mT),
        ("XTX (3, 3072, 768)", randn_bf16(3, 3072, 768), True, False, lambda A: A.mT @ A),
        ("XTX (24, 3072, 768)", randn_bf16(24, 3072, 768), True, False, lambda A: A.mT @ A),
        ("ba_plus_cAA (5, 768, 768)", sym5, False, True, lambda A: torch.baddbmm(A, A, A, beta=-2.0, alpha=0.5)),
        ("ba_plus_cAA (3, 768, 768)", sym5[:3].contiguous(), False, True,
         lambda A: torch.baddbmm(A, A, A, beta=-2.0, alpha=0.5)),
    ]
    lines = ["| tiling | " + " | ".join(case[0] for case in cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for config in [*tk._GRAM_CONFIGS, None]:
        cells = []
        for _, A, transposed, add_beta_a, reference in cases:
            size = A.shape[-1] if transposed else A.shape[-2]
            out = A.new_empty(A.shape[0], size, size)
            if config is None:
                t = bench_gpu(lambda: reference(A))
            else:
                t = bench_gpu(lambda: tk._symmetric_gram(A, out, transposed, 0.5, -2.0, add_beta_a, config=config))
            cells.append("n/a" if t is None else f"{t * 1e3:.1f}")
        label = ("PyTorch (cuBLAS, full product)" if config is None else
                 f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}, BLOCK_R {config.kwargs['BLOCK_R']}, "
                 f"{config.num_warps} warps, {config.num_stages} stages")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def tiling_label(t: dict, used: dict) -> str:
    return (f"{t['BLOCK_M']}x{t['BLOCK_N']}, BLOCK_K {t['BLOCK_K']}, {t['num_warps']} warps, "
            f"{t['num_stages']} stages" + (", flattened" if t["FLATTEN"] else "")
            + (f", {t['PROGRAMS_PER_SM']} programs per SM" if t.get("PROGRAMS_PER_SM", 1) > 1 else "")
            + (", warp-specialised" if t.get("WARP_SPECIALIZE") else "")
            + (" (used)" if used is t else ""))


def polar_update_tiling_sweep(tk) -> list[str]:
    """GPU-only microseconds of every tiling of the fused Polar Express update, and of PyTorch's
    forms: the compiled a X + X B, and cuBLAS's product X B alone (a floor without the add)."""
    a = POLAR_EXPRESS_COEFFS[1][0]
    cases = [(randn_bf16(count, 3072, 768), symmetric_bf16(count, 768)) for count in (3, 24)]
    compiled = torch.compile(lambda X, B: a * X + X @ B)
    lines = ["| tiling | " + " | ".join(f"{tuple(X.shape)}" for X, _ in cases) + " |",
             "|---" * (len(cases) + 1) + "|"]
    rows = [(tiling_label(t, tk._GEMM_TILES),
             lambda X, B, out, t=t: tk._polar_update_tall(X, B, a, out, t)) for t in tk._GEMM_TILINGS]
    rows += [("PyTorch a X + X B, torch.compile", lambda X, B, out: compiled(X, B)),
             ("PyTorch X @ B alone (cuBLAS, no add)", lambda X, B, out: torch.matmul(X, B, out=out))]
    for label, fn in rows:
        cells = []
        for X, B in cases:
            out = torch.empty_like(X)
            t = bench_gpu(lambda: fn(X, B, out))
            cells.append("n/a" if t is None else f"{t * 1e3:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def mlp_tiling_sweep(tk) -> list[str]:
    """GPU-only microseconds of every tiling of the MLP's fused GEMMs (forward: post; backward:
    d_pre) at the stage-1 and stage-3 micro-batches, and of cuBLAS's x @ W1^T alone (a floor)."""
    d, hidden = 768, 3072
    W1 = small_weight_bf16(hidden, d)
    W2 = small_weight_bf16(hidden, d)
    Ts = (16384, 49152)
    inputs = {T: (randn_bf16(T, d), randn_bf16(T, d), randn_bf16(T, hidden), randn_bf16(T, hidden))
              for T in Ts}
    lines = []
    for epilogue, name in ((tk.RELU2_FORWARD, "forward"), (tk.RELU2_BACKWARD, "backward")):
        lines += [f"| {name} tiling | " + " | ".join(f"T={T}" for T in Ts) + " |",
                  "|---" * (len(Ts) + 1) + "|"]
        for t in tk._GEMM_TILINGS:
            cells = []
            for T in Ts:
                x, dY, post, d_pre = inputs[T]
                args = (x, W1, post, post) if epilogue is tk.RELU2_FORWARD else (dY, W2, d_pre, post)
                ms = bench_gpu(lambda: tk._launch_gemm_epilogue(*args, epilogue, tiles=t))
                cells.append("n/a" if ms is None else f"{ms * 1e3:.1f}")
            lines.append(f"| {tiling_label(t, tk._GEMM_TILES)} | " + " | ".join(cells) + " |")
        cells = []
        for T in Ts:
            ms = bench_gpu(lambda: inputs[T][0] @ W1.t())
            cells.append("n/a" if ms is None else f"{ms * 1e3:.1f}")
        lines += ["| PyTorch x @ W1^T alone (cuBLAS, no epilogue) | " + " | ".join(cells) + " |", ""]
    return lines


def fp8_mlp_tiling_sweep(tk, d=768, hidden=3072, Ts=(16384, 49152)) -> list[str]:
    """GPU-only microseconds of every tiling of #89's two FP8 GEMMs (forward: post, post8 and
    their maxima; down: out = post8 W2_8t^T), of #84's forward (post alone, from the same
    e4m3 operands: what the second output and the maxima cost), of #344's backward (d_pre and
    its maximum from e5m2 dY and e4m3 c_proj) and of --fp8_mlp_grad_bound's (d_pre and d_pre8 at
    a given scale) at the stage-1 and stage-3 micro-batches, and of cuBLAS's scaled matmul of the
    same operands (a floor)."""
    W1_8, _ = tk.quantize_e4m3(small_weight_bf16(hidden, d))
    W2_8, _ = tk.quantize_e4m3(small_weight_bf16(hidden, d))
    W2_8t, _ = tk.quantize_e4m3(small_weight_bf16(d, hidden))
    one, act_scale = torch.ones(1, device=DEVICE), torch.tensor([0.02], device=DEVICE)
    lines = []
    for name in ("forward (RELU2_FP8_FORWARD)", "#84 forward (RELU2_FORWARD, e4m3)", "down (STORE)",
                 "backward (RELU2_BACKWARD_MAX, e5m2 x e4m3)",
                 "backward with d_pre8 (RELU2_BACKWARD_FP8, e5m2 x e4m3)"):
        lines += [f"| {name} tiling | " + " | ".join(f"T={T}" for T in Ts) + " |",
                  "|---" * (len(Ts) + 1) + "|"]
        calls = {}
        for T in Ts:
            x8 = randn_bf16(T, d).to(torch.float8_e4m3fn)
            post = torch.empty(T, hidden, dtype=torch.bfloat16, device=DEVICE)
            post8 = randn_bf16(T, hidden).abs().to(torch.float8_e4m3fn)
            out = torch.empty(T, d, dtype=torch.bfloat16, device=DEVICE)
            if name.startswith("#84"):
                calls[T] = (lambda t, x8=x8, post=post: tk._launch_gemm_epilogue(
                    x8, W1_8, post, post, tk.RELU2_FORWARD, scale=one, tiles=t), lambda x8=x8:
                    torch._scaled_mm(x8, W1_8.t(), scale_a=one, scale_b=one,
                                     out_dtype=torch.bfloat16, use_fast_accum=True))
            elif name.startswith("forward"):
                calls[T] = (lambda t, x8=x8, post=post, post8=post8: tk._launch_gemm_epilogue(
                    x8, W1_8, post, post8, tk.RELU2_FP8_FORWARD, scale=one, fp8_scale=act_scale,
                    tiles=t), lambda x8=x8: torch._scaled_mm(
                    x8, W1_8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                    use_fast_accum=True))
            elif name.startswith("down"):
                calls[T] = (lambda t, post8=post8, out=out: tk._launch_gemm_epilogue(
                    post8, W2_8t, out, out, tk.STORE, scale=one, tiles=t), lambda post8=post8:
                    torch._scaled_mm(post8, W2_8t.t(), scale_a=one, scale_b=one,
                                     out_dtype=torch.bfloat16, use_fast_accum=True))
            else:
                g8 = randn_bf16(T, d).to(torch.float8_e5m2)
                post.copy_(randn_bf16(T, hidden).abs())
                d_pre8 = torch.empty(T, hidden, dtype=torch.float8_e5m2, device=DEVICE)
                epilogue = tk.RELU2_BACKWARD_FP8 if "d_pre8" in name else tk.RELU2_BACKWARD_MAX
                calls[T] = (lambda t, g8=g8, post=post, d_pre8=d_pre8, e=epilogue:
                            tk._launch_gemm_epilogue(g8, W2_8, torch.empty_like(post), post, e,
                                                     scale=one, fp8_scale=act_scale, out8=d_pre8,
                                                     tiles=t), lambda g8=g8: torch._scaled_mm(
                    g8, W2_8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                    use_fast_accum=True))
        for t in tk._FP8_GEMM_TILINGS:
            cells = []
            for T in Ts:
                ms = bench_gpu(lambda: calls[T][0](t))
                cells.append("n/a" if ms is None else f"{ms * 1e3:.1f}")
            lines.append(f"| {tiling_label(t, tk._FP8_GEMM_TILES)} | " + " | ".join(cells) + " |")
        cells = []
        for T in Ts:
            ms = bench_gpu(calls[T][1])
            cells.append("n/a" if ms is None else f"{ms * 1e3:.1f}")
        lines += ["| cuBLAS scaled_mm alone (no epilogue) | " + " | ".join(cells) + " |", ""]
    return lines


def each_setting(tk, name: str, candidates):
    """Set triton_kernels.<name> to each candidate in turn, yielding its label ("(used)" after
    the one the trainer uses), and restore the trainer's value afterwards."""
    used = getattr(tk, name)
    try:
        for value in candidates:
            setattr(tk, name, value)
            label = (", ".join(f"{key} {v}" for key, v in value.items())
                     if isinstance(value, dict) else str(value))
            yield label + (" (used)" if value == used else "")
    finally:
        setattr(tk, name, used)


def us_cell(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


DC_TILINGS = [dict(BLOCK=16, num_warps=w, num_stages=s)
              for w, s in ((8, 2), (8, 1), (8, 3), (4, 1), (4, 3))]


def dc_attention_tiling_sweep(tk, T=49152, H=6, hd=128, window=112) -> list[str]:
    """GPU-only microseconds of dc_attention's forward + backward at every candidate for
    triton_kernels._DC_TILES (layer 10's shapes, documents of about 400 tokens)."""
    q, k, v = (randn_bf16(T, H, hd).requires_grad_() for _ in range(3))
    w1, w2 = (randn_bf16(T, H).requires_grad_() for _ in range(2))
    cu = torch.cat([torch.arange(0, T, 400, device=DEVICE, dtype=torch.int32),
                    torch.tensor([T], device=DEVICE, dtype=torch.int32)])
    leaves = (q, k, v, w1, w2)
    run = fwd_bwd(lambda q, k, v, w1, w2: tk.dc_attention(q, k, v, cu, 0.12, w1, w2,
                                                          window=window),
                  leaves, leaves, randn_bf16(T, H, hd))
    lines = ["| tiling | fwd + bwd us |", "|---|---|"]
    for label in each_setting(tk, "_DC_TILES", DC_TILINGS):
        lines.append(f"| {label} | {us_cell(bench_gpu(run))} |")
    return lines


# (name, tokens per micro-batch, short window, longest document) of stage 3 and stage 1
ATTENTION_STAGES = (("stage 3", 49152, 640, 2048), ("stage 1", 16384, 128, 896))


def attention_tiling_sweep(tk, H=6, hd=128, stages=ATTENTION_STAGES) -> list[str]:
    """GPU-only microseconds of windowed_attention's forward and forward + backward at every
    candidate for triton_kernels._ATTENTION_TILES, at the short windows and documents of stages 3
    and 1, and torch's flash attention beside them."""
    shapes = []
    for _, T, window, longest in stages:
        leaves = [randn_bf16(T, H, hd).requires_grad_() for _ in range(3)]
        shapes.append((attention_batch(T, longest=longest), window, leaves, randn_bf16(T, H, hd)))
    lines = ["| tiling | " + " | ".join(f"{name} ({T} tokens, window {window}): fwd us | fwd + bwd us"
                                        for name, T, window, _ in stages) + " |",
             "|---|" + "---|---|" * len(stages)]

    def row(label, attend):
        cells = []
        for cu, window, leaves, dY in shapes:
            fn = attend(cu, window)
            with torch.no_grad():
                cells.append(us_cell(bench_gpu(lambda: fn(*leaves))))
            cells.append(us_cell(bench_gpu(fwd_bwd(fn, leaves, leaves, dY))))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    row("flash attention (varlen_attn)", flash_attention)
    for label in each_setting(tk, "_ATTENTION_TILES", tk._ATTENTION_TILINGS):
        row(label, lambda cu, window: lambda q, k, v: tk.windowed_attention(q, k, v, cu, window,
                                                                              0.12))
    return lines


QK_PREP_TILINGS = [dict(BLOCK_T=t, num_warps=w) for t in (8, 16, 32) for w in (4, 8)]


def qk_prep_tiling_sweep(tk, T=49152, H=6, w=96, width=128) -> list[str]:
    """GPU-only microseconds of qk_prep's forward + backward at every candidate for
    triton_kernels._QK_PREP_TILES, on a plain layer with the key offset and on a paired one."""
    import train_gpt as tg
    rotary = tg.Rotary(w, 2 * T).to(DEVICE)
    rotary.reset()
    q, k = (randn_bf16(T, H, w).requires_grad_() for _ in range(2))
    grad = randn_bf16(T, H, width)   # viewed as each layer's output: (2T, H/2, width) if paired
    layers = {"plain, key offset": (False, True), "paired": (True, False)}
    lines = ["| tiling | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for label in each_setting(tk, "_QK_PREP_TILES", QK_PREP_TILINGS):
        cells = []
        for paired, key_offset in layers.values():
            def fwd_bwd_once(paired=paired, key_offset=key_offset):
                out = tk.qk_prep(q, k, rotary.cos, rotary.sin, paired, key_offset, width)
                return torch.autograd.grad(out, (q, k), [grad.view_as(t) for t in out])
            cells.append(us_cell(bench_gpu(fwd_bwd_once)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def launch_overhead_sweep(tk) -> list[str]:
    """Host microseconds per call of each piece of a Triton GEMM launch and of comparable PyTorch
    launches, at shapes so small that the GPU never limits: where the host time of the kernels'
    custom ops goes (stage 1's steps are short enough for it to show)."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def one_pointer_kernel(x_ptr):
        tl.store(x_ptr, 1.0)

    a8 = randn_bf16(128, 768).to(torch.float8_e4m3fn)
    b8 = randn_bf16(256, 768).to(torch.float8_e4m3fn)
    out = torch.empty(128, 256, dtype=torch.bfloat16, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    q = randn_bf16(64, 6, 96)
    rotary_table = randn_bf16(128, 96)
    pieces = {
        "aten mul_ on one element": lambda: one.mul_(1.0),
        "torch.empty, one element": lambda: torch.empty(1, device=DEVICE),
        "current_stream().query()": lambda: torch.cuda.current_stream(DEVICE).query(),
        "TensorDescriptor.from_tensor x4": lambda: [TensorDescriptor.from_tensor(t, [128, 64])
                                                    for t in (a8, b8, out, out)],
        "Triton launch, one pointer": lambda: one_pointer_kernel[(1,)](one),
        "GEMM kernel launch (_launch_gemm_epilogue, STORE)": lambda: tk._launch_gemm_epilogue(
            a8, b8, out, out, tk.STORE, scale=one),
        "the same through its custom op (fp8_linear)": lambda: tk._fp8_linear_op(a8, b8, one),
        "cuBLAS _scaled_mm, same operands": lambda: torch._scaled_mm(
            a8, b8.t(), scale_a=one.reshape(()), scale_b=one.reshape(()),
            out_dtype=torch.bfloat16, use_fast_accum=True),
        "qk_prep forward custom op (T=64)": lambda: torch.ops.nanogpt_triton.qk_prep_forward(
            q, q, rotary_table, rotary_table, False, True, 128),
    }
    lines = ["| piece | host us per call |", "|---|---|"]
    for name, fn in pieces.items():
        lines.append(f"| {name} | {host_us(fn, calls=200):.1f} |")
    return lines


def exact_max_sweep(tk, T=49152, d=768, H=6, w=96) -> list[str]:
    """The largest |value| behind an exact FP8 scale, compiled with what makes the tensor, in two
    forms of the same value: one maximum over the flattened tensor, and triton_kernels'
    largest_magnitude (each row's maximum, then theirs). GPU-only microseconds."""
    dq, dk = randn_bf16(T, H * w), randn_bf16(T, H * w)
    dv, e, y = randn_bf16(T, d), randn_bf16(T, d), randn_bf16(T, d)
    producers = {
        "packed QKV gradient: cat(dq, dk, dv + e)": lambda: torch.cat([dq, dk, dv + e], 1),
        "MLP input: rms_norm(y)": lambda: torch.nn.functional.rms_norm(y, (d,)),
    }
    forms = (lambda t: t.abs().amax(), tk.largest_magnitude)

    def tensor_and_max(make, largest):   # the model keeps the tensor too (its GEMMs read it)
        t = make()
        return t, largest(t)

    lines = ["| tensor | one maximum, flattened (us) | rows first (us) | ratio |", "|---|---|---|---|"]
    for name, make in producers.items():
        times = []
        for largest in forms:
            fn = torch.compile(functools.partial(tensor_and_max, make, largest))
            fn()
            times.append(bench_gpu(fn))
        ratio = "n/a" if None in times else f"{times[1] / times[0]:.2f}"
        lines.append(f"| {name} | {us_cell(times[0])} | {us_cell(times[1])} | {ratio} |")
    return lines


PAIRWISE_TILINGS = [   # candidates for triton_kernels._PAIRWISE_TILES
    dict(PAIR_BLOCK=8, forward=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dw=dict(BLOCK_T=64, BLOCK_N=128, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=64, BLOCK_D=64, FLATTEN=True, num_warps=8, num_stages=3)),
    dict(PAIR_BLOCK=8, forward=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dw=dict(BLOCK_T=64, BLOCK_N=128, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=64, BLOCK_D=64, FLATTEN=False, num_warps=8, num_stages=3)),
    dict(PAIR_BLOCK=8, forward=dict(BLOCK_T=128, BLOCK_N=256, num_warps=8, num_stages=3),
         dw=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=128, BLOCK_D=64, FLATTEN=True, num_warps=8, num_stages=3)),
    dict(PAIR_BLOCK=16, forward=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dw=dict(BLOCK_T=64, BLOCK_N=64, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=64, BLOCK_D=32, FLATTEN=True, num_warps=8, num_stages=2)),
    # pair tiles two at a time: K 128 in the forward, dW reading dY 28 times at r = 79 against 55
    dict(PAIR_BLOCK=8, forward=dict(BLOCK_T=128, BLOCK_N=128, GROUP=2, num_warps=8, num_stages=3),
         dw=dict(BLOCK_T=64, BLOCK_N=128, GROUP=2, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=64, BLOCK_D=64, FLATTEN=True, num_warps=8, num_stages=3)),
    # 256 products a tile: dW and dh read dY once per pair tile, 15 times at r = 79 against 55
    dict(PAIR_BLOCK=16, forward=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=2),
         dw=dict(BLOCK_T=64, BLOCK_N=128, num_warps=8, num_stages=2),
         dh=dict(BLOCK_T=64, BLOCK_D=64, FLATTEN=True, num_warps=8, num_stages=2)),
    dict(PAIR_BLOCK=16, forward=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=2),
         dw=dict(BLOCK_T=32, BLOCK_N=128, num_warps=8, num_stages=3),
         dh=dict(BLOCK_T=32, BLOCK_D=64, FLATTEN=True, num_warps=4, num_stages=3)),
]


def pairwise_parts_sweep(tk, T=49152, d=768, ranks=(79, 110)) -> list[str]:
    """GPU-only microseconds of each piece of the pairwise MLP's forward + backward at the
    trainer's tiling and the stage-3 micro-batch, with the rate of the three pair-tile kernels
    (the tiles' padding products counted, so the rate is what the tensor cores ran): where the
    layer's time goes."""
    dY = randn_bf16(T, d)
    x = randn_bf16(T, d).requires_grad_()
    block = tk._pairwise_tiles()["PAIR_BLOCK"]
    lines = ["| piece | " + " | ".join(f"r={r} us" for r in ranks) + " | pair-tile TFLOP/s, r="
             + " / ".join(map(str, ranks)) + " |", "|---" * (len(ranks) + 2) + "|"]
    rows = {}
    for r in ranks:
        U = small_weight_bf16(r, d).requires_grad_()
        W = small_weight_bf16(tk.pair_count(r), d).requires_grad_()
        h = torch.relu(x.detach() @ tk._pairwise_padded(U.detach()).t())
        blocks = h.shape[1] // block
        tile_flops = 2 * T * tk.pair_count(blocks) * block * block * d    # one pair-tile GEMM
        pieces = {
            "features h = relu(x U^T)": (lambda: torch.relu(x @ tk._pairwise_padded(U).t()), 0),
            "forward kernel (y = q W)": (lambda: tk._pairwise_forward_op(h, W, r), tile_flops),
            "backward kernels (dh, dW)": (lambda: tk._pairwise_backward_op(dY, h, W, r),
                                          2 * tile_flops),
            "whole layer, fwd + bwd (autograd)": (fwd_bwd(tk.pairwise_mlp, (x, U, W), (x, U, W),
                                                          dY), 0),
        }
        for name, (fn, flops) in pieces.items():
            ms = bench_gpu(fn)
            rate = f"{flops / (ms * 1e-3) / 1e12:.0f}" if ms and flops else "-"
            rows.setdefault(name, []).append((us_cell(ms), rate))
    for name, cells in rows.items():
        rates = " / ".join(rate for _, rate in cells)
        lines.append(f"| {name} | " + " | ".join(us for us, _ in cells) + f" | {rates} |")
    return lines


def fp8_gemm_backend_sweep(tk, T=16384, d=768, hidden=3072, H=6, w=96) -> list[str]:
    """Each backend of the FP8 GEMMs without an epilogue (triton_kernels._FP8_GEMM) in the ops
    that use them, forward + backward: GPU-only microseconds and host microseconds per call."""
    x, dY = randn_bf16(T, d).requires_grad_(), randn_bf16(T, d)
    W1, W2 = (small_weight_bf16(hidden, d).requires_grad_() for _ in range(2))
    n = 2 * H * w + d
    Wqkv, dQKV = small_weight_bf16(n, d).requires_grad_(), randn_bf16(T, n)
    lam = torch.tensor([0.7], device=DEVICE, requires_grad=True)
    mlp_weights = tk.FP8MLPWeights(*e4m3_layouts(tk, W1), *e4m3_layouts(tk, W2))
    W8, W8t, w_scale = e4m3_layouts(tk, Wqkv)
    act_scale = torch.tensor([0.02], device=DEVICE)
    mlp = (x, W1, W2)
    ops = {
        "#89 MLP": fwd_bwd(lambda x, W1, W2: tk.linear_relu_square_fp8(
            x, W1, W2, mlp_weights.W2_8t, mlp_weights.w2_scale, act_scale)[0], mlp, mlp, dY),
        "#344 MLP": fwd_bwd(lambda x, W1, W2: tk.linear_relu_square_fp8_backward(
            x, W1, W2, mlp_weights, act_scale)[0], mlp, mlp, dY),
        "packed QKV": fwd_bwd(lambda x, W, lam: tk.packed_qkv_fp8(x, W, lam, W8, W8t, w_scale),
                              (x, Wqkv, lam), (x, Wqkv, lam), dQKV),
    }
    lines = [f"| backend (T={T}) | " + " | ".join(f"{name} GPU us | host us" for name in ops) + " |",
             "|---" * (2 * len(ops) + 1) + "|"]
    for label in each_setting(tk, "_FP8_GEMM", tk.FP8_GEMM_BACKENDS):
        cells = []
        for fn in ops.values():
            cells += [us_cell(bench_gpu(fn)), f"{host_us(fn):.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def pairwise_tiling_sweep(tk) -> list[str]:
    """GPU-only microseconds of the pairwise MLP's forward + backward for each candidate tiling,
    at r = 79 and 110 and the stage-3 micro-batch."""
    T, d = 49152, 768
    x, dY = randn_bf16(T, d).requires_grad_(), randn_bf16(T, d)
    ranks = (79, 110)
    lines = ["| tiling | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" * (len(ranks) + 1) + "|"]
    for label in each_setting(tk, "_PAIRWISE_TILES", PAIRWISE_TILINGS):
        cells = []
        for r in ranks:
            U = randn_bf16(r, d, scale=1 / 32).requires_grad_()
            W = randn_bf16(tk.pair_count(r), d, scale=1 / 32).requires_grad_()
            cells.append(us_cell(bench_gpu(fwd_bwd(tk.pairwise_mlp, (x, U, W), (x, U, W), dY))))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


PAIR_KERNEL_TILINGS = [
    dict(products=dict(BLOCK_T=p, num_warps=pw), contract=dict(BLOCK_T=c, num_warps=cw))
    for (p, pw), (c, cw) in (((32, 4), (32, 4)), ((64, 4), (32, 4)), ((32, 4), (16, 4)),
                             ((128, 8), (64, 8)), ((64, 8), (32, 8)), ((128, 4), (16, 2)))]


def pairwise_gemm_sweep(tk, T=49152, d=768, ranks=(79, 110)) -> list[str]:
    """The cuBLAS form of the pairwise MLP at the stage-3 micro-batch: its two pair kernels at
    each candidate tiling (GPU-only microseconds, and GB/s of the bytes they must move), then the
    layer piece by piece at the trainer's tiling."""
    x, dY = randn_bf16(T, d).requires_grad_(), randn_bf16(T, d)
    lines = ["| tiling | " + " | ".join(f"pair_products r={r} | pair_contract r={r}" for r in ranks)
             + " |", "|---" * (2 * len(ranks) + 1) + "|"]
    inputs = {}
    for r in ranks:
        width = -(-r // 8) * 8      # as _pairwise_padded pads on a GPU
        h = torch.relu(randn_bf16(T, width))
        h[:, r:] = 0
        inputs[r] = (h, randn_bf16(T, tk._aligned_pair_width(r)))    # G as the layer pads it

    def cell(ms, nbytes):
        return "n/a" if ms is None else f"{ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s"

    for label in each_setting(tk, "_PAIR_KERNEL_TILES", PAIR_KERNEL_TILINGS):
        cells = []
        for r, (h, G) in inputs.items():
            q_bytes, h_bytes = 2 * T * tk.pair_count(r), 2 * h.numel()
            q_width = tk._aligned_pair_width(r)
            cells.append(cell(bench_gpu(lambda: tk.pair_products(h, r, q_width)),
                              2 * T * q_width + h_bytes))
            cells.append(cell(bench_gpu(lambda: tk.pair_contract(G, h, r)),
                              q_bytes + h_bytes + 2 * h_bytes))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| piece (trainer's tiling) | " + " | ".join(f"r={r} us" for r in ranks) + " |",
              "|---" * (len(ranks) + 1) + "|"]
    rows = {}
    for r, (h, G) in inputs.items():
        U = small_weight_bf16(r, d).requires_grad_()
        W = small_weight_bf16(tk.pair_count(r), d).requires_grad_()
        U_padded = tk._pairwise_padded(U.detach())
        q_width = tk._aligned_pair_width(r)
        W_padded = tk._rows_padded(W.detach(), q_width)
        q = tk.pair_products(h, r, q_width)
        pieces = {
            "h = relu(x U^T), U padded to 8 rows": lambda: torch.relu(x.detach() @ U_padded.t()),
            "pair_products (q written, rows padded to 8 columns)":
                lambda: tk.pair_products(h, r, q_width),
            "y = q W (cuBLAS)": lambda: q @ W_padded,
            "G = dY W^T (cuBLAS)": lambda: dY @ W_padded.t(),
            "dW = q^T dY (cuBLAS)": lambda: q.t() @ dY,
            "pair_contract (dh)": lambda: tk.pair_contract(G, h, r),
            "whole layer, fwd + bwd (compiled)": fwd_bwd(torch.compile(tk.pairwise_mlp_gemm),
                                                         (x, U, W), (x, U, W), dY),
        }
        for name, fn in pieces.items():
            rows.setdefault(name, []).append(us_cell(bench_gpu(fn)))
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return lines


# =================================================================================================
# Main
# =================================================================================================

def autotune_choices(tk) -> list[str]:
    lines = []
    for name in ("_symmetric_gram_tuned",):
        for key, config in getattr(tk, name).cache.items():
            lines.append(f"- {name.strip('_')} {key}: {config}")
    return lines


CASES = {   # name: the call that times it at the speedrun shapes
    "xxt": lambda tk: case_xxt(tk, 5, 768, 768),
    "xtx": lambda tk: case_xtx(tk, 3, 3072, 768),
    "ba_plus_caa_5": lambda tk: case_ba_plus_caa(tk, 5, 768),
    "ba_plus_caa_3": lambda tk: case_ba_plus_caa(tk, 3, 768),
    "polar_update": lambda tk: case_polar_update(tk, 3, 3072, 768),
    "polar_express": lambda tk: case_polar_express(tk, 3, 3072, 768),
    "mlp": lambda tk: case_mlp(tk, 16384, 768, 3072),
    "mlp_fp8": lambda tk: case_mlp_fp8(tk, 16384, 768, 3072),
    "qkv_fp8": lambda tk: case_qkv_fp8(tk, 49152, 768, 6, 96),
    "qk_prep": lambda tk: case_qk_prep(tk, 49152, 6, 96, 128),
    "cross_entropy": lambda tk: case_cross_entropy(tk, 16384, 768, 50304),
    "transposes": lambda tk: case_transposes(tk, 768, 50304),
    "index_add_rows": lambda tk: case_index_add_rows(tk, 5, 49152, 50304, 768),
    "dc_attention": lambda tk: case_dc_attention(tk, 49152, 6, 128, 112),
    "attention": lambda tk: case_attention(tk, 49152, 6, 128, 640),
    "pairwise": lambda tk: case_pairwise(tk, 49152, 768, (79, 110), 3072),   # an experiment
}
GPU_ONLY = ", GPU-only microseconds (CUDA-graph replay)"
SWEEPS = {   # name: (title, the call that runs it)
    "gram": ("Gram kernel tilings" + GPU_ONLY, gram_config_sweep),
    "polar_update": ("Polar Express update (polar_update_tall) tilings" + GPU_ONLY,
                     polar_update_tiling_sweep),
    "mlp": ("MLP GEMM (linear_relu_square) tilings" + GPU_ONLY, mlp_tiling_sweep),
    "mlp_fp8": ("FP8 MLP GEMMs (#84, #89) tilings" + GPU_ONLY, fp8_mlp_tiling_sweep),
    "fp8_gemm": ("FP8 GEMMs without an epilogue: cuBLAS or Triton, in the ops that use them; "
                 "GPU-only (CUDA-graph replay) and host microseconds", fp8_gemm_backend_sweep),
    "pairwise": ("Pairwise MLP (pairwise_mlp) tilings, forward + backward" + GPU_ONLY,
                 pairwise_tiling_sweep),
    "pairwise_parts": ("Pairwise MLP (pairwise_mlp) piece by piece, r = 79 and 110" + GPU_ONLY,
                       pairwise_parts_sweep),
    "pairwise_gemm": ("Pairwise MLP, cuBLAS form (pairwise_mlp_gemm): its pair kernels' tilings, "
                      "and the layer piece by piece" + GPU_ONLY, pairwise_gemm_sweep),
    "qk_prep": ("Q/K preparation (qk_prep) tilings, forward + backward" + GPU_ONLY,
                qk_prep_tiling_sweep),
    "dc_attention": ("Composed attention (dc_attention) tilings, forward + backward" + GPU_ONLY,
                     dc_attention_tiling_sweep),
    "attention": ("Windowed attention (windowed_attention) tilings against flash attention, "
                  "the short windows of stages 3 and 1" + GPU_ONLY, attention_tiling_sweep),
    "launch": ("Host time of a kernel launch, piece by piece", launch_overhead_sweep),
    "exact_max": ("The maximum behind an exact FP8 scale, compiled with its producer" + GPU_ONLY,
                  exact_max_sweep),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "records", "kernels"))
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES),
                        help="the kernels to time (default: all)")
    parser.add_argument("--sweeps", nargs="*", choices=sorted(SWEEPS), default=list(SWEEPS),
                        help="the tiling sweeps to run (default: all; none with no names)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the tiling sweeps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the kernels' speed is only meaningful there); none found.")
    import triton
    import triton_kernels as tk

    torch.backends.cuda.matmul.allow_tf32 = False
    ceilings = measure_ceilings()
    print(f"measured ceilings: {ceilings}", flush=True)
    rows = []
    for name in args.cases:
        try:
            results = CASES[name](tk)
        except Exception:   # keep the other rows; the error goes into the table
            traceback.print_exc()
            rows.append(f"| {name} failed: {traceback.format_exc(limit=1).splitlines()[-1]} |")
            continue
        for result in results if isinstance(results, list) else [results]:
            rows.append(result.row(ceilings))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()

    sweeps = []
    for name in [] if args.no_sweeps else args.sweeps:
        title, sweep_fn = SWEEPS[name]
        try:
            lines = sweep_fn(tk)
        except Exception:
            traceback.print_exc()
            lines = ["(sweep failed)"]
        print("\n".join(lines), flush=True)
        sweeps += [f"{title}:", "", *lines, ""]

    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    command = "python3 records/bench_kernels.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"# triton_kernels.py benchmark: {device}, {date}",
        "",
        f"Commit {git_commit()}, torch {torch.__version__}, Triton {triton.__version__}. "
        f"Command: `{command.strip()}`.",
        "",
        "'ours', 'eager', 'torch.compile': median of do_bench (L2 flushed between launches, host "
        "launch cost included where it exceeds the GPU time). 'GPU-only': median of CUDA-graph "
        "replays (no host cost, warm L2); achieved throughput is computed from it. 'host us/call': "
        "Python + dispatch + launch time of one call of ours. Speedups: best of eager / compiled "
        f"PyTorch over ours. Ceilings, measured in this run: bf16 matmul {ceilings.bf16_tflops:.0f} "
        f"TFLOP/s, FP8 matmul {ceilings.fp8_tflops:.0f} TFLOP/s (8192^3, random data), device copy "
        f"{ceilings.copy_gbps:.0f} GB/s (4 GiB, bytes read + written).",
        "",
        HEADER, *rows,
        "",
        *sweeps,
        "Autotuner choices:",
        *autotune_choices(tk),
        "",
    ])
    print("\n" + report)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{device.replace(' ', '_')}_{date}.md")
    with open(path, "w") as f:
        f.write(report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
