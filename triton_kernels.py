"""Triton kernels of the speedrun, each beside a plain PyTorch statement of the same math.

  1. XXT            C = A A^T           symmetric Gram matrix (Polar Express, wide/square matrices)
  2. XTX            C = A^T A           symmetric Gram matrix (Polar Express, tall matrices)
  3. ba_plus_cAA    C = alpha A A^T + beta A, A symmetric (Polar Express: B = b A + c A A)
  4. linear_relu_square   relu(x W1^T)^2 W2 with the activation and its derivative fused into
                          the GEMM epilogues (every MLP), autograd function; and
     linear_relu_square_fp8_up   the same with its up-projection in e4m3 in the forward (#84)
     linear_relu_square_fp8      and with its down-projection in e4m3 too, at given (delayed)
                                 scales (#89)
     linear_relu_square_fp8_backward   and with the backward's data gradients in FP8 too (e5m2
                                 gradients times the weights' stored e4m3 copies)
     polar_update_tall    a X + X B for tall X, symmetric B (Polar Express step), the same GEMM
                          with an a X epilogue
  5. softcapped_mtp_cross_entropy   soft-capped multi-token cross entropy over an FP8 LM head,
                          autograd function; its row kernel (loss and logits gradient in
                          one pass) is exposed as softcapped_mtp_losses_and_grad
  6. transpose_copy  dst = src^T        (tied embedding <- lm_head^T)
  7. transpose_add   dst += src^T       (lm_head grad += embedding grad^T)
  8. index_add_rows  out[l, index[t]] += src[l, t]   (lookup-table gradients, row by row)
  9. dc_attention    the dynamically composed attention of record #85: the heads' softmax maps
                     over a short window mixed per token, applied to every head's values;
                     autograd function
 10. pairwise_mlp    q(relu(x U^T)) W with q(h) = (h_i h_j, i <= j): the pair products built
                     tile by tile inside the GEMMs, never stored (an experiment), autograd function;
                     pairwise_mlp_gemm, the same math with q built in memory for cuBLAS GEMMs
                     by pair_products, and dh from G = dY W^T by pair_contract
 11. qk_prep         Q and K before attention (#344): RMS norm, rotary, key offset, zero padding
                     to V's width and the attention's layout in one pass, autograd function (its
                     reference is the model's own ops, train_gpt.qk_prep_reference)
 12. quantize_packed_e4m3   a layer's Q, K and V weight rows in e4m3, row-major from one read
                     and transposed from its bytes (#344); packed_qkv_fp8: the packed QKV
                     projection through FP8 GEMMs (the forward and the input gradient),
                     autograd function
 13. windowed_attention   causal attention within documents over a left window, flash style
                     (online softmax, P never stored), forward and backward kernels, autograd
                     function (its reference is train_gpt.attention_reference)

Each kernel `name` has a `name_reference` with the same contract in plain PyTorch (qk_prep's and
windowed_attention's, attention_reference, are in train_gpt.py, being the model's own ops): the
CPU training path runs the references, and the tests compare every kernel with its reference.
Kernels 1-7 and 9-13 are torch.library custom ops with a fake (meta) implementation, so that
torch.compile(fullgraph=True) traces through them without a graph break. The soft cap of the LM
head, `softcap`, and its constants are defined here once; train_gpt.py imports them.

The kernels also run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is
how CI tests them. The interpreter's defects (Triton 3.9) are worked around behind the global
constexpr INTERPRETED: its tl.dot multiplies bf16 tiles as raw uint16 integers (so tiles are
widened to fp32 first), its fp32 -> bf16 cast truncates, and its fp32 -> fp8 cast does not carry
a rounded-up mantissa into the exponent (so values are first rounded to nearest-even on the
target grid by integer arithmetic, after which the cast is exact). On the GPU these branches are
compiled out and the tensor cores and hardware conversions are used.

Measured speeds, and the variants that were tried and not kept, are in records/kernels/README.md.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = [
    "INTERPRET", "SOFTCAP_A", "SOFTCAP_B", "SOFTCAP_C", "softcap",
    "XXT", "XXT_reference", "XTX", "XTX_reference", "ba_plus_cAA", "ba_plus_cAA_reference",
    "linear_relu_square", "linear_relu_square_reference", "E4M3_MAX", "quantize_e4m3",
    "linear_relu_square_fp8_up", "linear_relu_square_fp8_up_reference", "E4M3_SCALE_FLOOR",
    "largest_magnitude", "exact_e4m3_scale", "quantize_e4m3_scaled", "linear_relu_square_fp8",
    "linear_relu_square_fp8_reference",
    "relu_square", "E5M2_MAX", "quantize_e5m2", "quantize_e5m2_scaled", "bounded_d_pre_scale",
    "FP8MLPWeights", "linear_relu_square_fp8_backward",
    "linear_relu_square_fp8_backward_reference",
    "polar_update_tall", "polar_update_tall_fits", "polar_update_tall_reference",
    "softcapped_mtp_losses_and_grad", "softcapped_mtp_losses_and_grad_reference",
    "softcapped_mtp_losses_reference",
    "softcapped_mtp_cross_entropy", "softcapped_mtp_cross_entropy_reference",
    "transpose_copy", "transpose_copy_reference", "transpose_add", "transpose_add_reference",
    "index_add_rows", "index_add_rows_reference", "dc_attention", "dc_attention_reference",
    "pair_count", "pair_contract", "pair_contract_reference", "pair_products",
    "pair_products_reference", "pairwise_mlp", "pairwise_mlp_gemm", "pairwise_mlp_reference",
    "qk_prep", "quantize_packed_e4m3", "quantize_packed_e4m3_reference", "packed_qkv_fp8",
    "packed_qkv_fp8_reference", "document_bounds", "windowed_attention",
]

# Triton decides at decoration time whether @triton.jit functions are interpreted; the host code
# reads the same environment variable once, so that it picks matching tilings, and the kernels
# read it as a global constexpr.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
INTERPRETED = tl.constexpr(INTERPRET)

# Soft cap of the LM head: z = SOFTCAP_A * sigmoid((l + SOFTCAP_B) / SOFTCAP_C), z in (0, 23).
SOFTCAP_A = 23.0
SOFTCAP_B = 5.0
SOFTCAP_C = 7.5


def softcap(logits: torch.Tensor) -> torch.Tensor:
    """The soft-capped logits z, in the dtype of `logits`."""
    return SOFTCAP_A * torch.sigmoid((logits + SOFTCAP_B) / SOFTCAP_C)


# =================================================================================================
# Host-side helpers
# =================================================================================================

def _check_runnable(name: str, *tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter, all on one device."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{name}: CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 "
                           f"before importing triton), or use {name}_reference instead")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {device}")


def _check_dtype(name: str, arg: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: {arg} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_shape(name: str, arg: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: {arg} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# =================================================================================================
# Device-side helpers
# =================================================================================================

@triton.jit
def _mma(acc, a, b):
    """acc + a @ b with fp32 accumulation. The interpreter multiplies bf16 tiles as raw uint16
    integers, so there the (exactly representable) fp32 widening of the operands is multiplied."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, round to nearest even (the interpreter's own cast truncates)."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        x = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _lower_triangle_tile(tile_id, RATIO: tl.constexpr):
    """(row, col) of the tile_id-th tile touching the lower triangle, in a tiling with
    BLOCK_M = RATIO * BLOCK_N, numbered row by row: tile-row r holds RATIO (r + 1) such tiles."""
    q = tile_id // RATIO    # = r (r + 1) / 2 + (col // RATIO), and r (r + 1) / 2 <= q
    row = ((tl.sqrt(8.0 * q + 1.0) - 1.0) * 0.5).to(tl.int32)
    # fix a possible off-by-one of the floating-point square root
    row = tl.where(row * (row + 1) // 2 > q, row - 1, row)
    row = tl.where((row + 1) * (row + 2) // 2 <= q, row + 1, row)
    return row, tile_id - RATIO * (row * (row + 1) // 2)


@triton.jit
def _round_to_e5m2_grid(x):
    """x (fp32) rounded to the nearest e5m2 value, ties to even, saturating at +-57344 like the
    hardware's satfinite conversion. The result converts to fp8e5 exactly."""
    x = tl.minimum(tl.maximum(x, -57344.0), 57344.0)
    # normal range: keep 2 of the 23 mantissa bits; the integer add carries into the exponent
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0xFFFFF + ((bits >> 21) & 1)) >> 21) << 21
    normal = bits.to(tl.float32, bitcast=True)
    # below the smallest normal, 2^-14, e5m2 is fixed point with step 2^-16
    steps = tl.minimum(tl.abs(x), 6.103515625e-05) * 65536.0
    whole = steps.to(tl.int32)
    frac = steps - whole.to(tl.float32)
    whole += ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))).to(tl.int32)
    subnormal = whole.to(tl.float32) * (1.0 / 65536.0)
    subnormal = tl.where(x < 0, -subnormal, subnormal)
    return tl.where(tl.abs(x) < 6.103515625e-05, subnormal, normal)


@triton.jit
def _to_e5m2(x):
    """fp32 -> e5m2, saturating at +-57344, round to nearest even."""
    x = tl.minimum(tl.maximum(x, -57344.0), 57344.0)
    if INTERPRETED:
        x = _round_to_e5m2_grid(x)
    return x.to(tl.float8e5, fp_downcast_rounding="rtne")


@triton.jit
def _to_e4m3(x):
    """fp32 -> e4m3, saturating at +-448, round to nearest even. In the interpreter x is first
    rounded on the e4m3 grid by integer arithmetic (normal values keep 3 of the 23 mantissa bits;
    below the smallest normal, 2^-6, the grid is fixed point with step 2^-9), as for e5m2 above."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20
        normal = bits.to(tl.float32, bitcast=True)
        steps = tl.minimum(tl.abs(x), 0.015625) * 512.0
        whole = steps.to(tl.int32)
        frac = steps - whole.to(tl.float32)
        whole += ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))).to(tl.int32)
        subnormal = whole.to(tl.float32) * (1.0 / 512.0)
        subnormal = tl.where(x < 0, -subnormal, subnormal)
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


# =================================================================================================
# 1-3. Symmetric Gram kernels: XXT, XTX, ba_plus_cAA
# =================================================================================================
# A is viewed as (batch, n, r): C[i, j] = sum_r A[i, r] A[j, r] is n x n. XXT reads A (M, K) with
# n = M, r = K; XTX reads the same memory transposed (n = K, r = M), loading (BLOCK_R, BLOCK_M)
# blocks along A's rows and multiplying their transposes, which the tensor cores read from shared
# memory directly. Only the BLOCK_M x BLOCK_N tiles that touch the lower triangle are launched
# (BLOCK_N may be a fraction of BLOCK_M, which doubles the programs of a small matrix). Each tile
# stores its elements with i >= j in place and, mirrored, its elements with i > j at (j, i): every
# element of C is written exactly once, so C == C^T holds bit for bit.
#
# The operands arrive through TMA descriptors of the 3-D A, so blocks past n or r (also at a batch
# boundary) read zeros. A descriptor needs 16-byte aligned row strides; a matrix whose rows are not
# (K not a multiple of 8) is copied with zero columns appended, which leaves the Gram matrix as it is.

@triton.jit
def _gram_tile_product(row_desc, col_desc, batch, row0, col0, r, TRANSPOSED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile at (row0, col0) of one matrix's Gram product."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        if TRANSPOSED:
            x = row_desc.load([batch, r0, row0]).reshape(BLOCK_R, BLOCK_M)
            y = col_desc.load([batch, r0, col0]).reshape(BLOCK_R, BLOCK_N)
            acc = _mma(acc, x.T, y)
        else:
            x = row_desc.load([batch, row0, r0]).reshape(BLOCK_M, BLOCK_R)
            y = col_desc.load([batch, col0, r0]).reshape(BLOCK_N, BLOCK_R)
            acc = _mma(acc, x, y.T)
    return acc


@triton.jit
def _store_gram_tile(acc, a_ptr, c_ptr, alpha, beta, batch, row0, col0, n,
                     stride_ab, stride_an, stride_ar, stride_cb, stride_cm, stride_cn,
                     ADD_BETA_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a finished tile of C in place and mirrored (ba_plus_cAA: alpha acc + beta A)."""
    batch = batch.to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    in_bounds = (rows[:, None] < n) & (cols[None, :] < n)
    if ADD_BETA_A:  # A is square here (n == r): add beta times its (rows, cols) tile
        a_tile = tl.load(a_ptr + batch * stride_ab + rows[:, None].to(tl.int64) * stride_an
                         + cols[None, :] * stride_ar, mask=in_bounds, other=0.0)
        acc = alpha * acc + beta * a_tile.to(tl.float32)
    out = _to_bf16(acc)
    c_ptr += batch * stride_cb
    c_tile = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    c_mirror = c_ptr + cols[:, None].to(tl.int64) * stride_cm + rows[None, :] * stride_cn
    mirror_in_bounds = (cols[:, None] < n) & (rows[None, :] < n)
    # Stores masked by the triangle cost more than the whole product, so they are avoided where
    # the tile allows: a tile wholly below the diagonal is stored whole, in place and mirrored; a
    # square tile on the diagonal holds both C[i, j] and C[j, i], so its upper half is filled from
    # its own transpose and stored once.
    if row0 >= col0 + BLOCK_N:
        tl.store(c_tile, out, mask=in_bounds)
        tl.store(c_mirror, tl.trans(out), mask=mirror_in_bounds)
    elif BLOCK_M == BLOCK_N:
        tl.store(c_tile, tl.where(rows[:, None] >= cols[None, :], out, tl.trans(out)), mask=in_bounds)
    else:
        tl.store(c_tile, out, mask=in_bounds & (rows[:, None] >= cols[None, :]))
        tl.store(c_mirror, tl.trans(out), mask=mirror_in_bounds & (rows[None, :] > cols[:, None]))


@triton.jit
def _symmetric_gram_kernel(
    row_desc, col_desc, a_ptr, c_ptr, alpha, beta,   # descriptors of A with blocks of BLOCK_M / BLOCK_N
    n, r, num_batches,                      # num_batches: only an autotuning key (grid axis 1)
    stride_ab, stride_an, stride_ar,        # of a_ptr (the unpadded A), read by ba_plus_cAA's epilogue
    stride_cb, stride_cm, stride_cn,
    TRANSPOSED: tl.constexpr,               # XTX: n indexes A's columns, r its rows
    ADD_BETA_A: tl.constexpr,               # ba_plus_cAA epilogue: alpha * acc + beta * A
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    alpha = tl.cast(alpha, tl.float32)      # Python floats may arrive as fp64 under torch.compile
    beta = tl.cast(beta, tl.float32)
    tile_row, tile_col = _lower_triangle_tile(tl.program_id(0), BLOCK_M // BLOCK_N)
    batch = tl.program_id(1)
    row0 = tile_row * BLOCK_M
    col0 = tile_col * BLOCK_N
    acc = _gram_tile_product(row_desc, col_desc, batch, row0, col0, r, TRANSPOSED,
                             BLOCK_M, BLOCK_N, BLOCK_R)
    _store_gram_tile(acc, a_ptr, c_ptr, alpha, beta, batch, row0, col0, n,
                     stride_ab, stride_an, stride_ar, stride_cb, stride_cm, stride_cn,
                     ADD_BETA_A, BLOCK_M, BLOCK_N)


def _set_gram_blocks(nargs: dict) -> None:
    """Give the descriptors the block shapes of the configuration about to run (autotuning)."""
    block_r = nargs["BLOCK_R"]
    for desc, size in ((nargs["row_desc"], nargs["BLOCK_M"]), (nargs["col_desc"], nargs["BLOCK_N"])):
        desc.block_shape = [1, block_r, size] if nargs["TRANSPOSED"] else [1, size, block_r]


def _gram_config(block_m: int, block_n: int, block_r: int, **launch) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": block_r},
                         pre_hook=_set_gram_blocks, **launch)


# The autotuner picks one per shape: 128 x 128 tiles suit many matrices (one GPU holds all 24 of
# a bank), 64 x 64 the 3 to 5 of an 8-GPU shard. BLOCK_M must be a multiple of BLOCK_N.
_GRAM_CONFIGS = [
    _gram_config(128, 128, 64, num_stages=3, num_warps=8),
    _gram_config(64, 64, 64, num_stages=4, num_warps=4),
    _gram_config(64, 64, 128, num_stages=3, num_warps=4),
]
_symmetric_gram_tuned = triton.autotune(
    _GRAM_CONFIGS, key=["n", "r", "num_batches", "TRANSPOSED", "ADD_BETA_A"])(_symmetric_gram_kernel)


def _symmetric_gram(A: torch.Tensor, out: torch.Tensor, transposed: bool, alpha: float = 1.0,
                    beta: float = 0.0, add_beta_a: bool = False, config: triton.Config | None = None) -> None:
    """Launch the Gram kernel; `config` forces one tiling instead of the autotuner (benchmarks)."""
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    C3 = out if out.dim() == 3 else out.unsqueeze(0)
    batches, rows, cols = A3.shape
    if transposed:
        n, r, stride_an, stride_ar = cols, rows, A3.stride(2), A3.stride(1)
    else:
        n, r, stride_an, stride_ar = rows, cols, A3.stride(1), A3.stride(2)
    operand = A3
    if A3.stride(2) != 1 or A3.stride(1) % 8 or A3.stride(0) % 8 or A3.data_ptr() % 16:
        operand = A3.new_zeros(batches, rows, triton.cdiv(cols, 8) * 8)
        operand[..., :cols] = A3
    if config is None and INTERPRET:
        config = _gram_config(16, 16, 32)
    # placeholder block shapes: the configuration's pre-hook sets the real ones
    row_desc = TensorDescriptor.from_tensor(operand, [1, 8, 8])
    col_desc = TensorDescriptor.from_tensor(operand, [1, 8, 8])
    args = (row_desc, col_desc, A3, C3, alpha, beta, n, r, batches, A3.stride(0), stride_an, stride_ar,
            C3.stride(0), C3.stride(1), C3.stride(2))

    def grid(meta):
        tile_rows = triton.cdiv(n, meta["BLOCK_M"])
        ratio = meta["BLOCK_M"] // meta["BLOCK_N"]
        return (ratio * tile_rows * (tile_rows + 1) // 2, batches)

    if config is not None:
        _set_gram_blocks(dict(config.all_kwargs(), TRANSPOSED=transposed, row_desc=row_desc, col_desc=col_desc))
        _symmetric_gram_kernel[grid](*args, TRANSPOSED=transposed, ADD_BETA_A=add_beta_a,
                                     **config.all_kwargs())
    else:
        _symmetric_gram_tuned[grid](*args, TRANSPOSED=transposed, ADD_BETA_A=add_beta_a)


def _check_gram_args(name: str, A: torch.Tensor, out: torch.Tensor, out_size: int) -> None:
    _check_runnable(name, A, out)
    if A.dim() not in (2, 3):
        raise ValueError(f"{name}: A must be (M, K) or (batch, M, K), got shape {tuple(A.shape)}")
    _check_dtype(name, "A", A, (torch.bfloat16,))
    _check_dtype(name, "out", out, (torch.bfloat16,))
    _check_shape(name, "out", out, (*A.shape[:-2], out_size, out_size))


@torch.library.custom_op("nanogpt_triton::xxt", mutates_args=("out",))
def _xxt_op(A: torch.Tensor, out: torch.Tensor) -> None:
    _symmetric_gram(A, out, transposed=False)


@_xxt_op.register_fake
def _(A, out):
    return None


@torch.library.custom_op("nanogpt_triton::xtx", mutates_args=("out",))
def _xtx_op(A: torch.Tensor, out: torch.Tensor) -> None:
    _symmetric_gram(A, out, transposed=True)


@_xtx_op.register_fake
def _(A, out):
    return None


@torch.library.custom_op("nanogpt_triton::ba_plus_caa", mutates_args=("out",))
def _ba_plus_caa_op(A: torch.Tensor, alpha: float, beta: float, out: torch.Tensor) -> None:
    _symmetric_gram(A, out, transposed=False, alpha=alpha, beta=beta, add_beta_a=True)


@_ba_plus_caa_op.register_fake
def _(A, alpha, beta, out):
    return None


def XXT(A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = A @ A^T for A (M, K) or (B, M, K) bf16; out (.., M, M) bf16, fp32 accumulation."""
    _check_gram_args("XXT", A, out, A.shape[-2])
    _xxt_op(A, out)
    return out


def XXT_reference(A: torch.Tensor) -> torch.Tensor:
    Af = A.float()
    return (Af @ Af.mT).to(A.dtype)


def XTX(A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = A^T @ A for A (M, K) or (B, M, K) bf16 (reduction over M); out (.., K, K) bf16."""
    _check_gram_args("XTX", A, out, A.shape[-1])
    _xtx_op(A, out)
    return out


def XTX_reference(A: torch.Tensor) -> torch.Tensor:
    Af = A.float()
    return (Af.mT @ Af).to(A.dtype)


def ba_plus_cAA(A: torch.Tensor, alpha: float, beta: float, out: torch.Tensor) -> torch.Tensor:
    """out = alpha * A @ A^T + beta * A for symmetric A (M, M) or (B, M, M) bf16.
    Polar Express calls it with alpha = c, beta = b, giving b A + c A A."""
    _check_gram_args("ba_plus_cAA", A, out, A.shape[-2])
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ba_plus_cAA: A must be square, got shape {tuple(A.shape)}")
    _ba_plus_caa_op(A, float(alpha), float(beta), out)
    return out


def ba_plus_cAA_reference(A: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    Af = A.float()
    return (alpha * (Af @ Af.mT) + beta * Af).to(A.dtype)


# =================================================================================================
# 4. GEMMs with fused epilogues: Linear + ReLU^2 (every MLP), Polar Express update (tall)
# =================================================================================================
# One GEMM acc = a @ b^T with a (m, k), b (n, k), both read along k, and an epilogue chosen by
# the constexpr EPILOGUE:
#   RELU2_FORWARD:  a = x, b = W1 (= c_fc):   post = bf16(relu(bf16(acc))^2); with FP8 operands
#                   (#84: x and W1 in e4m3) acc is first multiplied by their scales' product,
#                   read from memory (it is computed on the device each step)
#   RELU2_BACKWARD: a = dY, b = W2 (= c_proj): d_pre = bf16(2 * acc * sqrt(post)), acc = d_post
#   AXPY:           a = X, b = B (symmetric, so X B^T = X B): out = bf16(acc + alpha * X)
#   RELU2_FP8_FORWARD (#89): RELU2_FORWARD's post, and beside it post8 = e4m3(post / act_scale)
#                   as quantize_e4m3_scaled rounds it (act_scale read from memory) into aux;
#                   every program writes the largest post of its tiles to maxima[program]
#   STORE:          a = post8, b = W2^T in e4m3 (#89, _FP8_GEMM = "triton"): out = bf16(acc),
#                   acc already scaled
#   RELU2_BACKWARD_MAX (#344): RELU2_BACKWARD, and every program writes the largest |d_pre| of
#                   its tiles to maxima[program]: d_pre's exact e5m2 scale without a pass over it
#   RELU2_BACKWARD_FP8 (--fp8_mlp_grad_bound): RELU2_BACKWARD's d_pre, and beside it d_pre8 =
#                   e5m2(d_pre / scale) into out8, for a scale known before the GEMM (read from
#                   memory): the pass that would quantise d_pre after its maximum is found is saved
# The forward stores only post, not pre as well: the forward is bound by its stores, and
# relu(pre) = sqrt(post) up to half a bf16 ulp, which the backward's own bf16 rounding of d_pre
# dwarfs.
# A persistent kernel (one program per SM strides over the output tiles) moving every tile through
# TMA descriptors: the hardware does the address arithmetic and bounds handling, and the
# epilogue's stores are asynchronous, so they overlap the next tile's loads. The fp32 accumulator
# is written in two halves, which halves the epilogue's registers and staging memory.
#
# Batches (AXPY): count matrices X (m, n) are stacked into one (count * m, n) matrix a, and their
# B (n, n) into one (count * n, n) matrix b. An output tile belongs to batch row0 // rows_per_batch
# and reads the b rows of that batch; rows_per_batch must then be a multiple of BLOCK_M, so that no
# tile straddles two matrices. Rows of b past a batch's n (a ragged last column tile) belong to the
# next batch, but they only reach accumulator columns past n, which the stores clip.

RELU2_FORWARD = tl.constexpr(0)    # out = post (written), aux unused
RELU2_BACKWARD = tl.constexpr(1)   # out = d_pre, aux = post (read)
AXPY = tl.constexpr(2)             # out = acc + alpha * aux, aux = a's tile at the output (read)
RELU2_FP8_FORWARD = tl.constexpr(3)  # out = post, aux = post8 (both written), maxima written
STORE = tl.constexpr(4)            # out = acc, aux unused
RELU2_BACKWARD_MAX = tl.constexpr(5)  # RELU2_BACKWARD, maxima written
RELU2_BACKWARD_FP8 = tl.constexpr(6)  # RELU2_BACKWARD, out8 = d_pre8 written


@triton.jit
def _relu2_backward_epilogue(acc, d_pre_desc, post_desc, row0, col0):
    """d_pre = bf16(2 acc sqrt(post)), stored, and returned in fp32. Tiles past the matrix edges
    hold zeros (TMA pads the operands), which leave maxima of |d_pre| alone."""
    relu = tl.sqrt(post_desc.load([row0, col0]).to(tl.float32))   # sqrt.approx, error ~2^-23
    d_pre = _to_bf16(2.0 * acc * relu)
    d_pre_desc.store([row0, col0], d_pre)
    return d_pre.to(tl.float32)


@triton.jit
def _gemm_epilogue(acc, out_desc, aux_desc, alpha, row0, col0,
                   EPILOGUE: tl.constexpr):
    if EPILOGUE == RELU2_BACKWARD:
        _relu2_backward_epilogue(acc, out_desc, aux_desc, row0, col0)
    elif EPILOGUE == AXPY:
        x = aux_desc.load([row0, col0]).to(tl.float32)
        out_desc.store([row0, col0], _to_bf16(acc + alpha * x))
    elif EPILOGUE == STORE:
        out_desc.store([row0, col0], _to_bf16(acc))
    else:   # relu of the bf16-rounded pre, as a bf16 matmul followed by relu would square
        relu = tl.maximum(_to_bf16(acc).to(tl.float32), 0.0)
        out_desc.store([row0, col0], _to_bf16(relu * relu))


@triton.jit
def _relu2_fp8_epilogue(acc, post_desc, post8_desc, inv_scale, row0, col0):
    """RELU2_FORWARD's post, and post8 = e4m3(post x inv_scale) from the same bf16 post, as
    quantize_e4m3_scaled; returns each row's largest post. Tiles past the matrix edges hold
    zeros (TMA pads the operands), which leave the maxima of post >= 0 alone."""
    relu = tl.maximum(_to_bf16(acc).to(tl.float32), 0.0)
    post = _to_bf16(relu * relu)
    post_desc.store([row0, col0], post)
    post = post.to(tl.float32)
    post8_desc.store([row0, col0], _to_e4m3(post * inv_scale))
    return tl.max(post, axis=1)


@triton.jit
def _gemm_epilogue_kernel(
    a_desc, b_desc, out_desc, aux_desc,     # aux: see RELU2_FORWARD, RELU2_BACKWARD, AXPY
    out8_desc,                              # d_pre8 (RELU2_BACKWARD_FP8)
    m, n, k, rows_per_batch, alpha,         # m counts the rows of all batches
    scale_ptr,                              # SCALED: acc is multiplied by this fp32 value
    fp8_scale_ptr, maxima_ptr,              # post8's or d_pre8's scale; per-program maxima
    EPILOGUE: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False,
):
    alpha = tl.cast(alpha, tl.float32)      # Python floats may arrive as fp64 under torch.compile
    if SCALED:
        scale = tl.load(scale_ptr)
    if EPILOGUE == RELU2_FP8_FORWARD or EPILOGUE == RELU2_BACKWARD_FP8:
        # one exact division here, a multiplication per element
        inv_scale = tl.math.div_rn(1.0, tl.load(fp8_scale_ptr))
    if EPILOGUE == RELU2_FP8_FORWARD or EPILOGUE == RELU2_BACKWARD_MAX:
        # a running maximum per tile row, reduced over the rows once at the end rather than
        # reduced to one value (a reduction across all the program's threads) in every tile
        largest = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    # FLATTEN merges the k loop into the tile loop, so the software pipeline keeps loading across
    # tiles: the next tile's first operands arrive during this tile's epilogue. WARP_SPECIALIZE
    # asks Triton to give loads, MMAs and the epilogue warps of their own, which overlaps the
    # epilogue with the next tile's MMAs where the compiler supports it.
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        # grouped tile order: GROUP_M consecutive tile-rows sweep the columns together, sharing b in L2
        first_tile_m = (tile // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
        row0 = (first_tile_m + (tile % tiles_per_group) % group_rows) * BLOCK_M
        col0 = ((tile % tiles_per_group) // group_rows) * BLOCK_N
        b_row0 = (row0 // rows_per_batch) * n + col0

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            a = a_desc.load([row0, k0])
            b = b_desc.load([b_row0, k0])
            acc = _mma(acc, a, b.T)
        if SCALED:
            acc = acc * scale

        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        if EPILOGUE == RELU2_FP8_FORWARD:
            left_max = _relu2_fp8_epilogue(left, out_desc, aux_desc, inv_scale, row0, col0)
            right_max = _relu2_fp8_epilogue(right, out_desc, aux_desc, inv_scale, row0,
                                            col0 + BLOCK_N // 2)
            largest = tl.maximum(largest, tl.maximum(left_max, right_max))
        elif EPILOGUE == RELU2_BACKWARD_MAX:
            left = _relu2_backward_epilogue(left, out_desc, aux_desc, row0, col0)
            right = _relu2_backward_epilogue(right, out_desc, aux_desc, row0, col0 + BLOCK_N // 2)
            largest = tl.maximum(largest, tl.maximum(tl.max(tl.abs(left), axis=1),
                                                     tl.max(tl.abs(right), axis=1)))
        elif EPILOGUE == RELU2_BACKWARD_FP8:
            left = _relu2_backward_epilogue(left, out_desc, aux_desc, row0, col0)
            out8_desc.store([row0, col0], _to_e5m2(left * inv_scale))
            right = _relu2_backward_epilogue(right, out_desc, aux_desc, row0, col0 + BLOCK_N // 2)
            out8_desc.store([row0, col0 + BLOCK_N // 2], _to_e5m2(right * inv_scale))
        else:
            _gemm_epilogue(left, out_desc, aux_desc, alpha, row0, col0, EPILOGUE)
            _gemm_epilogue(right, out_desc, aux_desc, alpha, row0, col0 + BLOCK_N // 2, EPILOGUE)
    if EPILOGUE == RELU2_FP8_FORWARD or EPILOGUE == RELU2_BACKWARD_MAX:
        tl.store(maxima_ptr + tl.program_id(0), tl.max(largest, axis=0))


# Candidate tilings, which records/bench_kernels.py times for each epilogue; _GEMM_TILES, the
# fastest there for every bf16 epilogue, is the one used for bf16 operands. A loaded aux tile
# (backward, AXPY) needs staging memory that 4 stages of 128 x 256 x 64 leave no room for. BLOCK_M
# must divide the rows of one matrix (3072 in the speedrun) when there are several.
# PROGRAMS_PER_SM (default 1) launches that many persistent programs per SM, so that one's
# epilogue can overlap another's MMAs; their staging memory must fit the SM together (2 stages:
# 64-96 KB each, 168-224 registers at 4 warps, records/kernel_registers.py's way of compiling).
_GEMM_TILINGS = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=False, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, FLATTEN=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, FLATTEN=True, num_warps=8, num_stages=5),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, FLATTEN=False, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, FLATTEN=True, num_warps=4, num_stages=2,
         PROGRAMS_PER_SM=2),
)
_GEMM_TILES = _GEMM_TILINGS[1]
# FP8 operands are one byte wide: a BLOCK_K of 128 stages the same bytes as bf16's 64 and halves
# the loop's iterations. _FP8_GEMM_TILES measures fastest of these candidates for FP8 operands.
_FP8_GEMM_TILES = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, FLATTEN=True, num_warps=8,
                       num_stages=3)
_FP8_GEMM_TILINGS = _GEMM_TILINGS + (
    _FP8_GEMM_TILES,
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, FLATTEN=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, FLATTEN=True, num_warps=4, num_stages=2,
         PROGRAMS_PER_SM=2),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, FLATTEN=False, WARP_SPECIALIZE=True,
         num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, FLATTEN=False, WARP_SPECIALIZE=True,
         num_warps=8, num_stages=4),
)
_INTERPRETED_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_gemm_epilogue(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, aux: torch.Tensor,
                          epilogue: tl.constexpr, alpha: float = 1.0, rows_per_batch: int | None = None,
                          tiles: dict | None = None, scale: torch.Tensor | None = None,
                          fp8_scale: torch.Tensor | None = None, out8: torch.Tensor | None = None
                          ) -> torch.Tensor | None:
    """acc = a @ b^T through the epilogue `epilogue`, all matrices 2-D and contiguous; times the
    one-element fp32 `scale` first if given. With rows_per_batch < m, row block i of a pairs with
    row block i of b (see the section's notes). `tiles` overrides the tiling (benchmarks).
    RELU2_FP8_FORWARD takes post8's one-element fp32 `fp8_scale` and returns the largest post,
    (1,); RELU2_BACKWARD_MAX returns the largest |d_pre|, (1,); RELU2_BACKWARD_FP8 writes
    e5m2(d_pre / fp8_scale) into `out8`."""
    if a.is_cuda and not torch.cuda.is_current_stream_capturing():
        # The backward may run on autograd's device thread before any CUDA call there made the
        # context current; the descriptors are encoded through the driver API, which needs it.
        # A stream query is a cheap runtime call that makes it current. A stream being captured
        # into a CUDA graph may not be queried (it raises), and its context is current already.
        torch.cuda.current_stream(a.device).query()
    m, k = a.shape
    n = out.shape[1]
    rows_per_batch = m if rows_per_batch is None else rows_per_batch
    tiles = dict(tiles or (_INTERPRETED_TILES if INTERPRET else
                           _FP8_GEMM_TILES if a.element_size() == 1 else _GEMM_TILES))
    programs_per_sm = tiles.pop("PROGRAMS_PER_SM", 1)
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    if rows_per_batch < m and rows_per_batch % bm:
        raise ValueError(f"GEMM epilogue kernel: rows per batch ({rows_per_batch}) must be a multiple "
                         f"of BLOCK_M ({bm}) when there are several batches (m = {m})")
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn // 2])
    aux_desc = out_desc if aux is out else TensorDescriptor.from_tensor(aux, [bm, bn // 2])
    out8_desc = out_desc if out8 is None else TensorDescriptor.from_tensor(out8, [bm, bn // 2])
    descriptors = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
                   out_desc, aux_desc, out8_desc)
    num_tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(num_tiles, 4 if INTERPRET else programs_per_sm * _num_sms(a.device))
    with_maxima = epilogue.value in (RELU2_FP8_FORWARD.value, RELU2_BACKWARD_MAX.value)
    maxima = torch.empty(programs, dtype=torch.float32, device=a.device) if with_maxima else out
    _gemm_epilogue_kernel[(programs,)](*descriptors, m, n, k, rows_per_batch, alpha,
                                       out if scale is None else scale,
                                       out if fp8_scale is None else fp8_scale, maxima,
                                       EPILOGUE=epilogue.value, SCALED=scale is not None,
                                       NUM_PROGRAMS=programs, **tiles)
    return maxima.amax().reshape(1) if with_maxima else None


@torch.library.custom_op("nanogpt_triton::linear_relu_square_forward", mutates_args=())
def _linear_relu_square_forward_op(x: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
    post = x.new_empty(x.shape[0], W1.shape[0])
    _launch_gemm_epilogue(x.contiguous(), W1.contiguous(), post, post, RELU2_FORWARD)
    return post


@_linear_relu_square_forward_op.register_fake
def _(x, W1):
    return x.new_empty(x.shape[0], W1.shape[0])


@torch.library.custom_op("nanogpt_triton::linear_relu_square_backward", mutates_args=())
def _linear_relu_square_backward_op(d_out: torch.Tensor, W2: torch.Tensor,
                                    post: torch.Tensor) -> torch.Tensor:
    d_pre = torch.empty_like(post)
    _launch_gemm_epilogue(d_out.contiguous(), W2.contiguous(), d_pre, post.contiguous(), RELU2_BACKWARD)
    return d_pre


@_linear_relu_square_backward_op.register_fake
def _(d_out, W2, post):
    return torch.empty_like(post)


def _linear_relu_square_backward(ctx, d_out):
    """(dx, dW1, dW2) from the saved bf16 (x, W1, W2, post): the backward of every form."""
    x, W1, W2, post = ctx.saved_tensors
    d_out = d_out.contiguous()
    d_pre = _linear_relu_square_backward_op(d_out, W2, post)
    dx = d_pre @ W1 if ctx.needs_input_grad[0] else None
    dW1 = d_pre.t() @ x if ctx.needs_input_grad[1] else None
    dW2 = post.t() @ d_out if ctx.needs_input_grad[2] else None
    return dx, dW1, dW2


class _LinearReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W1, W2):
        post = _linear_relu_square_forward_op(x, W1)
        ctx.save_for_backward(x, W1, W2, post)
        return post @ W2

    @staticmethod
    def backward(ctx, d_out):
        return _linear_relu_square_backward(ctx, d_out)


def _check_mlp_args(name: str, x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                    multiple: int) -> None:
    """bf16 x (..., d), W1 and W2 (hidden, d); hidden and d multiples of `multiple` (TMA needs
    16-byte aligned rows: 8 bf16 or 16 e4m3 values)."""
    _check_runnable(name, x, W1, W2)
    for arg, t in (("x", x), ("W1", W1), ("W2", W2)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
    if W1.dim() != 2 or W2.shape != W1.shape or x.shape[-1] != W1.shape[1]:
        raise ValueError(f"{name}: expected x (..., d) with W1 and W2 both (hidden, d), got x "
                         f"{tuple(x.shape)}, W1 {tuple(W1.shape)}, W2 {tuple(W2.shape)}")
    if W1.shape[0] % multiple or W1.shape[1] % multiple:
        raise ValueError(f"{name}: hidden and d must be multiples of {multiple}, got W1 "
                         f"{tuple(W1.shape)}")


def linear_relu_square(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """relu(x @ W1^T)^2 @ W2 for x (..., d), W1 = c_fc (hidden, d), W2 = c_proj (hidden, d) used
    without transpose; all bf16. Differentiable in x, W1 and W2."""
    _check_mlp_args("linear_relu_square", x, W1, W2, multiple=8)
    out = _LinearReluSquare.apply(x.reshape(-1, x.shape[-1]), W1, W2)
    return out.view(*x.shape[:-1], W2.shape[1])


def linear_relu_square_reference(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                                 pre_from_post: bool = False) -> torch.Tensor:
    return relu_square(x @ W1.t(), pre_from_post) @ W2


# ReLU^2 whose backward keeps post only (--mlp_pre_from_post, #344): relu(pre)^2 = post, so
# relu(pre) = sqrt(post) and d post / d pre = 2 sqrt(post) (0 where post = 0, as relu's is), and pre
# need not be kept for the backward. The Triton kernels always work this way (their forward is
# bound by its stores); this is the same math for the PyTorch path. Precision: post is rounded to
# bf16 (relative error <= 2^-8), so sqrt(post) is within 2^-9 relative of relu(pre), below d_pre's
# own bf16 rounding: d_pre = bf16(2 d_post sqrt(post)) is at most one bf16 ulp from the d_pre
# computed with the stored pre. (Where 0 < pre < 2^-67, post underflows to 0 and so does d_pre.)

class _ReluSquareFromPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre):
        post = torch.relu(pre).square()
        ctx.save_for_backward(post)
        return post

    @staticmethod
    def backward(ctx, d_post):
        (post,) = ctx.saved_tensors
        return (2 * d_post.float() * post.float().sqrt()).to(d_post.dtype)


def relu_square(pre: torch.Tensor, from_post: bool = False) -> torch.Tensor:
    """relu(pre)^2; with from_post its backward rebuilds relu(pre) as sqrt(post) (see above)."""
    return _ReluSquareFromPost.apply(pre) if from_post else torch.relu(pre).square()


# -------------------------------------------------------------------------------------------------
# The same MLP with its up-projection in FP8 in the forward pass (record #84): x and W1 are
# each quantised to e4m3 with one scale, max|t| / 448, so that the largest magnitude maps to the
# format's largest value; the GEMM accumulates in fp32 and multiplies by both scales before the
# ReLU^2. The backward is the bf16 one, from the bf16 x and W1.

E4M3_MAX = 448.0
E4M3_SCALE_FLOOR = 1e-30   # the scale of an all-zero tensor (c_proj starts at zero): finite


def largest_magnitude(t: torch.Tensor) -> torch.Tensor:
    """max|t| (0-d), taken along the last dimension first and then over the rows' maxima: the
    same value, in a form torch.compile reduces faster than one maximum over the flattened
    tensor (the packed QKV gradient's: 127 against 163 µs on an H200,
    records/2026-12-06_h200_protocol_t/)."""
    t = t.detach().abs()
    return t.amax(dim=-1).amax() if t.dim() > 1 else t.amax()


def exact_e4m3_scale(t_max: torch.Tensor) -> torch.Tensor:
    """max|t| / 448 in fp32: the scale that maps t's largest magnitude onto e4m3's largest value."""
    return (t_max.float() / E4M3_MAX).clamp_min(E4M3_SCALE_FLOOR)


def quantize_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in e4m3, scale) with scale = max|t| / 448 as a one-element fp32 tensor."""
    scale = exact_e4m3_scale(largest_magnitude(t)).reshape(1)
    return (t.detach().float() / scale).to(torch.float8_e4m3fn), scale


def quantize_e4m3_scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in e4m3 for an fp32 scale that broadcasts against t: t times the fp32 reciprocal
    of the scale (a multiplication per element is far cheaper than a division in a kernel's
    epilogue), rounded to fp32 and then to the nearest e4m3 value (ties to even), saturated at
    +-448: a scale from an earlier step may be too small for today's t, and e4m3fn has no
    infinity (an overflow would become NaN)."""
    inv_scale = 1.0 / scale.float()
    return (t.detach().float() * inv_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _fp8_matmul_reference(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """a8 b8^T x scale in fp32, for FP8 a8 (m, k) and b8 (n, k): their products are exact in fp32."""
    return (a8.float() @ b8.float().t()) * scale


@torch.library.custom_op("nanogpt_triton::linear_relu_square_fp8_forward", mutates_args=())
def _linear_relu_square_fp8_forward_op(x8: torch.Tensor, W1_8: torch.Tensor,
                                       scale: torch.Tensor) -> torch.Tensor:
    post = torch.empty(x8.shape[0], W1_8.shape[0], dtype=torch.bfloat16, device=x8.device)
    _launch_gemm_epilogue(x8.contiguous(), W1_8.contiguous(), post, post, RELU2_FORWARD,
                          scale=scale)
    return post


@_linear_relu_square_fp8_forward_op.register_fake
def _(x8, W1_8, scale):
    return torch.empty(x8.shape[0], W1_8.shape[0], dtype=torch.bfloat16, device=x8.device)


class _LinearReluSquareFP8Up(_LinearReluSquare):
    @staticmethod
    def forward(ctx, x, W1, W2):
        x8, x_scale = quantize_e4m3(x)
        W1_8, w_scale = quantize_e4m3(W1)
        post = _linear_relu_square_fp8_forward_op(x8, W1_8, x_scale * w_scale)
        ctx.save_for_backward(x, W1, W2, post)
        return post @ W2


def linear_relu_square_fp8_up(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """linear_relu_square with the up-projection x @ W1^T in e4m3 in the forward pass (see the
    notes above); same arguments, differentiable in x, W1 and W2."""
    _check_mlp_args("linear_relu_square_fp8_up", x, W1, W2, multiple=16)
    out = _LinearReluSquareFP8Up.apply(x.reshape(-1, x.shape[-1]), W1, W2)
    return out.view(*x.shape[:-1], W2.shape[1])


class _FP8UpProjectionReference(torch.autograd.Function):
    """pre = bf16(x8 W1_8^T x scales) forward; the bf16 x @ W1^T's gradients backward."""

    @staticmethod
    def forward(ctx, x, W1):
        x8, x_scale = quantize_e4m3(x)
        W1_8, w_scale = quantize_e4m3(W1)
        ctx.save_for_backward(x, W1)
        return _fp8_matmul_reference(x8, W1_8, x_scale * w_scale).to(x.dtype)

    @staticmethod
    def backward(ctx, d_pre):
        x, W1 = ctx.saved_tensors
        return d_pre @ W1, d_pre.t() @ x


def linear_relu_square_fp8_up_reference(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                                        pre_from_post: bool = False) -> torch.Tensor:
    pre = _FP8UpProjectionReference.apply(x.reshape(-1, x.shape[-1]), W1)
    return (relu_square(pre, pre_from_post) @ W2).view(*x.shape[:-1], W2.shape[1])


# -------------------------------------------------------------------------------------------------
# The MLP with its down-projection in FP8 as well (record #89), at delayed scales. post is
# quantised to e4m3 at a scale the caller gives (training: from the previous step's largest post
# of the same micro-batch slot, with a margin) and saturates at 448 where today's post outgrew it;
# W2 arrives quantised already, transposed: W2_8t (d, hidden) = e4m3(W2^T / w_scale), made once
# per optimizer step, K-major as the FP8 GEMM reads both operands. The up-projection is #84's. The
# forward kernel writes post in bf16 (for the backward) and in e4m3, and returns the largest post,
# from which the caller makes the next step's scale; then out = bf16(post8 W2_8t^T x act_scale x
# w_scale), accumulated in fp32. Without act_scale (evaluation), post is quantised at its own
# exact scale, max|post| / 448, found first. The backward is the bf16 one, from the bf16 post and
# W2, as in linear_relu_square.

@torch.library.custom_op("nanogpt_triton::linear_relu_square_fp8_post", mutates_args=())
def _linear_relu_square_fp8_post_op(x8: torch.Tensor, W1_8: torch.Tensor, scale: torch.Tensor,
                                    act_scale: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    post = torch.empty(x8.shape[0], W1_8.shape[0], dtype=torch.bfloat16, device=x8.device)
    post8 = torch.empty_like(post, dtype=torch.float8_e4m3fn)
    post_max = _launch_gemm_epilogue(x8.contiguous(), W1_8.contiguous(), post, post8,
                                     RELU2_FP8_FORWARD, scale=scale, fp8_scale=act_scale)
    return post, post8, post_max


@_linear_relu_square_fp8_post_op.register_fake
def _(x8, W1_8, scale, act_scale):
    post = torch.empty(x8.shape[0], W1_8.shape[0], dtype=torch.bfloat16, device=x8.device)
    return (post, torch.empty_like(post, dtype=torch.float8_e4m3fn),
            torch.empty(1, dtype=torch.float32, device=x8.device))


@torch.library.custom_op("nanogpt_triton::fp8_linear", mutates_args=())
def _fp8_linear_op(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a8.shape[0], b8.shape[0], dtype=torch.bfloat16, device=a8.device)
    _launch_gemm_epilogue(a8.contiguous(), b8.contiguous(), out, out, STORE, scale=scale)
    return out


@_fp8_linear_op.register_fake
def _(a8, b8, scale):
    return torch.empty(a8.shape[0], b8.shape[0], dtype=torch.bfloat16, device=a8.device)


# The FP8 GEMMs with nothing to fuse (#89's down-projection, the dx of #344's MLP backward, the
# packed QKV projection and its dx) run on cuBLAS's scaled matmul, as the reference's #89 GEMM
# does, or on the STORE epilogue above. Both sum the exact fp32 products with Hopper's fast
# accumulation and round once to bf16; records/bench_kernels.py's fp8_gemm sweep times the two.
FP8_GEMM_BACKENDS = ("cublas", "triton")
_FP8_GEMM = "cublas"


def _fp8_linear(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16(a8 (m, k) b8 (n, k)^T x scale): a8 e4m3 or e5m2, b8 e4m3, scale (1,) fp32."""
    if _FP8_GEMM == "triton":
        return _fp8_linear_op(a8, b8, scale)
    return torch._scaled_mm(a8.contiguous(), b8.contiguous().t(), scale_a=scale.reshape(()),
                            scale_b=scale.new_ones(()), out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def _fp8_mlp_forward(x8: torch.Tensor, W1_8: torch.Tensor, up_scale: torch.Tensor,
                     W2_8t: torch.Tensor, w2_scale: torch.Tensor, act_scale: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, post, largest post) through the kernels from e4m3 x8 and W1_8 (up_scale: the product
    of their scales) and W2_8t at w2_scale; act_scale None: post's exact scale."""
    if act_scale is None:
        post = _linear_relu_square_fp8_forward_op(x8, W1_8, up_scale)
        post_max = post.amax().float().reshape(1)
        act_scale = exact_e4m3_scale(post_max)
        post8 = quantize_e4m3_scaled(post, act_scale)
    else:
        post, post8, post_max = _linear_relu_square_fp8_post_op(x8, W1_8, up_scale, act_scale)
    return _fp8_linear(post8, W2_8t, act_scale * w2_scale), post, post_max


class _LinearReluSquareFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W1, W2, W2_8t, w_scale, act_scale):
        x8, x_scale = quantize_e4m3(x)
        W1_8, w1_scale = quantize_e4m3(W1)
        out, post, post_max = _fp8_mlp_forward(x8, W1_8, x_scale * w1_scale, W2_8t, w_scale,
                                               act_scale)
        ctx.save_for_backward(x, W1, W2, post)
        ctx.mark_non_differentiable(post_max)
        return out, post_max

    @staticmethod
    def backward(ctx, d_out, d_post_max):
        return *_linear_relu_square_backward(ctx, d_out), None, None, None


def _check_fp8_down_args(name: str, W2: torch.Tensor, W2_8t: torch.Tensor, w_scale: torch.Tensor,
                         act_scale: torch.Tensor | None) -> None:
    _check_shape(name, "W2_8t", W2_8t, W2.shape[::-1])
    _check_dtype(name, "W2_8t", W2_8t, (torch.float8_e4m3fn,))
    for arg, t in (("w_scale", w_scale), ("act_scale", act_scale)):
        if t is not None:
            _check_shape(name, arg, t, (1,))
            _check_dtype(name, arg, t, (torch.float32,))


def linear_relu_square_fp8(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                           W2_8t: torch.Tensor, w_scale: torch.Tensor,
                           act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_relu_square with both projections in e4m3 in the forward pass (see the notes above):
    x (..., d), W1 and W2 (hidden, d) bf16; W2_8t (d, hidden) e4m3 with its fp32 scale w_scale
    (1,); act_scale (1,) fp32 or None (exact). Returns (out (..., d), the largest post (1,) fp32);
    out is differentiable in x, W1 and W2."""
    _check_mlp_args("linear_relu_square_fp8", x, W1, W2, multiple=16)
    _check_fp8_down_args("linear_relu_square_fp8", W2, W2_8t, w_scale, act_scale)
    out, post_max = _LinearReluSquareFP8.apply(x.reshape(-1, x.shape[-1]), W1, W2, W2_8t, w_scale,
                                               act_scale)
    return out.view(*x.shape[:-1], W2.shape[1]), post_max


class _FP8DownProjectionReference(torch.autograd.Function):
    """bf16(e4m3(post / act_scale) W2_8t^T x act_scale x w_scale) forward; the gradients of the
    bf16 post @ W2 backward."""

    @staticmethod
    def forward(ctx, post, W2, W2_8t, w_scale, act_scale):
        post8 = quantize_e4m3_scaled(post, act_scale)
        ctx.save_for_backward(post, W2)
        return _fp8_matmul_reference(post8, W2_8t, act_scale * w_scale).to(post.dtype)

    @staticmethod
    def backward(ctx, d_out):
        post, W2 = ctx.saved_tensors
        return d_out @ W2.t(), post.t() @ d_out, None, None, None


def linear_relu_square_fp8_reference(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                                     W2_8t: torch.Tensor, w_scale: torch.Tensor,
                                     act_scale: torch.Tensor | None = None,
                                     pre_from_post: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    pre = _FP8UpProjectionReference.apply(x.reshape(-1, x.shape[-1]), W1)
    post = relu_square(pre, pre_from_post)
    post_max = post.detach().amax().float().reshape(1)
    if act_scale is None:
        act_scale = exact_e4m3_scale(post_max)
    out = _FP8DownProjectionReference.apply(post, W2, W2_8t, w_scale, act_scale)
    return out.view(*x.shape[:-1], W2.shape[1]), post_max


# -------------------------------------------------------------------------------------------------
# The MLP in FP8 in the backward pass too (--fp8_mlp_backward, as #344). Its weights arrive
# quantised once per optimizer update (FP8MLPWeights): W1 = c_fc and W2 = c_proj, each at its own
# scale, in both layouts, since an FP8 GEMM reads both operands along the summed dimension. The
# forward is #89's with W1's stored copy. The backward's four GEMMs:
#   d_post = dY W2^T  FP8: g8 = e5m2(dY / g_s) times W2_8 (hidden, d); the epilogue applies
#                     ReLU^2's derivative, d_pre = bf16(2 d_post sqrt(post)) (kernel 4's), and
#                     finds max|d_pre|, so that d_pre's scale costs no pass over it
#   dx = d_pre W1     FP8: e5m2(d_pre / g_s') times W1_8t (d, hidden)
#   dW1 = d_pre^T x   bf16, and dW2 = post^T dY bf16
# Gradients are e5m2 (5 exponent bits for their range, 2 mantissa bits), each tensor at its exact
# scale, max|g| / 57344, the format's largest value: g8 = e5m2(g / g_s), then the GEMM multiplies
# the fp32 sums by both operands' scales, as the LM head's FP8 matmul does (spec kernels.md 8).
# The weight-gradient GEMMs stay bf16. They sum over the T tokens of a micro-batch (16k-49k), so
# their FP8 operands would be transposed copies of activations and gradients, made every
# micro-batch, and their results go straight to the optimizer: dW2 = post^T dY stays free of e5m2
# rounding, and dW1 = d_pre^T x carries only the rounding of dY that d_pre inherits (each e5m2
# rounding moves an element by up to 2^-3; tests/test_kernels.py measures the sums' error).

E5M2_MAX = 57344.0


class FP8MLPWeights(NamedTuple):
    """One layer's MLP weights in e4m3, made once per optimizer update. hidden x d = W1's shape."""
    W1_8: torch.Tensor       # (hidden, d) c_fc / w1_scale: pre = x W1^T
    W1_8t: torch.Tensor      # (d, hidden) its transpose: dx = d_pre W1
    w1_scale: torch.Tensor   # (1,) fp32
    W2_8: torch.Tensor       # (hidden, d) c_proj / w2_scale: d_post = dY W2^T
    W2_8t: torch.Tensor      # (d, hidden) its transpose: out = post W2
    w2_scale: torch.Tensor   # (1,) fp32


def quantize_e5m2(t: torch.Tensor, t_max: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in e5m2, scale) with scale = max|t| / 57344 as a one-element fp32 tensor: a
    gradient's largest magnitude maps to e5m2's largest value; rounded to nearest even. t_max:
    max|t| where a kernel found it already."""
    if t_max is None:
        t_max = largest_magnitude(t)
    scale = (t_max.float() / E5M2_MAX).clamp_min(E4M3_SCALE_FLOOR).reshape(1)
    g8 = (t.detach().float() / scale).clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)
    return g8, scale


def quantize_e5m2_scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in e5m2 for a one-element fp32 scale chosen beforehand: t times the scale's fp32
    reciprocal (as RELU2_BACKWARD_FP8 computes it), rounded to the nearest e5m2 value (ties to
    even), saturated at +-57344."""
    inv_scale = 1.0 / scale.float()
    return (t.detach().float() * inv_scale).clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)


def bounded_d_pre_scale(d_out_max: torch.Tensor, post_max: torch.Tensor, W2_8: torch.Tensor,
                        w2_scale: torch.Tensor) -> torch.Tensor:
    """An e5m2 scale for d_pre = 2 d_post sqrt(post) known before the GEMM that makes d_pre: each
    d_post_ij = sum_k dY_ik W2_jk (the e5m2 dY no larger than max|dY|, W2 as its e4m3 copy at
    w2_scale), so no |d_pre| exceeds 2 sqrt(max post) max|dY| max_j sum_k |W2_jk|, which maps to
    e5m2's largest value (1,). The bound is looser than d_pre's own maximum; that only moves
    d_pre's smallest magnitudes into e5m2's subnormals (or to zero), since the rounding of a
    normal e5m2 value is relative, whatever the scale."""
    w2_row_sum = W2_8.float().abs().sum(dim=1).amax() * w2_scale.float()
    bound = 2.0 * post_max.float().sqrt() * d_out_max.float() * w2_row_sum
    return (bound / E5M2_MAX).clamp_min(E4M3_SCALE_FLOOR).reshape(1)


@torch.library.custom_op("nanogpt_triton::linear_relu_square_fp8_backward", mutates_args=())
def _linear_relu_square_fp8_backward_op(g8: torch.Tensor, W2_8: torch.Tensor, post: torch.Tensor,
                                        scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d_pre = torch.empty_like(post)
    d_pre_max = _launch_gemm_epilogue(g8.contiguous(), W2_8.contiguous(), d_pre,
                                      post.contiguous(), RELU2_BACKWARD_MAX, scale=scale)
    return d_pre, d_pre_max


@_linear_relu_square_fp8_backward_op.register_fake
def _(g8, W2_8, post, scale):
    return torch.empty_like(post), torch.empty(1, dtype=torch.float32, device=post.device)


@torch.library.custom_op("nanogpt_triton::linear_relu_square_fp8_backward_scaled",
                         mutates_args=())
def _linear_relu_square_fp8_backward_scaled_op(g8: torch.Tensor, W2_8: torch.Tensor,
                                               post: torch.Tensor, scale: torch.Tensor,
                                               d_pre_scale: torch.Tensor
                                               ) -> tuple[torch.Tensor, torch.Tensor]:
    d_pre = torch.empty_like(post)
    d_pre8 = torch.empty(post.shape, dtype=torch.float8_e5m2, device=post.device)
    _launch_gemm_epilogue(g8.contiguous(), W2_8.contiguous(), d_pre, post.contiguous(),
                          RELU2_BACKWARD_FP8, scale=scale, fp8_scale=d_pre_scale, out8=d_pre8)
    return d_pre, d_pre8


@_linear_relu_square_fp8_backward_scaled_op.register_fake
def _(g8, W2_8, post, scale, d_pre_scale):
    return (torch.empty_like(post),
            torch.empty(post.shape, dtype=torch.float8_e5m2, device=post.device))


class _LinearReluSquareFP8Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W1, W2, W1_8, W1_8t, w1_scale, W2_8, W2_8t, w2_scale, act_scale,
                grad_bound):
        x8, x_scale = quantize_e4m3(x)
        out, post, post_max = _fp8_mlp_forward(x8, W1_8, x_scale * w1_scale, W2_8t, w2_scale,
                                               act_scale)
        ctx.grad_bound = grad_bound
        ctx.save_for_backward(x, post, post_max, W1_8t, w1_scale, W2_8, w2_scale)
        ctx.mark_non_differentiable(post_max)
        return out, post_max

    @staticmethod
    def backward(ctx, d_out, d_post_max):
        x, post, post_max, W1_8t, w1_scale, W2_8, w2_scale = ctx.saved_tensors
        d_out = d_out.contiguous()
        d_out_max = largest_magnitude(d_out)
        g8, g_scale = quantize_e5m2(d_out, d_out_max)
        if ctx.grad_bound:
            d_pre_scale = bounded_d_pre_scale(d_out_max, post_max, W2_8, w2_scale)
            d_pre, d_pre8 = _linear_relu_square_fp8_backward_scaled_op(
                g8, W2_8, post, g_scale * w2_scale, d_pre_scale)
        else:
            d_pre, d_pre_max = _linear_relu_square_fp8_backward_op(g8, W2_8, post,
                                                                   g_scale * w2_scale)
            d_pre8, d_pre_scale = quantize_e5m2(d_pre, d_pre_max)
        dx = _fp8_linear(d_pre8, W1_8t, d_pre_scale * w1_scale)
        return dx, d_pre.t() @ x, post.t() @ d_out, *[None] * 8


def _check_fp8_weights(name: str, W1: torch.Tensor, weights: FP8MLPWeights) -> None:
    hidden, d = W1.shape
    for arg, shape in (("W1_8", (hidden, d)), ("W1_8t", (d, hidden)), ("W2_8", (hidden, d)),
                       ("W2_8t", (d, hidden)), ("w1_scale", (1,)), ("w2_scale", (1,))):
        t = getattr(weights, arg)
        _check_shape(name, f"weights.{arg}", t, shape)
        _check_dtype(name, f"weights.{arg}", t,
                     (torch.float32,) if arg.endswith("scale") else (torch.float8_e4m3fn,))


def linear_relu_square_fp8_backward(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                                    weights: FP8MLPWeights, act_scale: torch.Tensor | None = None,
                                    grad_bound: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_relu_square_fp8 with W1 from `weights` too, and the backward's data gradients in
    FP8 (see the notes above): x (..., d), W1 and W2 (hidden, d) bf16, whose values the kernels
    read from `weights` only; act_scale (1,) fp32 or None (exact). grad_bound: d_pre's e5m2
    scale from bounded_d_pre_scale, so that the backward's GEMM writes d_pre8 itself, instead of
    d_pre's exact maximum and a pass that quantises it. Returns (out (..., d), the largest post
    (1,) fp32); out is differentiable in x, W1 and W2."""
    name = "linear_relu_square_fp8_backward"
    _check_mlp_args(name, x, W1, W2, multiple=16)
    _check_fp8_weights(name, W1, weights)
    if act_scale is not None:
        _check_fp8_down_args(name, W2, weights.W2_8t, weights.w2_scale, act_scale)
    out, post_max = _LinearReluSquareFP8Backward.apply(x.reshape(-1, x.shape[-1]), W1, W2,
                                                       *weights, act_scale, grad_bound)
    return out.view(*x.shape[:-1], W2.shape[1]), post_max


class _FP8BackwardReference(torch.autograd.Function):
    """The math of _LinearReluSquareFP8Backward in PyTorch. pre_from_post=False keeps pre for
    the backward instead of rebuilding relu(pre) as sqrt(post)."""

    @staticmethod
    def forward(ctx, x, W1, W2, W1_8, W1_8t, w1_scale, W2_8, W2_8t, w2_scale, act_scale,
                pre_from_post, grad_bound):
        x8, x_scale = quantize_e4m3(x)
        pre = _fp8_matmul_reference(x8, W1_8, x_scale * w1_scale).to(x.dtype)
        post = torch.relu(pre).square()
        post_max = post.amax().float().reshape(1)
        if act_scale is None:
            act_scale = exact_e4m3_scale(post_max)
        post8 = quantize_e4m3_scaled(post, act_scale)
        out = _fp8_matmul_reference(post8, W2_8t, act_scale * w2_scale).to(x.dtype)
        ctx.grad_bound = grad_bound
        ctx.save_for_backward(x, post, None if pre_from_post else pre, post_max, W1_8t, w1_scale,
                              W2_8, w2_scale)
        ctx.mark_non_differentiable(post_max)
        return out, post_max

    @staticmethod
    def backward(ctx, d_out, d_post_max):
        x, post, pre, post_max, W1_8t, w1_scale, W2_8, w2_scale = ctx.saved_tensors
        relu = post.float().sqrt() if pre is None else torch.relu(pre).float()
        d_out_max = largest_magnitude(d_out)
        g8, g_scale = quantize_e5m2(d_out, d_out_max)
        d_post = _fp8_matmul_reference(g8, W2_8, g_scale * w2_scale)
        d_pre = (2 * d_post * relu).to(d_out.dtype)
        if ctx.grad_bound:
            d_pre_scale = bounded_d_pre_scale(d_out_max, post_max, W2_8, w2_scale)
            d_pre8 = quantize_e5m2_scaled(d_pre, d_pre_scale)
        else:
            d_pre8, d_pre_scale = quantize_e5m2(d_pre)
        dx = _fp8_matmul_reference(d_pre8, W1_8t, d_pre_scale * w1_scale).to(d_out.dtype)
        return dx, d_pre.t() @ x, post.t() @ d_out, *[None] * 9


def linear_relu_square_fp8_backward_reference(x: torch.Tensor, W1: torch.Tensor,
                                              W2: torch.Tensor, weights: FP8MLPWeights,
                                              act_scale: torch.Tensor | None = None,
                                              pre_from_post: bool = True, grad_bound: bool = False
                                              ) -> tuple[torch.Tensor, torch.Tensor]:
    out, post_max = _FP8BackwardReference.apply(x.reshape(-1, x.shape[-1]), W1, W2, *weights,
                                                act_scale, pre_from_post, grad_bound)
    return out.view(*x.shape[:-1], W2.shape[1]), post_max


def _polar_update_tall(X: torch.Tensor, B: torch.Tensor, alpha: float, out: torch.Tensor,
                       tiles: dict | None = None) -> None:
    """Launch the AXPY GEMM on (count, m, n) or (m, n) X; `tiles` overrides the tiling (benchmarks)."""
    if X.data_ptr() < out.data_ptr() + out.nbytes and out.data_ptr() < X.data_ptr() + X.nbytes:
        # checked here, on real tensors, as torch.compile traces the public function with fakes
        raise ValueError("polar_update_tall: out must not overlap X (other tiles still read X)")
    n = X.shape[-1]
    rows = X.numel() // n
    X2 = X.view(rows, n)
    _launch_gemm_epilogue(X2, B.view(-1, n), out.view(rows, n), X2, AXPY, alpha=alpha,
                          rows_per_batch=X.shape[-2], tiles=tiles)


@torch.library.custom_op("nanogpt_triton::polar_update_tall", mutates_args=("out",))
def _polar_update_tall_op(X: torch.Tensor, B: torch.Tensor, alpha: float, out: torch.Tensor) -> None:
    _polar_update_tall(X, B, alpha, out)


@_polar_update_tall_op.register_fake
def _(X, B, alpha, out):
    return None


def _gemm_block_m() -> int:
    return (_INTERPRETED_TILES if INTERPRET else _GEMM_TILES)["BLOCK_M"]


def polar_update_tall_fits(X: torch.Tensor) -> bool:
    """Whether polar_update_tall takes X's shape: rows of a multiple of 16 bytes (TMA) and, with
    several matrices, a whole number of row tiles in each (a tile may not straddle two)."""
    one_matrix = X.dim() == 2 or X.shape[0] == 1
    return X.shape[-1] % 8 == 0 and (one_matrix or X.shape[-2] % _gemm_block_m() == 0)


def _check_polar_update_args(name: str, X: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> None:
    _check_runnable(name, X, B, out)
    if X.dim() not in (2, 3):
        raise ValueError(f"{name}: X must be (m, n) or (count, m, n), got shape {tuple(X.shape)}")
    n = X.shape[-1]
    for arg, t, shape in (("X", X, X.shape), ("B", B, (*X.shape[:-2], n, n)), ("out", out, X.shape)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
        _check_shape(name, arg, t, shape)
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
    if n % 8:   # TMA needs 16-byte aligned rows
        raise ValueError(f"{name}: n must be a multiple of 8, got X {tuple(X.shape)}")
    block_m = _gemm_block_m()
    if X.dim() == 3 and X.shape[0] > 1 and X.shape[1] % block_m:
        raise ValueError(f"{name}: with several matrices, m must be a multiple of {block_m} (a tile "
                         f"may not straddle two of them), got X {tuple(X.shape)}")


def polar_update_tall(X: torch.Tensor, B: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """out = alpha * X + X @ B for X (m, n) or (count, m, n) and symmetric B (n, n) or
    (count, n, n), all bf16 and contiguous: one Polar Express step on tall matrices, with fp32
    accumulation and one rounding. The kernel multiplies by B^T, which is B only for symmetric B
    (ba_plus_cAA's output is symmetric bit for bit); B is not checked, as that would cost a pass."""
    _check_polar_update_args("polar_update_tall", X, B, out)
    _polar_update_tall_op(X, B, float(alpha), out)
    return out


def polar_update_tall_reference(X: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    Xf = X.float()
    return (alpha * Xf + Xf @ B.float()).bfloat16()


# =================================================================================================
# 5. Soft-capped multi-token cross entropy with the FP8 head
# =================================================================================================
# Row t of the logits l serves K targets: loss_t = sum_k w_k (lse_t - z_t[tgt_{t+k}]) over the
# valid k (t + k < T, w_k > 0, 0 <= tgt < V), z = A sigmoid((l + B) / C), lse_t = logsumexp(z_t),
# with the soft cap's A = 23, B = 5, C = 7.5. The training loss is the plain sum over rows, so the
# gradient of every row has the same upstream factor and can be computed in the same kernel,
# before the backward pass asks for it:
#   dz_j = S_w softmax(z)_j - sum_k w_k [j == tgt_{t+k}],   S_w = sum of the valid w_k,
#   dl_j = dz_j (A / C) s_j (1 - s_j),   s = sigmoid((l + B) / C),
# written as e5m2(dl / grad_scale), the operand of the two FP8 backward GEMMs, which apply the
# upstream factor through their scale. One kernel reads the logits once from memory (the second
# pass over a row finds it in L2) instead of twice in a forward and a backward kernel.
#
# z < A, so exp(z - A) can neither overflow nor lose the sum: lse is accumulated with the fixed
# shift A instead of a running maximum.
#
# Keeping the row in L2 between the passes matters most: pass-1 reads are marked evict_last,
# pass-2 reads and the gradient writes evict_first, and pass 2 walks the row backwards, so that
# the blocks pass 1 read last, the likeliest to be still cached, come first.
#
# Per logit the kernel moves 3 bytes from memory (when pass 2 finds the row in a cache), and the
# transcendental unit, 16 results per clock per SM (an eighth of the FMA rate), is the scarce
# resource, so the arithmetic is arranged around it: 3.5 transcendentals per logit.
# - Pass 1 needs exp(z - A) at fp32 accuracy: 2^(A log2(e) (s - 1)), s = 1 / d with
#   d = 1 + 2^(-(l + B) log2(e) / C). Neighbouring logits share a reciprocal:
#   1 / d_a = d_b / (d_a d_b) and 1 / d_b = d_a / (d_a d_b).
# - Pass 2, rounded to 2 mantissa bits, takes the sigmoid from the hardware tanh (relative error
#   below 2^-10) and the exponential from a polynomial on the FMA units (relative error 7.5e-5),
#   whose coefficients carry the row's factor and the fraction of its lse shift.
#   The K target columns, where dz can cancel, are then rewritten with exact values.
# - The targets and their logits are loaded before pass 1, which hides their latency.
# The hardware ex2 / rcp are the approximate ones without denormal handling (relative error
# ~2^-22), and every affine argument is folded into one FMA. The instruction count matters too:
# a bf16 logit is widened by one integer instruction, pass 1 clamps logits on bf16 pairs, and the
# unrolled pass-2 blocks share one 64-bit base address.

def _kernel_constant(value: float):
    """A module constant for @triton.jit code: a constexpr when compiled, the plain value under
    the interpreter, which runs the kernels as Python (where a constexpr on the left of a tensor
    operation would wrap the result)."""
    return value if INTERPRET else tl.constexpr(value)


LOG2_E = 1.4426950408889634
_LOG2E = _kernel_constant(LOG2_E)
_A, _B, _C = (_kernel_constant(v) for v in (SOFTCAP_A, SOFTCAP_B, SOFTCAP_C))


@triton.jit
def _softcap(logits):
    s = tl.sigmoid((logits + _B) * (1.0 / _C))
    return _A * s, s


@triton.jit
def _ex2(x):
    """2^x; on the GPU ex2.approx.ftz (relative error ~2^-22, subnormal results flushed to 0)."""
    if INTERPRETED:
        return tl.exp2(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _rcp(x):
    """1 / x; on the GPU rcp.approx.ftz (relative error ~2^-23)."""
    if INTERPRETED:
        return 1.0 / x
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _bf16_to_f32(x):
    """x.to(float32) of bf16 x; on the GPU one integer instruction per value, taking two values
    from one 32-bit register (the compiler's conversion spends two on the upper one)."""
    if INTERPRETED:
        return x.to(tl.float32)
    return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r",
                                     [x], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _bf16_to_f32_above_m300(x):
    """max(x, -300).to(float32) of bf16 x, NaN kept; on the GPU one maximum for two values, taken
    on the bf16 pair (-300 is 0xC396 in bf16)."""
    if INTERPRETED:
        return tl.maximum(x.to(tl.float32), -300.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 c; mov.b32 c, 0xC396C396; max.NaN.bf16x2 c, $2, c; "
        "shl.b32 $0, c, 16; and.b32 $1, c, 0xffff0000; }",
        "=r,=r,r", [x], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _tanh(x):
    """tanh(x); on the GPU tanh.approx (relative error below 2^-10)."""
    if INTERPRETED:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _scaled_exp2_poly(a, x, exponent_base, coefficients):
    """c 2^(a x + e) on the FMA units (relative error 7.5e-5), given exponent_base = floor(e) +
    1.5 * 2^23 and the coefficients of the degree-3 polynomial fitted to 2^f on [-1/2, 1/2] (for
    relative error) times c 2^(e - floor(e)). a x + exponent_base rounds to the integer grid of
    its binade, so r holds n = floor(e) + round(a x) in its low mantissa bits, f = a x - round(a x)
    comes exactly from r, and n shifted into the exponent field scales the polynomial. c 2^(a x + e)
    must be a normal float."""
    c3, c2, c1, c0 = coefficients
    r = a * x + exponent_base
    f = a * x + (exponent_base - r)
    p = ((c3 * f + c2) * f + c1) * f + c0
    bits = p.to(tl.int32, bitcast=True) + (r.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sigmoid_denominator(logits):
    """1 + 2^(-(l + B) log2(e) / C) = 1 / sigmoid((l + B) / C); below 2^57 for l >= -300, so
    that the product of two stays finite."""
    return 1.0 + _ex2(logits * (-_LOG2E / _C) - _B * _LOG2E / _C)


@triton.jit
def _lse_terms(logits, valid, MASKED: tl.constexpr):
    """exp(z - A) = 2^(A log2(e) (s - 1)) of a block of bf16 logits, summed over neighbouring
    pairs (BLOCK / 2 values), with one reciprocal per pair; where `valid` is False (if MASKED) the
    terms are 0. Logits below -300 count as -300: the sigmoid is then under 2^-56, and exp(z - A)
    equals exp(-A) in fp32 either way."""
    la, lb = tl.split(tl.reshape(_bf16_to_f32_above_m300(logits), (logits.shape[0] // 2, 2)))
    da = _sigmoid_denominator(la)
    db = _sigmoid_denominator(lb)
    r = _rcp(da * db) * (_A * _LOG2E)
    ta = _ex2(db * r - _A * _LOG2E)
    tb = _ex2(da * r - _A * _LOG2E)
    if MASKED:
        va, vb = tl.split(tl.reshape(valid, (logits.shape[0] // 2, 2)))
        ta = tl.where(va, ta, 0.0)
        tb = tl.where(vb, tb, 0.0)
    return ta + tb


@triton.jit
def _grad_row_constants(lse, scale):
    """The per-row constants of _grad_terms for the row's lse and factor scale >= 0 (scalars):
    the affine map of the logits inside the tanh, and _scaled_exp2_poly's exponent_base and
    coefficients for the shift lse_shift = (A / 2 - lse) log2(e) and the factor scale. A row with
    scale 0 (no valid target) maps every logit to t = tanh(20) = 1, where 1 - t^2, and so the
    gradient, is exactly 0 (the exponent shift cannot give 0)."""
    has_grad = scale > 0
    lse_shift = (_A * 0.5 - lse) * _LOG2E
    n = tl.floor(lse_shift)
    c = tl.where(has_grad, scale, 1.0) * tl.exp2(lse_shift - n)
    tanh_a = tl.where(has_grad, 0.5 / _C, 0.0)
    tanh_b = tl.where(has_grad, 0.5 * _B / _C, 20.0)
    return tanh_a, tanh_b, n + 12582912.0, (0.05517084 * c, 0.24260935 * c, 0.69326096 * c, 0.99992818 * c)


@triton.jit
def _grad_terms(logits, row_constants):
    """scale p (1 - t^2) for every column of a block of bf16 logits, as if none were a target:
    with t = tanh((l + B) / 2C) = 2 s - 1, s (1 - s) = (1 - t^2) / 4 and p = exp(z - lse) =
    2^((A / 2) log2(e) t + lse_shift). The exponent lies in [-(A + ln V) log2(e), 0]."""
    tanh_a, tanh_b, exponent_base, coefficients = row_constants
    t = _tanh(_bf16_to_f32(logits) * tanh_a + tanh_b)
    return _scaled_exp2_poly(_A * 0.5 * _LOG2E, t, exponent_base, coefficients) * (1.0 - t * t)


@triton.jit
def _store_e5m2(ptrs, value, mask, STREAMING: tl.constexpr):
    if INTERPRETED:
        value = _round_to_e5m2_grid(value)
    value = value.to(tl.float8e5, fp_downcast_rounding="rtne")
    if STREAMING:
        tl.store(ptrs, value, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _mtp_targets(row, targets_ptr, w_ptr, extra_targets_ptr, extra_w_ptr, n_rows, n_cols,
                 K: tl.constexpr, K_POW2: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Target columns and weights of row `row` for k = 0..K-1 (and, with HAS_EXTRA, the row's
    extra target as lane K), as vectors of K_POW2: target -1 where there is no row + k, weight 0
    where the term is invalid."""
    k = tl.arange(0, K_POW2)
    has_row = (k < K) & (row + k < n_rows)
    target = tl.load(targets_ptr + row + k, mask=has_row, other=-1)
    weight = tl.load(w_ptr + k, mask=k < K, other=0.0)
    if HAS_EXTRA:
        extra = k == K
        target = tl.where(extra, tl.load(extra_targets_ptr + row + 0 * k, mask=extra, other=-1), target)
        weight = tl.where(extra, tl.load(extra_w_ptr + 0 * k, mask=extra, other=0.0), weight)
        has_row = has_row | extra
    valid = has_row & (weight > 0) & (target >= 0) & (target < n_cols)
    return target, tl.where(valid, weight, 0.0)


@triton.jit
def _mtp_ce_kernel(
    logits_ptr, stride_row, targets_ptr, w_ptr, extra_targets_ptr, extra_w_ptr, losses_ptr,
    grad_ptr, stride_grad, grad_scale, n_rows, n_cols,
    K: tl.constexpr, K_POW2: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_V: tl.constexpr,
):
    grad_factor = (_A / _C) / tl.cast(grad_scale, tl.float32)
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    grad_row_ptr = grad_ptr + row.to(tl.int64) * stride_grad
    cols = tl.arange(0, BLOCK_V)
    n_blocks = n_cols // BLOCK_V        # full blocks, then a masked tail
    n_full = n_blocks * BLOCK_V
    tail = cols < n_cols - n_full

    # the targets and their logits first: their loads complete while pass 1 runs
    target, weight = _mtp_targets(row, targets_ptr, w_ptr, extra_targets_ptr, extra_w_ptr, n_rows,
                                  n_cols, K, K_POW2, HAS_EXTRA)
    in_row = (target >= 0) & (target < n_cols)
    z_target, s_target = _softcap(tl.load(row_ptr + target, mask=in_row, other=0.0).to(tl.float32))

    # pass 1: log-sum-exp of the row, then the loss. The row is kept in L2 for pass 2.
    sum_exp = tl.zeros((BLOCK_V // 2,), dtype=tl.float32)
    for i in tl.range(0, n_blocks, loop_unroll_factor=4):
        logits = tl.load(row_ptr + i * BLOCK_V + cols, eviction_policy="evict_last")
        sum_exp += _lse_terms(logits, tail, False)
    if n_full < n_cols:
        logits = tl.load(row_ptr + n_full + cols, mask=tail, other=0.0)
        sum_exp += _lse_terms(logits, tail, True)
    lse = _A + tl.log(tl.sum(sum_exp, axis=0))
    tl.store(losses_ptr + row, tl.sum(tl.where(weight > 0, weight * (lse - z_target), 0.0), axis=0))
    weight_sum = tl.sum(weight, axis=0)

    # pass 2: the gradient of every column as if none were a target, walking the row backwards
    # so that the blocks pass 1 read last, the likeliest to be still cached, come first. Its
    # reads are the row's last use and its writes are not read here, so both leave L2 first.
    row_constants = _grad_row_constants(lse, 0.25 * weight_sum * grad_factor)
    if n_full < n_cols:
        logits = tl.load(row_ptr + n_full + cols, mask=tail, other=0.0)
        _store_e5m2(grad_row_ptr + n_full + cols, _grad_terms(logits, row_constants), tail, True)
    for i in tl.range(0, n_blocks, loop_unroll_factor=4):
        # a product with BLOCK_V keeps the loads vectorised; in 64 bits, the unrolled blocks'
        # addresses are one base with constant offsets
        c0 = (n_blocks - 1 - i).to(tl.int64) * BLOCK_V
        logits = tl.load((row_ptr + c0) + cols, eviction_policy="evict_first")
        _store_e5m2((grad_row_ptr + c0) + cols, _grad_terms(logits, row_constants), None, True)

    # then the exact gradient in the target columns overwrites pass 2's (after a barrier, which
    # orders the program's global stores); a column that is the target of several k gets the
    # same value from each
    tl.debug_barrier()
    same_column = target[:, None] == target[None, :]
    dz = weight_sum * tl.exp(z_target - lse) - tl.sum(tl.where(same_column, weight[None, :], 0.0), axis=1)
    _store_e5m2(grad_row_ptr + target, dz * s_target * (1.0 - s_target) * grad_factor, in_row, False)


# One program streams one row: 4096 columns over 16 warps, 8 per thread (16-byte loads), loops
# unrolled 4 times (40 registers, 3 programs per SM): the fastest tiling measured.
_CE_TILE = dict(BLOCK_V=4096, num_warps=16)
_CE_INTERPRETED_TILE = dict(BLOCK_V=256)


def _check_grad_scale(name: str, grad_scale: float) -> None:
    # the kernel builds gradients by exponent arithmetic that assumes normal fp32 values
    if not 2.0 ** -60 <= grad_scale <= 2.0 ** 60:
        raise ValueError(f"{name}: grad_scale must lie in [2^-60, 2^60], got {grad_scale}")


def _check_mtp_args(name: str, logits: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor) -> None:
    _check_runnable(name, logits, targets, mtp_weights)
    _check_dtype(name, "logits", logits, (torch.bfloat16,))
    _check_dtype(name, "targets", targets, (torch.int64,))
    _check_dtype(name, "mtp_weights", mtp_weights, (torch.float32,))
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"{name}: logits must be (T, V) with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    _check_shape(name, "targets", targets, (logits.shape[0],))
    if mtp_weights.dim() != 1 or mtp_weights.numel() < 1:
        raise ValueError(f"{name}: mtp_weights must be 1-D with at least one entry (K), "
                         f"got shape {tuple(mtp_weights.shape)}")


@torch.library.custom_op("nanogpt_triton::mtp_ce", mutates_args=())
def _mtp_ce_op(logits: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
               grad_scale: float, extra_targets: Optional[torch.Tensor] = None,
               extra_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    grad = torch.empty(n_rows, n_cols, dtype=torch.float8_e5m2, device=logits.device)
    targets, mtp_weights = targets.contiguous(), mtp_weights.contiguous()
    has_extra = extra_targets is not None
    extra = (extra_targets.contiguous(), extra_weight.contiguous()) if has_extra else (targets, mtp_weights)
    args = (logits, logits.stride(0), targets, mtp_weights, *extra, losses, grad, grad.stride(0),
            grad_scale, n_rows, n_cols)
    K = mtp_weights.numel()
    tile = _CE_INTERPRETED_TILE if INTERPRET else _CE_TILE
    _mtp_ce_kernel[(n_rows,)](*args, K=K, K_POW2=triton.next_power_of_2(K + has_extra),
                              HAS_EXTRA=has_extra, **tile)
    return losses, grad


@_mtp_ce_op.register_fake
def _(logits, targets, mtp_weights, grad_scale, extra_targets=None, extra_weight=None):
    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return losses, torch.empty(logits.shape, dtype=torch.float8_e5m2, device=logits.device)


def _check_extra_target(name: str, targets: torch.Tensor, extra_targets: torch.Tensor | None,
                        extra_weight: torch.Tensor | None) -> None:
    if (extra_targets is None) != (extra_weight is None):
        raise ValueError(f"{name}: extra_targets and extra_weight go together")
    if extra_targets is not None:
        _check_dtype(name, "extra_targets", extra_targets, (torch.int64,))
        _check_shape(name, "extra_targets", extra_targets, tuple(targets.shape))
        _check_dtype(name, "extra_weight", extra_weight, (torch.float32,))
        _check_shape(name, "extra_weight", extra_weight, (1,))


def softcapped_mtp_losses_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                                   mtp_weights: torch.Tensor, grad_scale: float,
                                   extra_targets: torch.Tensor | None = None,
                                   extra_weight: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row multi-token losses (T,) fp32 and the gradient of their sum with respect to the
    logits, as e5m2(gradient / grad_scale) (T, V), for bf16 logits (T, V), int64 targets (T,)
    and fp32 weights (K,), K >= 1 (1..3 in the speedrun). Row t's terms are the targets of rows
    t..t+K-1, and with extra_targets (T,) int64 and extra_weight (1,) fp32 one more term, its own
    extra target (the prefix-token loss)."""
    name = "softcapped_mtp_losses_and_grad"
    _check_mtp_args(name, logits, targets, mtp_weights)
    _check_extra_target(name, targets, extra_targets, extra_weight)
    _check_grad_scale(name, grad_scale)
    return _mtp_ce_op(logits, targets, mtp_weights, float(grad_scale), extra_targets, extra_weight)


def _mtp_terms(targets: torch.Tensor, mtp_weights: torch.Tensor, n_cols: int,
               extra_targets: torch.Tensor | None, extra_weight: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row's loss terms as target columns (T, J), weights (J,) and validity (T, J): term k
    the target k rows later for each k < K, then the extra target. A term is invalid where row
    t + k does not exist, its weight is 0 or its target lies outside [0, V); its column is then
    clamped. Tensor ops throughout (no loop over K), so one compiled graph serves every K."""
    n_rows = targets.shape[0]
    ahead = (torch.arange(n_rows, device=targets.device)[:, None]
             + torch.arange(mtp_weights.shape[0], device=targets.device)[None, :])
    target = torch.where(ahead < n_rows, targets[ahead.clamp(max=n_rows - 1)], -1)
    weight = mtp_weights
    if extra_targets is not None:
        target = torch.cat([target, extra_targets[:, None]], 1)
        weight = torch.cat([weight, extra_weight])
    valid = (weight > 0) & (target >= 0) & (target < n_cols)
    return target.clamp(0, n_cols - 1), weight, valid


def softcapped_mtp_losses_reference(logits: torch.Tensor, targets: torch.Tensor,
                                    mtp_weights: torch.Tensor,
                                    extra_targets: torch.Tensor | None = None,
                                    extra_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's per-row losses in plain PyTorch, computed in fp32 from the given logits;
    autograd through them gives the kernel's gradient."""
    z = softcap(logits.float())
    lse = torch.logsumexp(z, dim=-1)
    column, weight, valid = _mtp_terms(targets, mtp_weights, logits.shape[1], extra_targets,
                                       extra_weight)
    return torch.where(valid, weight * (lse[:, None] - z.gather(1, column)), 0.0).sum(1)


def softcapped_mtp_losses_and_grad_reference(logits: torch.Tensor, targets: torch.Tensor,
                                             mtp_weights: torch.Tensor, grad_scale: float,
                                             extra_targets: torch.Tensor | None = None,
                                             extra_weight: torch.Tensor | None = None
                                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """softcapped_mtp_losses_and_grad in plain PyTorch: the reference losses and the closed-form
    gradient of their sum (section notes above), as e5m2(gradient / grad_scale)."""
    s = torch.sigmoid((logits.float() + SOFTCAP_B) / SOFTCAP_C)
    softmax = torch.softmax(SOFTCAP_A * s, dim=1)
    column, weight, valid = _mtp_terms(targets, mtp_weights, logits.shape[1], extra_targets,
                                       extra_weight)
    weight = torch.where(valid, weight, 0.0)                                   # (T, J)
    dz = (weight.sum(1, keepdim=True) * softmax).scatter_add(1, column, -weight)
    grad = dz * (SOFTCAP_A / SOFTCAP_C) * s * (1.0 - s)
    losses = softcapped_mtp_losses_reference(logits, targets, mtp_weights, extra_targets, extra_weight)
    return losses, (grad / grad_scale).to(torch.float8_e5m2)


def _transposed(t: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """t^T as a new contiguous tensor (any dtype, fp8 included)."""
    if not use_kernels:
        return t.t().contiguous()
    out = t.new_empty(t.shape[1], t.shape[0])
    _transpose_copy_op(t, out)
    return out


class _SoftcappedMTPCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, mtp_weights, W_head, x_scale, w_scale, grad_scale, use_kernels,
                extra_targets, extra_weight):
        # e4m3 quantisation with fixed scales; the division is done in fp32 (one rounding)
        h8 = (h.float() / x_scale).to(torch.float8_e4m3fn)
        W8 = (W_head.float() / w_scale).to(torch.float8_e4m3fn)          # (d, V) row-major
        W8_t = _transposed(W8, use_kernels)                              # W8 column-major = W8_t^T
        x_s = torch.full((), x_scale, dtype=torch.float32, device=h.device)   # no host->device copy
        w_s = torch.full((), w_scale, dtype=torch.float32, device=h.device)
        logits = torch._scaled_mm(h8, W8_t.t(), scale_a=x_s, scale_b=w_s,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        loss_and_grad = _mtp_ce_op if use_kernels else softcapped_mtp_losses_and_grad_reference
        losses, G8 = loss_and_grad(logits, targets, mtp_weights, grad_scale, extra_targets, extra_weight)
        ctx.save_for_backward(G8, h8, W8)
        ctx.scales = (x_scale, w_scale, grad_scale)
        ctx.use_kernels = use_kernels
        return losses.sum()

    @staticmethod
    def backward(ctx, dloss):
        G8, h8, W8 = ctx.saved_tensors
        x_scale, w_scale, grad_scale = ctx.scales
        x_s = torch.full((), x_scale, dtype=torch.float32, device=G8.device)
        w_s = torch.full((), w_scale, dtype=torch.float32, device=G8.device)
        g_s = (dloss.float() * grad_scale).reshape(())   # the upstream factor, still on the device
        dh = dW_head = None
        if ctx.needs_input_grad[0]:   # dh = G W^T: W8 row-major (d, V) is W^T in column-major
            dh = torch._scaled_mm(G8, W8.t(), scale_a=g_s, scale_b=w_s,
                                  out_dtype=torch.bfloat16, use_fast_accum=False)
        if ctx.needs_input_grad[3]:   # dW = h^T G in the stored (d, V) layout, fp32
            G8_t = _transposed(G8, ctx.use_kernels)                      # G8 column-major = G8_t^T
            h8_t = _transposed(h8, ctx.use_kernels)                      # h^T row-major
            dW_head = torch._scaled_mm(h8_t, G8_t.t(), scale_a=x_s, scale_b=g_s,
                                       out_dtype=torch.float32, use_fast_accum=False)
        return dh, None, None, dW_head, None, None, None, None, None, None


def softcapped_mtp_cross_entropy(h: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
                                 W_head: torch.Tensor, x_scale: float, w_scale: float,
                                 grad_scale: float, use_kernels: bool = True,
                                 extra_targets: torch.Tensor | None = None,
                                 extra_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The summed soft-capped multi-token cross entropy (0-dim fp32) with the LM head evaluated
    in FP8: h (T, d) bf16, W_head (d, V) bf16 (stored transposed, logits = h @ W_head), fixed
    e4m3 scales x_scale and w_scale. The logits gradient travels as e5m2(dl / (grad_scale x g))
    for an upstream gradient g, so grad_scale is the scale for g = 1 (the speedrun's 0.75 / 448).
    Differentiable in h and W_head (dW_head comes back as fp32). With use_kernels=False the loss,
    its gradient and the transposes run as plain PyTorch (the same math, no Triton). The extra
    target term is softcapped_mtp_losses_and_grad's."""
    name = "softcapped_mtp_cross_entropy"
    if use_kernels:
        _check_runnable(name, h, targets, mtp_weights, W_head)
    _check_dtype(name, "h", h, (torch.bfloat16,))
    _check_dtype(name, "W_head", W_head, (torch.bfloat16,))
    _check_dtype(name, "targets", targets, (torch.int64,))
    _check_dtype(name, "mtp_weights", mtp_weights, (torch.float32,))
    if h.dim() != 2 or W_head.dim() != 2 or h.shape[1] != W_head.shape[0]:
        raise ValueError(f"{name}: expected h (T, d) and W_head (d, V), got {tuple(h.shape)} "
                         f"and {tuple(W_head.shape)}")
    _check_shape(name, "targets", targets, (h.shape[0],))
    if mtp_weights.dim() != 1 or mtp_weights.numel() < 1:
        raise ValueError(f"{name}: mtp_weights must be 1-D with at least one entry (K), "
                         f"got shape {tuple(mtp_weights.shape)}")
    for arg, value in (("x_scale", x_scale), ("w_scale", w_scale)):
        if not value > 0:
            raise ValueError(f"{name}: {arg} must be positive, got {value}")
    _check_extra_target(name, targets, extra_targets, extra_weight)
    _check_grad_scale(name, grad_scale)
    return _SoftcappedMTPCrossEntropy.apply(h.contiguous(), targets, mtp_weights, W_head.contiguous(),
                                            float(x_scale), float(w_scale), float(grad_scale),
                                            use_kernels, extra_targets, extra_weight)


def softcapped_mtp_cross_entropy_reference(h: torch.Tensor, targets: torch.Tensor,
                                           mtp_weights: torch.Tensor, W_head: torch.Tensor) -> torch.Tensor:
    """bf16 head (logits = h @ W_head in bf16), then the summed fp32 reference losses; autograd-ready."""
    return softcapped_mtp_losses_reference(h @ W_head, targets, mtp_weights).sum()


# =================================================================================================
# 6-7. Tiled transposes: dst = src^T and dst += src^T
# =================================================================================================
# Each program loads a tile coalesced along the rows of src, transposes it in registers and
# writes it coalesced along the rows of dst. A copy moves raw bits (any 1-, 2- or 4-byte dtype,
# fp8 included) through an integer view, so it is exact.

@triton.jit
def _transpose_kernel(
    src_ptr, dst_ptr, m, n,
    stride_sm, stride_sn, stride_dn, stride_dm,
    ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tile = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn,
                   mask=(rows[:, None] < m) & (cols[None, :] < n))
    dst_ptrs = dst_ptr + cols[:, None] * stride_dn + rows[None, :] * stride_dm
    dst_mask = (cols[:, None] < n) & (rows[None, :] < m)
    tile = tl.trans(tile)
    if ADD:   # bf16 only: one rounding of the fp32 sum
        tile = _to_bf16(tl.load(dst_ptrs, mask=dst_mask).to(tl.float32) + tile.to(tl.float32))
    tl.store(dst_ptrs, tile, mask=dst_mask)


_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _launch_transpose(src: torch.Tensor, dst: torch.Tensor, add: bool) -> None:
    m, n = src.shape
    block = 32 if INTERPRET else 64
    grid = (triton.cdiv(m, block), triton.cdiv(n, block))
    _transpose_kernel[grid](src, dst, m, n, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
                            ADD=add, BLOCK_M=block, BLOCK_N=block, num_warps=4)


def _check_transpose_args(name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    _check_runnable(name, src, dst)
    if src.dim() != 2:
        raise ValueError(f"{name}: src must be 2-D, got shape {tuple(src.shape)}")
    _check_shape(name, "dst", dst, (src.shape[1], src.shape[0]))
    if src.dtype != dst.dtype:
        raise ValueError(f"{name}: src and dst must share a dtype, got {src.dtype} and {dst.dtype}")


@torch.library.custom_op("nanogpt_triton::transpose_copy", mutates_args=("dst",))
def _transpose_copy_op(src: torch.Tensor, dst: torch.Tensor) -> None:
    bits = _BITS_VIEW[src.element_size()]
    _launch_transpose(src.view(bits), dst.view(bits), add=False)


@_transpose_copy_op.register_fake
def _(src, dst):
    return None


@torch.library.custom_op("nanogpt_triton::transpose_add", mutates_args=("dst",))
def _transpose_add_op(src: torch.Tensor, dst: torch.Tensor) -> None:
    _launch_transpose(src, dst, add=True)


@_transpose_add_op.register_fake
def _(src, dst):
    return None


def transpose_copy(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst (N, M) = src (M, N)^T, bit-exact, for any 1-, 2- or 4-byte dtype (bf16, fp8, ...)."""
    _check_transpose_args("transpose_copy", src, dst)
    if src.element_size() not in _BITS_VIEW:
        raise ValueError(f"transpose_copy: element size must be 1, 2 or 4 bytes, got {src.dtype}")
    _transpose_copy_op(src, dst)
    return dst


def transpose_copy_reference(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src.t())


def transpose_add(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst (N, M) += src (M, N)^T for bf16, added in fp32 and rounded once to bf16."""
    _check_transpose_args("transpose_add", src, dst)
    _check_dtype("transpose_add", "src", src, (torch.bfloat16,))
    _transpose_add_op(src, dst)
    return dst


def transpose_add_reference(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(dst.float() + src.t().float())


# =================================================================================================
# 8. Row scatter-add: out[l, index[t]] += src[l, t]
# =================================================================================================
# The gradient of a lookup table, from the gradients of its looked-up rows. index_add_ issues one
# fp32 atomic per row element, and the rows of frequent tokens (a few percent of a batch each)
# serialise on the same addresses. Here the index is sorted first; each program takes a chunk of
# consecutive sorted positions, sums the rows of each run of equal indices with a segmented scan,
# and issues one atomic add per run and column: about (distinct rows + chunks) instead of
# (positions) atomics per column.

@triton.jit
def _segment_sum_combine(starts_a, sum_a, starts_b, sum_b):
    """Segmented sum: a run restarts wherever b starts one."""
    return starts_a | starts_b, tl.where(starts_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _index_add_rows_kernel(
    out_ptr, stride_ol, stride_or, src_ptr, stride_sl, stride_st, sorted_ptr, order_ptr,
    n_index, n_rows, n_cols,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs = tl.arange(0, CHUNK)
    pos = tl.program_id(0) * CHUNK + offs
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    table = tl.program_id(2).to(tl.int64)
    valid = pos < n_index
    ids = tl.load(sorted_ptr + pos, mask=valid, other=-1)
    # a run starts at the chunk's first position or where the index changes, and ends likewise
    prev_ids = tl.load(sorted_ptr + pos - 1, mask=valid & (offs > 0), other=-1)
    next_ids = tl.load(sorted_ptr + pos + 1, mask=(pos + 1 < n_index) & (offs < CHUNK - 1), other=-1)
    starts = (ids != prev_ids).to(tl.int32)
    ends = valid & (ids != next_ids) & (ids >= 0) & (ids < n_rows)

    src_rows = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
    in_cols = cols < n_cols
    x = tl.load(src_ptr + table * stride_sl + src_rows[:, None] * stride_st + cols[None, :],
                mask=valid[:, None] & in_cols[None, :], other=0.0)
    _, run_sums = tl.associative_scan((tl.broadcast_to(starts[:, None], (CHUNK, BLOCK_D)), x), 0,
                                      _segment_sum_combine)
    tl.atomic_add(out_ptr + table * stride_ol + ids[:, None].to(tl.int64) * stride_or + cols[None, :],
                  run_sums, mask=ends[:, None] & in_cols[None, :], sem="relaxed")


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                   index_sorted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """out[l, index[t], :] += src[l, t, :] for fp32 out (L, R, D) and src (L, T, D) (or out (R, D)
    and src (T, D)), int32 or int64 index (T,) shared by the L tables: index_add_ along dim -2.
    `index_sorted` is torch.sort(index), for a caller that adds several tensors along one index.
    Index values must lie in [0, R); the lookup that produced them (tables[index]) has checked
    that already, and rows outside are skipped here. Sums in a nondeterministic order, like
    index_add_."""
    name = "index_add_rows"
    _check_runnable(name, out, index, src)
    _check_dtype(name, "out", out, (torch.float32,))
    _check_dtype(name, "src", src, (torch.float32,))
    _check_dtype(name, "index", index, (torch.int32, torch.int64))
    if out.dim() not in (2, 3) or src.dim() != out.dim() or index.dim() != 1:
        raise ValueError(f"{name}: expected out (L, R, D) or (R, D), src (L, T, D) or (T, D) and "
                         f"index (T,), got {tuple(out.shape)}, {tuple(src.shape)} and {tuple(index.shape)}")
    _check_shape(name, "src", src, (*out.shape[:-2], index.shape[0], out.shape[-1]))
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    src3 = src if src.dim() == 3 else src.unsqueeze(0)
    if out3.stride(-1) != 1 or src3.stride(-1) != 1:
        raise ValueError(f"{name}: out and src need contiguous rows, got strides {out.stride()} and {src.stride()}")
    sorted_index, order = torch.sort(index) if index_sorted is None else index_sorted
    _check_shape(name, "index_sorted", sorted_index, tuple(index.shape))
    tables, n_rows, n_cols = out3.shape
    chunk, block_d = (16, 32) if INTERPRET else (16, 512)   # the fastest tiling measured
    grid = (triton.cdiv(index.numel(), chunk), triton.cdiv(n_cols, block_d), tables)
    _index_add_rows_kernel[grid](out3, out3.stride(0), out3.stride(1), src3, src3.stride(0), src3.stride(1),
                                 sorted_index, order, index.numel(), n_rows, n_cols,
                                 CHUNK=chunk, BLOCK_D=block_d, num_warps=4)
    return out


def index_add_rows_reference(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                             index_sorted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """index_add_ along dim -2 (it needs no sorted index)."""
    return out.index_add_(-2, index, src)


# =================================================================================================
# 9. Dynamically composed attention (record #85): y_h(t) = w2_h(t) sum_s a(t, s) v_h(s)
# =================================================================================================
# a(t, s) = sum_g w1n_g(t) P_g(t, s) mixes the heads' softmax maps: P_g(t, .) is head g's softmax
# of scale q_g(t).k_g(s) over the keys s of t's document with t - window < s <= t, and w1n is w1
# divided by its RMS over the heads. Because a mixes all heads before it meets the values, the
# maps cannot stay inside a flash-attention kernel; but the window is short (112 tokens), so a
# block of BLOCK queries needs only the KEYS = next power of two >= BLOCK + window - 1 keys before
# it, and every map of the block fits on chip. The forward stores each head's log-sum-exp, so the
# backward recomputes the maps in two passes: by query blocks (dq, dw1n, dw2 and each head's
# delta = sum_s P dP), then by key blocks, over the queries that can see them (dk, dv), with no
# atomics. The maps are multiplied with the values in bf16 (as flash attention does); every sum
# is fp32. The loops over heads stay loops (not unrolled): each map of a block takes a register per
# entry and thread, and unrolled loops keep several alive at once, which spills.

@triton.jit
def _dc_tile(doc_ptr, T, row0, key0, ROWS: tl.constexpr, COLS: tl.constexpr, WINDOW: tl.constexpr):
    """Rows (queries) row0 + [0, ROWS), keys key0 + [0, COLS), which of them exist, and which
    query sees which key."""
    rows = row0 + tl.arange(0, ROWS)
    keys = key0 + tl.arange(0, COLS)
    row_ok = rows < T
    key_ok = (keys >= 0) & (keys < T)
    row_doc = tl.load(doc_ptr + rows, mask=row_ok, other=-1)
    key_doc = tl.load(doc_ptr + keys, mask=key_ok, other=-2)
    distance = rows[:, None] - keys[None, :]
    visible = ((distance >= 0) & (distance < WINDOW) & (row_doc[:, None] == key_doc[None, :])
               & row_ok[:, None] & key_ok[None, :])
    return rows.to(tl.int64), keys.to(tl.int64), row_ok, key_ok, visible


@triton.jit
def _dc_head(ptr, index, ok, head, H: tl.constexpr, HD: tl.constexpr):
    """The head's (len(index), HD) slice of a (T, H, HD) tensor; zeros where not ok."""
    dims = tl.arange(0, HD)
    return tl.load(ptr + index[:, None] * (H * HD) + head * HD + dims[None, :], mask=ok[:, None],
                   other=0.0)


@triton.jit
def _dc_probabilities(q_ptr, k_ptr, lse_ptr, rows, keys, row_ok, key_ok, visible, head, scale,
                      H: tl.constexpr, HD: tl.constexpr):
    """P_head(rows, keys) from the stored log-sum-exp of each row."""
    q = _dc_head(q_ptr, rows, row_ok, head, H, HD)
    k = _dc_head(k_ptr, keys, key_ok, head, H, HD)
    scores = _mma(tl.zeros((q.shape[0], k.shape[0]), tl.float32), q, k.T) * scale
    lse = tl.load(lse_ptr + rows * H + head, mask=row_ok, other=0.0)
    return tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)


@triton.jit
def _dc_mixed(q_ptr, k_ptr, lse_ptr, w1n_ptr, rows, keys, row_ok, key_ok, visible, scale,
              H: tl.constexpr, HD: tl.constexpr):
    """a(rows, keys) = sum_g w1n_g(row) P_g(rows, keys)."""
    mixed = tl.zeros((rows.shape[0], keys.shape[0]), tl.float32)
    for g in range(H):
        p = _dc_probabilities(q_ptr, k_ptr, lse_ptr, rows, keys, row_ok, key_ok, visible, g,
                              scale, H, HD)
        mixed += p * tl.load(w1n_ptr + rows * H + g, mask=row_ok, other=0.0)[:, None]
    return mixed


@triton.jit
def _dc_attention_forward_kernel(q_ptr, k_ptr, v_ptr, doc_ptr, w1n_ptr, w2_ptr, out_ptr, lse_ptr,
                                 T, scale, H: tl.constexpr, HD: tl.constexpr,
                                 WINDOW: tl.constexpr, BLOCK: tl.constexpr, KEYS: tl.constexpr):
    scale = tl.cast(scale, tl.float32)      # Python floats may arrive as fp64 under torch.compile
    row0 = tl.program_id(0) * BLOCK
    rows, keys, row_ok, key_ok, visible = _dc_tile(doc_ptr, T, row0, row0 + BLOCK - KEYS,
                                                   BLOCK, KEYS, WINDOW)
    for g in range(H):      # the log-sum-exp of every head's row
        q = _dc_head(q_ptr, rows, row_ok, g, H, HD)
        k = _dc_head(k_ptr, keys, key_ok, g, H, HD)
        scores = tl.where(visible, _mma(tl.zeros((BLOCK, KEYS), tl.float32), q, k.T) * scale,
                          float("-inf"))
        top = tl.max(scores, 1)
        top = tl.where(top == float("-inf"), 0.0, top)      # rows past T see no key
        total = tl.sum(tl.where(visible, tl.exp(scores - top[:, None]), 0.0), 1)
        lse = top + tl.log(tl.where(total > 0, total, 1.0))
        tl.store(lse_ptr + rows * H + g, lse, mask=row_ok)
    mixed = _to_bf16(_dc_mixed(q_ptr, k_ptr, lse_ptr, w1n_ptr, rows, keys, row_ok, key_ok,
                               visible, scale, H, HD))
    for h in range(H):
        v = _dc_head(v_ptr, keys, key_ok, h, H, HD)
        out = _mma(tl.zeros((BLOCK, HD), tl.float32), mixed, v)
        w2 = tl.load(w2_ptr + rows * H + h, mask=row_ok, other=0.0)
        dims = tl.arange(0, HD)
        tl.store(out_ptr + rows[:, None] * (H * HD) + h * HD + dims[None, :],
                 _to_bf16(out * w2[:, None]), mask=row_ok[:, None])


@triton.jit
def _dc_d_mixed(v_ptr, dy_ptr, w2_ptr, rows, keys, row_ok, key_ok, H: tl.constexpr,
                HD: tl.constexpr):
    """dL/da(rows, keys) = sum_h w2_h(row) dy_h(row) . v_h(key)."""
    d_mixed = tl.zeros((rows.shape[0], keys.shape[0]), tl.float32)
    for h in range(H):
        d_out = _dc_d_out(dy_ptr, w2_ptr, rows, row_ok, h, H, HD)
        d_mixed = _mma(d_mixed, d_out, _dc_head(v_ptr, keys, key_ok, h, H, HD).T)
    return d_mixed


@triton.jit
def _dc_d_out(dy_ptr, w2_ptr, rows, row_ok, head, H: tl.constexpr, HD: tl.constexpr):
    """dL/d(sum_s a v_h) = w2_h dy_h, rounded to bf16 for the tensor cores."""
    w2 = tl.load(w2_ptr + rows * H + head, mask=row_ok, other=0.0)
    return _to_bf16(_dc_head(dy_ptr, rows, row_ok, head, H, HD).to(tl.float32) * w2[:, None])


@triton.jit
def _dc_attention_backward_queries_kernel(
        q_ptr, k_ptr, v_ptr, doc_ptr, w1n_ptr, w2_ptr, lse_ptr, dy_ptr,
        dq_ptr, dw1n_ptr, dw2_ptr, delta_ptr, T, scale,
        H: tl.constexpr, HD: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
        KEYS: tl.constexpr):
    scale = tl.cast(scale, tl.float32)
    row0 = tl.program_id(0) * BLOCK
    rows, keys, row_ok, key_ok, visible = _dc_tile(doc_ptr, T, row0, row0 + BLOCK - KEYS,
                                                   BLOCK, KEYS, WINDOW)
    mixed = _to_bf16(_dc_mixed(q_ptr, k_ptr, lse_ptr, w1n_ptr, rows, keys, row_ok, key_ok,
                               visible, scale, H, HD))
    for h in range(H):      # dw2_h = dy_h . (sum_s a v_h), as the forward made it
        out = _mma(tl.zeros((BLOCK, HD), tl.float32), mixed, _dc_head(v_ptr, keys, key_ok, h, H, HD))
        dy = _dc_head(dy_ptr, rows, row_ok, h, H, HD).to(tl.float32)
        tl.store(dw2_ptr + rows * H + h, tl.sum(dy * out, 1), mask=row_ok)
    d_mixed = _dc_d_mixed(v_ptr, dy_ptr, w2_ptr, rows, keys, row_ok, key_ok, H, HD)
    dims = tl.arange(0, HD)
    for g in range(H):
        p = _dc_probabilities(q_ptr, k_ptr, lse_ptr, rows, keys, row_ok, key_ok, visible, g,
                              scale, H, HD)
        w1n = tl.load(w1n_ptr + rows * H + g, mask=row_ok, other=0.0)
        dw1n = tl.sum(p * d_mixed, 1)
        delta = w1n * dw1n                  # sum_s P dP, with dP = w1n d_mixed
        tl.store(dw1n_ptr + rows * H + g, dw1n, mask=row_ok)
        tl.store(delta_ptr + rows * H + g, delta, mask=row_ok)
        d_scores = _to_bf16(p * (w1n[:, None] * d_mixed - delta[:, None]))
        dq = _mma(tl.zeros((BLOCK, HD), tl.float32), d_scores, _dc_head(k_ptr, keys, key_ok, g, H, HD))
        tl.store(dq_ptr + rows[:, None] * (H * HD) + g * HD + dims[None, :], _to_bf16(dq * scale),
                 mask=row_ok[:, None])


@triton.jit
def _dc_attention_backward_keys_kernel(
        q_ptr, k_ptr, v_ptr, doc_ptr, w1n_ptr, w2_ptr, lse_ptr, dy_ptr, delta_ptr,
        dk_ptr, dv_ptr, T, scale,
        H: tl.constexpr, HD: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
        QUERIES: tl.constexpr):
    scale = tl.cast(scale, tl.float32)
    key0 = tl.program_id(0) * BLOCK         # these keys, and the QUERIES queries from key0 on
    rows, keys, row_ok, key_ok, visible = _dc_tile(doc_ptr, T, key0, key0, QUERIES, BLOCK, WINDOW)
    mixed = _to_bf16(_dc_mixed(q_ptr, k_ptr, lse_ptr, w1n_ptr, rows, keys, row_ok, key_ok,
                               visible, scale, H, HD))
    dims = tl.arange(0, HD)
    for h in range(H):      # dv_h(s) = sum_t a(t, s) w2_h(t) dy_h(t)
        d_out = _dc_d_out(dy_ptr, w2_ptr, rows, row_ok, h, H, HD)
        dv = _mma(tl.zeros((BLOCK, HD), tl.float32), mixed.T, d_out)
        tl.store(dv_ptr + keys[:, None] * (H * HD) + h * HD + dims[None, :], _to_bf16(dv),
                 mask=key_ok[:, None])
    d_mixed = _dc_d_mixed(v_ptr, dy_ptr, w2_ptr, rows, keys, row_ok, key_ok, H, HD)
    for g in range(H):
        p = _dc_probabilities(q_ptr, k_ptr, lse_ptr, rows, keys, row_ok, key_ok, visible, g,
                              scale, H, HD)
        w1n = tl.load(w1n_ptr + rows * H + g, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows * H + g, mask=row_ok, other=0.0)
        d_scores = _to_bf16(p * (w1n[:, None] * d_mixed - delta[:, None]))
        dk = _mma(tl.zeros((BLOCK, HD), tl.float32), d_scores.T, _dc_head(q_ptr, rows, row_ok, g, H, HD))
        tl.store(dk_ptr + keys[:, None] * (H * HD) + g * HD + dims[None, :], _to_bf16(dk * scale),
                 mask=key_ok[:, None])


# 16 queries see 16 + 111 = 127 keys (window 112): a 128-key span, nearly all of it used; 32 or 64
# queries (a 256-key span) spill heavily at any width. 4 warps and three pipeline stages measure
# fastest (records/bench_kernels.py --sweeps dc_attention) although the backward kernels spill a
# few registers there (records/kernel_registers.py): twice the programs per SM hide more latency
# than the spills cost.
_DC_TILES = dict(BLOCK=16, num_warps=4, num_stages=3)


def _dc_tiling(window: int) -> tuple[int, int]:
    """(BLOCK, KEYS): queries (or keys) per program, and the power-of-two span that covers them
    and their window."""
    block = 16 if INTERPRET else _DC_TILES["BLOCK"]
    return block, triton.next_power_of_2(block + window - 1)


def _dc_launch_options() -> dict:
    return dict(num_warps=_DC_TILES["num_warps"], num_stages=_DC_TILES["num_stages"])


@torch.library.custom_op("nanogpt_triton::dc_attention_forward", mutates_args=())
def _dc_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor,
                             w1n: torch.Tensor, w2: torch.Tensor, scale: float,
                             window: int) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, HD = q.shape
    out = torch.empty_like(v)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    block, keys = _dc_tiling(window)
    _dc_attention_forward_kernel[(triton.cdiv(T, block),)](
        q, k, v, doc, w1n, w2, out, lse, T, scale, H=H, HD=HD, WINDOW=window, BLOCK=block,
        KEYS=keys, **_dc_launch_options())
    return out, lse


@_dc_attention_forward_op.register_fake
def _(q, k, v, doc, w1n, w2, scale, window):
    return torch.empty_like(v), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("nanogpt_triton::dc_attention_backward", mutates_args=())
def _dc_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor,
                              w1n: torch.Tensor, w2: torch.Tensor, lse: torch.Tensor,
                              dy: torch.Tensor, scale: float, window: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    T, H, HD = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dw1n, dw2, delta = (torch.empty(T, H, dtype=torch.float32, device=q.device) for _ in range(3))
    block, span = _dc_tiling(window)
    grid = (triton.cdiv(T, block),)
    _dc_attention_backward_queries_kernel[grid](
        q, k, v, doc, w1n, w2, lse, dy, dq, dw1n, dw2, delta, T, scale, H=H, HD=HD,
        WINDOW=window, BLOCK=block, KEYS=span, **_dc_launch_options())
    _dc_attention_backward_keys_kernel[grid](
        q, k, v, doc, w1n, w2, lse, dy, delta, dk, dv, T, scale, H=H, HD=HD, WINDOW=window,
        BLOCK=block, QUERIES=span, **_dc_launch_options())
    return dq, dk, dv, dw1n, dw2


@_dc_attention_backward_op.register_fake
def _(q, k, v, doc, w1n, w2, lse, dy, scale, window):
    rows = q.new_empty(q.shape[:2], dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), rows,
            torch.empty_like(rows))


class _DCAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, w1n, w2, scale, window):
        out, lse = _dc_attention_forward_op(q, k, v, doc, w1n, w2, scale, window)
        ctx.save_for_backward(q, k, v, doc, w1n, w2, lse)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, dy):
        q, k, v, doc, w1n, w2, lse = ctx.saved_tensors
        dq, dk, dv, dw1n, dw2 = _dc_attention_backward_op(q, k, v, doc, w1n, w2, lse,
                                                          dy.contiguous(), ctx.scale, ctx.window)
        return dq, dk, dv, None, dw1n, dw2, None, None


def _dc_mixing_weights(w1: torch.Tensor) -> torch.Tensor:
    """w1 divided by its RMS over the heads (eps 1e-6), fp32."""
    w1 = w1.float()
    return w1 * torch.rsqrt(w1.square().mean(-1, keepdim=True) + 1e-6)


def dc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 scale: float, w1: torch.Tensor, w2: torch.Tensor, window: int) -> torch.Tensor:
    """The composed attention term (T, H, hd) in v's dtype: y_h(t) = w2_h(t) sum_s a(t, s) v_h(s)
    (see the section's notes). q, k, v: (T, H, hd) bf16, hd a power of two; cu_seqlens: the
    document starts (int32, last entry T, may repeat); w1, w2: (T, H). Differentiable in q, k, v,
    w1 and w2."""
    name = "dc_attention"
    _check_runnable(name, q, k, v, cu_seqlens, w1, w2)
    for arg, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
    T, H, HD = q.shape
    _check_shape(name, "k", k, q.shape)
    _check_shape(name, "v", v, q.shape)
    _check_shape(name, "w1", w1, (T, H))
    _check_shape(name, "w2", w2, (T, H))
    if HD & (HD - 1) or window < 1:
        raise ValueError(f"{name}: head_dim must be a power of two and window positive, got "
                         f"{HD} and {window}")
    positions = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens, positions, right=True).to(torch.int32)
    return _DCAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), doc,
                              _dc_mixing_weights(w1), w2.float().contiguous(), scale, window)


def dc_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, scale: float, w1: torch.Tensor,
                           w2: torch.Tensor, window: int, chunk: int = 128) -> torch.Tensor:
    """dc_attention in PyTorch, banded: the queries go in chunks of `chunk` rows, each against
    the chunk + window - 1 keys that can reach it, so memory grows with T x (chunk + window),
    not T^2; fp32 throughout."""
    T, H, hd = q.shape
    n = -(-T // chunk)
    rows = n * chunk
    positions = torch.arange(rows, device=q.device)
    document = torch.searchsorted(cu_seqlens, positions.clamp_max(T - 1), right=True)
    keys = (positions[::chunk, None] - (window - 1)
            + torch.arange(chunk + window - 1, device=q.device))           # (n, L)
    key_index = keys.clamp(0, T - 1)
    query = positions.view(n, chunk, 1)
    key = keys[:, None, :]
    visible = ((key >= 0) & (key <= query) & (key > query - window)
               & (document[key_index][:, None, :] == document.view(n, chunk, 1)))  # (n, C, L)
    pad = (0, 0, 0, 0, 0, rows - T)
    Q = F.pad(q.float(), pad).view(n, chunk, H, hd)
    K, V = k.float()[key_index], v.float()[key_index]                        # (n, L, H, hd)
    scores = torch.einsum("nchd,nlhd->nhcl", Q, K) * scale
    # a large finite fill: rows past T (padding) see no key, and must not produce NaN
    probs = torch.softmax(scores.masked_fill(~visible[:, None], -1e30), dim=-1)
    w1n = F.pad(_dc_mixing_weights(w1), (0, 0, 0, rows - T)).view(n, chunk, H)
    mixed = torch.einsum("nch,nhcl->ncl", w1n, probs)
    out = torch.einsum("ncl,nlhd->nchd", mixed, V).reshape(rows, H, hd)[:T]
    return (w2.float()[:, :, None] * out).to(v.dtype)


# =================================================================================================
# 10. Pairwise quadratic MLP: y = q(h) W, h = relu(x U^T), q(h) = (h_i h_j for i <= j)
# =================================================================================================
# r features per token give P = r (r + 1) / 2 products, numbered row-major by i: pair (i, j) is
# row i r - i (i - 1) / 2 + (j - i) of W (P, d). Equivalently y_k = h^T S_k h with S_k symmetric.
#
# The kernels never store q. h (T, padded r) is cut into blocks of PAIR_BLOCK features, and the
# pair matrix into the square tiles (a, c), a <= c, of blocks, numbered row by row of the lower
# triangle of (c, a). A tile's PAIR_BLOCK^2 products are the outer product of two contiguous
# slices of h, built in registers as one K-block of a GEMM, and its rows of W are gathered by the
# pair-number formula. Products that are no pair (i > j in a diagonal tile, j >= r) meet W rows
# loaded as zero. The tiles cover the triangle with little waste: 3,520 products computed for the
# 3,160 pairs of r = 79 at PAIR_BLOCK 8.
# The forward and dW kernels take the tiles GROUP at a time (a tiling field, 1 by default): a
# group's products side by side are one K-block of GROUP PAIR_BLOCK^2 (forward) or the rows of
# one MMA (dW, which then reads dY once per group instead of once per tile).
#   forward: program (token tile, column tile) accumulates y over all pair tiles.
#   dW:      program (group, column tile) accumulates Q^T dY over all token tiles and writes the
#            rows of its pairs; every pair lies in one tile, so no atomics.
#   dh:      program (token tile) computes G = dY W^T one pair tile at a time and contracts it at
#            once, dh_i += G_ij h_j and dh_j += G_ij h_i, into dh rows kept in registers (a
#            diagonal pair takes both terms: d(h_i^2)/dh_i = 2 h_i).
# h, the only activation kept for the backward, is relu(x U^T) from a small torch GEMM, padded
# with zero columns to whole blocks; d_pre, dU and dx are small torch GEMMs too.

@triton.jit
def _group_tiles(group, num_tiles, GROUP: tl.constexpr):
    """Blocks (a, c), (GROUP,) each, of pair tiles group GROUP ... + GROUP - 1, and which of them
    exist: a group past the last tile repeats the last one, whose W rows it then never touches."""
    tile = group * GROUP + tl.arange(0, GROUP)
    c, a = _lower_triangle_tile(tl.minimum(tile, num_tiles - 1), 1)
    return a, c, tile < num_tiles


@triton.jit
def _group_rows(a, c, exists, r, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """The W rows of a group's products in their (tile, i, j) row-major order, (GROUP BLOCK^2,),
    and which of them are pairs (i <= j < r, of a tile that exists)."""
    i = a[:, None, None] * BLOCK + tl.arange(0, BLOCK)[None, :, None]
    j = c[:, None, None] * BLOCK + tl.arange(0, BLOCK)[None, None, :]
    rows = i * r - i * (i - 1) // 2 + (j - i)
    is_pair = (i <= j) & (j < r) & exists[:, None, None]
    return (tl.reshape(rows, (GROUP * BLOCK * BLOCK,)),
            tl.reshape(is_pair, (GROUP * BLOCK * BLOCK,)))


@triton.jit
def _group_features(h_ptr, rows, row_ok, blocks, h_stride, GROUP: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Features blocks[m] * BLOCK ... + BLOCK of the given tokens side by side, (tokens, GROUP
    BLOCK) fp32 (0 past T)."""
    cols = tl.reshape(blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], (GROUP * BLOCK,))
    return tl.load(h_ptr + rows[:, None] * h_stride + cols[None, :], mask=row_ok[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _group_products(h_a, h_c, BLOCK_T: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """(BLOCK_T, GROUP BLOCK^2) bf16 from two _group_features: column (m BLOCK + ii) BLOCK + jj
    holds feature ii of block a_m times feature jj of block c_m (exact in fp32, then rounded once,
    as a bf16 multiplication rounds)."""
    products = (tl.reshape(h_a, (BLOCK_T, GROUP, BLOCK, 1))
                * tl.reshape(h_c, (BLOCK_T, GROUP, 1, BLOCK)))
    return _to_bf16(tl.reshape(products, (BLOCK_T, GROUP * BLOCK * BLOCK)))


@triton.jit
def _pairwise_forward_kernel(
    h_ptr, w_ptr, y_ptr, T, r, d, h_stride, num_blocks,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr = 1,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < T, cols < d
    num_tiles = num_blocks * (num_blocks + 1) // 2
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    # one loop over the groups of pair tiles, not one over c around one over a: the software
    # pipeline then runs through all of them instead of draining at the end of every row of tiles
    for group in range(tl.cdiv(num_tiles, GROUP)):
        a, c, exists = _group_tiles(group, num_tiles, GROUP)
        q = _group_products(_group_features(h_ptr, rows, row_ok, a, h_stride, GROUP, BLOCK),
                            _group_features(h_ptr, rows, row_ok, c, h_stride, GROUP, BLOCK),
                            BLOCK_T, GROUP, BLOCK)
        w_rows, is_pair = _group_rows(a, c, exists, r, GROUP, BLOCK)
        w = tl.load(w_ptr + w_rows[:, None] * d + cols[None, :],
                    mask=is_pair[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(acc, q, w)
    tl.store(y_ptr + rows[:, None] * d + cols[None, :], _to_bf16(acc),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pairwise_dw_kernel(
    dy_ptr, h_ptr, dw_ptr, T, r, d, h_stride, num_blocks,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr = 1,
):
    num_tiles = num_blocks * (num_blocks + 1) // 2
    a, c, exists = _group_tiles(tl.program_id(0), num_tiles, GROUP)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    acc = tl.zeros((GROUP * BLOCK * BLOCK, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        q = _group_products(_group_features(h_ptr, rows, row_ok, a, h_stride, GROUP, BLOCK),
                            _group_features(h_ptr, rows, row_ok, c, h_stride, GROUP, BLOCK),
                            BLOCK_T, GROUP, BLOCK)
        dy = tl.load(dy_ptr + rows[:, None] * d + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(acc, tl.trans(q), dy)
    w_rows, is_pair = _group_rows(a, c, exists, r, GROUP, BLOCK)
    tl.store(dw_ptr + w_rows[:, None] * d + cols[None, :], _to_bf16(acc),
             mask=is_pair[:, None] & col_ok[None, :])


@triton.jit
def _pairwise_dh_kernel(
    dy_ptr, h_ptr, w_ptr, dh_ptr, T, r, d, h_stride, num_blocks,
    BLOCK: tl.constexpr, BLOCKS_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    num_tiles = num_blocks * (num_blocks + 1) // 2
    # dh of the tile's tokens as (token, block, feature in block): a block's update is a select
    dh = tl.zeros((BLOCK_T, BLOCKS_POW2, BLOCK), dtype=tl.float32)
    block_ids = tl.arange(0, BLOCKS_POW2)[None, :, None]
    # flatten: the k loop merges into the tile loop, so the pipeline keeps loading across tiles
    for tile in tl.range(0, num_tiles, flatten=FLATTEN):
        a, c, exists = _group_tiles(tile, num_tiles, 1)     # a group of one tile
        w_rows, is_pair = _group_rows(a, c, exists, r, 1, BLOCK)
        g = tl.zeros((BLOCK_T, BLOCK * BLOCK), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            dy = tl.load(dy_ptr + rows[:, None] * d + ks[None, :],
                         mask=row_ok[:, None] & (ks < d)[None, :], other=0.0)
            w_t = tl.load(w_ptr + w_rows[None, :] * d + ks[:, None],
                          mask=is_pair[None, :] & (ks < d)[:, None], other=0.0)
            g = _mma(g, dy, w_t)
        g = tl.reshape(g, (BLOCK_T, BLOCK, BLOCK))     # G_ij, i in block a, j in block c
        h_a = _group_features(h_ptr, rows, row_ok, a, h_stride, 1, BLOCK)
        h_c = _group_features(h_ptr, rows, row_ok, c, h_stride, 1, BLOCK)
        to_a = tl.sum(g * h_c[:, None, :], axis=2)     # dh_i += sum_j G_ij h_j
        to_c = tl.sum(g * h_a[:, :, None], axis=1)     # dh_j += sum_i G_ij h_i
        dh += tl.where(block_ids == tl.sum(a), to_a[:, None, :], 0.0)   # sum: a's one value
        dh += tl.where(block_ids == tl.sum(c), to_c[:, None, :], 0.0)
    cols = tl.arange(0, BLOCKS_POW2 * BLOCK)
    tl.store(dh_ptr + rows[:, None] * h_stride + cols[None, :],
             tl.reshape(dh, (BLOCK_T, BLOCKS_POW2 * BLOCK)),
             mask=row_ok[:, None] & (cols < h_stride)[None, :])


# The tiling is the fastest of records/bench_kernels.py's --sweeps pairwise over r = 79 and 110
# together (records/kernels/NVIDIA_H100_80GB_HBM3_2026-12-06.md). PAIR_BLOCK 8 makes each pair
# tile a K-block of 64 products; the interpreter takes 4 (K = 16, the smallest tl.dot), so that
# the small test shapes span several blocks, and groups of 2 tiles.
# (records/kernel_registers.py: GROUP 4 with BLOCK_T 128 leaves the forward no shared memory.)
_PAIRWISE_TILES = dict(
    PAIR_BLOCK=8,
    forward=dict(BLOCK_T=128, BLOCK_N=256, num_warps=8, num_stages=3),
    dw=dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dh=dict(BLOCK_T=128, BLOCK_D=64, FLATTEN=True, num_warps=8, num_stages=3),
)
_PAIRWISE_INTERPRETED_TILES = dict(
    PAIR_BLOCK=4, forward=dict(BLOCK_T=16, BLOCK_N=16, GROUP=2),
    dw=dict(BLOCK_T=16, BLOCK_N=16, GROUP=2), dh=dict(BLOCK_T=16, BLOCK_D=16, FLATTEN=False),
)
PAIRWISE_MAX_RANK = 256   # the dh kernel keeps a row of dh per token in registers


def pair_count(r: int) -> int:
    """P, the number of pairs i <= j of r features."""
    return r * (r + 1) // 2


def _pairwise_tiles() -> dict:
    return _PAIRWISE_INTERPRETED_TILES if INTERPRET else _PAIRWISE_TILES


def _pairwise_padded(U: torch.Tensor) -> torch.Tensor:
    """U (r, d) with zero rows up to whole pair blocks: h = relu(x U_padded^T) has zero padding
    columns, and on a GPU (blocks of 8) the small GEMMs with U run on aligned rows."""
    return F.pad(U, (0, 0, 0, -U.shape[0] % _pairwise_tiles()["PAIR_BLOCK"]))


@torch.library.custom_op("nanogpt_triton::pairwise_forward", mutates_args=())
def _pairwise_forward_op(h: torch.Tensor, W: torch.Tensor, r: int) -> torch.Tensor:
    tiles = _pairwise_tiles()
    block, launch = tiles["PAIR_BLOCK"], tiles["forward"]
    T, d = h.shape[0], W.shape[1]
    y = h.new_empty(T, d)
    grid = (triton.cdiv(T, launch["BLOCK_T"]), triton.cdiv(d, launch["BLOCK_N"]))
    _pairwise_forward_kernel[grid](h, W, y, T, r, d, h.shape[1], h.shape[1] // block,
                                   BLOCK=block, **launch)
    return y


@_pairwise_forward_op.register_fake
def _(h, W, r):
    return h.new_empty(h.shape[0], W.shape[1])


@torch.library.custom_op("nanogpt_triton::pairwise_backward", mutates_args=())
def _pairwise_backward_op(d_out: torch.Tensor, h: torch.Tensor, W: torch.Tensor,
                          r: int) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = _pairwise_tiles()
    block = tiles["PAIR_BLOCK"]
    T, d = h.shape[0], W.shape[1]
    num_blocks = h.shape[1] // block
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dW = torch.empty_like(W)
    launch = tiles["dh"]
    _pairwise_dh_kernel[(triton.cdiv(T, launch["BLOCK_T"]),)](
        d_out, h, W, dh, T, r, d, h.shape[1], num_blocks, BLOCK=block,
        BLOCKS_POW2=triton.next_power_of_2(num_blocks), **launch)
    launch = tiles["dw"]
    groups = triton.cdiv(pair_count(num_blocks), launch.get("GROUP", 1))
    _pairwise_dw_kernel[(groups, triton.cdiv(d, launch["BLOCK_N"]))](
        d_out, h, dW, T, r, d, h.shape[1], num_blocks, BLOCK=block, **launch)
    return dh, dW


@_pairwise_backward_op.register_fake
def _(d_out, h, W, r):
    return h.new_empty(h.shape, dtype=torch.float32), torch.empty_like(W)


def _check_pairwise_args(name: str, x: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> None:
    if U.dim() != 2 or W.dim() != 2 or x.shape[-1] != U.shape[1] or W.shape[1] != U.shape[1]:
        raise ValueError(f"{name}: expected x (..., d), U (r, d) and W (r (r + 1) / 2, d), got x "
                         f"{tuple(x.shape)}, U {tuple(U.shape)}, W {tuple(W.shape)}")
    r = U.shape[0]
    if W.shape[0] != pair_count(r):
        raise ValueError(f"{name}: W must have r (r + 1) / 2 = {pair_count(r)} rows for U's r = {r} "
                         f"features, got W {tuple(W.shape)}")


# The same layer through cuBLAS (pairwise_mlp_gemm): q (T, P) is written from h by one kernel
# (pair_products), used by one GEMM and dropped; the backward writes it again for dW, and one more
# kernel (pair_contract) contracts G = dY W^T (T, P) with h into dh. q and G cross memory four
# times in all, which at the speedrun shapes costs less than building the pair tiles inside the
# GEMMs' inner loop (records/2026-12-06_pairwise_mlp/). h, padded as above, stays the only
# activation kept for the backward, and the backward after dh is the fused form's.
# Both kernels take pair row i (pairs (i, j), j >= i, contiguous in q from i r - i (i - 1) / 2) as
# one vector over j, shifted so that pair (i, j) lands in lane j next to feature h_j:
#   pair_products: program (token tile, i) stores h_i h_j for j >= i (rounded once, like a bf16
#                  multiplication).
#   pair_contract: program (token tile) runs over i, with dh (tokens, all features) in registers:
#                  dh_j += G_ij h_i for every j >= i, and dh_i += sum_j G_ij h_j. The diagonal
#                  pair takes both terms, as d(h_i^2)/dh_i = 2 h_i. Each G entry is read once.

@triton.jit
def _pair_row_start(i, r):
    return i * r - i * (i - 1) // 2


@triton.jit
def _pair_products_kernel(h_ptr, q_ptr, T, r, h_stride, q_stride, BLOCK_T: tl.constexpr,
                          FEATURES_POW2: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.program_id(1)
    j = tl.arange(0, FEATURES_POW2)
    row_ok, in_row = rows < T, (j >= i) & (j < r)
    h_i = tl.load(h_ptr + rows * h_stride + i, mask=row_ok, other=0.0).to(tl.float32)
    h_j = tl.load(h_ptr + rows[:, None] * h_stride + j[None, :],
                  mask=row_ok[:, None] & in_row[None, :], other=0.0).to(tl.float32)
    tl.store(q_ptr + rows[:, None] * q_stride + (_pair_row_start(i, r) - i + j)[None, :],
             _to_bf16(h_i[:, None] * h_j), mask=row_ok[:, None] & in_row[None, :])


@triton.jit
def _pair_contract_kernel(g_ptr, h_ptr, dh_ptr, T, r, g_stride, h_stride, BLOCK_T: tl.constexpr,
                          FEATURES_POW2: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, FEATURES_POW2)
    row_ok = rows < T
    h = tl.load(h_ptr + rows[:, None] * h_stride + j[None, :],
                mask=row_ok[:, None] & (j < r)[None, :], other=0.0).to(tl.float32)
    dh = tl.zeros((BLOCK_T, FEATURES_POW2), dtype=tl.float32)
    for i in range(r):
        in_row = (j >= i) & (j < r)
        g = tl.load(g_ptr + rows[:, None] * g_stride + (_pair_row_start(i, r) - i + j)[None, :],
                    mask=row_ok[:, None] & in_row[None, :], other=0.0).to(tl.float32)
        h_i = tl.load(h_ptr + rows * h_stride + i, mask=row_ok, other=0.0).to(tl.float32)
        dh += g * h_i[:, None]
        dh += tl.where(j[None, :] == i, tl.sum(g * h, axis=1)[:, None], 0.0)
    tl.store(dh_ptr + rows[:, None] * h_stride + j[None, :], dh,
             mask=row_ok[:, None] & (j < h_stride)[None, :])


# Token tiles, the fastest of bench_kernels.py's pairwise_gemm sweep on the H200 at r = 79 and 110
# (records/2026-12-06_pairwise_mlp/). pair_contract holds dh, h and a row of G per token in
# registers (3 x 128 fp32 values at r <= 128).
_PAIR_KERNEL_TILES = dict(products=dict(BLOCK_T=32, num_warps=4),
                          contract=dict(BLOCK_T=32, num_warps=4))
_PAIR_KERNEL_INTERPRETED_TILES = dict(products=dict(BLOCK_T=16), contract=dict(BLOCK_T=16))


def _pair_kernel_tiles() -> dict:
    return _PAIR_KERNEL_INTERPRETED_TILES if INTERPRET else _PAIR_KERNEL_TILES


@torch.library.custom_op("nanogpt_triton::pair_products", mutates_args=())
def _pair_products_op(h: torch.Tensor, r: int, width: int) -> torch.Tensor:
    T, P = h.shape[0], pair_count(r)
    q = h.new_empty(T, width)
    if width > P:
        q[:, P:].zero_()
    launch = _pair_kernel_tiles()["products"]
    _pair_products_kernel[(triton.cdiv(T, launch["BLOCK_T"]), r)](
        h, q, T, r, h.stride(0), width, FEATURES_POW2=triton.next_power_of_2(r), **launch)
    return q


@_pair_products_op.register_fake
def _(h, r, width):
    return h.new_empty(h.shape[0], width)


@torch.library.custom_op("nanogpt_triton::pair_contract", mutates_args=())
def _pair_contract_op(G: torch.Tensor, h: torch.Tensor, r: int) -> torch.Tensor:
    T = h.shape[0]
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    launch = _pair_kernel_tiles()["contract"]
    _pair_contract_kernel[(triton.cdiv(T, launch["BLOCK_T"]),)](
        G, h, dh, T, r, G.shape[1], h.stride(0),
        FEATURES_POW2=triton.next_power_of_2(h.shape[1]), **launch)
    return dh


@_pair_contract_op.register_fake
def _(G, h, r):
    return h.new_empty(h.shape, dtype=torch.float32)


def _check_pair_args(name: str, h: torch.Tensor, r: int, G: torch.Tensor | None = None) -> None:
    if h.dim() != 2 or not 1 <= r <= h.shape[1] or h.stride(1) != 1:
        raise ValueError(f"{name}: expected h (T, r or more features, contiguous rows) and "
                         f"1 <= r <= its width, got h {tuple(h.shape)} and r = {r}")
    if G is not None and (G.dim() != 2 or G.shape[0] != h.shape[0]
                          or G.shape[1] < pair_count(r) or not G.is_contiguous()):
        raise ValueError(f"{name}: expected G contiguous (T, r (r + 1) / 2 or more) = "
                         f"({h.shape[0]}, {pair_count(r)} or more), got {tuple(G.shape)}")


def pair_products(h: torch.Tensor, r: int, width: int | None = None) -> torch.Tensor:
    """q (T, width): h_i h_j of features i <= j < r of h (T, r or more), row-major by i, in h's
    dtype (each product rounded once), then zeros from column P to `width` (default P)."""
    _check_runnable("pair_products", h)
    _check_pair_args("pair_products", h, r)
    width = pair_count(r) if width is None else width
    if width < pair_count(r):
        raise ValueError(f"pair_products: width {width} < the {pair_count(r)} pairs of r = {r}")
    return _pair_products_op(h, r, width)


def pair_products_reference(h: torch.Tensor, r: int) -> torch.Tensor:
    """The products of the pairs of h's first r features (..., r or more), picked by fixed
    index."""
    i, j, _ = _pair_indices(r, h.device)
    return h[..., i] * h[..., j]


def pair_contract(G: torch.Tensor, h: torch.Tensor, r: int) -> torch.Tensor:
    """dh (T, h's width) fp32: the gradient of sum_p G_p q_p(h) with respect to h, for q =
    pair_products(h, r) and G (T, P or more: columns from P on are not read); zero in the
    features from r on."""
    _check_runnable("pair_contract", G, h)
    _check_pair_args("pair_contract", h, r, G)
    return _pair_contract_op(G, h, r)


def pair_contract_reference(G: torch.Tensor, h: torch.Tensor, r: int) -> torch.Tensor:
    """dh_i = sum_j G_{pair(i, j)} h_j over all j, plus G_{pair(i, i)} h_i once more, by gathers."""
    _, _, pair = _pair_indices(r, h.device)
    wide = torch.promote_types(h.dtype, torch.float32)
    features = h[:, :r].to(wide)
    dh = ((G[:, pair].to(wide) * features[:, None, :]).sum(-1)
          + G[:, pair.diagonal()].to(wide) * features)
    return F.pad(dh, (0, h.shape[1] - r))


def _pair_indices(r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """i, j of every pair (P,) in W's row order, and pair (r, r): the pair number of (min(i, j),
    max(i, j)) for every i and j."""
    i, j = torch.triu_indices(r, r, device=device)
    features = torch.arange(r, device=device)
    low = torch.minimum(features[:, None], features[None, :])
    high = torch.maximum(features[:, None], features[None, :])
    return i, j, low * r - low * (low - 1) // 2 + (high - low)


class _PairwiseMLP(torch.autograd.Function):
    """Either form: `fused` builds the products inside the GEMMs, else q is written for cuBLAS."""
    @staticmethod
    def forward(ctx, x, U, W, fused):
        r, U_padded = U.shape[0], _pairwise_padded(U)
        h = torch.relu(x @ U_padded.t())
        ctx.save_for_backward(x, U_padded, W, h)
        ctx.rank, ctx.fused = r, fused
        if fused:
            return _pairwise_forward_op(h, W, r)
        width = _aligned_pair_width(r)
        return _pair_products_op(h, r, width) @ _rows_padded(W, width)

    @staticmethod
    def backward(ctx, d_out):
        x, U_padded, W, h = ctx.saved_tensors
        r, dW = ctx.rank, None
        if ctx.fused:
            dh, dW = _pairwise_backward_op(d_out.contiguous(), h, W, r)
        else:
            width = _aligned_pair_width(r)
            if ctx.needs_input_grad[2]:
                dW = (_pair_products_op(h, r, width).t() @ d_out)[:W.shape[0]]
            dh = _pair_contract_op(d_out @ _rows_padded(W, width).t(), h, r)
        # relu' from h: h > 0 exactly where the (bf16) pre-activation is; padding columns are 0
        d_pre = torch.where(h > 0, dh, 0.0).to(x.dtype)
        dx = d_pre @ U_padded if ctx.needs_input_grad[0] else None
        dU = (d_pre.t() @ x)[:r] if ctx.needs_input_grad[1] else None
        return dx, dU, dW if ctx.needs_input_grad[2] else None, None


def _aligned_pair_width(r: int) -> int:
    """P rounded up to whole 16-byte rows of bf16: cuBLAS takes its fast GEMM kernels only for
    aligned rows (at r = 110, P = 6,105 ran the layer's three GEMMs 10 times slower)."""
    return pair_count(r) + (-pair_count(r) % 8)


def _rows_padded(W: torch.Tensor, rows: int) -> torch.Tensor:
    return W if W.shape[0] == rows else F.pad(W, (0, 0, 0, rows - W.shape[0]))


def _pairwise_layer(name: str, x: torch.Tensor, U: torch.Tensor, W: torch.Tensor,
                    fused: bool) -> torch.Tensor:
    _check_runnable(name, x, U, W)
    for arg, t in (("x", x), ("U", U), ("W", W)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
    _check_pairwise_args(name, x, U, W)
    if not 1 <= U.shape[0] <= PAIRWISE_MAX_RANK:
        raise ValueError(f"{name}: r = {U.shape[0]} features, expected 1 to {PAIRWISE_MAX_RANK} "
                         f"(its dh kernel keeps a row of dh per token in registers)")
    out = _PairwiseMLP.apply(x.reshape(-1, x.shape[-1]).contiguous(), U.contiguous(),
                             W.contiguous(), fused)
    return out.view(*x.shape[:-1], W.shape[1])


def pairwise_mlp(x: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """q(relu(x U^T)) W for x (..., d), U (r, d) and W (P, d), P = r (r + 1) / 2, all bf16: W is
    the transpose of the layer's (d, P) output matrix, stored like c_proj. q never exists in
    memory. Differentiable in x, U and W."""
    return _pairwise_layer("pairwise_mlp", x, U, W, fused=True)


def pairwise_mlp_gemm(x: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """pairwise_mlp's math with q built in memory for cuBLAS GEMMs: the same arguments and
    result, h the only activation kept. Differentiable in x, U and W."""
    return _pairwise_layer("pairwise_mlp_gemm", x, U, W, fused=False)


def pairwise_mlp_reference(x: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The same math in plain PyTorch: the products h_i h_j (i <= j, row by row) picked by fixed
    indices, and one GEMM."""
    _check_pairwise_args("pairwise_mlp_reference", x, U, W)
    return pair_products_reference(torch.relu(x @ U.t()), U.shape[0]) @ W


# =================================================================================================
# 11. Q/K preparation for attention (#344): RMS norm, rotary, key offset, zero padding, layout
# =================================================================================================
# Q and K leave the QKV projection as strided views (T, H, w) of its output. Before attention each
# head is RMS-normed, turned by the half-truncated rotary (pairs (2j, 2j+1) of the first half at
# the tables' angles; paired-head layers read positions 2t and 2t+1 for the two heads of a pair),
# in the long-window layers each key's second half is replaced by the previous token's (the key
# offset; token 0 keeps its own), and the heads are padded with zero columns to V's width W in a
# new contiguous (T, H, W) tensor: the layout attention reads (paired layers view it as
# (2T, H/2, W)). The reference is train_gpt.qk_prep_reference, the model's own composition of
# rms_norm, rotate, the key offset and zero_pad_heads: the kernel does the same in one pass over
# Q and K, in fp32, rounding once at the end (the composition rounds after every op). An optional
# one-value tensor multiplies the queries before that rounding (train_gpt's --dynamic_stages: the
# stage's softmax factor read from the device, not held by a compiled graph as a constant).
#
# One program per (block of BLOCK_T tokens, Q or K) walks over the heads, so the rotary tables
# are loaded (and in the backward the sine's pair partners made) once per token block rather than
# once per head: in paired layers the heads of each parity share one set of table rows. The
# rotation needs each entry's pair partner (columns 2j and 2j+1 swapped), taken from the loaded
# tile by a reshape, not loaded again. The backward reverses the chain: the key offset sends the
# gradient of row t's second half to row t - 1 (row 0 also keeps its own), the rotation is
# transposed (the partner's sine), then the RMS norm's dx = (g - xn mean(g xn)) / rms, from the
# saved input. Pairs never straddle the two halves, since w is a multiple of 4.

@triton.jit
def _pair_partners(x, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """x (BLOCK_T, BLOCK_W) with the columns of each pair (2j, 2j + 1) swapped."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_W // 2, 2)))
    return tl.reshape(tl.join(odd, even), (BLOCK_T, BLOCK_W))


@triton.jit
def _qk_head(ptr, rows, cols, head, stride_t, stride_h, T, W_IN: tl.constexpr):
    """x[rows, head, cols] in fp32, zeros outside."""
    ok = (rows < T)[:, None] & (cols < W_IN)[None, :]
    base = ptr + rows.to(tl.int64)[:, None] * stride_t + head * stride_h
    return tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _rotary_table(table_ptr, rows, cols, parity, table_stride, T, W_IN: tl.constexpr,
                  PAIRED: tl.constexpr):
    """The table's entries at each row's position (2t + parity in paired layers, else t)."""
    positions = 2 * rows + parity if PAIRED else rows
    ok = (rows < T)[:, None] & (cols < W_IN)[None, :]
    return tl.load(table_ptr + positions.to(tl.int64)[:, None] * table_stride + cols[None, :],
                   mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _normed_turned(x, cos, sin, eps, W_IN: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """rotate(rms_norm(x)) for a loaded head x (BLOCK_T, BLOCK_W), fp32."""
    rstd = tl.rsqrt(tl.sum(x * x, 1) / W_IN + eps)
    return (x * cos + _pair_partners(x, BLOCK_T, BLOCK_W) * sin) * rstd[:, None]


@triton.jit
def _store_rows(out_ptr, value, rows, cols, head, T, H: tl.constexpr, WIDTH: tl.constexpr,
                OUT_BF16: tl.constexpr):
    """value into the contiguous (T, H, WIDTH) out at rows, this head, cols < WIDTH."""
    if OUT_BF16:
        value = _to_bf16(value)
    dst = out_ptr + (rows.to(tl.int64) * H + head)[:, None] * WIDTH + cols[None, :]
    tl.store(dst, value, mask=(rows < T)[:, None] & (cols < WIDTH)[None, :])


@triton.jit
def _qk_prep_heads(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, cols, stride_t, stride_h,
                   table_stride, T, eps, scale, H: tl.constexpr, W_IN: tl.constexpr,
                   W_OUT: tl.constexpr, PAIRED: tl.constexpr, SHIFTED: tl.constexpr,
                   OUT_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """Every head of Q or K at rows: normed, turned, shifted (the key offset), times `scale`
    (fp32) and padded."""
    previous = tl.maximum(rows - 1, 0)
    second_half = (cols >= W_IN // 2)[None, :]
    for parity in tl.static_range(2 if PAIRED else 1):
        cos = _rotary_table(cos_ptr, rows, cols, parity, table_stride, T, W_IN, PAIRED)
        sin = _rotary_table(sin_ptr, rows, cols, parity, table_stride, T, W_IN, PAIRED)
        if SHIFTED:
            cos_before = _rotary_table(cos_ptr, previous, cols, parity, table_stride, T, W_IN,
                                       PAIRED)
            sin_before = _rotary_table(sin_ptr, previous, cols, parity, table_stride, T, W_IN,
                                       PAIRED)
        for head in range(parity, H, 2 if PAIRED else 1):   # a loop, not unrolled: registers
            x = _qk_head(x_ptr, rows, cols, head, stride_t, stride_h, T, W_IN)
            out = _normed_turned(x, cos, sin, eps, W_IN, BLOCK_T, BLOCK_W)
            if SHIFTED:
                x = _qk_head(x_ptr, previous, cols, head, stride_t, stride_h, T, W_IN)
                before = _normed_turned(x, cos_before, sin_before, eps, W_IN, BLOCK_T, BLOCK_W)
                out = tl.where(second_half, before, out)
            out = tl.where((cols < W_IN)[None, :], out * scale, 0.0)   # zero padding to W_OUT
            _store_rows(out_ptr, out, rows, cols, head, T, H, W_OUT, OUT_BF16)


@triton.jit
def _query_scale(q_scale_ptr, Q_SCALE: tl.constexpr):
    """The queries' factor: the one fp32 value at q_scale_ptr, or 1 (exact: no change)."""
    if Q_SCALE:
        return tl.load(q_scale_ptr).to(tl.float32)
    return 1.0


@triton.jit
def _qk_prep_forward_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, q_scale_ptr, T,
                            q_stride_t, q_stride_h, k_stride_t, k_stride_h, table_stride, eps,
                            H: tl.constexpr, W_IN: tl.constexpr, W_OUT: tl.constexpr,
                            PAIRED: tl.constexpr, KEY_OFFSET: tl.constexpr,
                            Q_SCALE: tl.constexpr, OUT_BF16: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    eps = tl.cast(eps, tl.float32)          # Python floats may arrive as fp64 under torch.compile
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_W)
    if tl.program_id(1) == 0:
        _qk_prep_heads(q_ptr, q_out_ptr, cos_ptr, sin_ptr, rows, cols, q_stride_t, q_stride_h,
                       table_stride, T, eps, _query_scale(q_scale_ptr, Q_SCALE), H, W_IN, W_OUT,
                       PAIRED, False, OUT_BF16, BLOCK_T, BLOCK_W)
    else:
        _qk_prep_heads(k_ptr, k_out_ptr, cos_ptr, sin_ptr, rows, cols, k_stride_t, k_stride_h,
                       table_stride, T, eps, 1.0, H, W_IN, W_OUT, PAIRED, KEY_OFFSET, OUT_BF16,
                       BLOCK_T, BLOCK_W)


@triton.jit
def _turned_grad(dout_ptr, rows, cols, head, T, H: tl.constexpr, W_IN: tl.constexpr,
                 W_OUT: tl.constexpr, SHIFTED: tl.constexpr):
    """The gradient at rotate(rms_norm(x))[rows, cols], fp32: the output's, except that with
    SHIFTED (a key offset) the second half's comes from the next row, and row 0 keeps its own."""
    col_ok = (cols < W_IN)[None, :]
    here = (rows < T)[:, None] & col_ok
    if SHIFTED:
        second_half = (cols >= W_IN // 2)[None, :]
        from_next = ((rows + 1) < T)[:, None] & col_ok & second_half
        from_own = (rows == 0)[:, None] & col_ok & second_half
        here = here & (~second_half)
    base = dout_ptr + (rows.to(tl.int64) * H + head)[:, None] * W_OUT + cols[None, :]
    g = tl.load(base, mask=here, other=0.0).to(tl.float32)
    if SHIFTED:
        g += tl.load(base + H * W_OUT, mask=from_next, other=0.0).to(tl.float32)
        g += tl.load(base, mask=from_own, other=0.0).to(tl.float32)
    return g


@triton.jit
def _qk_prep_heads_backward(x_ptr, dout_ptr, dx_ptr, cos_ptr, sin_ptr, rows, cols, stride_t,
                            stride_h, table_stride, T, eps, scale, H: tl.constexpr,
                            W_IN: tl.constexpr,
                            W_OUT: tl.constexpr, PAIRED: tl.constexpr, SHIFTED: tl.constexpr,
                            OUT_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_W: tl.constexpr):
    """dx of every head of Q or K at rows, through the factor `scale`, the key offset if
    SHIFTED, the rotation and the RMS norm."""
    for parity in tl.static_range(2 if PAIRED else 1):
        cos = _rotary_table(cos_ptr, rows, cols, parity, table_stride, T, W_IN, PAIRED)
        sin = _rotary_table(sin_ptr, rows, cols, parity, table_stride, T, W_IN, PAIRED)
        sin_partner = _pair_partners(sin, BLOCK_T, BLOCK_W)
        for head in range(parity, H, 2 if PAIRED else 1):
            g = _turned_grad(dout_ptr, rows, cols, head, T, H, W_IN, W_OUT, SHIFTED) * scale
            d_normed = g * cos + _pair_partners(g, BLOCK_T, BLOCK_W) * sin_partner
            x = _qk_head(x_ptr, rows, cols, head, stride_t, stride_h, T, W_IN)
            rstd = tl.rsqrt(tl.sum(x * x, 1) / W_IN + eps)
            normed = x * rstd[:, None]
            mean = tl.sum(d_normed * normed, 1) / W_IN
            dx = (d_normed - normed * mean[:, None]) * rstd[:, None]
            _store_rows(dx_ptr, dx, rows, cols, head, T, H, W_IN, OUT_BF16)


@triton.jit
def _qk_prep_backward_kernel(dq_ptr, dk_ptr, q_ptr, k_ptr, dq_in_ptr, dk_in_ptr, cos_ptr, sin_ptr,
                             q_scale_ptr, T, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                             table_stride, eps, H: tl.constexpr, W_IN: tl.constexpr,
                             W_OUT: tl.constexpr, PAIRED: tl.constexpr, KEY_OFFSET: tl.constexpr,
                             Q_SCALE: tl.constexpr, OUT_BF16: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_W)
    if tl.program_id(1) == 0:
        _qk_prep_heads_backward(q_ptr, dq_ptr, dq_in_ptr, cos_ptr, sin_ptr, rows, cols,
                                q_stride_t, q_stride_h, table_stride, T, eps,
                                _query_scale(q_scale_ptr, Q_SCALE), H, W_IN, W_OUT, PAIRED, False,
                                OUT_BF16, BLOCK_T, BLOCK_W)
    else:
        _qk_prep_heads_backward(k_ptr, dk_ptr, dk_in_ptr, cos_ptr, sin_ptr, rows, cols,
                                k_stride_t, k_stride_h, table_stride, T, eps, 1.0, H, W_IN, W_OUT,
                                PAIRED, KEY_OFFSET, OUT_BF16, BLOCK_T, BLOCK_W)


QK_NORM_EPS = torch.finfo(torch.float32).eps   # F.rms_norm's default on bf16 and fp32 inputs


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# 8 tokens x 128 columns over 4 warps: 8 values per thread per tile, 40-71 registers compiled as
# launched (records/kernel_registers.py), so many programs share an SM and hide the loads'
# latency; 32 tokens take 76-128 registers, and 64 tokens at 4 warps spill.
# records/bench_kernels.py --sweeps qk_prep times the candidates (this one measures fastest).
_QK_PREP_TILES = dict(BLOCK_T=8, num_warps=4)


def _qk_prep_launch(kernel, tensors: tuple, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    q_scale: torch.Tensor | None, paired: bool, key_offset: bool,
                    width: int) -> None:
    """Either kernel over (token blocks, Q or K); q and k with unit last strides, every other
    tensor contiguous."""
    T, H, w = q.shape
    block_t = 16 if INTERPRET else _QK_PREP_TILES["BLOCK_T"]
    kernel[(triton.cdiv(T, block_t), 2)](
        *tensors, cos if q_scale is None else q_scale, T, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), cos.stride(0), QK_NORM_EPS, H=H, W_IN=w, W_OUT=width, PAIRED=paired,
        KEY_OFFSET=key_offset, Q_SCALE=q_scale is not None,
        OUT_BF16=q.dtype == torch.bfloat16, BLOCK_T=block_t,
        BLOCK_W=triton.next_power_of_2(max(w, width)), num_warps=_QK_PREP_TILES["num_warps"])


@torch.library.custom_op("nanogpt_triton::qk_prep_forward", mutates_args=())
def _qk_prep_forward_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_scale: torch.Tensor | None, paired: bool, key_offset: bool, width: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    q_out = q.new_empty(*q.shape[:2], width)
    k_out = torch.empty_like(q_out)
    _qk_prep_launch(_qk_prep_forward_kernel, (q, k, q_out, k_out, cos, sin), q, k, cos, q_scale,
                    paired, key_offset, width)
    return q_out, k_out


@_qk_prep_forward_op.register_fake
def _(q, k, cos, sin, q_scale, paired, key_offset, width):
    q_out = q.new_empty(*q.shape[:2], width)
    return q_out, torch.empty_like(q_out)


@torch.library.custom_op("nanogpt_triton::qk_prep_backward", mutates_args=())
def _qk_prep_backward_op(dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None,
                         paired: bool, key_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    dq, dk = dq.contiguous(), dk.contiguous()
    dq_in = q.new_empty(q.shape)
    dk_in = torch.empty_like(dq_in)
    _qk_prep_launch(_qk_prep_backward_kernel, (dq, dk, q, k, dq_in, dk_in, cos, sin), q, k, cos,
                    q_scale, paired, key_offset, dq.shape[-1])
    return dq_in, dk_in


@_qk_prep_backward_op.register_fake
def _(dq, dk, q, k, cos, sin, q_scale, paired, key_offset):
    dq_in = q.new_empty(q.shape)
    return dq_in, torch.empty_like(dq_in)


class _QKPrep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, q_scale, paired, key_offset, width):
        ctx.save_for_backward(q, k, cos, sin, q_scale)
        ctx.paired, ctx.key_offset = paired, key_offset
        return _qk_prep_forward_op(q, k, cos, sin, q_scale, paired, key_offset, width)

    @staticmethod
    def backward(ctx, dq, dk):
        q, k, cos, sin, q_scale = ctx.saved_tensors
        dq_in, dk_in = _qk_prep_backward_op(dq, dk, q, k, cos, sin, q_scale, ctx.paired,
                                            ctx.key_offset)
        return dq_in, dk_in, None, None, None, None, None, None


def qk_prep(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, paired: bool,
            key_offset: bool, width: int, q_scale: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q and K as attention reads them (see the section's notes): q, k (T, H, w), any strides
    (read in place where the last dimension is contiguous), bf16 or fp32, w a multiple of 4;
    cos, sin the rotary tables (positions, w), at least 2T positions if paired (H even) else T;
    width >= w; q_scale None or a one-element fp32 tensor that multiplies the queries (in fp32,
    before the one rounding). Returns new contiguous tensors, (2T, H/2, width) if paired else
    (T, H, width), in q's dtype, zero past w. Differentiable in q and k."""
    name = "qk_prep"
    _check_runnable(name, q, k, cos, sin)
    for arg, t in (("q", q), ("k", k)):
        _check_dtype(name, arg, t, (torch.bfloat16, torch.float32))
    _check_shape(name, "k", k, q.shape)
    T, H, w = q.shape
    if w % 4 or width < w or (paired and H % 2):
        raise ValueError(f"{name}: expected a head width w that is a multiple of 4, width >= w "
                         f"and (paired) an even head count, got q {tuple(q.shape)}, width {width}, "
                         f"paired={paired}")
    positions = 2 * T if paired else T
    if cos.shape != sin.shape or cos.shape[1] != w or cos.shape[0] < positions:
        raise ValueError(f"{name}: cos and sin must be ({positions} or more, {w}) tables, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if q_scale is not None:
        _check_runnable(name, q, q_scale)
        _check_dtype(name, "q_scale", q_scale, (torch.float32,))
        if q_scale.numel() != 1:
            raise ValueError(f"{name}: q_scale must hold one value, got shape {tuple(q_scale.shape)}")
    q_out, k_out = _QKPrep.apply(q, k, cos.contiguous(), sin.contiguous(), q_scale, paired,
                                 key_offset, width)
    if paired:
        return q_out.view(2 * T, H // 2, width), k_out.view(2 * T, H // 2, width)
    return q_out, k_out


# =================================================================================================
# 12. Packed FP8 QKV projection (#344): one e4m3 GEMM for Q, K and V
# =================================================================================================
# Each attention layer's Q, K and V rows form one packed weight W (n, d), n = 2 H w + d, with Q
# and K (2 H w rows, the layer's head-pair blocks of qk_bank) stored apart from V (a matrix of
# vo_bank). After every optimizer update (and at the start) quantize_packed_e4m3 turns the
# weights of every layer into e4m3 twice over, W / s row-major (n, d) for the forward and its
# transpose (d, n) for the backward; the scale s is each layer's exact max|W| / 448 (the record's
# description gives no scales: every scale here is an exact per-tensor max, found by a reduction
# before the quantisation). The kernel writes the row-major copy only and the transpose is a copy
# of its bytes: with Triton 3.6's ptxas, a kernel that also stores an fp8 tile transposed writes
# foreign bytes into part of it (triton-lang/triton#11111), NaN codes among them.
#
# Forward: y = x W^T lambda (T, n), lambda the layer's QKV scalar, as one FP8 GEMM of x in e4m3
# (exact scale max|x| / 448 per call) against W / s, the fp32 sums times both scales and lambda.
# Backward: dx = dy W lambda as an FP8 GEMM of dy in e5m2 (exact scale max|dy| / 57344, the
# format for gradients) against the transposed e4m3 copy; the weight gradient dW = lambda dy^T x
# and dlambda = sum(dy^T x * W) stay bf16 GEMMs of the saved bf16 activations, which would need
# transposed FP8 copies of x and dy and feed the orthogonalising optimizer directly.


@triton.jit
def _quantize_packed_kernel(top_ptr, bottom_ptr, scale_ptr, out_ptr,
                            top_rows, rows, cols, top_batch, top_row, bottom_batch, bottom_row,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    layer = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = (c < cols)[None, :]
    in_top = (r < top_rows)[:, None] & col_ok
    in_bottom = ((r >= top_rows) & (r < rows))[:, None] & col_ok
    top = top_ptr + layer * top_batch + r.to(tl.int64)[:, None] * top_row + c[None, :]
    bottom_r = tl.maximum(r - top_rows, 0).to(tl.int64)
    bottom = bottom_ptr + layer * bottom_batch + bottom_r[:, None] * bottom_row + c[None, :]
    w = (tl.load(top, mask=in_top, other=0.0).to(tl.float32)
         + tl.load(bottom, mask=in_bottom, other=0.0).to(tl.float32))
    w8 = _to_e4m3(w * tl.math.div_rn(1.0, tl.load(scale_ptr + layer)))   # as quantize_e4m3_scaled
    first = layer.to(tl.int64) * rows * cols
    tl.store(out_ptr + first + r.to(tl.int64)[:, None] * cols + c[None, :], w8,
             mask=(r < rows)[:, None] & col_ok)


@torch.library.custom_op("nanogpt_triton::quantize_packed_e4m3", mutates_args=("out", "out_t"))
def _quantize_packed_op(top: torch.Tensor, bottom: torch.Tensor, scales: torch.Tensor,
                        out: torch.Tensor, out_t: torch.Tensor) -> None:
    L, top_rows, cols = top.shape
    rows = out.shape[1]
    block_r, block_c = (32, 32) if INTERPRET else (64, 64)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c), L)
    _quantize_packed_kernel[grid](top, bottom, scales, out, top_rows, rows, cols,
                                  top.stride(0), top.stride(1), bottom.stride(0), bottom.stride(1),
                                  BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    out_t.copy_(out.mT)


@_quantize_packed_op.register_fake
def _(top, bottom, scales, out, out_t):
    return None


def _check_packed_args(name: str, top: torch.Tensor, bottom: torch.Tensor, scales: torch.Tensor,
                       out: torch.Tensor, out_t: torch.Tensor) -> None:
    L, _, cols = top.shape
    rows = top.shape[1] + bottom.shape[1]
    if bottom.shape[::2] != (L, cols) or top.stride(-1) != 1 or bottom.stride(-1) != 1:
        raise ValueError(f"{name}: expected top (L, r1, d) and bottom (L, r2, d) with contiguous "
                         f"rows, got {tuple(top.shape)} and {tuple(bottom.shape)}")
    _check_shape(name, "scales", scales, (L,))
    _check_dtype(name, "scales", scales, (torch.float32,))
    _check_shape(name, "out", out, (L, rows, cols))
    _check_shape(name, "out_t", out_t, (L, cols, rows))


def quantize_packed_e4m3(top: torch.Tensor, bottom: torch.Tensor, scales: torch.Tensor,
                         out: torch.Tensor, out_t: torch.Tensor) -> None:
    """out = e4m3(cat([top, bottom], 1) / scales) (L, r1 + r2, d) and out_t its transpose
    (L, d, r1 + r2), in place: out from one read of top (L, r1, d) and bottom (L, r2, d) (any
    batch and row strides), out_t copied from out; scales (L,) fp32; saturating at +-448."""
    name = "quantize_packed_e4m3"
    _check_runnable(name, top, bottom, scales, out, out_t)
    _check_packed_args(name, top, bottom, scales, out, out_t)
    for arg, t in (("out", out), ("out_t", out_t)):
        _check_dtype(name, arg, t, (torch.float8_e4m3fn,))
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
    _quantize_packed_op(top, bottom, scales, out, out_t)


def quantize_packed_e4m3_reference(top: torch.Tensor, bottom: torch.Tensor, scales: torch.Tensor,
                                   out: torch.Tensor, out_t: torch.Tensor) -> None:
    """The same in PyTorch; out and out_t may have any float dtype (they receive e4m3 values)."""
    _check_packed_args("quantize_packed_e4m3_reference", top, bottom, scales, out, out_t)
    packed = quantize_e4m3_scaled(torch.cat([top, bottom], 1), scales[:, None, None])
    out.copy_(packed)
    out_t.copy_(packed.mT)


def _fp8_gemm(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
              use_kernels: bool) -> torch.Tensor:
    """a8 (m, k) b8 (n, k)^T x scale in `dtype`, accumulated in fp32: the FP8 GEMM (bf16 out),
    or its emulation in PyTorch."""
    if use_kernels:
        return _fp8_linear(a8, b8, scale)
    return _fp8_matmul_reference(a8, b8, scale).to(dtype)


class _PackedQKVFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, lam, W8, W8t, w_scale, use_kernels):
        x8, x_scale = quantize_e4m3(x)
        ctx.save_for_backward(x, W, lam, W8t, w_scale)
        ctx.use_kernels = use_kernels
        return _fp8_gemm(x8, W8, x_scale * w_scale * lam, x.dtype, use_kernels)

    @staticmethod
    def backward(ctx, dy):
        x, W, lam, W8t, w_scale = ctx.saved_tensors
        dy8, dy_scale = quantize_e5m2(dy)
        dx = _fp8_gemm(dy8, W8t, dy_scale * w_scale * lam, x.dtype, ctx.use_kernels)
        d_weight = dy.t() @ x                   # the gradient of lambda W
        d_lam = (d_weight.float() * W.float()).sum().reshape(lam.shape)
        return dx, d_weight * lam, d_lam, None, None, None, None


def _check_packed_qkv_args(name: str, x: torch.Tensor, W: torch.Tensor, lam: torch.Tensor,
                           W8: torch.Tensor, W8t: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1] or lam.numel() != 1:
        raise ValueError(f"{name}: expected x (T, d), W (n, d) and a one-element lambda, got x "
                         f"{tuple(x.shape)}, W {tuple(W.shape)}, lambda {tuple(lam.shape)}")
    _check_shape(name, "W8", W8, W.shape)
    _check_shape(name, "W8t", W8t, W.shape[::-1])
    _check_shape(name, "w_scale", w_scale, (1,))


def packed_qkv_fp8(x: torch.Tensor, W: torch.Tensor, lam: torch.Tensor, W8: torch.Tensor,
                   W8t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x W^T lambda (T, n) through the FP8 GEMMs (see the section's notes): x (T, d) and W (n, d)
    bf16, lambda a one-element fp32 tensor, W8 = e4m3(W / w_scale) (n, d) and W8t its transpose
    (d, n), w_scale (1,) fp32; n and d multiples of 16 (TMA's 16-byte rows). Differentiable in
    x, W and lambda."""
    name = "packed_qkv_fp8"
    _check_runnable(name, x, W, lam, W8, W8t, w_scale)
    _check_packed_qkv_args(name, x, W, lam, W8, W8t, w_scale)
    for arg, t in (("x", x), ("W", W)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
    for arg, t in (("W8", W8), ("W8t", W8t)):
        _check_dtype(name, arg, t, (torch.float8_e4m3fn,))
    if W.shape[0] % 16 or W.shape[1] % 16:
        raise ValueError(f"{name}: n and d must be multiples of 16, got W {tuple(W.shape)}")
    return _PackedQKVFP8.apply(x, W, lam, W8, W8t, w_scale, True)


def packed_qkv_fp8_reference(x: torch.Tensor, W: torch.Tensor, lam: torch.Tensor,
                             W8: torch.Tensor, W8t: torch.Tensor, w_scale: torch.Tensor
                             ) -> torch.Tensor:
    """packed_qkv_fp8 with its GEMMs emulated in PyTorch (fp32 products of the same e4m3 and e5m2
    operands); x and W of any float dtype, W8 and W8t of any dtype holding e4m3 values."""
    _check_packed_qkv_args("packed_qkv_fp8_reference", x, W, lam, W8, W8t, w_scale)
    return _PackedQKVFP8.apply(x, W, lam, W8, W8t, w_scale, False)


# =================================================================================================
# 13. Causal windowed attention within documents: forward and backward
# =================================================================================================
# The function of train_gpt.attention (its reference, attention_reference, lives there): the rows
# of a packed batch (T, H, D) attend to the rows of their own document within a left window, row
# i to rows i - window .. i, with softmax(scale q.k). One program takes BLOCK_M query rows of one
# head and walks the key blocks from the first key any of its rows sees up to its last row, with
# the online softmax of flash attention: a running maximum and sum per row in fp32, base-2
# exponentials, P rounded to bf16 to meet V on the tensor cores. A row sees a key when the key
# is not after it, within its window and at or after the start of the row's document; those
# starts, doc_start (T,), and the documents' ends, doc_end (T,), are made from cu_seqlens once per
# call. The forward keeps each row's base-2 log-sum-exp. The backward recomputes P in two kernels
# without atomics: one program per query block accumulates dQ, and first finds its rows' delta =
# rowsum(dO * O) and stores it; then one program per key block accumulates dK and dV over the
# query blocks that can see its keys (up to the window's reach, inside the last key's document).
# Every kernel walks its blocks in three ranges (_attention_key_ranges, _attention_query_ranges):
# the blocks in which every row sees every key, between the edges of the windows and documents
# and the diagonal, skip the mask.


@triton.jit
def _attention_rows(ptr, rows, ok, head, stride_t, stride_h, D: tl.constexpr):
    """The head's (len(rows), D) slice of a (T, H, D) tensor with unit last stride; zeros where
    not ok."""
    dims = tl.arange(0, D)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + dims[None, :],
                   mask=ok[:, None], other=0.0)


@triton.jit
def _attention_sees(rows, keys, row_start, window):
    """Whether each query row sees each key, for broadcastable rows, keys and row_start (the
    start of the row's document)."""
    return (keys <= rows) & (keys >= rows - window) & (keys >= row_start)


@triton.jit
def _attention_key_ranges(doc_start_ptr, row0, T, window, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """The key blocks the query rows row0 + [0, BLOCK_M) walk, as three consecutive ranges of
    block starts: [first, full), where some row does not see some key; [full, edge), where every
    row sees every key, so no mask is needed; [edge, last), the diagonal blocks. A key block is
    full when its first key is at or after the latest first key any row sees (the last row's
    document start or window edge) and its last key is at or before the first row."""
    last_row = tl.minimum(row0 + BLOCK_M, T) - 1
    first = tl.maximum(tl.load(doc_start_ptr + row0), row0 - window) // BLOCK_N * BLOCK_N
    last = last_row + 1
    latest = tl.maximum(tl.load(doc_start_ptr + last_row), last_row - window)
    full = tl.minimum(tl.maximum(tl.cdiv(latest, BLOCK_N) * BLOCK_N, first), last)
    edge = tl.minimum(tl.maximum((row0 + 1) // BLOCK_N * BLOCK_N, full), last)
    return first, full, edge, last


@triton.jit
def _attention_query_rows(q_ptr, doc_start_ptr, T, stride_qt, stride_qh, D: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """This program's head, first row, rows, which of them exist, their document starts and Q."""
    head = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    row_start = tl.load(doc_start_ptr + rows, mask=row_ok, other=T)
    q = _attention_rows(q_ptr, rows, row_ok, head, stride_qt, stride_qh, D)
    return head, row0, rows, row_ok, row_start, q


@triton.jit
def _attention_key_block(q, k_ptr, v_ptr, key0, T, qk_scale, head, stride_kt, stride_kh,
                         stride_vt, stride_vh, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys key0 + [0, BLOCK_N), their K and V, and the base-2 scores of the rows of q."""
    keys = key0 + tl.arange(0, BLOCK_N)
    key_ok = keys < T
    k = _attention_rows(k_ptr, keys, key_ok, head, stride_kt, stride_kh, D)
    v = _attention_rows(v_ptr, keys, key_ok, head, stride_vt, stride_vh, D)
    scores = _mma(tl.zeros((q.shape[0], BLOCK_N), tl.float32), q, tl.trans(k)) * qk_scale
    return keys, k, v, scores


@triton.jit
def _attention_forward_blocks(acc, top, total, q, rows, row_start, k_ptr, v_ptr, begin, end, T,
                              window, qk_scale, head, stride_kt, stride_kh, stride_vt, stride_vh,
                              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over the key blocks starting in [begin, end)."""
    for key0 in range(begin, end, BLOCK_N):
        keys, k, v, scores = _attention_key_block(q, k_ptr, v_ptr, key0, T, qk_scale, head,
                                                  stride_kt, stride_kh, stride_vt, stride_vh, D,
                                                  BLOCK_N)
        if MASKED:
            scores = tl.where(_attention_sees(rows[:, None], keys[None, :], row_start[:, None],
                                              window), scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)   # a row that sees no key yet
        p = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(top - shift)
        total = total * rescale + tl.sum(p, 1)
        acc = _mma(acc * rescale[:, None], _to_bf16(p), v)
        top = new_top
    return acc, top, total


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, doc_start_ptr, out_ptr, lse_ptr, T, window,
                              qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                              stride_vh, H: tl.constexpr, D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)    # Python floats may arrive as fp64 under torch.compile
    head, row0, rows, row_ok, row_start, q = _attention_query_rows(q_ptr, doc_start_ptr, T,
                                                                   stride_qt, stride_qh, D,
                                                                   BLOCK_M)
    first, full, edge, last = _attention_key_ranges(doc_start_ptr, row0, T, window, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc, top, total = _attention_forward_blocks(acc, top, total, q, rows, row_start, k_ptr, v_ptr,
                                                first, full, T, window, qk_scale, head, stride_kt,
                                                stride_kh, stride_vt, stride_vh, D, BLOCK_N, True)
    acc, top, total = _attention_forward_blocks(acc, top, total, q, rows, row_start, k_ptr, v_ptr,
                                                full, edge, T, window, qk_scale, head, stride_kt,
                                                stride_kh, stride_vt, stride_vh, D, BLOCK_N, False)
    acc, top, total = _attention_forward_blocks(acc, top, total, q, rows, row_start, k_ptr, v_ptr,
                                                edge, last, T, window, qk_scale, head, stride_kt,
                                                stride_kh, stride_vt, stride_vh, D, BLOCK_N, True)
    total = tl.where(total > 0, total, 1.0)      # rows past T, which see nothing
    dims = tl.arange(0, D)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (H * D) + head * D + dims[None, :],
             _to_bf16(acc / total[:, None]), mask=row_ok[:, None])
    tl.store(lse_ptr + rows * H + head, top + tl.log2(total), mask=row_ok)


@triton.jit
def _attention_dq_blocks(dq, q, d_out, lse, delta, rows, row_start, k_ptr, v_ptr, begin, end, T,
                         window, qk_scale, head, stride_kt, stride_kh, stride_vt, stride_vh,
                         D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dQ's sums over the key blocks starting in [begin, end) (before the softmax scale)."""
    for key0 in range(begin, end, BLOCK_N):
        keys, k, v, scores = _attention_key_block(q, k_ptr, v_ptr, key0, T, qk_scale, head,
                                                  stride_kt, stride_kh, stride_vt, stride_vh, D,
                                                  BLOCK_N)
        p = tl.exp2(scores - lse[:, None])
        if MASKED:
            p = tl.where(_attention_sees(rows[:, None], keys[None, :], row_start[:, None], window),
                         p, 0.0)
        dp = _mma(tl.zeros((q.shape[0], BLOCK_N), tl.float32), d_out, tl.trans(v))
        dq = _mma(dq, _to_bf16(p * (dp - delta[:, None])), k)
    return dq


@triton.jit
def _attention_backward_queries_kernel(q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr,
                                       delta_ptr, doc_start_ptr, dq_ptr, T, window, qk_scale,
                                       scale, stride_qt, stride_qh, stride_kt, stride_kh,
                                       stride_vt, stride_vh, H: tl.constexpr, D: tl.constexpr,
                                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    head, row0, rows, row_ok, row_start, q = _attention_query_rows(q_ptr, doc_start_ptr, T,
                                                                   stride_qt, stride_qh, D,
                                                                   BLOCK_M)
    d_out = _attention_rows(dout_ptr, rows, row_ok, head, H * D, D, D)
    lse = tl.load(lse_ptr + rows * H + head, mask=row_ok, other=0.0)
    out = _attention_rows(out_ptr, rows, row_ok, head, H * D, D, D)
    delta = tl.sum(d_out.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + rows * H + head, delta, mask=row_ok)     # for the keys kernel
    first, full, edge, last = _attention_key_ranges(doc_start_ptr, row0, T, window, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    dq = _attention_dq_blocks(dq, q, d_out, lse, delta, rows, row_start, k_ptr, v_ptr, first, full,
                              T, window, qk_scale, head, stride_kt, stride_kh, stride_vt,
                              stride_vh, D, BLOCK_N, True)
    dq = _attention_dq_blocks(dq, q, d_out, lse, delta, rows, row_start, k_ptr, v_ptr, full, edge,
                              T, window, qk_scale, head, stride_kt, stride_kh, stride_vt,
                              stride_vh, D, BLOCK_N, False)
    dq = _attention_dq_blocks(dq, q, d_out, lse, delta, rows, row_start, k_ptr, v_ptr, edge, last,
                              T, window, qk_scale, head, stride_kt, stride_kh, stride_vt,
                              stride_vh, D, BLOCK_N, True)
    dims = tl.arange(0, D)
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * (H * D) + head * D + dims[None, :],
             _to_bf16(dq * scale), mask=row_ok[:, None])


@triton.jit
def _attention_query_ranges(doc_end_ptr, key0, T, window, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """The query blocks that can see keys key0 + [0, BLOCK_N), as three consecutive ranges of
    block starts: [first, edge), the diagonal blocks; [edge, full), where every row sees every
    key (the rows at or after the last key, inside key0's document and window); [full, last),
    the blocks up to the window's reach within the last key's document."""
    last_key = tl.minimum(key0 + BLOCK_N, T) - 1
    first = key0 // BLOCK_M * BLOCK_M
    last = tl.minimum(tl.load(doc_end_ptr + last_key), last_key + window + 1)
    edge = tl.minimum(tl.maximum(tl.cdiv(last_key, BLOCK_M) * BLOCK_M, first), last)
    reach = tl.minimum(tl.load(doc_end_ptr + key0), key0 + window + 1)
    full = tl.minimum(tl.maximum(reach // BLOCK_M * BLOCK_M, edge), last)
    return first, edge, full, last


@triton.jit
def _attention_dkv_blocks(dk, dv, k, v, keys, q_ptr, dout_ptr, lse_ptr, delta_ptr,
                          doc_start_ptr, begin, end, T, window, qk_scale, head, stride_qt,
                          stride_qh, H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          MASKED: tl.constexpr):
    """dK's (before the softmax scale) and dV's sums over the query blocks starting in
    [begin, end), with the maps transposed (keys, rows): both are sums over the rows."""
    for row0 in range(begin, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        q = _attention_rows(q_ptr, rows, row_ok, head, stride_qt, stride_qh, D)
        d_out = _attention_rows(dout_ptr, rows, row_ok, head, H * D, D, D)
        lse = tl.load(lse_ptr + rows * H + head, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows * H + head, mask=row_ok, other=0.0)
        scores = _mma(tl.zeros((k.shape[0], BLOCK_M), tl.float32), k, tl.trans(q)) * qk_scale
        p = tl.exp2(scores - lse[None, :])
        if MASKED:
            row_start = tl.load(doc_start_ptr + rows, mask=row_ok, other=T)
            p = tl.where(_attention_sees(rows[None, :], keys[:, None], row_start[None, :], window),
                         p, 0.0)
        dv = _mma(dv, _to_bf16(p), d_out)
        dp = _mma(tl.zeros((k.shape[0], BLOCK_M), tl.float32), v, tl.trans(d_out))
        dk = _mma(dk, _to_bf16(p * (dp - delta[None, :])), q)
    return dk, dv


@triton.jit
def _attention_backward_keys_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr,
                                    doc_start_ptr, doc_end_ptr, dk_ptr, dv_ptr, T, window,
                                    qk_scale, scale, stride_qt, stride_qh, stride_kt, stride_kh,
                                    stride_vt, stride_vh, H: tl.constexpr, D: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    head = tl.program_id(1)
    key0 = tl.program_id(0) * BLOCK_N
    keys = key0 + tl.arange(0, BLOCK_N)
    key_ok = keys < T
    k = _attention_rows(k_ptr, keys, key_ok, head, stride_kt, stride_kh, D)
    v = _attention_rows(v_ptr, keys, key_ok, head, stride_vt, stride_vh, D)
    first, edge, full, last = _attention_query_ranges(doc_end_ptr, key0, T, window, BLOCK_M,
                                                      BLOCK_N)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    dk, dv = _attention_dkv_blocks(dk, dv, k, v, keys, q_ptr, dout_ptr, lse_ptr, delta_ptr,
                                   doc_start_ptr, first, edge, T, window, qk_scale, head,
                                   stride_qt, stride_qh, H, D, BLOCK_M, True)
    dk, dv = _attention_dkv_blocks(dk, dv, k, v, keys, q_ptr, dout_ptr, lse_ptr, delta_ptr,
                                   doc_start_ptr, edge, full, T, window, qk_scale, head,
                                   stride_qt, stride_qh, H, D, BLOCK_M, False)
    dk, dv = _attention_dkv_blocks(dk, dv, k, v, keys, q_ptr, dout_ptr, lse_ptr, delta_ptr,
                                   doc_start_ptr, full, last, T, window, qk_scale, head,
                                   stride_qt, stride_qh, H, D, BLOCK_M, True)
    dims = tl.arange(0, D)
    offsets = keys.to(tl.int64)[:, None] * (H * D) + head * D + dims[None, :]
    tl.store(dk_ptr + offsets, _to_bf16(dk * scale), mask=key_ok[:, None])
    tl.store(dv_ptr + offsets, _to_bf16(dv), mask=key_ok[:, None])


# Candidate tilings for records/bench_kernels.py; _ATTENTION_TILES is the one used, the fastest
# forward + backward of them on two H100s (0.83x and 0.85x torch's flash attention's time at
# stage 3's shapes, 0.84x and 0.85x at stage 1's: records/2026-12-07_h100_triton_attention).
# Compiled as launched (records/kernel_registers.py), the keys kernel at 128 keys and 8 warps
# spills a little.
def _attention_tiling(forward, queries, keys):
    """Each kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    return {kernel: dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for kernel, (m, n, w, s) in (("forward", forward), ("queries", queries),
                                         ("keys", keys))}


_ATTENTION_TILINGS = (
    _attention_tiling((64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3)),
    _attention_tiling((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)),
    _attention_tiling((128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)),
    _attention_tiling((64, 32, 4, 3), (32, 32, 4, 3), (32, 32, 4, 3)),
    _attention_tiling((64, 64, 4, 4), (32, 64, 4, 3), (64, 32, 4, 3)),
    _attention_tiling((64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 4)),
    _attention_tiling((64, 128, 4, 2), (64, 32, 4, 4), (64, 64, 4, 3)),
)
_ATTENTION_TILES = _ATTENTION_TILINGS[0]
_INTERPRETED_ATTENTION_TILE = dict(BLOCK_M=16, BLOCK_N=16)


def _attention_tile(kernel: str, tiles: dict | None) -> dict:
    if INTERPRET:
        return dict(_INTERPRETED_ATTENTION_TILE)
    return dict((tiles or _ATTENTION_TILES)[kernel])


def _attention_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(stride for t in tensors for stride in (t.stride(0), t.stride(1)))


@torch.library.custom_op("nanogpt_triton::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          doc_start: torch.Tensor, scale: float, window: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    tile = _attention_tile("forward", None)
    _attention_forward_kernel[(triton.cdiv(T, tile["BLOCK_M"]), H)](
        q, k, v, doc_start, out, lse, T, window, scale * LOG2_E, *_attention_strides(q, k, v),
        H=H, D=D, **tile)
    return out, lse


@_attention_forward_op.register_fake
def _(q, k, v, doc_start, scale, window):
    T, H, D = q.shape
    return q.new_empty(T, H, D), q.new_empty(T, H, dtype=torch.float32)


@torch.library.custom_op("nanogpt_triton::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, d_out: torch.Tensor, doc_start: torch.Tensor,
                           doc_end: torch.Tensor, scale: float, window: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    dq, dk, dv = (torch.empty(T, H, D, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty(T, H, dtype=torch.float32, device=q.device)   # the queries kernel's
    strides = _attention_strides(q, k, v)
    tile = _attention_tile("queries", None)
    _attention_backward_queries_kernel[(triton.cdiv(T, tile["BLOCK_M"]), H)](
        q, k, v, out, d_out, lse, delta, doc_start, dq, T, window, scale * LOG2_E, scale, *strides,
        H=H, D=D, **tile)
    tile = _attention_tile("keys", None)
    _attention_backward_keys_kernel[(triton.cdiv(T, tile["BLOCK_N"]), H)](
        q, k, v, d_out, lse, delta, doc_start, doc_end, dk, dv, T, window, scale * LOG2_E, scale,
        *strides, H=H, D=D, **tile)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, d_out, doc_start, doc_end, scale, window):
    return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)


class _WindowedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, scale, window):
        out, lse = _attention_forward_op(q, k, v, doc_start, scale, window)
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        dq, dk, dv = _attention_backward_op(q, k, v, out, lse, d_out.contiguous(), doc_start,
                                            doc_end, ctx.scale, ctx.window)
        return dq, dk, dv, None, None, None, None


def document_bounds(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The start and the end (one past the last row) of each row's document, (T,) int32 each,
    from cu_seqlens (the documents' starts, last entry T, entries may repeat), on the device."""
    positions = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    document = torch.searchsorted(cu_seqlens, positions, right=True)
    return cu_seqlens[document - 1].int(), cu_seqlens[document].int()


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Causal attention within documents over a left window (see the section's notes), (T, H, D)
    bf16 like v: q, k, v (T, H, D) bf16 with unit last stride, D a power of two; cu_seqlens the
    document starts (int32, last entry T, may repeat); window >= 0. Differentiable in q, k, v."""
    name = "windowed_attention"
    _check_runnable(name, q, k, v, cu_seqlens)
    for arg, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, arg, t, (torch.bfloat16,))
        _check_shape(name, arg, t, q.shape)
    T, H, D = q.shape
    if D & (D - 1) or window < 0:
        raise ValueError(f"{name}: head_dim must be a power of two and window at least 0, got "
                         f"{D} and {window}")
    doc_start, doc_end = document_bounds(cu_seqlens, T)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    # window stays as given: under torch.compile a symbolic window must not be specialised
    return _WindowedAttention.apply(q, k, v, doc_start, doc_end, float(scale), window)


# -------------------------------------------------------------------------------------------------
# Compiling recorded specialisations ahead of their first launch
# -------------------------------------------------------------------------------------------------
# Triton compiles each kernel of this file at its first launch with new argument types, one after
# another, and keeps the binaries in its own cache, outside torch.compile's cache artifacts. A
# record of the specialisations a run compiled (Triton's "specialization data", which its JIT hook
# hands out) lets a fresh machine compile them in worker processes meanwhile (train_gpt.py's
# --compile_cache).

def preload_specialization(device_index: int, name: str, specialization_data: str) -> None:
    """Compile one recorded specialisation of this file's kernel `name` into Triton's on-disk
    cache, for the GPU `device_index`; run in a worker process."""
    torch.cuda.set_device(device_index)
    kernel = globals().get(name)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise ValueError(f"{name}: not a Triton kernel of triton_kernels.py")
    kernel.preload(specialization_data)
