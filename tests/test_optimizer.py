"""Single-process tests of the NorMuonAndAdam optimizer, on CPU with small shapes.

Every expected value is recomputed here from the spec's formulas (float64 where possible), not
taken from the code under test. Polar Express is checked against the scalar polynomials its
coefficients define; the full-step restatement then reuses `polar_express` as a checked building
block."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import POLAR_EXPRESS_COEFFS

# The record's per-parameter table, written out independently of PARAM_TABLE:
# label -> (optimizer, Adam betas, lr_mul, wd_mul)
SPEC_TABLE = {
    "attn_bank": ("normuon", None, 1.0, 1.0),
    "mlp_bank": ("normuon", None, 1.0, 1.0),
    "scalars": ("adam", (0.9, 0.99), 5.0, 0.0),
    "smear_gate": ("adam", (0.9, 0.99), 0.01, 0.0),
    "skip_gate": ("adam", (0.9, 0.99), 0.05, 0.0),
    "attn_gate_bank": ("adam", (0.9, 0.99), 1.0, 1.0),
    "ve_gate_bank": ("adam", (0.9, 0.99), 1.0, 1.0),
    "lm_head": ("adam", (0.5, 0.95), 1.0, 150.0),
    "bigram_embed": ("adam", (0.75, 0.95), 75.0, 5.0),
    "post_lambdas": ("adam", (0.9, 0.95), 1.0, 0.0),
    "x0_lambdas": ("adam", (0.9, 0.95), 1.0, 0.0),
    "bigram_lambdas": ("adam", (0.9, 0.95), 1.0, 0.0),
    "resid_lambdas": ("adam", (0.9, 0.95), 5.0, 0.0),
    "value_embeds": ("adam", (0.75, 0.95), 75.0, 5.0),
    "embed": ("adam", (0.5, 0.95), 1.0, 150.0),
}
# The parameters records #80-#85 add, from their descriptions
LATER_SPEC_TABLE = {
    "qk_bank": ("normuon", None, 1.0, 1.0),
    "vo_bank": ("normuon", None, 1.0, 1.0),
    "xsa_alphas": ("adam", (0.9, 0.95), 1.0, 0.0),
    "mudd_w1": ("adam", (0.9, 0.99), 0.25, 1.0),
    "mudd_w2": ("adam", (0.9, 0.99), 0.25, 1.0),
    "mudd_b2": ("adam", (0.9, 0.99), 0.25, 0.0),
    "gate_w1": ("adam", (0.9, 0.99), 0.1, 1.0),
    "gate_w2": ("adam", (0.9, 0.99), 0.1, 1.0),
    "gate_b2": ("adam", (0.9, 0.99), 0.1, 0.0),
    "gate_scales": ("adam", (0.9, 0.99), 0.1, 0.0),
}
# The experiments: --mlp=pairwise (U like c_fc; W, stored like c_proj, with c_proj's extra 2x)
# and the attention variants of issue 22 (NorMuon for every new matrix, Adam with a small learning
# rate and no weight decay for the lambda vectors)
EXPERIMENT_SPEC_TABLE = {
    "pairwise_u_bank": ("normuon", None, 1.0, 1.0),
    "pairwise_w_bank": ("normuon", None, 2.0, 1.0),
    "noise_qk_bank": ("normuon", None, 1.0, 1.0),
    **{bank: ("normuon", None, 1.0, 1.0) for bank in ("mla_dq_bank", "mla_uq_bank", "mla_dkv_bank",
                                                       "mla_ukv_bank", "mla_o_bank")},
    "noise_lambdas": ("adam", (0.9, 0.95), 0.1, 0.0),
}
ADAM_LR, ADAM_WD, ADAM_EPS = 0.008, 0.005, 1e-10
MUON_LR, MUON_WD, MUON_BETA2 = 0.023, 1.2, 0.95
CFG = tg.Hyperparameters()


# -------------------------------------------------------------------------------------------------
# Fixtures: a miniature parameter set with every label

def make_params(d=16, hidden=64, attn_layers=2, mlp_layers=2, vocab=32, value_rows=40,
                bigram_rows=32, heads=2, layers=3, seed=0) -> dict[str, torch.nn.Parameter]:
    """Small tensors with the production layouts and dtypes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1e-2, dtype=torch.bfloat16):
        return torch.nn.Parameter((torch.randn(*shape, generator=g) * scale).to(dtype))

    bound = 3 ** 0.5 * 0.5 / d ** 0.5
    params = {
        "attn_bank": torch.nn.Parameter(
            ((torch.rand(attn_layers, 4 * d, d, generator=g) * 2 - 1) * bound).bfloat16()),
        "mlp_bank": torch.nn.Parameter(
            ((torch.rand(mlp_layers, 2, hidden, d, generator=g) * 2 - 1) * bound).bfloat16()),
        "lm_head": rand(d, vocab),
        "value_embeds": rand(value_rows, d),
        "bigram_embed": rand(bigram_rows, d),
        "attn_gate_bank": rand(attn_layers, heads, 12, scale=1e-3),
        "ve_gate_bank": rand(5, heads, 12, scale=1e-3),
        "smear_gate": rand(1, 12, scale=1e-3),
        "skip_gate": rand(1, 12, scale=1e-3),
        "scalars": rand(8, scale=1e-3, dtype=torch.float32),
        "post_lambdas": rand(layers, 2, 2, scale=1e-3, dtype=torch.float32),
        "x0_lambdas": rand(layers, scale=1e-3, dtype=torch.float32),
        "bigram_lambdas": rand(layers, scale=1e-3, dtype=torch.float32),
        "resid_lambdas": rand(layers, 2, scale=1e-3, dtype=torch.float32),
    }
    params["embed"] = torch.nn.Parameter(params["lm_head"].detach().T.contiguous())
    return params


def random_grad(p: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=g).to(p.dtype)


def clone_params(params):
    return {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}


def master_value(param: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    """The fp32 number whose high half is the bf16 param and low half the mantissa (float64)."""
    high = param.detach().contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    low = mantissa.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    return torch.from_numpy(((high << 16) | low).view(np.float32).astype(np.float64))


def truncate_to_bf16(x32: np.ndarray) -> torch.Tensor:
    bits = np.asarray(x32, dtype=np.float32).view(np.uint32) >> 16
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16)


# -------------------------------------------------------------------------------------------------
# Table, work order, comms modes

def test_table_matches_spec_and_work_order_is_a_permutation():
    assert tg.param_labels(CFG) == list(SPEC_TABLE)  # record #74: scatter order = spec order
    specs = {s.label: s for s in tg.PARAM_TABLE}
    every = {**SPEC_TABLE, **LATER_SPEC_TABLE, **EXPERIMENT_SPEC_TABLE}
    for label, (optimizer, betas, lr_mul, wd_mul) in every.items():
        s = specs[label]
        assert (s.optimizer, s.betas, s.lr_mul, s.wd_mul) == (optimizer, betas, lr_mul, wd_mul)
    assert sorted(specs) == sorted(every)
    assert sorted(tg.WORK_ORDER) == sorted(specs)
    assert tg.WORK_ORDER.index("lm_head") < tg.WORK_ORDER.index("embed")
    banks = [label for label in every if every[label][0] == "normuon"]
    assert sorted(tg.WORK_ORDER[-len(banks):]) == sorted(banks)   # the Polar Express banks last
    assert tg.WORK_ORDER[-3:] == ["mlp_bank", "pairwise_u_bank", "pairwise_w_bank"]


def test_comms_mode():
    spec = {s.label: s for s in tg.PARAM_TABLE}
    assert tg.comms_mode(spec["bigram_embed"], 8, 1) == "sharded_sparse"
    assert tg.comms_mode(spec["bigram_embed"], 8, 2) == "sharded"
    assert tg.comms_mode(spec["bigram_embed"], 4, 2) == "sharded"
    assert tg.comms_mode(spec["bigram_embed"], 1, 8) == "none"
    assert tg.comms_mode(spec["scalars"], 2, 4) == "replicated"
    assert tg.comms_mode(spec["attn_bank"], 2, 4) == "sharded"
    assert tg.comms_mode(spec["lm_head"], 1, 8) == "none"


def test_bad_inputs_raise_clear_errors():
    params = make_params()
    del params["skip_gate"]
    with pytest.raises(ValueError, match="missing labels \\['skip_gate'\\]"):
        tg.NorMuonAndAdam(params, CFG, 0, 1, 8)
    params = make_params(vocab=30)  # lm_head (16, 30): 30 rows of embed not divisible by 4
    with pytest.raises(ValueError, match="embed: dim 0 30 is not divisible by the world size 4"):
        tg.NorMuonAndAdam(params, CFG, 0, 4, 2)
    params = make_params(attn_layers=3)  # 12 attention matrices, 8 ranks
    with pytest.raises(ValueError, match="attn_bank: matrix count 12 is not divisible"):
        tg.NorMuonAndAdam(params, CFG, 0, 8, 1)
    exchange = tg.SparseBigramExchange(32, 1, 0, "cpu")
    with pytest.raises(ValueError, match="comms mode is 'none'"):
        tg.NorMuonAndAdam(make_params(), CFG, 0, 1, 8, sparse_bigram=exchange)
    with pytest.raises(ValueError, match="bigram ids span \\[0, 32\\], expected \\[0, 32\\)"):
        exchange.mark(np.array([0, 32]))
    with pytest.raises(RuntimeError, match="start_count_exchange\\(\\) must come first"):
        exchange.start_index_exchange()
    with pytest.raises(ValueError, match="bigram_embed has 30 rows, expected a multiple"):
        tg.SparseBigramExchange(30, 8, 0, "cpu")


# -------------------------------------------------------------------------------------------------
# Polar Express

def composite_polynomial(sigma: torch.Tensor) -> torch.Tensor:
    for a, b, c in POLAR_EXPRESS_COEFFS:
        sigma = a * sigma + b * sigma ** 3 + c * sigma ** 5
    return sigma


def normalised_singular_values(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return torch.linalg.svdvals(X) / (1.02 * X.norm(dim=(-2, -1))).unsqueeze(-1)


def matrix_with_spectrum(n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((U * singular_values) @ V.T).bfloat16()


@pytest.mark.parametrize("shape", [(1100, 96), (96, 320), (3, 96, 48), "square"])
def test_polar_express_singular_values(shape):
    """For inputs whose normalised singular values are >= 1e-3, the 5 quintics map every singular
    value into [0.859, 1.141] in exact arithmetic. We assert the bf16 result lies in [0.8, 1.2]
    and that each output singular value is the composite polynomial of the matching input one to
    within 0.05 (the spectrum of p(X) is p applied to the spectrum of X). (1100, 96) has more
    than 1024 rows and so takes the split-matmul path."""
    if shape == "square":
        X = matrix_with_spectrum(128, torch.logspace(0, -2, 128, dtype=torch.float64), seed=1)
    else:
        X = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    sigma_in = normalised_singular_values(X)
    assert sigma_in.min() >= 1e-3  # precondition of the band
    Y = tg.polar_express(X)
    assert Y.dtype == torch.bfloat16 and Y.shape == X.shape
    sigma_out = torch.linalg.svdvals(Y.double())
    assert sigma_out.min() >= 0.8 and sigma_out.max() <= 1.2
    predicted = composite_polynomial(sigma_in).sort(dim=-1, descending=True).values
    assert (sigma_out - predicted).abs().max() < 0.05


def test_polar_express_tall_and_wide_algebra_agree():
    """A tall X uses A = X^T X and X B; its transpose (wide) uses A = X X^T and B X. The two
    results are transposes of each other up to bf16 rounding."""
    X = torch.randn(2, 200, 72, generator=torch.Generator().manual_seed(3)).bfloat16()
    tall = tg.polar_express(X).double()
    wide = tg.polar_express(X.mT.contiguous()).double().mT
    assert (tall - wide).abs().max() <= 2 ** -7 * tall.abs().max()


def test_polar_express_zero_matrix_gives_zero():
    assert torch.equal(tg.polar_express(torch.zeros(8, 4, dtype=torch.bfloat16)),
                       torch.zeros(8, 4, dtype=torch.bfloat16))


# -------------------------------------------------------------------------------------------------
# Nesterov momentum (5.1) and NorMuon normalisation (5.3)

def test_nesterov_momentum():
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(3, 24, 8, generator=g).bfloat16()
    buf0 = torch.randn(3, 24, 8, generator=g)
    buf = buf0.clone()
    mu = 0.9
    out = tg.nesterov_polar_express(grad, buf, torch.tensor(mu))
    expected_buf = mu * buf0.double() + (1 - mu) * grad.double()
    torch.testing.assert_close(buf.double(), expected_buf, rtol=1e-6, atol=1e-6)
    u = (1 - mu) * grad.double() + mu * expected_buf
    expected = tg.polar_express(u.bfloat16()).double()
    # bf16(u) may differ in the last bit from the optimizer's fp32-computed u
    assert (out.double() - expected).abs().max() <= 2 ** -6 * expected.abs().max()


def normalise_reference(X: torch.Tensor, V: torch.Tensor, beta2: float):
    """The NorMuon normalisation, one matrix at a time, float64."""
    X, V = X.double(), V.double().clone()
    out = torch.empty_like(X)
    per_row = X.shape[-2] >= X.shape[-1]
    for i in range(X.shape[0]):
        M = X[i] if per_row else X[i].T           # statistics along the rows of M
        v = V[i, :, 0] if per_row else V[i, 0, :]
        N = M.shape[1]
        q = (M ** 2).mean(dim=1)
        norm_before = (N * q.sum()).sqrt()
        v += (1 - beta2) * (q - v)
        s = 1 / v.clamp_min(1e-10).sqrt()
        norm_after = (N * q * s ** 2).sum().sqrt()
        result = M * s[:, None] * (norm_before / norm_after.clamp_min(1e-10))
        out[i] = result if per_row else result.T
    return out, V


@pytest.mark.parametrize("shape", [(3, 48, 16), (2, 16, 16), (2, 8, 40)])
def test_normuon_normalisation(shape):
    g = torch.Generator().manual_seed(5)
    X = (torch.randn(*shape, generator=g) * torch.rand(*shape[:2], 1, generator=g) * 3).bfloat16()
    count, m, n = shape
    V0 = torch.rand((count, m, 1) if m >= n else (count, 1, n), generator=g) * 0.01
    V = V0.clone()
    out = tg.normuon_normalise(X, V, MUON_BETA2)
    expected, expected_V = normalise_reference(X, V0, MUON_BETA2)
    torch.testing.assert_close(V.double(), expected_V, rtol=1e-5, atol=1e-9)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -6, atol=1e-6)
    # the Frobenius norm of every matrix is kept (up to bf16 rounding)
    torch.testing.assert_close(out.double().norm(dim=(-2, -1)), X.double().norm(dim=(-2, -1)),
                               rtol=1e-2, atol=0)


# -------------------------------------------------------------------------------------------------
# Cautious weight decay through the mantissa buffer (5.5)

def test_cautious_update_with_mantissa():
    g = torch.Generator().manual_seed(6)
    param = torch.randn(64, 32, generator=g).bfloat16()
    mantissa = torch.randint(0, 2 ** 16, (64, 32), generator=g, dtype=torch.int32).to(torch.uint16)
    update = torch.randn(64, 32, generator=g).bfloat16()
    update[::3] = 0  # X * P == 0: decayed under the >= mask
    P = master_value(param, mantissa)
    lr, decay = 0.01, 0.2
    tg.cautious_update_with_mantissa(param, mantissa, update, torch.tensor(lr), torch.tensor(decay))
    X = update.double()
    mask = (X * P >= 0).double()
    expected = P - P * mask * decay - X * lr
    new_master = master_value(param, mantissa)
    # fp32 arithmetic: a few roundings of terms no larger than |P|
    torch.testing.assert_close(new_master, expected, rtol=0, atol=2 ** -22 * P.abs().max())
    # the bf16 weight is the truncated (not rounded) high half of the fp32 master value
    assert torch.equal(param, truncate_to_bf16(new_master.numpy()))
    # elements with a zero update were decayed; a strict > mask would have left them unchanged
    assert (new_master[::3] != P[::3]).all()


def test_small_updates_accumulate_in_the_mantissa():
    """Steps of 1e-4 on a weight of 1.0 vanish in bf16 (half an ulp is 2^-8) but add up in the
    32-bit master value; the bf16 weight follows its truncation."""
    param = torch.ones(4, dtype=torch.bfloat16)
    mantissa = torch.zeros(4, dtype=torch.uint16)
    update = torch.ones(4, dtype=torch.bfloat16)
    lr = np.float32(1e-4)
    master = np.ones(4, dtype=np.float32)
    bf16_only = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(100):
        tg.cautious_update_with_mantissa(param, mantissa, update, torch.tensor(float(lr)),
                                         torch.tensor(0.0))
        master = (master - np.float32(1.0) * lr).astype(np.float32)
        bf16_only = bf16_only - 1e-4
    assert torch.equal(bf16_only, torch.ones(4, dtype=torch.bfloat16))  # plain bf16 is stuck
    assert np.array_equal(master_value(param, mantissa).numpy().astype(np.float32), master)
    assert torch.equal(param, truncate_to_bf16(master))
    assert abs(param.double()[0] - 0.99) < 2 ** -7


# -------------------------------------------------------------------------------------------------
# Adam (section 6)

def test_adam_update_math_and_strict_mask():
    g = torch.Generator().manual_seed(7)
    param = torch.randn(200, generator=g)
    grad = torch.randn(200, generator=g)
    grad[:20] = 0  # zero update: no decay under the strict > mask
    exp_avg, exp_avg_sq = torch.randn(200, generator=g) * 0.1, torch.rand(200, generator=g)
    exp_avg[:20], exp_avg_sq[:20] = 0, 0
    p0, m0, v0 = param.double(), exp_avg.double(), exp_avg_sq.double()
    beta1, beta2, step_size, decay = 0.8, 0.95, 0.01, 0.3
    tg.adam_update(param, grad, exp_avg, exp_avg_sq, torch.tensor(beta1), torch.tensor(beta2),
                   torch.tensor(step_size), torch.tensor(decay), ADAM_EPS)
    m = beta1 * m0 + (1 - beta1) * grad.double()
    v = beta2 * v0 + (1 - beta2) * grad.double() ** 2
    upd = step_size * m / (v.sqrt() + ADAM_EPS)
    upd = upd + decay * p0 * (upd * p0 > 0)
    torch.testing.assert_close(exp_avg.double(), m, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(exp_avg_sq.double(), v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(param.double(), p0 - upd, rtol=1e-6, atol=1e-7)
    assert torch.equal(param[:20], p0[:20].float())


# -------------------------------------------------------------------------------------------------
# Whole optimizer steps against a restatement of the spec

class ReferenceOptimizer:
    """The whole step (reductions, Polar Express, normalisation, cautious decay, Adam, tie) for
    one process, float64, written from the specification."""

    def __init__(self, params):
        self.master = {}   # NorMuon banks: float64 master values as (count, m, n)
        self.state = {}
        for label, p in params.items():
            kind = SPEC_TABLE[label][0]
            if kind == "normuon":
                view = tg.matrix_view(label, p.detach())
                self.master[label] = view.double().clone()
                count, m, n = view.shape
                self.state[label] = dict(M=torch.zeros(count, m, n, dtype=torch.float64),
                                         V=torch.zeros((count, m, 1) if m >= n else (count, 1, n),
                                                       dtype=torch.float64))
            else:
                self.state[label] = dict(m=torch.zeros(p.shape, dtype=torch.float64),
                                         v=torch.zeros(p.shape, dtype=torch.float64), t=0)
        self.values = {label: p.detach().double().clone() for label, p in params.items()}
        self.tied = True

    def normuon(self, label, grad, lr_mul, mu):
        st, P = self.state[label], self.master[label]
        g = tg.matrix_view(label, grad).double()
        st["M"] = mu * st["M"] + (1 - mu) * g
        u = (1 - mu) * g + mu * st["M"]
        X = tg.polar_express(u.bfloat16())
        X, st["V"] = normalise_reference(X, st["V"], MUON_BETA2)
        count, m, n = P.shape
        for i in range(count):
            lr = MUON_LR * lr_mul * max(1.0, m / n) ** 0.5
            if label == "mlp_bank" and i % 2 == 1:
                lr *= 2  # c_proj
            wd = MUON_WD * 1.0 * MUON_LR * lr_mul
            mask = (X[i] * P[i] >= 0).double()
            P[i] = P[i] - P[i] * mask * wd * lr - X[i] * lr

    def adam(self, label, grad, lr_mul):
        _, (b1, b2), lr_mul_table, wd_mul = SPEC_TABLE[label]
        st, p = self.state[label], self.values[label]
        st["t"] += 1
        st["m"] = b1 * st["m"] + (1 - b1) * grad
        st["v"] = b2 * st["v"] + (1 - b2) * grad ** 2
        lr = ADAM_LR * lr_mul * lr_mul_table
        step = lr * (1 - b2 ** st["t"]) ** 0.5 / (1 - b1 ** st["t"])
        upd = step * st["m"] / (st["v"].sqrt() + ADAM_EPS)
        upd = upd + lr ** 2 * ADAM_WD * wd_mul * p * (upd * p > 0)
        self.values[label] = p - upd

    def step(self, step, lr_mul, mu, grads):
        """grads: label -> float64 gradient (already summed over accumulated steps)."""
        for label, g in grads.items():
            if SPEC_TABLE[label][0] == "normuon":
                self.normuon(label, g, lr_mul, mu)
            elif step % 2 == 1:
                if label == "embed" and self.tied:
                    continue
                if label == "lm_head" and self.tied:
                    # the folded gradient is stored in lm_head.grad, i.e. in bf16
                    g = (g + grads["embed"].T).bfloat16().double()
                self.adam(label, g, lr_mul)
        if step % 2 == 1 and self.tied:
            self.values["embed"] = self.values["lm_head"].T.clone()

    def untie(self):
        head, embed = self.state["lm_head"], self.state["embed"]
        embed.update(m=head["m"].T.clone(), v=head["v"].T.clone(), t=head["t"])
        self.tied = False


def set_grads(params, step):
    """Simulate a backward: add a fresh gradient onto .grad (or create it)."""
    fresh = {}
    for i, (label, p) in enumerate(params.items()):
        g = random_grad(p, seed=1000 * step + i)
        fresh[label] = g
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad += g
    return fresh


def check_against_reference(opt, params, ref):
    for label, p in params.items():
        if SPEC_TABLE[label][0] == "normuon":
            state = opt.state[label]
            view = tg.matrix_view(label, p.detach())
            master = master_value(view, state.mantissa)
            old = tg.matrix_view(label, ref.values[label])
            expected_delta = ref.master[label] - old
            # bf16 rounding inside Polar Express and the normalisation: 2% of the update
            torch.testing.assert_close(master - old, expected_delta, rtol=0.02,
                                       atol=0.02 * expected_delta.abs().max().item())
            assert torch.equal(view, truncate_to_bf16(master.float().numpy()))
            ref.values[label] = ref.master[label].reshape(p.shape).clone()
        else:
            expected = ref.values[label]
            # bf16: one rounding of the fp32 result (1 ulp = 2^-7 relative); fp32: the rounding
            # of the fp32 arithmetic, relative to updates of about lr = 1e-2
            tol = dict(rtol=2 ** -7, atol=1e-9) if p.dtype == torch.bfloat16 else dict(rtol=1e-6,
                                                                                    atol=1e-7)
            torch.testing.assert_close(p.detach().double(), expected, **tol)
            ref.values[label] = p.detach().double().clone()  # continue from the same rounding


def run_steps(opt, params, ref, steps, split_step=None, lr_mul=1.0, mu=0.9):
    for step in steps:
        before = {label: p.detach().clone() for label, p in params.items()}
        set_grads(params, step)
        # what the optimizer receives: the gradients as accumulated in the parameter dtype
        grads = {label: p.grad.double() for label, p in params.items()}
        opt.step(step, lr_mul, mu)
        ref.step(step, lr_mul, mu, grads)
        check_against_reference(opt, params, ref)
        for label, p in params.items():
            changed = not torch.equal(p.detach(), before[label])
            is_adam = SPEC_TABLE[label][0] == "adam"
            assert changed == (not is_adam or step % 2 == 1), (step, label)
            # NorMuon gradients are cleared every step, Adam ones only after an Adam step
            if is_adam and step % 2 == 0:
                assert torch.equal(p.grad.double(), grads[label]), (step, label)
            else:
                assert p.grad is None, (step, label)
        if step == split_step:
            opt.untie()
            ref.untie()


def test_steps_match_the_spec_tied_and_untied():
    """Steps 0-5 with the untie after step 3: every parameter against the restatement, Adam
    parameters frozen on even steps (their gradients kept and summed into the odd step),
    embed == lm_head^T while tied, independent afterwards."""
    params = make_params()
    opt = tg.NorMuonAndAdam(params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    ref = ReferenceOptimizer(params)
    run_steps(opt, params, ref, steps=[0, 1], lr_mul=1.0, mu=0.85)
    assert torch.equal(params["embed"].detach(), params["lm_head"].detach().T)
    run_steps(opt, params, ref, steps=[2, 3], split_step=3, lr_mul=1.52, mu=0.9)
    assert torch.equal(params["embed"].detach(), params["lm_head"].detach().T)
    assert not opt.tied
    run_steps(opt, params, ref, steps=[4, 5], lr_mul=0.5, mu=0.95)
    assert not torch.equal(params["embed"].detach(), params["lm_head"].detach().T)


def test_untie_copies_the_head_state_transposed():
    params = make_params()
    opt = tg.NorMuonAndAdam(params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    for step in range(4):
        set_grads(params, step)
        opt.step(step, 1.0, 0.9)
    head, embed = opt.state["lm_head"], opt.state["embed"]
    assert embed.step == 0 and not embed.exp_avg.any()  # embed skipped while tied
    opt.untie()
    assert embed.step == head.step == 2
    assert torch.equal(embed.exp_avg, head.exp_avg.T)
    assert torch.equal(embed.exp_avg_sq, head.exp_avg_sq.T)
    with pytest.raises(RuntimeError, match="already untied"):
        opt.untie()


def test_c_proj_gets_twice_the_lr_of_c_fc():
    """Identical weights and gradients for c_fc and c_proj: the c_proj change (update plus
    decay, both proportional to lr) is exactly twice the c_fc change in the fp32 master."""
    params = make_params()
    bank = params["mlp_bank"].detach()
    bank[:, 1] = bank[:, 0]
    opt = tg.NorMuonAndAdam(params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    grad = random_grad(params["mlp_bank"], seed=9)
    grad[:, 1] = grad[:, 0]
    params["mlp_bank"].grad = grad
    before = tg.matrix_view("mlp_bank", bank.clone()).double()
    opt.step(0, 1.0, 0.9)
    master = master_value(tg.matrix_view("mlp_bank", bank), opt.state["mlp_bank"].mantissa)
    delta = master - before
    # up to the rounding of the fp32 results (a few ulps of the weights)
    torch.testing.assert_close(delta[1::2], 2 * delta[0::2], rtol=0,
                               atol=2 ** -21 * before.abs().max().item())
    assert delta[0::2].abs().max() > 0


def test_zero_gradient_decays_normuon_weights_but_not_adam_weights():
    """A zero gradient gives a zero NorMuon update, yet the >= mask still decays the weights by
    the factor (1 - wd_coef x lr) (the MLP padding layer); Adam's strict mask leaves them."""
    params = make_params()
    opt = tg.NorMuonAndAdam(params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    attn = tg.matrix_view("attn_bank", params["attn_bank"].detach())
    attn_before = attn.double().clone()
    scalars_before = params["scalars"].detach().clone()
    opt.step(1, 1.0, 0.9)
    lr = MUON_LR  # attention: shape factor 1
    decay = MUON_WD * MUON_LR * lr
    master = master_value(attn, opt.state["attn_bank"].mantissa)
    torch.testing.assert_close(master, attn_before * (1 - decay), rtol=1e-6, atol=0)
    assert torch.equal(params["scalars"].detach(), scalars_before)
    assert torch.isfinite(master).all()


def test_reset_restores_the_initial_behaviour():
    initial = make_params()
    params = clone_params(initial)
    opt = tg.NorMuonAndAdam(params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    for step in range(4):
        set_grads(params, step)
        opt.step(step, 1.0, 0.9)
    opt.untie()
    opt.reset()
    assert opt.tied
    for state in opt.state.values():
        for value in vars(state).values():
            assert (not value.any()) if isinstance(value, torch.Tensor) else value == 0
    # after restoring the weights, the reset optimizer behaves exactly like a fresh one
    for label, p in params.items():
        p.data.copy_(initial[label].detach())
    fresh_params = clone_params(initial)
    fresh = tg.NorMuonAndAdam(fresh_params, CFG, rank=0, world_size=1, grad_accum_steps=8)
    for step in range(2):
        set_grads(params, step)
        set_grads(fresh_params, step)
        opt.step(step, 1.0, 0.9)
        fresh.step(step, 1.0, 0.9)
    for label in params:
        assert torch.equal(params[label].detach(), fresh_params[label].detach()), label
