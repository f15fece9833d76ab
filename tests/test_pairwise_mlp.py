"""The pairwise quadratic MLP (--mlp=pairwise), an experiment: y = q(h) W with h = relu(x U^T) and
q(h) = (h_i h_j for i <= j), pairs numbered row by row.

The math is restated here with explicit loops over the pairs (fp64), and once more in its
quadratic-form reading y_k = h^T S_k h. The kernels run under Triton's interpreter on small
shapes that are no multiples of the tiles (r = 5, 7, 11 against pair blocks of 4).
"""
import math
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

@pytest.fixture(params=[1, 2, 4], ids=lambda group: f"group{group}")
def tile_group(request, monkeypatch):
    """The forward and dW kernels take the pair tiles this many at a time (the last group is
    partial at most of the ragged shapes)."""
    tiles = tk._pairwise_tiles()
    grouped = {**tiles, **{kernel: {**tiles[kernel], "GROUP": request.param}
                           for kernel in ("forward", "dw")}}
    monkeypatch.setattr(tk, "_PAIRWISE_INTERPRETED_TILES" if tk.INTERPRET else "_PAIRWISE_TILES",
                        grouped)
    return request.param


@pytest.mark.parametrize("r,T,d", RAGGED)
def test_forward_kernel_is_a_rounding_of_the_exact_product(r, T, d, tile_group):
    _, _, W, _ = layer_inputs(r, T, d)
    h = padded_features(r, T)
    y = torch.ops.nanogpt_triton.pairwise_forward(h, W, r)
    # the kernel rounds each product to bf16 (as a bf16 multiplication does), sums in fp32
    q = pair_products(h[:, :r].double()).bfloat16().double()
    exact = q @ W.double()
    bound = q.shape[1] * FP32_U * (q.abs() @ W.double().abs())
    assert_bf16_rounding_of(y, exact, bound, f"pairwise forward r={r}")


@pytest.mark.parametrize("r,T,d", RAGGED)
def test_backward_kernels_against_the_exact_gradients(r, T, d, tile_group):
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
    for layer in (tk.pairwise_mlp, tk.pairwise_mlp_gemm, tk.pairwise_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, U, W)]
        y = layer(*leaves)
        grads = torch.autograd.grad(y, leaves, dY)
        # bf16 roundings of h, of each product and of the outputs: a few bf16 ulps in norm
        assert y.dtype == torch.bfloat16 and rel_error(y, exact) < 1e-2, layer.__name__
        for name, got, want in zip("xUW", grads, exact_grads):
            assert rel_error(got, want) < 2e-2, (layer.__name__, name)


# -------------------------------------------------------------------------------------------------
# The cuBLAS form's two kernels: the pair products written out, and G contracted with h

# (r = 110: the wider of the two ranks measured, 6,105 columns)
@pytest.mark.parametrize("r,T", [(5, 37), (8, 20), (11, 33), (1, 5), (110, 2)])
def test_pair_products_kernel_is_the_reference_bit_for_bit(r, T):
    h = padded_features(r, T)
    q = tk.pair_products(h, r)
    assert torch.equal(q, tk.pair_products_reference(h, r))
    # and the reference is the restatement: each product rounded once from its exact value
    assert torch.equal(q.double(), pair_products(h[:, :r].double()).bfloat16().double())
    # written into wider rows (as the layer does for cuBLAS), zeros follow the products, also in
    # memory that held NaN before
    P = tk.pair_count(r)
    torch.full((T, P + 13), float("nan"), dtype=torch.bfloat16, device=DEV)   # freed: a GPU's
    # caching allocator hands this memory to the next tensor of its size
    wide = tk.pair_products(h, r, width=P + 13)
    assert wide.shape == (T, P + 13) and torch.equal(wide[:, :P], q)
    assert wide[:, P:].eq(0).all()


@pytest.mark.parametrize("r,T", [(5, 37), (8, 20), (11, 33), (1, 5)])
def test_pair_contract_kernel_against_the_exact_gradient(r, T):
    h = padded_features(r, T)
    G = torch.randn(T, tk.pair_count(r), generator=torch.Generator().manual_seed(r)).bfloat16()
    G = G.to(DEV)
    h64, G64 = h[:, :r].double(), G.double()
    exact, scale = dh_restated(G64, h64), dh_restated(G64.abs(), h64)
    for dh in (tk.pair_contract(G, h, r), tk.pair_contract_reference(G, h, r)):
        assert dh.dtype == torch.float32 and dh.shape == h.shape
        assert ((dh[:, :r].double() - exact).abs() <= 2 * (r + 1) * FP32_U * scale).all()
        assert dh[:, r:].eq(0).all()   # padding features take no gradient
    assert torch.allclose(tk.pair_contract_reference(G64, h64, r), exact, rtol=1e-12, atol=1e-12)
    # columns past P in a wider G (the layer's padded rows) are not read
    wide = torch.cat([G, torch.full((T, 5), float("nan"), dtype=G.dtype, device=DEV)], 1)
    assert torch.equal(tk.pair_contract(wide, h, r), tk.pair_contract(G, h, r))


def test_keeps_leading_dims_and_rejects_bad_arguments():
    x, U, W, _ = layer_inputs(5, 12, 16)
    out = tk.pairwise_mlp(x.view(3, 4, 16), U, W)
    assert out.shape == (3, 4, 16) and torch.equal(out.view(12, 16), tk.pairwise_mlp(x, U, W))
    with pytest.raises(ValueError, match=r"W must have r \(r \+ 1\) / 2 = 15 rows for U's r = 5"):
        tk.pairwise_mlp(x, U, W[:14])
    with pytest.raises(ValueError, match=r"expected x \(..., d\), U \(r, d\)"):
        tk.pairwise_mlp_reference(x[:, :8], U, W)
    gemm = tk.pairwise_mlp_gemm(x.view(3, 4, 16), U, W)
    assert gemm.shape == (3, 4, 16)
    assert torch.equal(gemm.view(12, 16), tk.pairwise_mlp_gemm(x, U, W))
    with pytest.raises(ValueError, match=r"pairwise_mlp_gemm: W must have r \(r \+ 1\) / 2 = 15"):
        tk.pairwise_mlp_gemm(x, U, W[:14])
    with pytest.raises(ValueError, match="pairwise_mlp_gemm: W must have dtype"):
        tk.pairwise_mlp_gemm(x, U, W.float())
    h = padded_features(5, 12)
    with pytest.raises(ValueError, match=r"pair_products: expected h \(T, r or more features"):
        tk.pair_products(h, 9)
    with pytest.raises(ValueError, match=r"pair_products: width 14 < the 15 pairs of r = 5"):
        tk.pair_products(h, 5, width=14)
    with pytest.raises(ValueError, match=r"pair_contract: expected G contiguous \(T, r \(r \+ 1\) "
                                         r"/ 2 or more\) = \(12, 15 or more\), got \(12, 14\)"):
        tk.pair_contract(torch.zeros(12, 14, dtype=torch.bfloat16, device=DEV), h, 5)
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
    for layer in (tk.pairwise_mlp, tk.pairwise_mlp_gemm):
        y = layer(x.bfloat16().to(DEV), U.bfloat16().to(DEV), W.bfloat16().to(DEV))
        assert rel_error(y.cpu(), direct) < 3e-2   # every input rounded to bf16


def test_reference_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    U = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(tk.pair_count(4), 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tk.pairwise_mlp_reference, (x, U, W))


# -------------------------------------------------------------------------------------------------
# torch.compile traces every form without graph breaks

@pytest.mark.parametrize("layer",
                         [tk.pairwise_mlp, tk.pairwise_mlp_gemm, tk.pairwise_mlp_reference])
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
    for layer in (tk.pairwise_mlp, tk.pairwise_mlp_gemm, tk.pairwise_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, U, W)]
        y = layer(*leaves)
        results.append((y, torch.autograd.grad(y, leaves, dY)))
    y_ref, grads_ref = results[-1]
    for y, grads in results[:-1]:
        assert rel_error(y, y_ref) < 1e-2
        for got, want in zip(grads, grads_ref):
            assert rel_error(got, want) < 2e-2


# =================================================================================================
# The variant in the trainer: configuration, parameters, training
# =================================================================================================

import train_gpt as tg  # noqa: E402
from conftest import needs_corpus, needs_tokenizer  # noqa: E402
from test_model import TINY, bf16_model, step_by_paths  # noqa: E402

PAIRWISE_TINY = tg.Hyperparameters(**{**{f: getattr(TINY, f) for f in ("vocab_size", "num_heads",
                                      "head_dim", "model_dim", "mlp_hidden", "bigram_vocab_mult")},
                                      "mlp": "pairwise", "pairwise_rank": 6})


def test_options_parse_and_bad_values_fail_clearly():
    cfg = tg.parse_config(["--preset=speedrun", "--mlp=pairwise", "--pairwise_rank=110",
                           "--fp8_mlp_up=false", "--fp8_mlp_down=false", "--fp8_mlp_backward=false"])
    assert (cfg.mlp, cfg.pairwise_rank) == ("pairwise", 110)
    assert (tg.Hyperparameters().mlp, tg.Hyperparameters().pairwise_rank) == ("relu2", 79)
    assert all(values.get("mlp", "relu2") == "relu2" for values in tg.PRESETS.values())
    with pytest.raises(SystemExit, match="--mlp='gelu': expected one of relu2, pairwise"):
        tg.parse_config(["--mlp=gelu"])
    with pytest.raises(SystemExit, match="--pairwise_rank=0: expected a positive integer"):
        tg.parse_config(["--mlp=pairwise", "--pairwise_rank=0", "--fp8_mlp_up=false",
                         "--fp8_mlp_down=false", "--fp8_mlp_backward=false"])
    with pytest.raises(SystemExit, match="--pairwise_rank=7.5: expected an integer"):
        tg.parse_config(["--pairwise_rank=7.5"])
    with pytest.raises(SystemExit, match="mlp=pairwise has no FP8 form .* --fp8_mlp_up=false "
                                         "--fp8_mlp_down=false --fp8_mlp_backward=false"):
        tg.parse_config(["--mlp=pairwise"])            # the speedrun preset has the FP8 MLP
    with pytest.raises(SystemExit, match="mlp=pairwise has no FP8 form"):
        tg.parse_config(["--mlp=pairwise", "--fp8_mlp_up=false"])   # nor at #89's down-projection
    with pytest.raises(SystemExit, match="mlp=pairwise has no FP8 form"):
        tg.parse_config(["--mlp=pairwise", "--fp8_mlp_up=false", "--fp8_mlp_down=false"])  # #344's


def test_own_banks_replace_the_mlp_bank():
    labels = tg.param_labels(tg.Hyperparameters(mlp="pairwise"))
    assert "mlp_bank" not in labels and {"pairwise_u_bank", "pairwise_w_bank"} <= set(labels)
    default = tg.param_labels(tg.Hyperparameters())
    assert "mlp_bank" in default and not {"pairwise_u_bank", "pairwise_w_bank"} & set(default)


def parameter_count(cfg, world_size):
    with torch.device("meta"):
        model = tg.GPT(cfg, world_size, max_positions=2)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("world_size,relu2_slots,pairwise_slots", [(1, 11, 11), (8, 12, 16)])
def test_parameter_count(world_size, relu2_slots, pairwise_slots):
    """Per layer r d + d P (U and W) instead of 2 x hidden x d; the banks padded to a multiple of
    the world size (the MLP bank counts c_fc and c_proj, 2 matrices per slot)."""
    d, hidden, r = 768, 3072, 79
    P = 79 * 80 // 2
    relu2 = parameter_count(tg.Hyperparameters(), world_size)
    pairwise = parameter_count(tg.Hyperparameters(mlp="pairwise"), world_size)
    assert pairwise == relu2 - relu2_slots * 2 * hidden * d + pairwise_slots * (r * d + d * P)
    if world_size == 8:
        assert relu2 == 543_818_952   # record #74's count (test_model)


def test_initial_weights():
    torch.manual_seed(0)
    m = tg.GPT(PAIRWISE_TINY, world_size=4, max_positions=8)
    d, r = PAIRWISE_TINY.model_dim, 6
    assert m.pairwise_u_bank.shape == (12, r, d) and m.pairwise_w_bank.shape == (12, 21, d)
    assert m.pairwise_u_bank.dtype == m.pairwise_w_bank.dtype == torch.bfloat16
    bound = 3 ** 0.5 * 0.5 / d ** 0.5          # c_fc's uniform bound
    U = m.pairwise_u_bank.float()
    assert U.abs().max() <= bound * (1 + 2 ** -8) and U[:11].abs().min() > 0
    assert U[:11].std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    assert U[11:].eq(0).all() and m.pairwise_w_bank.eq(0).all()
    assert not hasattr(m, "mlp_bank")


def test_flop_count_counts_the_pairwise_weights():
    settings = tg.Schedule(tg.Hyperparameters()).at(0)
    relu2 = tg.flops_per_token(tg.Hyperparameters(), settings)
    pairwise = tg.flops_per_token(tg.Hyperparameters(mlp="pairwise", pairwise_rank=110), settings)
    # 3 x 2 FLOPs per weight, 11 layers: (110 + 6105) x 768 weights instead of 2 x 3072 x 768
    assert relu2 - pairwise == 3 * 2 * 11 * (2 * 3072 * 768 - (110 + 6105) * 768)


@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_kernel_path_trains_like_the_reference_path(path):
    """One training forward and backward of the model through the pairwise kernels (the fused
    ones, or the cuBLAS form's) against the same model through the reference: the same loss,
    gradients equal up to bf16 roundings."""
    if not tk.INTERPRET:   # the model runs on the CPU here
        pytest.skip("the kernels on CPU tensors need TRITON_INTERPRET=1")
    torch.manual_seed(3)
    T = 32
    model = bf16_model(T, PAIRWISE_TINY)       # every parameter nonzero, W included
    (kernel_loss, kernel_grads), (reference_loss, reference_grads) = step_by_paths(
        model, T, tg.Paths(mlp=path), tg.Paths())
    assert abs(kernel_loss - reference_loss) < 1e-3 * reference_loss
    for name in ("pairwise_u_bank", "pairwise_w_bank", "attn_bank", "embed"):
        want, got = reference_grads[name], kernel_grads[name]
        assert want.norm() > 0, name
        assert (got - want).norm() < 0.05 * want.norm(), name


@needs_corpus
@needs_tokenizer
def test_trains_on_the_smoke_preset():
    from test_recipe import HALF_BATCHES, TINY_SMOKE, train_steps
    cfg = tg.Hyperparameters(**{**TINY_SMOKE, **HALF_BATCHES, "mlp": "pairwise", "pairwise_rank": 7,
                                "fp8_mlp_up": False, "fp8_mlp_down": False,
                                "fp8_mlp_backward": False})
    losses, params = train_steps(cfg, steps=6)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert params["pairwise_w_bank"].abs().sum() > 0   # W leaves zero
