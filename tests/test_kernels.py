"""Tests of triton_kernels.py: every kernel against the same math restated here in fp64.

Without a GPU the kernels run in Triton's interpreter on small shapes that are not multiples of
the block sizes (the interpreter is slow); with a GPU the same tests run on CUDA, and the tests
marked `gpu` add the real speedrun shapes. Inputs are fresh random draws on every run.

Error bounds used below (u = unit roundoff):
* A dot product of length K accumulated in fp32 is within K * 2^-23 * sum|a_i b_i| of the exact
  value (2^-23 rather than 2^-24 leaves room for accumulators that truncate).
* Rounding to bf16 (8 significant bits) to nearest moves a value by at most half a bf16 ulp.
"""
import functools
import os

import pytest
import torch
import triton

if not torch.cuda.is_available():   # kernels on CPU tensors need the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton_kernels as tk  # noqa: E402
from conftest import POLAR_EXPRESS_COEFFS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAM_ACC_U = 2.0 ** -23


# =================================================================================================
# Helpers
# =================================================================================================

def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x|: 2^(e - 8) for |x| in [2^(e-1), 2^e)."""
    _, exponent = torch.frexp(x.abs().double())
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 8).clamp_min(2.0 ** -133)


def assert_bf16_rounding_of(out: torch.Tensor, exact: torch.Tensor, fp32_error: torch.Tensor, what: str):
    """out is a bf16 rounding (to nearest) of a fp32 value within fp32_error of exact."""
    err = (out.double() - exact).abs()
    tol = 0.5 * bf16_ulp(exact.abs() + fp32_error) + fp32_error
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{what}: error reaches {worst:.3f} x the bound"


def rel_norm_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_same_max(reference_max: torch.Tensor, kernel_max: torch.Tensor):
    """The largest post of a PyTorch reference against the kernel's. The interpreter sums both in
    true fp32 in the same order: the same value. On the GPU the reference's GEMM sums in another
    order and the kernel's FP8 MMA with fewer bits, so the bf16 maximum may differ by a few of
    bf16's steps (2^-8 to 2^-7 relative each; 143 against 141 measured at the speedrun's shape)."""
    if kernel_max.device.type == "cpu":
        assert reference_max.item() == kernel_max.item()
    else:
        assert abs(reference_max.item() - kernel_max.item()) <= 2.0 ** -5 * kernel_max.item()


def e5m2_steps(t: torch.Tensor) -> torch.Tensor:
    """e5m2 codes as signed step counts from zero: neighbouring values differ by one."""
    code = t.view(torch.uint8).int()
    magnitude = code & 0x7F
    return torch.where(code >= 0x80, -magnitude, magnitude)


def symmetric_bf16(batch: tuple, n: int, device) -> torch.Tensor:
    """Exactly symmetric bf16 matrices (a + b == b + a elementwise), Gram-like scale."""
    x = torch.randn(*batch, n, n, device=device)
    return ((x + x.mT) / 4).bfloat16()


# =================================================================================================
# 1-3. Symmetric Gram kernels
# =================================================================================================

def check_xxt(A: torch.Tensor):
    out = torch.full((*A.shape[:-1], A.shape[-2]), float("nan"), dtype=torch.bfloat16, device=A.device)
    tk.XXT(A, out)
    A64 = A.double()
    exact = A64 @ A64.mT
    bound = A.shape[-1] * GRAM_ACC_U * (A64.abs() @ A64.abs().mT)
    assert torch.equal(out, out.mT), "XXT output is not exactly symmetric"
    assert_bf16_rounding_of(out, exact, bound, f"XXT {tuple(A.shape)}")


def check_xtx(A: torch.Tensor):
    out = torch.full((*A.shape[:-2], A.shape[-1], A.shape[-1]), float("nan"), dtype=torch.bfloat16,
                     device=A.device)
    tk.XTX(A, out)
    A64 = A.double()
    exact = A64.mT @ A64
    bound = A.shape[-2] * GRAM_ACC_U * (A64.abs().mT @ A64.abs())
    assert torch.equal(out, out.mT), "XTX output is not exactly symmetric"
    assert_bf16_rounding_of(out, exact, bound, f"XTX {tuple(A.shape)}")


def check_ba_plus_caa(A: torch.Tensor, alpha: float, beta: float):
    out = torch.full_like(A, float("nan"))
    tk.ba_plus_cAA(A, alpha, beta, out)
    A64 = A.double()
    exact = alpha * (A64 @ A64.mT) + beta * A64
    # accumulation error scaled by |alpha|, plus the fp32 multiply-add of the epilogue
    bound = (abs(alpha) * A.shape[-1] * GRAM_ACC_U * (A64.abs() @ A64.abs().mT)
             + 2.0 ** -22 * (abs(alpha) * (A64 @ A64.mT).abs() + abs(beta) * A64.abs()))
    assert torch.equal(out, out.mT), "ba_plus_cAA output is not exactly symmetric"
    assert_bf16_rounding_of(out, exact, bound, f"ba_plus_cAA {tuple(A.shape)}")


@pytest.mark.parametrize("shape", [(37, 50), (3, 70, 45), (2, 64, 96)])
def test_xxt(shape):
    check_xxt(torch.randn(shape, device=DEV).bfloat16())


@pytest.mark.parametrize("shape", [(70, 37), (3, 100, 45), (2, 33, 64)])
def test_xtx(shape):
    check_xtx(torch.randn(shape, device=DEV).bfloat16())


@pytest.mark.parametrize("batch,n", [((), 45), ((3,), 70)])
def test_ba_plus_caa(batch, n):
    a, b, c = POLAR_EXPRESS_COEFFS[torch.randint(0, 5, ()).item()]
    check_ba_plus_caa(symmetric_bf16(batch, n, DEV), c, b)


@pytest.mark.parametrize("blocks", [(16, 16, 32), (32, 16, 16)], ids=["square", "tall"])
def test_gram_tilings(monkeypatch, blocks):
    """Both ways a diagonal tile is stored: a square tile fills its upper half from its own
    transpose, a tall one (BLOCK_M = 2 BLOCK_N) masks its stores by the triangle."""
    block_m, block_n, block_r = blocks
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": block_r})
    monkeypatch.setattr(tk, "_symmetric_gram", functools.partial(tk._symmetric_gram, config=config))
    check_xxt(torch.randn(2, 45, 37, device=DEV).bfloat16())
    check_xtx(torch.randn(2, 37, 45, device=DEV).bfloat16())
    check_ba_plus_caa(symmetric_bf16((2,), 45, DEV), 0.5, -2.0)


def test_gram_rejects_bad_arguments():
    A = torch.randn(2, 40, 30, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="out must have shape"):
        tk.XXT(A, torch.empty(2, 30, 30, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="A must have dtype"):
        tk.XTX(A.float(), torch.empty(2, 30, 30, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="must be square"):
        tk.ba_plus_cAA(A, 1.0, 1.0, torch.empty(2, 40, 40, dtype=torch.bfloat16, device=DEV))


@pytest.mark.gpu
def test_gram_kernels_speedrun_shapes():
    check_xxt(torch.randn(5, 768, 768, device="cuda").bfloat16())
    check_xtx(torch.randn(3, 3072, 768, device="cuda").bfloat16())
    for batch in (5, 3):
        for _, b, c in POLAR_EXPRESS_COEFFS:
            check_ba_plus_caa(symmetric_bf16((batch,), 768, "cuda") / 8, c, b)


# =================================================================================================
# 4. Linear + ReLU^2
# =================================================================================================

def check_linear_relu_square(T: int, d: int, hidden: int, device):
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=device).bfloat16()
    x64, W1_64, W2_64, dY64 = x.double(), W1.double(), W2.double(), dY.double()

    # forward kernel: post = bf16(relu(pre)^2), pre = bf16 rounding (relative error <= 2^-8) of an
    # fp32 x W1^T within the accumulation bound; relu is 1-Lipschitz, so relu(pre) is within
    # pre_err of relu(exact)
    post = torch.ops.nanogpt_triton.linear_relu_square_forward(x.detach(), W1.detach())
    exact = x64 @ W1_64.t()
    pre_err = d * GRAM_ACC_U * (x64.abs() @ W1_64.abs().t()) + 2.0 ** -8 * exact.abs()
    relu = torch.relu(exact)
    err = (post.double() - relu.square()).abs()
    tol = pre_err * (2 * relu + pre_err) + 2.0 ** -8 * (relu + pre_err).square()
    assert (err <= tol).all(), f"post: error reaches {(err / tol).max().item():.3f} x the bound"

    # backward kernel: d_pre = bf16(2 (dY W2^T) sqrt(post)); fp32 accumulation, then a square
    # root and two products
    d_pre = torch.ops.nanogpt_triton.linear_relu_square_backward(dY, W2.detach(), post)
    relu_pre = post.double().sqrt()
    exact = 2 * (dY64 @ W2_64.t()) * relu_pre
    bound = (2 * d * GRAM_ACC_U * (dY64.abs() @ W2_64.abs().t()) * relu_pre
             + 2.0 ** -21 * exact.abs())
    assert_bf16_rounding_of(d_pre, exact, bound, "d_pre")

    # autograd wrapper against fp64 autograd. bf16 rounds pre, post, the output and d_pre,
    # each by at most 2^-8 relative; compounded through the matmuls that stays below 1e-2.
    out = tk.linear_relu_square(x, W1, W2)
    out.backward(dY)
    leaves = [t.detach().double().requires_grad_() for t in (x, W1, W2)]
    out_ref = torch.relu(leaves[0] @ leaves[1].t()).square() @ leaves[2]
    out_ref.backward(dY64)
    assert rel_norm_error(out, out_ref) < 1e-2
    for got, ref, name in zip((x.grad, W1.grad, W2.grad), leaves, ("dx", "dW1", "dW2")):
        assert rel_norm_error(got, ref.grad) < 1e-2, name


@pytest.mark.parametrize("T", [100, 64])
def test_linear_relu_square(T):
    # interpreter tiles are 32 x 32 x 32; on the GPU (128 x 256 x 64) a larger problem spans
    # several tiles and ends in a partial row tile too
    if DEV == "cpu":
        check_linear_relu_square(T, d=48, hidden=80, device=DEV)
    else:
        check_linear_relu_square(T + 100, d=128, hidden=512, device=DEV)


def test_linear_relu_square_keeps_leading_dims():
    x = torch.randn(1, 40, 32, device=DEV).bfloat16()
    W1 = torch.randn(48, 32, device=DEV).div(8).bfloat16()
    W2 = torch.randn(48, 32, device=DEV).div(8).bfloat16()
    out = tk.linear_relu_square(x, W1, W2)
    assert out.shape == (1, 40, 32)
    assert torch.equal(out[0], tk.linear_relu_square(x[0], W1, W2))
    with pytest.raises(ValueError, match="W1 and W2 both"):
        tk.linear_relu_square(x, W1, W2[:, :16])


@pytest.mark.gpu
def test_linear_relu_square_speedrun_shape():
    check_linear_relu_square(16384, d=768, hidden=3072, device="cuda")


# -------------------------------------------------------------------------------------------------
# The MLP with its up-projection in FP8 (#84)

@pytest.mark.parametrize("shape", [(7,), (5, 13), (3, 4, 9)])
def test_largest_magnitude_is_the_maximum_over_every_element(shape):
    """The row-by-row form finds the one largest |value| wherever it lies: in the last row, the
    first column, and as a negative value."""
    torch.manual_seed(0)
    for position in (0, -1):
        t = torch.randn(shape).bfloat16()
        t.view(-1)[position] = -7.5
        largest = tk.largest_magnitude(t)
        assert largest.dim() == 0 and largest.item() == 7.5


def test_quantize_e4m3_is_the_records_scaling():
    t = torch.randn(50, 30, device=DEV).bfloat16() * 3
    t8, scale = tk.quantize_e4m3(t)
    assert t8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(t.float().abs().max().item() / 448, rel=1e-6)
    assert t8.float().abs().max().item() == 448             # the largest magnitude maps to 448
    # every value is the fp32 quotient t / scale rounded to the e4m3 grid: within half a step
    # (3 mantissa bits; a quotient halfway between two values goes to either)
    exact = (t.float() / scale).double()
    step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs())[1] - 4).clamp_min(2.0 ** -9)
    assert ((t8.double() - exact).abs() <= step / 2).all()


def assert_fp8_gemm_result(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str):
    """An FP8 GEMM's output against the exact product of its e4m3 operands. The interpreter sums
    in true fp32, so `bound` (fp32 accumulation and bf16 rounding) holds element by element.
    On the GPU only bf16's rounding plus a little is promised, over the whole tensor: Hopper's FP8
    MMA accumulates with fewer bits (fast accumulation, as the reference's GEMMs), and a PyTorch
    reference sums its bf16 input in another order, so a few of its e4m3 codes differ."""
    if out.device.type == "cpu":
        err = (out.double() - exact).abs()
        assert (err <= bound).all(), f"{what}: error reaches {(err / bound).max().item():.3f} x the bound"
    else:
        assert rel_norm_error(out, exact) < 2.0 ** -7, what


# the FP8 MLP tests' (T, d, hidden): ragged token counts, sizes the FP8 GEMM's 16 divides
FP8_MLP_SIZES = (100, 48, 80) if DEV == "cpu" else (300, 128, 512)


def check_linear_relu_square_fp8_up(T, d, hidden, device, use_kernel=True):
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=device).bfloat16()
    (x8, x_scale), (W8, w_scale) = tk.quantize_e4m3(x), tk.quantize_e4m3(W1)
    scale = (x_scale * w_scale).double()
    # the FP8 product is exact in fp64; fp32 accumulation errs by at most d 2^-23 sum|a b|, and
    # pre is then rounded to bf16
    pre = (x8.double() @ W8.double().t()) * scale
    pre_err = d * GRAM_ACC_U * (x8.double().abs() @ W8.double().abs().t()) * scale + 2.0 ** -8 * pre.abs()
    relu = torch.relu(pre)
    if use_kernel:   # post itself, as the kernel writes it
        post = torch.ops.nanogpt_triton.linear_relu_square_fp8_forward(x8, W8, x_scale * w_scale)
        tol = pre_err * (2 * relu + pre_err) + 2.0 ** -8 * (relu + pre_err).square()
        assert_fp8_gemm_result(post, relu.square(), tol, "post")
    fn = tk.linear_relu_square_fp8_up if use_kernel else tk.linear_relu_square_fp8_up_reference
    out = fn(x, W1, W2)
    out.backward(dY)
    # the output from the FP8 pre; the gradients of the bf16 MLP evaluated at that pre
    W2_64, dY64 = W2.detach().double(), dY.double()
    assert rel_norm_error(out, relu.square() @ W2_64) < 1e-2
    d_pre = 2 * (dY64 @ W2_64.t()) * relu
    assert rel_norm_error(x.grad, d_pre @ W1.detach().double()) < 1e-2
    assert rel_norm_error(W1.grad, d_pre.t() @ x.detach().double()) < 1e-2
    assert rel_norm_error(W2.grad, relu.square().t() @ dY64) < 1e-2
    # and the forward really is FP8: its pre differs from the bf16 product by far more than bf16
    # rounding would
    assert rel_norm_error(pre, x.detach().double() @ W1.detach().double().t()) > 1e-2


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "reference"])
def test_linear_relu_square_fp8_up(use_kernel):
    check_linear_relu_square_fp8_up(*FP8_MLP_SIZES, device=DEV, use_kernel=use_kernel)


def test_linear_relu_square_fp8_up_rejects_unaligned_sizes():
    x = torch.randn(4, 40, device=DEV).bfloat16()
    W = torch.randn(48, 40, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="multiples of 16"):
        tk.linear_relu_square_fp8_up(x, W, W)


@pytest.mark.gpu
def test_linear_relu_square_fp8_up_speedrun_shape():
    check_linear_relu_square_fp8_up(16384, d=768, hidden=3072, device="cuda")


# -------------------------------------------------------------------------------------------------
# The MLP with its down-projection in FP8 too, at given scales (#89)

def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, ascending, from the 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return values[values.isfinite()].unique()


def test_quantize_e4m3_scaled_rounds_to_nearest_and_saturates():
    t = torch.randn(40, 24, device=DEV) * 3
    t[0, :4] = torch.tensor([5000.0, -5000.0, 448.5 * 0.01, 0.0])   # past the range either side
    scale = torch.tensor([0.01], device=DEV)
    t8 = tk.quantize_e4m3_scaled(t, scale)
    assert t8.dtype == torch.float8_e4m3fn
    # the nearest e4m3 value to t x (1 / scale) (each step rounded to fp32), where that is past
    # 448 the largest one of its sign
    exact = (t * (1 / scale)).double().clamp(-448, 448).flatten().cpu()
    grid = e4m3_grid()
    nearest = grid[(exact[:, None] - grid[None, :]).abs().argmin(dim=1)]
    assert torch.equal(t8.double().flatten().cpu(), nearest)
    assert t8[0, :4].double().tolist() == [448.0, -448.0, 448.0, 0.0]


def fp8_down_weights(W2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W2^T (d, hidden) in e4m3 at the scale max|W2| / 448, and that scale (1,)."""
    w_scale = (W2.detach().float().abs().max() / 448).reshape(1)
    return (W2.detach().float().t() / w_scale).to(torch.float8_e4m3fn), w_scale


def e4m3_times_reciprocal(t, scale):
    """e4m3 of t x (1 / scale), the reciprocal and the product each rounded to fp32 (the product
    of two fp32 values is exact in fp64), clipped to +-448: quantize_e4m3_scaled's definition."""
    inv_scale = (1 / scale.float()).double()
    return (t.double() * inv_scale).float().clamp(-448, 448).to(torch.float8_e4m3fn)


def check_linear_relu_square_fp8(T, d, hidden, device, act_scale):
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=device) * 2 - 1).div(8).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=device).bfloat16()
    W2_8t, w_scale = fp8_down_weights(W2)
    given = None if act_scale is None else torch.tensor([act_scale], device=device)
    out, post_max = tk.linear_relu_square_fp8(x, W1, W2, W2_8t, w_scale, given)
    out.backward(dY)
    grads = [t.grad for t in (x, W1, W2)]
    # post is #84's: its e4m3 form and maximum from the same bf16 values
    (x8, x_scale), (W1_8, w1_scale) = tk.quantize_e4m3(x), tk.quantize_e4m3(W1)
    post = torch.ops.nanogpt_triton.linear_relu_square_fp8_forward(x8, W1_8, x_scale * w1_scale)
    assert post_max.item() == post.float().max().item()
    scale = ((post_max / 448).double() if act_scale is None   # the exact scale, in fp32
             else torch.tensor([act_scale], device=device).double())
    if act_scale is not None:   # the kernel's own e4m3 post, beside its bf16 post
        kernel_post, post8, kernel_max = torch.ops.nanogpt_triton.linear_relu_square_fp8_post(
            x8, W1_8, x_scale * w1_scale, given)
        assert torch.equal(kernel_post, post) and kernel_max.item() == post_max.item()
        expected8 = e4m3_times_reciprocal(post, scale)
        assert torch.equal(post8.view(torch.uint8), expected8.view(torch.uint8))
        assert (post.double() / scale).max().item() > 448     # the saturation was exercised
    # out = bf16 of an fp32 accumulation of the exact e4m3 products, times both scales
    post8 = e4m3_times_reciprocal(post, scale).double()
    product_scale = scale * w_scale.double()
    exact = (post8 @ W2_8t.double().t()) * product_scale
    # plus the fp32 roundings of the scales' product and of acc times it
    bound = (hidden * GRAM_ACC_U * (post8.abs() @ W2_8t.double().abs().t()) * product_scale
             + 2.0 ** -22 * exact.abs())
    assert_fp8_gemm_result(out, exact, 0.5 * bf16_ulp(exact.abs() + bound) + bound, "out")
    # the backward is #84's bf16 one, from the same post: the same gradients, bit for bit
    for t in (x, W1, W2):
        t.grad = None
    tk.linear_relu_square_fp8_up(x, W1, W2).backward(dY)
    for got, want, name in zip(grads, (x.grad, W1.grad, W2.grad), ("dx", "dW1", "dW2")):
        assert torch.equal(got, want), name
    # the reference: the same math (the GPU may sum the products in another order)
    x.grad = W1.grad = W2.grad = None
    ref_out, ref_max = tk.linear_relu_square_fp8_reference(x, W1, W2, W2_8t, w_scale, given)
    ref_out.backward(dY)
    assert_same_max(ref_max, post_max)
    assert_fp8_gemm_result(ref_out, exact, 0.5 * bf16_ulp(exact.abs() + bound) + bound,
                           "reference out")
    # (the GPU kernel's fast accumulation: see assert_fp8_gemm_result)
    assert rel_norm_error(ref_out, out) < (1e-3 if out.device.type == "cpu" else 2.0 ** -7)
    ref_grads = [t.grad for t in (x, W1, W2)]
    x.grad = W1.grad = W2.grad = None
    tk.linear_relu_square_fp8_up_reference(x, W1, W2).backward(dY)
    for got, want, name in zip(ref_grads, (x.grad, W1.grad, W2.grad), ("dx", "dW1", "dW2")):
        assert torch.equal(got, want), f"reference {name}"


@pytest.mark.parametrize("act_scale", [0.004, None], ids=["delayed", "exact"])
def test_linear_relu_square_fp8(act_scale):
    # 0.004 x 448 = 1.8 lies below the largest post: the largest values saturate
    check_linear_relu_square_fp8(*FP8_MLP_SIZES, device=DEV, act_scale=act_scale)


def test_linear_relu_square_fp8_rejects_bad_arguments():
    x = torch.randn(4, 32, device=DEV).bfloat16()
    W = torch.randn(48, 32, device=DEV).bfloat16()
    W8t, w_scale = fp8_down_weights(W)
    with pytest.raises(ValueError, match="W2_8t must have shape \\(32, 48\\)"):
        tk.linear_relu_square_fp8(x, W, W, W8t.t(), w_scale)
    with pytest.raises(ValueError, match="W2_8t must have dtype"):
        tk.linear_relu_square_fp8(x, W, W, W.t().contiguous(), w_scale)
    with pytest.raises(ValueError, match="act_scale must have shape \\(1,\\)"):
        tk.linear_relu_square_fp8(x, W, W, W8t, w_scale, torch.ones((), device=DEV))


def test_linear_relu_square_fp8_compiles_fullgraph():
    x = torch.randn(64, 48, device=DEV).bfloat16().requires_grad_()
    W1 = torch.randn(80, 48, device=DEV).div(7).bfloat16().requires_grad_()
    W2 = torch.randn(80, 48, device=DEV).div(9).bfloat16().requires_grad_()
    W2_8t, w_scale = fp8_down_weights(W2)
    act_scale = torch.tensor([0.01], device=DEV)

    def step(x, W1, W2):
        out, post_max = tk.linear_relu_square_fp8(x, W1, W2, W2_8t, w_scale, act_scale)
        return out.float().square().sum(), post_max

    (loss, post_max), (eager_loss, eager_max) = compile_fullgraph(step)(x, W1, W2), step(x, W1, W2)
    assert torch.equal(post_max, eager_max)
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item())


@pytest.mark.gpu
def test_linear_relu_square_fp8_speedrun_shape():
    check_linear_relu_square_fp8(16384, d=768, hidden=3072, device="cuda", act_scale=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", range(len(tk._GEMM_TILINGS), len(tk._FP8_GEMM_TILINGS)))
def test_fp8_mlp_candidate_tilings_compute_the_same(tiling, monkeypatch):
    """The FP8-only tilings the benchmark may pick, forward and backward at the speedrun shape."""
    monkeypatch.setattr(tk, "_FP8_GEMM_TILES", tk._FP8_GEMM_TILINGS[tiling])
    check_linear_relu_square_fp8(16384, d=768, hidden=3072, device="cuda", act_scale=0.02)
    check_linear_relu_square_fp8_backward(16384, d=768, hidden=3072, device="cuda", act_scale=0.02)


# -------------------------------------------------------------------------------------------------
# The MLP in FP8 in the backward pass too, from weights quantised once per update (#344)

def e5m2_grid() -> torch.Tensor:
    """Every finite e5m2 value, ascending, from the 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2).double()
    return values[values.isfinite()].unique()


def test_quantize_e5m2_takes_the_nearest_value_at_the_exact_scale():
    torch.manual_seed(9)    # on the CPU it draws values exactly halfway between two e5m2 values
    g = torch.randn(40, 24, device=DEV).bfloat16() * 1e-3
    g[0, :3] = torch.tensor([0.0, 1e-12, -1e-30])     # zero, and values far below the scale
    g8, scale = tk.quantize_e5m2(g)
    assert g8.dtype == torch.float8_e5m2 and scale.dtype == torch.float32 and scale.shape == (1,)
    # the scale maps the largest magnitude onto e5m2's largest value, 57344
    assert scale.item() == torch.tensor(g.double().abs().max().item() / 57344).float().item()
    assert g8.double().abs().max().item() == 57344
    # every value is the nearest e5m2 value to g / scale; a tie goes to the even last mantissa bit
    exact = (g.double() / scale.double()).flatten().cpu()
    grid = e5m2_grid()
    even = (grid.to(torch.float8_e5m2).view(torch.uint8) & 1) == 0
    distance = (exact[:, None] - grid[None, :]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    preference = nearest.int() + (nearest & even[None, :]).int()
    assert torch.equal(g8.double().flatten().cpu(), grid[preference.argmax(dim=1)])


def fp8_mlp_weights(W1: torch.Tensor, W2: torch.Tensor) -> tk.FP8MLPWeights:
    """W1 and W2 in e4m3 in both layouts at their exact scales max|W| / 448, as the quantisations
    of the first optimizer steps make them."""
    def layouts(W):
        scale = (W.detach().float().abs().max() / 448).reshape(1)
        W8 = (W.detach().float() / scale).to(torch.float8_e4m3fn)
        return W8, W8.t().contiguous(), scale
    return tk.FP8MLPWeights(*layouts(W1), *layouts(W2))


def fp8_gemm_exact(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor):
    """(a8 b8^T x scale in fp64, the bound of an fp32 accumulation of it plus the fp32 roundings
    of the scales' product and of acc times it) for FP8 a8 (m, k), b8 (n, k)."""
    a, b, s = a8.double(), b8.double(), scale.double()
    exact = (a @ b.t()) * s
    return exact, a.shape[1] * GRAM_ACC_U * (a.abs() @ b.abs().t()) * s + 2.0 ** -22 * exact.abs()


@pytest.mark.parametrize("backend", tk.FP8_GEMM_BACKENDS)
def test_fp8_gemm_rounds_the_sum_of_exact_products_once(backend, monkeypatch):
    """The FP8 GEMMs with no epilogue, on either backend: e4m3 or e5m2 rows times e4m3 rows, the
    summed length not a multiple of the tile, give bf16 of the exact sum times the scale."""
    monkeypatch.setattr(tk, "_FP8_GEMM", backend)
    torch.manual_seed(0)
    m, n, k = (40, 32, 80) if DEV == "cpu" else (304, 256, 1936)
    scale = torch.tensor([0.37], device=DEV)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a8 = (4 * torch.randn(m, k, device=DEV)).to(dtype)
        b8 = (4 * torch.randn(n, k, device=DEV)).to(torch.float8_e4m3fn)
        out = tk._fp8_linear(a8, b8, scale)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        exact, bound = fp8_gemm_exact(a8, b8, scale)
        assert_fp8_gemm_result(out, exact, 0.5 * bf16_ulp(exact.abs() + bound) + bound,
                               f"{backend}, {dtype}")


def check_linear_relu_square_fp8_backward(T, d, hidden, device, act_scale):
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=device) * 2 - 1).div(8).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=device).bfloat16()
    weights = fp8_mlp_weights(W1, W2)
    given = None if act_scale is None else torch.tensor([act_scale], device=device)
    out, post_max = tk.linear_relu_square_fp8_backward(x, W1, W2, weights, given)
    out.backward(dY)
    grads = [t.grad for t in (x, W1, W2)]
    # the forward is #89's: with W1's stored copy at its exact scale, as #84 makes it in every
    # forward, the same output and largest post, bit for bit
    with torch.no_grad():
        want_out, want_max = tk.linear_relu_square_fp8(x, W1, W2, weights.W2_8t, weights.w2_scale,
                                                       given)
    assert torch.equal(out, want_out) and torch.equal(post_max, want_max)
    x8, x_scale = tk.quantize_e4m3(x)
    post = torch.ops.nanogpt_triton.linear_relu_square_fp8_forward(x8, weights.W1_8,
                                                                 x_scale * weights.w1_scale)
    # the backward, GEMM by GEMM, each against the exact product of its FP8 operands:
    # d_pre = bf16(2 d_post sqrt(post)), d_post = g8 W2_8^T x both scales, g8 = e5m2(dY / g_s)
    g8, g_scale = tk.quantize_e5m2(dY)
    d_pre, d_pre_max = torch.ops.nanogpt_triton.linear_relu_square_fp8_backward(
        g8, weights.W2_8, post, g_scale * weights.w2_scale)
    assert torch.equal(d_pre_max, d_pre.float().abs().amax().reshape(1))   # found in the epilogue
    d_post, bound = fp8_gemm_exact(g8, weights.W2_8, g_scale * weights.w2_scale)
    relu = post.double().sqrt()
    exact, bound = 2 * d_post * relu, 2 * bound * relu + 2.0 ** -21 * (d_post * relu).abs()
    assert_fp8_gemm_result(d_pre, exact, 0.5 * bf16_ulp(exact.abs() + bound) + bound, "d_pre")
    # dx = e5m2(d_pre / g_s') W1_8t^T x both scales
    d_pre8, d_pre_scale = tk.quantize_e5m2(d_pre)
    dx = tk._fp8_linear(d_pre8, weights.W1_8t, d_pre_scale * weights.w1_scale)
    exact, bound = fp8_gemm_exact(d_pre8, weights.W1_8t, d_pre_scale * weights.w1_scale)
    assert_fp8_gemm_result(dx, exact, 0.5 * bf16_ulp(exact.abs() + bound) + bound, "dx")
    # the wrapper's gradients are these, and the bf16 weight gradients from the same d_pre and post
    assert torch.equal(grads[0], dx)
    assert torch.equal(grads[1], d_pre.t() @ x.detach())
    assert torch.equal(grads[2], post.t() @ dY)
    # the reference: the same math (the GPU may sum the products in another order)
    x.grad = W1.grad = W2.grad = None
    ref_out, ref_max = tk.linear_relu_square_fp8_backward_reference(x, W1, W2, weights, given)
    ref_out.backward(dY)
    assert_same_max(ref_max, post_max)
    # (the GPU kernel's fast accumulation: see assert_fp8_gemm_result; and there d_pre's small
    # differences flip e5m2 roundings of d_pre, by up to 2^-3 of an element, on the way to dx)
    cpu = out.device.type == "cpu"
    assert rel_norm_error(ref_out, out) < (1e-3 if cpu else 2.0 ** -6)
    for t, got, name, gpu_tol in zip((x, W1, W2), grads, ("dx", "dW1", "dW2"),
                                     (2.0 ** -4, 2.0 ** -6, 2.0 ** -6)):
        assert rel_norm_error(t.grad, got) < (1e-3 if cpu else gpu_tol), f"reference {name}"
    return grads, post


@pytest.mark.parametrize("act_scale", [0.004, None], ids=["delayed", "exact"])
def test_linear_relu_square_fp8_backward(act_scale):
    check_linear_relu_square_fp8_backward(*FP8_MLP_SIZES, device=DEV, act_scale=act_scale)


def test_fp8_backward_gradients_against_fp64():
    """The gradients of the FP8 backward against fp64 autograd of the MLP at the FP8 forward's
    values (pre from e4m3 x and W1, the e4m3 weights): only the gradients' own e5m2 roundings
    differ. Each moves an element by at most 2^-3 of its magnitude (2 mantissa bits), which the
    GEMMs' sums average: at most 2^-3 norm-wise for dW1 (dY rounded once) and 2^-2 for dx (dY,
    then d_pre); dW2 = post^T dY is a bf16 product (2^-7). And they really are FP8: dx and dW1
    differ from #89's bf16 backward by more than bf16 rounding would."""
    torch.manual_seed(0)
    T, d, hidden = FP8_MLP_SIZES
    x = torch.randn(T, d, device=DEV).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=DEV) * 2 - 1).div(8).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=DEV) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=DEV).bfloat16()
    weights = fp8_mlp_weights(W1, W2)
    tk.linear_relu_square_fp8_backward_reference(x, W1, W2, weights)[0].backward(dY)
    fp8_grads = [t.grad.clone() for t in (x, W1, W2)]
    # fp64: pre = x8 W1_8^T x scales (bf16 rounding aside), out = relu(pre)^2 W2_8 x scale
    x8, x_scale = tk.quantize_e4m3(x)
    xq = (x8.double() * x_scale.double()).requires_grad_()
    W1q = (weights.W1_8.double() * weights.w1_scale.double()).requires_grad_()
    W2q = (weights.W2_8.double() * weights.w2_scale.double()).requires_grad_()
    (torch.relu(xq @ W1q.t()).square() @ W2q).backward(dY.double())
    for got, want, name, bound in zip(fp8_grads, (xq, W1q, W2q), ("dx", "dW1", "dW2"),
                                      (2.0 ** -2, 2.0 ** -3, 2.0 ** -7)):
        assert rel_norm_error(got, want.grad) < bound, name
    x.grad = W1.grad = W2.grad = None
    tk.linear_relu_square_fp8_reference(x, W1, W2, weights.W2_8t, weights.w2_scale)[0].backward(dY)
    assert rel_norm_error(fp8_grads[0], x.grad) > 1e-2
    assert rel_norm_error(fp8_grads[1], W1.grad) > 1e-2


def fp8_backward_inputs(T, d, hidden, device, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d, device=device) * 2 - 1).div(8).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d, device=device) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d, device=device).bfloat16()
    return x, W1, W2, dY, fp8_mlp_weights(W1, W2)


def test_backward_epilogue_writes_d_pre8_at_the_given_scale():
    """RELU2_BACKWARD_FP8 (--fp8_mlp_grad_bound): the same d_pre as #344's epilogue, bit for bit,
    and beside it e5m2(d_pre / scale) exactly as quantize_e5m2_scaled rounds it, including the
    saturation of what a too small scale pushes past 57344."""
    T, d, hidden = FP8_MLP_SIZES
    _, _, _, dY, weights = fp8_backward_inputs(T, d, hidden, DEV)
    post = torch.rand(T, hidden, device=DEV).bfloat16()
    g8, g_scale = tk.quantize_e5m2(dY)
    scale = g_scale * weights.w2_scale
    d_pre, d_pre_max = torch.ops.nanogpt_triton.linear_relu_square_fp8_backward(
        g8, weights.W2_8, post, scale)
    exact = (d_pre_max / tk.E5M2_MAX).reshape(1)
    for d_pre_scale in (exact * 4, exact / 4):         # all inside e5m2's range; the largest saturated
        got, d_pre8 = torch.ops.nanogpt_triton.linear_relu_square_fp8_backward_scaled(
            g8, weights.W2_8, post, scale, d_pre_scale)
        assert torch.equal(got, d_pre)
        assert d_pre8.dtype == torch.float8_e5m2
        want = tk.quantize_e5m2_scaled(d_pre, d_pre_scale)
        assert torch.equal(d_pre8.view(torch.uint8), want.view(torch.uint8))
    assert (d_pre8.float().abs() == tk.E5M2_MAX).sum() > 1      # the saturated ones


def test_bounded_d_pre_scale_is_never_exceeded_and_is_reached():
    """bounded_d_pre_scale's bound, 2 sqrt(max post) max|dY| max_j sum_k |W2_jk|, holds for
    random operands and is met (up to d_pre's bf16 rounding) when one row of dY has every entry at
    max|dY| with the signs of W2's row of largest sum, and that row's post is the largest post:
    a bound that were too small or needlessly loose would fail one of the two."""
    T, d, hidden = FP8_MLP_SIZES
    _, _, _, dY, weights = fp8_backward_inputs(T, d, hidden, DEV)
    post = torch.rand(T, hidden, device=DEV).bfloat16()

    def d_pre_and_bound(dY, post):
        d_out_max = tk.largest_magnitude(dY)
        g8, g_scale = tk.quantize_e5m2(dY, d_out_max)
        d_pre, _ = torch.ops.nanogpt_triton.linear_relu_square_fp8_backward(
            g8, weights.W2_8, post, g_scale * weights.w2_scale)
        scale = tk.bounded_d_pre_scale(d_out_max, post.float().amax(), weights.W2_8,
                                       weights.w2_scale)
        return d_pre.float().abs().amax().item(), scale.item() * tk.E5M2_MAX

    largest, bound = d_pre_and_bound(dY, post)
    assert 0 < largest <= bound
    row_sums = weights.W2_8.float().abs().sum(dim=1)
    j = row_sums.argmax()
    dY = dY.clone()
    dY[7] = 8.0 * torch.sign(weights.W2_8[j].float()).bfloat16()   # above every other |dY|
    post = post.clone()
    post[7, j] = 1.5                            # above every other post, from torch.rand
    largest, bound = d_pre_and_bound(dY, post)
    assert bound * (1 - 2.0 ** -7) <= largest <= bound * (1 + 2.0 ** -7)


def test_fp8_backward_with_grad_bound():
    """--fp8_mlp_grad_bound's backward: d_pre, dW1 and dW2 as #344's exactly; dx from d_pre in e5m2
    at the bounded scale, bit for bit as quantize_e5m2_scaled and the FP8 GEMM make it. Against
    fp64 autograd at the FP8 forward's values (as test_fp8_backward_gradients_against_fp64) its dx
    is as close as #344's: the rounding of a normal e5m2 value is relative, whatever the scale.
    The reference path computes the same."""
    T, d, hidden = FP8_MLP_SIZES
    x, W1, W2, dY, weights = fp8_backward_inputs(T, d, hidden, DEV)
    grads = {}
    for bound in (False, True):
        x.grad = W1.grad = W2.grad = None
        out, post_max = tk.linear_relu_square_fp8_backward(x, W1, W2, weights, grad_bound=bound)
        out.backward(dY)
        grads[bound] = [t.grad for t in (x, W1, W2)]
    assert torch.equal(grads[True][1], grads[False][1])
    assert torch.equal(grads[True][2], grads[False][2])
    x8, x_scale = tk.quantize_e4m3(x)
    post = torch.ops.nanogpt_triton.linear_relu_square_fp8_forward(x8, weights.W1_8,
                                                                 x_scale * weights.w1_scale)
    d_out_max = tk.largest_magnitude(dY)
    g8, g_scale = tk.quantize_e5m2(dY, d_out_max)
    d_pre, _ = torch.ops.nanogpt_triton.linear_relu_square_fp8_backward(
        g8, weights.W2_8, post, g_scale * weights.w2_scale)
    d_pre_scale = tk.bounded_d_pre_scale(d_out_max, post_max, weights.W2_8, weights.w2_scale)
    dx = tk._fp8_linear(tk.quantize_e5m2_scaled(d_pre, d_pre_scale), weights.W1_8t,
                        d_pre_scale * weights.w1_scale)
    assert torch.equal(grads[True][0], dx)
    xq = (x8.double() * x_scale.double()).requires_grad_()
    W1q = weights.W1_8.double() * weights.w1_scale.double()
    W2q = weights.W2_8.double() * weights.w2_scale.double()
    (torch.relu(xq @ W1q.t()).square() @ W2q).backward(dY.double())
    exact_error = rel_norm_error(grads[False][0], xq.grad)
    assert rel_norm_error(grads[True][0], xq.grad) < max(1.25 * exact_error, 2.0 ** -5)
    x.grad = W1.grad = W2.grad = None
    tk.linear_relu_square_fp8_backward_reference(x, W1, W2, weights, grad_bound=True)[0].backward(dY)
    cpu = DEV == "cpu"
    for t, got, gpu_tol in zip((x, W1, W2), grads[True], (2.0 ** -4, 2.0 ** -6, 2.0 ** -6)):
        assert rel_norm_error(t.grad, got) < (1e-3 if cpu else gpu_tol)


def test_relu_square_from_post_is_within_one_ulp_of_the_stored_pre():
    """relu(pre) rebuilt as sqrt(post): d_pre at most one bf16 ulp from the one computed with pre
    (see triton_kernels.relu_square), 0 where pre <= 0; the MLP's dW1 = d_pre^T x then agree within
    2^-7 norm-wise, and dW2 = post^T dY, which needs no pre, exactly. So does the bf16 dx; the FP8
    backward's dx = e5m2(d_pre / s) W1 within 2^-4: a changed d_pre may move its e5m2 scale and
    flip roundings by one e5m2 step (2^-3 relative) in some elements."""
    torch.manual_seed(1)
    pre = torch.randn(64, 48).bfloat16()
    pre[0, :2] = torch.tensor([0.0, -0.0])
    d_post = torch.randn(64, 48).bfloat16()
    grads = []
    for from_post in (False, True):
        leaf = pre.clone().requires_grad_()
        tk.relu_square(leaf, from_post).backward(d_post)
        grads.append(leaf.grad)
    stored, rebuilt = grads
    assert torch.equal(tk.relu_square(pre, True), torch.relu(pre).square())
    assert ((rebuilt.double() - stored.double()).abs() <= bf16_ulp(stored)).all()
    assert torch.equal(rebuilt[pre <= 0], torch.zeros_like(rebuilt[pre <= 0]))
    assert not torch.equal(rebuilt, stored)       # the rebuilt root differs in some last bits
    T, d, hidden = FP8_MLP_SIZES
    x = torch.randn(T, d).bfloat16().requires_grad_()
    W1 = (torch.rand(hidden, d) * 2 - 1).div(8).bfloat16().requires_grad_()
    W2 = (torch.rand(hidden, d) * 2 - 1).div(32).bfloat16().requires_grad_()
    dY = torch.randn(T, d).bfloat16()
    weights = fp8_mlp_weights(W1, W2)
    mlps = (lambda p: tk.linear_relu_square_reference(x, W1, W2, pre_from_post=p),
            lambda p: tk.linear_relu_square_fp8_backward_reference(x, W1, W2, weights,
                                                                   pre_from_post=p)[0])
    for mlp, dx_bound in zip(mlps, (2.0 ** -7, 2.0 ** -4)):
        results = []
        for from_post in (False, True):
            x.grad = W1.grad = W2.grad = None
            out = mlp(from_post)
            out.backward(dY)
            results.append((out, x.grad, W1.grad, W2.grad))
        (out_a, dx_a, dW1_a, dW2_a), (out_b, dx_b, dW1_b, dW2_b) = results
        assert torch.equal(out_a, out_b) and torch.equal(dW2_a, dW2_b)
        assert rel_norm_error(dx_b, dx_a) < dx_bound and rel_norm_error(dW1_b, dW1_a) < 2.0 ** -7


def test_linear_relu_square_fp8_backward_rejects_bad_arguments():
    x = torch.randn(4, 32, device=DEV).bfloat16()
    W = torch.randn(48, 32, device=DEV).bfloat16()
    weights = fp8_mlp_weights(W, W)
    with pytest.raises(ValueError, match="weights.W1_8t must have shape \\(32, 48\\)"):
        tk.linear_relu_square_fp8_backward(x, W, W, weights._replace(W1_8t=weights.W1_8))
    with pytest.raises(ValueError, match="weights.W2_8 must have dtype"):
        tk.linear_relu_square_fp8_backward(x, W, W, weights._replace(W2_8=W))
    with pytest.raises(ValueError, match="weights.w1_scale must have shape \\(1,\\)"):
        tk.linear_relu_square_fp8_backward(x, W, W, weights._replace(w1_scale=weights.w1_scale[0]))


@pytest.mark.parametrize("grad_bound", [False, True], ids=["exact", "grad_bound"])
def test_linear_relu_square_fp8_backward_compiles_fullgraph(grad_bound):
    x = torch.randn(64, 48, device=DEV).bfloat16().requires_grad_()
    W1 = torch.randn(80, 48, device=DEV).div(7).bfloat16().requires_grad_()
    W2 = torch.randn(80, 48, device=DEV).div(9).bfloat16().requires_grad_()
    weights = fp8_mlp_weights(W1, W2)
    act_scale = torch.tensor([0.01], device=DEV)

    def step(x, W1, W2):
        out, post_max = tk.linear_relu_square_fp8_backward(x, W1, W2, weights, act_scale,
                                                           grad_bound)
        return out.float().square().sum(), post_max

    leaves = (x, W1, W2)
    (loss, post_max), (eager_loss, eager_max) = compile_fullgraph(step)(*leaves), step(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    assert torch.equal(post_max, eager_max)
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item())
    for g, e in zip(grads, eager_grads):
        assert rel_norm_error(g, e) < 2e-2


@pytest.mark.gpu
def test_linear_relu_square_fp8_backward_speedrun_shape():
    check_linear_relu_square_fp8_backward(16384, d=768, hidden=3072, device="cuda", act_scale=0.02)


# =================================================================================================
# 4b. Polar Express update: a X + X B (the same GEMM, AXPY epilogue)
# =================================================================================================

def assert_polar_update(out: torch.Tensor, X: torch.Tensor, B: torch.Tensor, alpha: float, what: str):
    """out is a bf16 rounding of an fp32 evaluation of alpha X + X B."""
    X64, B64 = X.double(), B.double()
    product = X64 @ B64
    exact = alpha * X64 + product
    # accumulation of X B in fp32, plus the fp32 multiply-add of alpha X
    bound = (X.shape[-1] * GRAM_ACC_U * (X64.abs() @ B64.abs())
             + 2.0 ** -22 * (abs(alpha) * X64.abs() + product.abs()))
    assert_bf16_rounding_of(out, exact, bound, f"{what} {tuple(X.shape)}")


def check_polar_update_tall(X: torch.Tensor, B: torch.Tensor, alpha: float):
    out = torch.full_like(X, float("nan"))
    assert tk.polar_update_tall(X, B, alpha, out) is out
    assert_polar_update(out, X, B, alpha, "polar_update_tall")


# interpreter tiles are 32 x 32 x 32; the GPU's are 128 x 256 x 64. n is not a multiple of the
# column block or of the reduction block; several matrices need m to be a multiple of the row block.
POLAR_UPDATE_SHAPES = {
    "cpu": [(70, 40), (1, 50, 24), (3, 64, 40), (2, 96, 56)],
    "cuda": [(300, 264), (1, 200, 136), (3, 256, 264), (2, 384, 520)],
}


@pytest.mark.parametrize("case", range(4))
def test_polar_update_tall(case):
    shape = POLAR_UPDATE_SHAPES[DEV][case]
    a, _, _ = POLAR_EXPRESS_COEFFS[torch.randint(0, 5, ()).item()]
    X = torch.randn(shape, device=DEV).bfloat16()
    check_polar_update_tall(X, symmetric_bf16(shape[:-2], shape[-1], DEV), a)


@pytest.mark.parametrize("tiling", range(len(tk._GEMM_TILINGS)))
def test_gemm_epilogue_candidate_tilings_compute_the_same_update(tiling):
    """Every tiling the benchmark may pick computes the same update (the interpreter runs each
    one's flags on its own small blocks, and one or more programs per SM come out as its four)."""
    tiles = tk._GEMM_TILINGS[tiling]
    if DEV == "cpu":
        tiles = {**tiles, **tk._INTERPRETED_TILES, "FLATTEN": tiles["FLATTEN"]}
    shape = POLAR_UPDATE_SHAPES[DEV][2]
    a, _, _ = POLAR_EXPRESS_COEFFS[1]
    X, B = torch.randn(shape, device=DEV).bfloat16(), symmetric_bf16(shape[:-2], shape[-1], DEV)
    out = torch.full_like(X, float("nan"))
    tk._polar_update_tall(X, B, a, out, tiles)
    assert_polar_update(out, X, B, a, f"polar_update_tall, tiling {tiles}")


def test_polar_update_tall_reference():
    X = torch.randn(2, 30, 24).bfloat16()
    B = symmetric_bf16((2,), 24, "cpu")
    assert_polar_update(tk.polar_update_tall_reference(X, B, -1.5), X, B, -1.5, "polar_update_tall_reference")


def test_polar_update_tall_rejects_bad_arguments():
    X = torch.randn(2, 128, 40, device=DEV).bfloat16()   # 128 rows: whole row tiles on every device
    B = symmetric_bf16((2,), 40, DEV)
    out = torch.empty_like(X)
    with pytest.raises(ValueError, match="X must have dtype"):
        tk.polar_update_tall(X.float(), B, 2.0, out)
    with pytest.raises(ValueError, match="B must have shape"):
        tk.polar_update_tall(X, B[:, :32, :32], 2.0, out)
    with pytest.raises(ValueError, match="B must have shape"):
        tk.polar_update_tall(X[:1], B, 2.0, out[:1])
    with pytest.raises(ValueError, match="out must have shape"):
        tk.polar_update_tall(X, B, 2.0, out[:, :32])
    with pytest.raises(ValueError, match="m must be a multiple of"):
        tk.polar_update_tall(X[:, :40].contiguous(), B, 2.0, out[:, :40].contiguous())
    with pytest.raises(ValueError, match="out must be contiguous"):
        tk.polar_update_tall(X, B, 2.0, torch.empty(2, 40, 128, dtype=X.dtype, device=DEV).mT)
    with pytest.raises(ValueError, match="multiple of 8"):
        X12 = X[..., :12].contiguous()
        tk.polar_update_tall(X12, B[:, :12, :12].contiguous(), 2.0, torch.empty_like(X12))
    with pytest.raises(ValueError, match="must not overlap X"):
        tk.polar_update_tall(X, B, 2.0, X)


def test_polar_update_tall_fits_agrees_with_the_argument_checks():
    for shape in [(2, 128, 40), (1, 40, 40), (40, 24), (2, 40, 40), (2, 128, 12), (40, 12)]:
        X = torch.randn(shape, device=DEV).bfloat16()
        B = symmetric_bf16(shape[:-2], shape[-1], DEV)
        try:
            tk.polar_update_tall(X, B, 1.5, torch.empty_like(X))
            accepted = True
        except ValueError:
            accepted = False
        assert tk.polar_update_tall_fits(X) == accepted, shape


def polar_express_fp64(G: torch.Tensor) -> torch.Tensor:
    """The same 5 steps in fp64 (tall form), from the bf16 input."""
    X = G.bfloat16().double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X.mT @ X
        X = a * X + X @ (b * A + c * A @ A)
    return X


def test_train_gpt_polar_express_takes_the_fused_update(monkeypatch):
    import train_gpt
    calls = []
    fused = tk.polar_update_tall

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(tk, "polar_update_tall", counted)
    G = torch.randn(2, 128, 48, device=DEV)   # 128 rows: whole row tiles on every device
    X = train_gpt.polar_express(G.bfloat16(), use_kernels=True)
    assert len(calls) == 5
    assert rel_norm_error(X, polar_express_fp64(G)) < 4e-2   # see the compiled test below


@pytest.mark.gpu
def test_polar_update_tall_speedrun_shapes():
    for count in (3, 24):
        X = torch.randn(count, 3072, 768, device="cuda").bfloat16()
        check_polar_update_tall(X, symmetric_bf16((count,), 768, "cuda") / 8, POLAR_EXPRESS_COEFFS[0][0])


# =================================================================================================
# 5. Soft-capped multi-token cross entropy
# =================================================================================================

def reference_losses_and_grad(logits, targets, w, dloss, extra=None):
    """fp64 restatement: per-row losses, lse and d(sum dloss_t loss_t)/d logits, row by row in
    chunks (bounded memory at the real shapes). extra = (extra_targets, weight) adds to row t the
    term for its own extra target."""
    T, V = logits.shape
    w = w.double().tolist()
    losses = torch.zeros(T, dtype=torch.float64, device=logits.device)
    lse_all = torch.zeros_like(losses)
    grad = torch.zeros(T, V, dtype=torch.float32, device=logits.device)
    for r0 in range(0, T, 2048):
        rows = torch.arange(r0, min(r0 + 2048, T), device=logits.device)
        l = logits[rows].double()
        s = torch.sigmoid((l + 5.0) / 7.5)
        z = 23.0 * s
        lse = torch.logsumexp(z, dim=1)
        dz = torch.zeros_like(z)
        terms = [(rows + k, targets[(rows + k).clamp(max=T - 1)], wk) for k, wk in enumerate(w)]
        if extra is not None:
            terms.append((rows, extra[0][rows], extra[1]))
        for later, target, wk in terms:
            valid = (later < T) & (target >= 0) & (target < V) & (wk > 0)
            z_t = z.gather(1, target.clamp(0, V - 1)[:, None])[:, 0]
            losses[rows] += torch.where(valid, wk * (lse - z_t), 0.0)
            weight = valid.double() * wk
            dz += weight[:, None] * torch.softmax(z, dim=1)
            dz.scatter_add_(1, target.clamp(0, V - 1)[:, None], -weight[:, None])
        lse_all[rows] = lse
        grad[rows] = (dloss[rows].double()[:, None] * dz * (23.0 / 7.5) * s * (1 - s)).float()
    return losses, lse_all, grad


def check_mtp_kernel(T, V, w, device, invalid_target=False,
                     losses_and_grad=tk.softcapped_mtp_losses_and_grad, extra_weight=None):
    logits = (torch.randn(T, V, device=device) * 4).bfloat16()
    targets = torch.randint(0, V, (T,), device=device)
    if invalid_target:   # skipped by the validity rule 0 <= target < V
        targets[T // 2] = -1
        targets[T // 3] = V
    w = torch.tensor(w, device=device)
    grad_scale = 0.75 / 448

    extra = None
    if extra_weight is not None:   # a second target per row; -1 (none) for a few, a repeat for some
        extra_targets = torch.randint(0, V, (T,), device=device)
        extra_targets[::5] = -1
        extra_targets[1::7] = targets[1::7]
        extra = (extra_targets, extra_weight)
        losses, grad8 = losses_and_grad(logits, targets, w, grad_scale, extra_targets,
                                        torch.tensor([extra_weight], device=device))
    else:
        losses, grad8 = losses_and_grad(logits, targets, w, grad_scale)
    ref_losses, _, ref_grad = reference_losses_and_grad(logits, targets, w, torch.ones(T, device=device),
                                                        extra)
    has_loss = ref_losses != 0
    assert torch.equal(losses != 0, has_loss), "rows with and without a loss term differ"
    # fp32 streaming sums of exp over at most 50k positive terms: ~1e-6 relative
    assert ((losses.double() - ref_losses).abs()[has_loss] / ref_losses[has_loss].abs()).max().item() < 1e-4

    ref8 = (ref_grad / torch.tensor(grad_scale, dtype=torch.float32)).to(torch.float8_e5m2)
    steps = (e5m2_steps(grad8) - e5m2_steps(ref8)).abs()
    # fp32 vs fp64 evaluation moves a value across an e5m2 rounding boundary only when it lies
    # within ~1e-6 relative of one. The gradient pass's polynomial exponential (relative error
    # 7.5e-5) moves a few more, and on the GPU its sigmoid from the hardware tanh (relative error
    # < 2^-10, so < 1% on the value) more still, to the neighbouring code; never further.
    assert steps.max().item() <= 1
    assert steps.float().mean().item() < (0.05 if device == "cuda" else 1e-3)
    # the target columns, where S_w p - w cancels, are computed exactly on every device (an
    # invalid target names no column: the clamped index would land on an ordinary one)
    for k in range(w.numel()):
        later = targets[k:]
        valid = (later >= 0) & (later < V)
        at_targets = steps[torch.arange(T - k, device=device)[valid], later[valid]]
        assert at_targets.float().mean().item() < 1e-3


@pytest.mark.parametrize("w,invalid_target", [
    ([1.0], False),
    ([1.0, 0.5], False),
    ([1.0, 0.0], True),
    ([1.0, 0.5, 0.25], False),
    ([1.0, 0.5, 0.0], True),
])
@pytest.mark.parametrize("losses_and_grad", [tk.softcapped_mtp_losses_and_grad,
                                             tk.softcapped_mtp_losses_and_grad_reference])
def test_mtp_kernel(w, invalid_target, losses_and_grad):
    # T = 37 rows: the last K-1 rows lose their later targets; V = 700 is not a multiple of the block
    check_mtp_kernel(37, 700, w, DEV, invalid_target, losses_and_grad)


@pytest.mark.parametrize("w,extra_weight", [([1.0, 0.5, 0.25], 0.25), ([1.0, 0.0], 0.25), ([1.0], 0.0)])
@pytest.mark.parametrize("losses_and_grad", [tk.softcapped_mtp_losses_and_grad,
                                             tk.softcapped_mtp_losses_and_grad_reference])
def test_mtp_kernel_extra_target(w, extra_weight, losses_and_grad):
    # the prefix-token term: one more target per row, its own, with its own weight
    check_mtp_kernel(37, 700, w, DEV, losses_and_grad=losses_and_grad, extra_weight=extra_weight)


def test_mtp_kernel_whole_blocks():
    # V a whole number of column blocks (256 in the interpreter, 4096 on the GPU): no tail block
    check_mtp_kernel(21, 8192 if DEV == "cuda" else 512, [1.0, 0.5, 0.25], DEV)


def test_mtp_kernel_extreme_and_nan_logits():
    # pass 1 counts logits below -300 as -300; infinities saturate the soft cap, and a NaN
    # anywhere in a row must reach that row's loss (the training loop stops on a NaN loss)
    T, V = 9, 600
    logits = (torch.randn(T, V, device=DEV) * 4).bfloat16()
    extremes = torch.tensor([-float("inf"), -1e4, -350.0, -300.5, 300.0, 1e4, float("inf")], device=DEV)
    columns = torch.randperm(V, device=DEV)[:4 * extremes.numel()]
    logits[:T - 1, columns] = extremes.repeat(4).bfloat16()
    nan_row = T - 1
    logits[nan_row, 7] = float("nan")
    targets = torch.randint(0, V, (T,), device=DEV)
    targets[nan_row] = 8
    w = torch.tensor([1.0], device=DEV)
    grad_scale = 0.75 / 448

    losses, grad8 = tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale)
    assert torch.isnan(losses[nan_row])
    ref_losses, _, ref_grad = reference_losses_and_grad(logits[:nan_row], targets[:nan_row], w,
                                                        torch.ones(nan_row, device=DEV))
    assert ((losses[:nan_row].double() - ref_losses).abs() / ref_losses.abs()).max().item() < 1e-4
    ref8 = (ref_grad / torch.tensor(grad_scale, dtype=torch.float32)).to(torch.float8_e5m2)
    assert (e5m2_steps(grad8[:nan_row]) - e5m2_steps(ref8)).abs().max().item() <= 1


@pytest.mark.parametrize("grad_scale", [0.0, -1.0, 2.0 ** 61, float("nan")])
def test_mtp_kernel_rejects_grad_scale(grad_scale):
    logits = torch.randn(4, 64, device=DEV).bfloat16()
    targets = torch.zeros(4, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="grad_scale"):
        tk.softcapped_mtp_losses_and_grad(logits, targets, torch.ones(1, device=DEV), grad_scale)


def test_mtp_reference_matches_restatement():
    T, V = 30, 200
    logits = (torch.randn(T, V) * 4).bfloat16()
    targets = torch.randint(0, V, (T,))
    w = torch.tensor([1.0, 0.5, 0.25])
    ref_losses, _, _ = reference_losses_and_grad(logits, targets, w, torch.ones(T))
    got = tk.softcapped_mtp_losses_reference(logits, targets, w)
    assert ((got.double() - ref_losses).abs() / ref_losses.abs()).max().item() < 1e-5


def fp8_head_reference(h, targets, w, W_head, dloss, x_scale, w_scale):
    """fp32 autograd of the loss on the same e4m3-rounded inputs, logits never rounded."""
    h_q = ((h.float() / x_scale).to(torch.float8_e4m3fn).float() * x_scale).requires_grad_()
    W_q = ((W_head.float() / w_scale).to(torch.float8_e4m3fn).float() * w_scale).requires_grad_()
    logits = h_q @ W_q
    T, V = logits.shape
    z = 23.0 * torch.sigmoid((logits + 5.0) / 7.5)
    lse = torch.logsumexp(z, dim=1)
    losses = torch.zeros(T, device=h.device)
    for k, wk in enumerate(w.tolist()):
        if wk > 0 and k < T:
            losses = losses + torch.nn.functional.pad(
                wk * (lse[:T - k] - z[:T - k].gather(1, targets[k:, None])[:, 0]), (0, k))
    (losses * dloss).sum().backward()
    return losses.detach(), h_q, W_q


def check_fp8_cross_entropy(T, d, V, device, use_kernels=True):
    x_scale, w_scale = 100 / 448, 1.6 / 448
    grad_accum_scale = 0.125
    h = torch.randn(T, d, device=device).bfloat16().requires_grad_()   # rmsnorm'd: unit scale
    W_head = (torch.randn(d, V, device=device) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (T,), device=device)
    w = torch.tensor([1.0, 0.5, 0.25], device=device)

    loss = tk.softcapped_mtp_cross_entropy(h, targets, w, W_head, x_scale, w_scale, 0.75 / 448,
                                           use_kernels)
    (loss * grad_accum_scale).backward()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # a true fp32 reference
    try:
        ref_losses, h_q, W_q = fp8_head_reference(h.detach(), targets, w, W_head.detach(),
                                                  torch.full((T,), grad_accum_scale, device=device),
                                                  x_scale, w_scale)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    # The FP8 GEMM writes bf16 logits (2^-9 relative) accumulated in reduced precision: allow
    # |dl| <= 2^-8 sum|h w| per logit. dz/dl <= 23/7.5/4, and each weighted term moves with lse
    # and one z: |d loss_t| <= 2 S_w max_j |dz_j|.
    with torch.no_grad():
        logit_error = 2.0 ** -8 * (h_q.abs() @ W_q.abs())
        weight_sum = sum(wk * (torch.arange(T, device=device) + k < T).float()
                         for k, wk in enumerate(w.tolist()))
        tol = 2 * weight_sum * (23 / 7.5 / 4) * logit_error.max(dim=1).values + 1e-4 * ref_losses.abs()
    assert (loss - ref_losses.sum()).abs() <= tol.sum()

    # The logits gradient travels in e5m2 (2 mantissa bits): each element is rounded by up to
    # 2^-3 relative, independently, so dh and dW_head carry ~5% norm-relative error; allow 10%.
    assert rel_norm_error(h.grad, h_q.grad) < 0.1
    assert rel_norm_error(W_head.grad, W_q.grad) < 0.1
    assert h.grad.dtype == torch.bfloat16 and W_head.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("use_kernels", [True, False])
def test_fp8_cross_entropy_end_to_end(use_kernels):
    check_fp8_cross_entropy(48, 64, 304, DEV, use_kernels)


def test_softcap_is_the_record_formula():
    logits = torch.randn(5, 7, dtype=torch.float64) * 20
    assert torch.allclose(tk.softcap(logits), 23.0 * torch.sigmoid((logits + 5.0) / 7.5))


@pytest.mark.gpu
def test_mtp_kernel_speedrun_shape():
    check_mtp_kernel(16384, 50304, [1.0, 0.5, 0.25], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("use_kernels", [True, False])
def test_fp8_cross_entropy_speedrun_shape(use_kernels):
    check_fp8_cross_entropy(16384, 768, 50304, "cuda", use_kernels)


# =================================================================================================
# 6-7. Transposes
# =================================================================================================

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_transpose_copy(dtype):
    big = torch.randn(70, 60, device=DEV).to(dtype)
    src = big[:, 5:50]                         # strided rows, 45 columns
    dst = torch.empty(45, 70, dtype=dtype, device=DEV)
    tk.transpose_copy(src, dst)
    bits = torch.uint8 if dtype != torch.bfloat16 else torch.int16   # compare raw bits
    assert torch.equal(dst.view(bits), src.t().contiguous().view(bits))


def test_transpose_add():
    src = torch.randn(70, 45, device=DEV).bfloat16()
    dst0 = torch.randn(45, 70, device=DEV).bfloat16()
    dst = dst0.clone()
    tk.transpose_add(src, dst)
    exact = dst0.double() + src.t().double()
    assert ((dst.double() - exact).abs() <= bf16_ulp(exact)).all()   # one rounding of the sum


def test_transpose_rejects_bad_arguments():
    src = torch.randn(70, 45, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="dst must have shape"):
        tk.transpose_copy(src, torch.empty(70, 45, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="share a dtype"):
        tk.transpose_add(src, torch.empty(45, 70, device=DEV))


@pytest.mark.gpu
def test_transposes_speedrun_shape():
    src = torch.randn(768, 50304, device="cuda").bfloat16()
    dst = torch.empty(50304, 768, dtype=torch.bfloat16, device="cuda")
    tk.transpose_copy(src, dst)
    assert torch.equal(dst, src.t())
    src8 = src.to(torch.float8_e4m3fn)
    dst8 = torch.empty(50304, 768, dtype=torch.float8_e4m3fn, device="cuda")
    tk.transpose_copy(src8, dst8)
    assert torch.equal(dst8.view(torch.uint8), src8.t().view(torch.uint8))
    grad = torch.randn(50304, 768, device="cuda").bfloat16()
    head_grad0 = torch.randn(768, 50304, device="cuda").bfloat16()
    head_grad = head_grad0.clone()
    tk.transpose_add(grad, head_grad)
    exact = head_grad0.double() + grad.t().double()
    assert ((head_grad.double() - exact).abs() <= bf16_ulp(exact)).all()


# =================================================================================================
# 8. Row scatter-add
# =================================================================================================

def index_add_restated(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[l, index[t]] += src[l, t] in fp64 (exact for these sizes, whatever the order)."""
    return out.double().index_add(-2, index, src.double())


def check_index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, presorted: bool = False) -> None:
    exact = index_add_restated(out, index, src)
    # every output element is one fp32 sum of its start value and its rows, in some order
    count = torch.zeros(out.shape[-2], dtype=torch.float64, device=out.device)
    count.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    magnitude = out.double().abs() + torch.zeros_like(exact).index_add_(-2, index, src.double().abs())
    tol = (count[:, None] + 1) * 2.0 ** -23 * magnitude
    tk.index_add_rows(out, index, src, torch.sort(index) if presorted else None)
    assert ((out.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("tables,rows,positions,cols,index_dtype,presorted", [
    (None, 50, 90, 70, torch.int64, False), (3, 17, 61, 40, torch.int32, True)])
def test_index_add_rows(tables, rows, positions, cols, index_dtype, presorted):
    lead = () if tables is None else (tables,)
    index = torch.randint(0, rows, (positions,), device=DEV, dtype=index_dtype)
    index[torch.randperm(positions, device=DEV)[:positions // 3]] = 2   # one run across several chunks
    check_index_add_rows(torch.randn(*lead, rows, cols, device=DEV), index,
                         torch.randn(*lead, positions, cols, device=DEV), presorted)


def test_index_add_rows_rejects_bad_arguments():
    out, src = torch.zeros(10, 8, device=DEV), torch.ones(5, 8, device=DEV)
    index = torch.zeros(5, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="src must have shape"):
        tk.index_add_rows(out, index, src[:, :4])
    with pytest.raises(ValueError, match="index must have dtype"):
        tk.index_add_rows(out, index.to(torch.int16), src)
    with pytest.raises(ValueError, match="index_sorted must have shape"):
        tk.index_add_rows(out, index, src, torch.sort(index[:3]))


@pytest.mark.gpu
def test_index_add_rows_speedrun_shape():
    # value-table gradients of one stage-3 micro-batch: 5 tables, token ids with a Zipf-like skew
    tokens = torch.randint(0, 50304, (49152,), device="cuda", dtype=torch.int32)
    frequent = torch.rand(49152, device="cuda") < 0.3
    tokens[frequent] = torch.randint(0, 20, (int(frequent.sum()),), device="cuda", dtype=torch.int32)
    check_index_add_rows(torch.randn(5, 50304, 768, device="cuda"), tokens,
                         torch.randn(5, 49152, 768, device="cuda"))


# =================================================================================================
# References used by the CPU training path
# =================================================================================================

def test_references_restate_the_math():
    A = torch.randn(2, 20, 12).bfloat16()
    A64 = A.double()
    assert torch.equal(tk.XXT_reference(A), (A64 @ A64.mT).float().bfloat16())
    assert torch.equal(tk.XTX_reference(A), (A64.mT @ A64).float().bfloat16())
    S = symmetric_bf16((2,), 12, "cpu")
    S64 = S.double()
    ref = tk.ba_plus_cAA_reference(S, 0.5, -2.0).double()
    assert ((ref - (0.5 * S64 @ S64 + -2.0 * S64)).abs() <= bf16_ulp(ref)).all()
    x, W1, W2 = torch.randn(10, 12), torch.randn(16, 12), torch.randn(16, 12)
    assert torch.allclose(tk.linear_relu_square_reference(x, W1, W2),
                          torch.clamp(x @ W1.t(), min=0) ** 2 @ W2, rtol=1e-5, atol=1e-5)
    src, dst = torch.randn(7, 5).bfloat16(), torch.randn(5, 7).bfloat16()
    assert torch.equal(tk.transpose_copy_reference(src, dst.clone()), src.t())
    summed = tk.transpose_add_reference(src, dst.clone())
    assert torch.equal(summed, (dst.float() + src.t().float()).bfloat16())
    out, index, rows = torch.randn(2, 6, 3), torch.tensor([4, 0, 4, 5]), torch.randn(2, 4, 3)
    assert torch.allclose(tk.index_add_rows_reference(out.clone(), index, rows),
                          index_add_restated(out, index, rows).float(), rtol=0, atol=1e-6)


# =================================================================================================
# torch.compile: the kernels must trace without graph breaks
# =================================================================================================

def polar_express(G: torch.Tensor) -> torch.Tensor:
    """5 Polar Express steps through the kernels (the record's coefficients), tall or wide form."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    size = min(X.shape[-2:])
    A = X.new_empty(*X.shape[:-2], size, size)
    B = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if tall:
            tk.XTX(X, A)
            tk.ba_plus_cAA(A, c, b, B)
            X = tk.polar_update_tall(X, B, a, torch.empty_like(X))
        else:
            tk.XXT(X, A)
            tk.ba_plus_cAA(A, c, b, B)
            X = a * X + B @ X
    return X


def compile_fullgraph(fn):
    # On CPU inductor would need a C++ build per graph; aot_eager still runs dynamo (fullgraph),
    # fake tensors, functionalisation and AOT autograd, which is where custom ops can break.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")


def assert_compiles_like_eager(term, leaves):
    """term(*leaves) compiled (fullgraph) gives eager's value exactly, the same kernels on the
    same inputs, and its gradients within the surrounding ops' rounding."""
    compiled = compile_fullgraph(term)(*leaves)
    grads = torch.autograd.grad(compiled, leaves)
    eager = term(*leaves)
    assert torch.equal(compiled, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, leaves)):
        assert rel_norm_error(g, e) < 1e-2


def test_polar_express_with_kernels_compiles_and_orthogonalises():
    G = torch.randn(2, 128, 48, device=DEV)   # 128 rows: whole row tiles on every device
    tall = compile_fullgraph(polar_express)(G)
    wide = compile_fullgraph(polar_express)(G.mT.contiguous())
    for X in (tall, wide.mT):
        sv = torch.linalg.svdvals(X.double())
        assert sv.min().item() > 0.6 and sv.max().item() < 1.2, sv
    # a X and X B nearly cancel in the first steps (a = 8.2, b = -22.5), so bf16 roundings of the
    # terms are large against the result: ~4% after 5 steps where the terms are rounded before
    # their sum (wide form), ~2.5% where the fused update rounds once (tall form)
    exact = polar_express_fp64(G)
    assert rel_norm_error(tall, exact) < 4e-2
    assert rel_norm_error(wide.mT, exact) < 6e-2


def test_mlp_and_loss_compile_fullgraph():
    x = torch.randn(64, 48, device=DEV).bfloat16().requires_grad_()
    W1 = torch.randn(80, 48, device=DEV).div(7).bfloat16().requires_grad_()
    W2 = torch.randn(80, 48, device=DEV).div(9).bfloat16().requires_grad_()
    W_head = (torch.randn(48, 160, device=DEV) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, 160, (64,), device=DEV)
    w = torch.tensor([1.0, 0.5], device=DEV)

    def step(x, W1, W2, W_head):   # only kernels and the wrappers' own ops: compiled == eager
        h = tk.linear_relu_square(x, W1, W2)
        return tk.softcapped_mtp_cross_entropy(h, targets, w, W_head, 100 / 448, 1.6 / 448, 0.75 / 448)

    leaves = (x, W1, W2, W_head)
    loss = compile_fullgraph(step)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    # the same kernels run in both; only the surrounding PyTorch ops may be fused differently
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item())
    for g, e in zip(grads, eager_grads):
        assert rel_norm_error(g, e) < 2e-2


# =================================================================================================
# 9. Dynamically composed attention
# =================================================================================================

def dc_attention_fp64(q, k, v, cu_seqlens, scale, w1, w2, window):
    """y_h(t) = w2_h(t) sum_s a(t, s) v_h(s), a = sum_g w1n_g P_g, with dense (T, T) maps."""
    q, k, v, w1, w2 = (t.double() for t in (q, k, v, w1, w2))
    positions = torch.arange(q.shape[0], device=q.device)
    doc = (cu_seqlens[None, :].long() <= positions[:, None]).sum(1)
    distance = positions[:, None] - positions[None, :]
    visible = (distance >= 0) & (distance < window) & (doc[:, None] == doc[None, :])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    P = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    w1n = w1 / torch.sqrt(w1.square().mean(-1, keepdim=True) + 1e-6)
    mixed = torch.einsum("th,hts->ts", w1n, P)
    return w2[:, :, None] * torch.einsum("ts,shd->thd", mixed, v)


def check_dc_attention(T, H, hd, cu_seqlens, window, device, use_kernel=True):
    q, k, v = (torch.randn(T, H, hd, device=device).bfloat16().requires_grad_() for _ in range(3))
    w1 = torch.randn(T, H, device=device).bfloat16().requires_grad_()
    w2 = torch.randn(T, H, device=device).bfloat16().requires_grad_()
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    dY = torch.randn(T, H, hd, device=device).bfloat16()
    scale = 0.12
    fn = tk.dc_attention if use_kernel else tk.dc_attention_reference
    out = fn(q, k, v, cu, scale, w1, w2, window=window)
    out.backward(dY)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w1, w2)]
    exact = dc_attention_fp64(*leaves[:3], cu, scale, *leaves[3:], window)
    exact.backward(dY.double())
    # bf16 rounds the maps before the values and the gradients' operands: a few 2^-9 relative
    assert out.dtype == torch.bfloat16 and rel_norm_error(out, exact) < 1e-2
    for got, ref, name in zip((q, k, v, w1, w2), leaves, ("dq", "dk", "dv", "dw1", "dw2")):
        assert rel_norm_error(got.grad, ref.grad) < 2e-2, name


@pytest.mark.parametrize("window", [5, 20])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "reference"])
def test_dc_attention(window, use_kernel):
    # 37 tokens: three query blocks of the interpreter's 16, the last ragged; documents of 9, 0
    # (an empty slot, as padded cu_seqlens hold) and 28 tokens; a window shorter and one longer
    # than a block
    check_dc_attention(37, 3, 16, [0, 9, 9, 37, 37], window, DEV, use_kernel)


def test_dc_attention_rejects_bad_arguments():
    q = torch.randn(8, 2, 16, device=DEV).bfloat16()
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    w = torch.ones(8, 2, device=DEV)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        tk.dc_attention(q[..., :12], q[..., :12], q[..., :12], cu, 1.0, w, w, window=4)
    with pytest.raises(ValueError, match=r"w2 must have shape \(8, 2\)"):
        tk.dc_attention(q, q, q, cu, 1.0, w, w[:4], window=4)


@pytest.mark.gpu
def test_dc_attention_speedrun_shape():
    # layer 10 of stage 1: 6 heads of 128, the 112-token window, documents of uneven lengths;
    # 4,096 tokens (64 query blocks) keep the dense fp64 oracle's (H, T, T) maps near 0.8 GB each
    cuts = sorted(torch.randint(1, 4096, (12,)).tolist())
    check_dc_attention(4096, 6, 128, [0, *cuts, 4096], 112, "cuda")


def test_dc_attention_compiles_fullgraph():
    q, k, v = (torch.randn(24, 2, 16, device=DEV).bfloat16().requires_grad_() for _ in range(3))
    w1, w2 = (torch.randn(24, 2, device=DEV).bfloat16().requires_grad_() for _ in range(2))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEV)
    leaves = (q, k, v, w1, w2)

    def term(q, k, v, w1, w2):
        return tk.dc_attention(q, k, v, cu, 0.2, w1, w2, window=6).float().square().sum()

    assert_compiles_like_eager(term, leaves)
