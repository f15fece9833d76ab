"""The pairwise quadratic MLP (--mlp=pairwise), an experiment: y = q(h) W with h = relu(x U^T) and
q(h) = (h_i h_j for i <= j), pairs numbered row by row.

The math is restated here with explicit loops over the pairs (fp64), and once more in its
quadratic-form reading y_k = h^T S_k h. The kernels run under Triton's interpreter on small
shapes that are no multiples of the tiles (r = 5, 7, 11 against pair blocks of 4).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():   # kernels on CPU tensors need the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton_kernels as tk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_U = 2.0 ** -23
RAGGED = [(5, 37, 24), (7, 20, 40), (11, 33, 24), (1, 5, 16)]   # (r, T, d)


def pairs(r: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(r) for j in range(i, r)]


def pair_products(h: torch.Tensor) -> torch.Tensor:
    """q (T, P): column p holds h_i h_j for the p-th pair (i, j), row-major by i."""
    return torch.stack([h[:, i] * h[:, j] for i, j in pairs(h.shape[1])], dim=1)


def pairwise_restated(x, U, W):
    return pair_products(torch.relu(x @ U.t())) @ W


def dh_restated(G: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dh_m = sum over pairs containing m of G_p times the other factor (twice for (m, m))."""
    dh = torch.zeros_like(h)
    for p, (i, j) in enumerate(pairs(h.shape[1])):
        dh[:, i] += G[:, p] * h[:, j]
        dh[:, j] += G[:, p] * h[:, i]
    return dh


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(x.abs().double())
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 8).clamp_min(2.0 ** -133)


def assert_bf16_rounding_of(out, exact, fp32_error, what):
    """out is a bf16 rounding (to nearest) of a fp32 value within fp32_error of exact."""
    err = (out.double() - exact).abs()
    tol = 0.5 * bf16_ulp(exact.abs() + fp32_error) + fp32_error
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{what}: error reaches {worst:.3f} x the bound"


def rel_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layer_inputs(r, T, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).bfloat16().to(DEV)
    U = (torch.randn(r, d, generator=g) / d ** 0.5).bfloat16().to(DEV)
    W = torch.randn(tk.pair_count(r), d, generator=g).bfloat16().to(DEV)
    dY = torch.randn(T, d, generator=g).bfloat16().to(DEV)
    return x, U, W, dY


def padded_features(r, T, seed=0):
    """h as the kernels take it: bf16, nonnegative with some exact zeros, zero padding columns."""
    block = tk._pairwise_tiles()["PAIR_BLOCK"]
    h = torch.zeros(T, r + (-r % block))
    h[:, :r] = torch.relu(torch.randn(T, r, generator=torch.Generator().manual_seed(seed)))
    return h.bfloat16().to(DEV)


# -------------------------------------------------------------------------------------------------
# The kernels against the exact math, one op at a time

@pytest.mark.parametrize("r,T,d", RAGGED)
def test_forward_kernel_is_a_rounding_of_the_exact_product(r, T, d):
    _, _, W, _ = layer_inputs(r, T, d)
    h = padded_features(r, T)
    y = torch.ops.nanogpt_triton.pairwise_forward(h, W, r)
    # the kernel rounds each product to bf16 (as a bf16 multiplication does), sums in fp32
    q = pair_products(h[:, :r].double()).bfloat16().double()
    exact = q @ W.double()
    bound = q.shape[1] * FP32_U * (q.abs() @ W.double().abs())
    assert_bf16_rounding_of(y, exact, bound, f"pairwise forward r={r}")


@pytest.mark.parametrize("r,T,d", RAGGED)
def test_backward_kernels_against_the_exact_gradients(r, T, d):
    _, _, W, dY = layer_inputs(r, T, d)
    h = padded_features(r, T)
    dh, dW = torch.ops.nanogpt_triton.pairwise_backward(dY, h, W, r)
    h64, W64, dY64 = h[:, :r].double(), W.double(), dY.double()
    q = pair_products(h64).bfloat16().double()
    assert_bf16_rounding_of(dW, q.t() @ dY64, T * FP32_U * (q.abs().t() @ dY64.abs()),
                            f"pairwise dW r={r}")
    # dh in fp32: G = dY W^T summed over d, then contracted with h over the pairs
    exact = dh_restated(dY64 @ W64.t(), h64)
    scale = dh_restated(dY64.abs() @ W64.abs().t(), h64)
    assert ((dh[:, :r].double() - exact).abs() <= (d + 2 * r) * FP32_U * scale).all()
    assert dh[:, r:].eq(0).all()   # padding features take no gradient


# -------------------------------------------------------------------------------------------------
# The layer end to end: kernel, reference and the restatement

@pytest.mark.parametrize("r,T,d", RAGGED)
def test_kernel_and_reference_match_the_restated_layer(r, T, d):
    x, U, W, dY = layer_inputs(r, T, d)
    leaves64 = [t.double().requires_grad_() for t in (x, U, W)]
    exact = pairwise_restated(*leaves64)
    exact_grads = torch.autograd.grad(exact, leaves64, dY.double())
    for layer in (tk.pairwise_mlp, tk.pairwise_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, U, W)]
        y = layer(*leaves)
        grads = torch.autograd.grad(y, leaves, dY)
        # bf16 roundings of h, of each product and of the outputs: a few bf16 ulps in norm
        assert y.dtype == torch.bfloat16 and rel_error(y, exact) < 1e-2, layer.__name__
        for name, got, want in zip("xUW", grads, exact_grads):
            assert rel_error(got, want) < 2e-2, (layer.__name__, name)


def test_keeps_leading_dims_and_rejects_bad_arguments():
    x, U, W, _ = layer_inputs(5, 12, 16)
    out = tk.pairwise_mlp(x.view(3, 4, 16), U, W)
    assert out.shape == (3, 4, 16) and torch.equal(out.view(12, 16), tk.pairwise_mlp(x, U, W))
    with pytest.raises(ValueError, match=r"W must have r \(r \+ 1\) / 2 = 15 rows for U's r = 5"):
        tk.pairwise_mlp(x, U, W[:14])
    with pytest.raises(ValueError, match=r"expected x \(..., d\), U \(r, d\)"):
        tk.pairwise_mlp_reference(x[:, :8], U, W)
    with pytest.raises(ValueError, match="W must have dtype"):
        tk.pairwise_mlp(x, U, W.float())


# -------------------------------------------------------------------------------------------------
# The math, independently: a quadratic form per output

def test_layer_is_a_quadratic_form_per_output():
    """y_k = h^T S_k h for symmetric S_k, when W holds S_k's upper triangle with the off-diagonal
    entries doubled (S_ij h_i h_j + S_ji h_j h_i = 2 S_ij h_i h_j) and the diagonal as it is."""
    r, T, d = 7, 9, 6
    g = torch.Generator().manual_seed(1)
    A = torch.randn(d, r, r, generator=g, dtype=torch.float64)
    S = (A + A.mT) / 2
    W = torch.empty(tk.pair_count(r), d, dtype=torch.float64)
    for p, (i, j) in enumerate(pairs(r)):
        W[p] = S[:, i, j] if i == j else 2 * S[:, i, j]
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    U = torch.randn(r, d, generator=g, dtype=torch.float64)
    h = torch.relu(x @ U.t())
    direct = torch.einsum("ti,kij,tj->tk", h, S, h)
    assert torch.allclose(tk.pairwise_mlp_reference(x, U, W), direct, rtol=1e-12, atol=1e-12)
    y = tk.pairwise_mlp(x.bfloat16().to(DEV), U.bfloat16().to(DEV), W.bfloat16().to(DEV))
    assert rel_error(y.cpu(), direct) < 3e-2   # every input rounded to bf16


def test_reference_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    U = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(tk.pair_count(4), 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tk.pairwise_mlp_reference, (x, U, W))


# -------------------------------------------------------------------------------------------------
# torch.compile traces both forms without graph breaks

@pytest.mark.parametrize("layer", [tk.pairwise_mlp, tk.pairwise_mlp_reference])
def test_compiles_fullgraph(layer):
    x, U, W, dY = layer_inputs(7, 20, 24)
    leaves = [t.requires_grad_() for t in (x, U, W)]
    torch._dynamo.reset()
    # on CPU aot_eager runs dynamo (fullgraph), fake tensors and AOT autograd without a C++ build
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")
    y = compiled(*leaves)
    grads = torch.autograd.grad(y, leaves, dY)
    eager = layer(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves, dY)
    assert rel_error(y, eager) < 1e-2
    for got, want in zip(grads, eager_grads):
        assert rel_error(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("r", [79, 110])
def test_kernel_speedrun_shape(r):
    x, U, W, dY = layer_inputs(r, 16384, 768)
    W = W / 32   # products of O(1) features times weights at the trained model's scale
    results = []
    for layer in (tk.pairwise_mlp, tk.pairwise_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, U, W)]
        y = layer(*leaves)
        results.append((y, torch.autograd.grad(y, leaves, dY)))
    (y, grads), (y_ref, grads_ref) = results
    assert rel_error(y, y_ref) < 1e-2
    for got, want in zip(grads, grads_ref):
        assert rel_error(got, want) < 2e-2
