"""The attention experiments of issue 22 (`--attn=diff|cmd|mla|cmd_mla`) against plain
restatements written here: the differential attention loop by loop (the two-call model path and
the dense reference of train_gpt), lambda and its start, each variant's whole sublayer with
document boundaries and windows (outputs and gradients), MLA with identity factors as ordinary
attention, the configuration, the parameter counts, and a few training steps of each variant.
"""
import math

import pytest
import torch

import train_gpt as tg
from conftest import needs_corpus, needs_tokenizer
from test_model import (TINY, random_model, random_tokens, ref_attention_rows, ref_bigram,
                        ref_rmsnorm)
from test_recipe import HALF_BATCHES, SPEEDRUN_TINY_SIZES, TINY_FILES, train_steps

VARIANTS = ["diff", "cmd", "mla", "cmd_mla"]
PAIRED = (0, 2, 5, 9)
VARIANT_LAYERS = (1, 3, 4, 7, 8, 10)          # the attention layers that are not paired
# tiny sizes: d = 64, 2 heads of 32; noise width 16 (narrower than a head), latents 48 and 24;
# Q and K as wide as V (the variants refuse #344's narrower ones)
TINY_VARIANT = dict(mla_q_rank=48, mla_kv_rank=24, cmd_noise_dim=16, qk_head_dim=0)
FULL_WIDTH_QK = dict(qk_head_dim=0)


def tiny_cfg(attn, base=None, **extra):
    values = {**(base or dict(vocab_size=200, num_heads=2, head_dim=32, model_dim=64,
                               mlp_hidden=96, bigram_vocab_mult=1)), **TINY_VARIANT, **extra}
    return tg.Hyperparameters(**values, attn=attn)


def ref_lambda_init(l):
    """The paper's lambda_init for the 1-based layer index l."""
    return 0.8 - 0.6 * math.exp(-0.3 * (l - 1))


# =================================================================================================
# Differential attention: the model path (two attention() calls) and the dense reference
# =================================================================================================

def ref_differential_rows(q, k, qn, kn, v, doc, window, scale, noise_scale, lam, init):
    """Loop by loop in fp64: row i of head h is sum_j (a_ij - lam_h b_ij) v_j over the keys j of
    i's document with i - window <= j <= i, a from (q_h, k_h), b from the noise pair (shared when
    qn has one head), lam one per head or one for all; then each head normalised to RMS 1 and
    times (1 - init)."""
    T, H, hd = v.shape
    out = torch.zeros(T, H, hd, dtype=torch.float64)
    for h in range(H):
        g = h if qn.shape[1] == H else 0
        lam_h = lam[h] if lam.numel() == H else lam[0]
        for i in range(T):
            keys = [j for j in range(i + 1) if doc[j] == doc[i] and i - j <= window]
            a = torch.softmax(torch.stack([q[i, h] @ k[j, h] for j in keys]) * scale, 0)
            b = torch.softmax(torch.stack([qn[i, g] @ kn[j, g] for j in keys]) * noise_scale, 0)
            y = sum((a[n] - lam_h * b[n]) * v[j, h] for n, j in enumerate(keys))
            out[i, h] = y / torch.sqrt((y * y).mean() + torch.finfo(torch.float32).eps) * (1 - init)
    return out


def differential_inputs(T, H, hd, n, groups, lambdas, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, hd, generator=g) for _ in range(3))
    qn, kn = (torch.randn(T, groups, n, generator=g) for _ in range(2))
    lam = 0.3 + torch.rand(lambdas, generator=g)
    return [t.requires_grad_() for t in (q, k, qn, kn, v, lam)]


@pytest.mark.parametrize("groups,n,lambdas", [(3, 8, 1), (1, 8, 3), (1, 4, 3), (1, 12, 3)],
                         ids=["diff", "cmd", "cmd-narrow", "cmd-wide"])
def test_differential_attention_matches_loops_and_dense_reference(groups, n, lambdas):
    """Outputs and gradients: the two-call model path, the dense reference with materialised maps,
    and the loops here, with document boundaries (an empty one too) and a window."""
    T, H, hd, window, init = 23, 3, 8, 4, ref_lambda_init(4)
    cu = torch.tensor([0, 6, 6, 17, 23, 23], dtype=torch.int32)
    doc = [int((cu <= t).sum()) for t in range(T)]
    q, k, qn, kn, v, lam = differential_inputs(T, H, hd, n, groups, lambdas)
    scale, noise_scale = 0.3, 0.2
    q64, k64, qn64, kn64, v64, lam64 = (t.detach().double() for t in (q, k, qn, kn, v, lam))
    want = ref_differential_rows(q64, k64, qn64, kn64, v64, doc, window, scale, noise_scale,
                                 lam64, init)
    model = tg.differential_attention(q, k, qn, kn, v, cu, T, window, scale, noise_scale, lam,
                                      init, tg.Paths())
    dense = tg.differential_attention_reference(q, k, qn, kn, v, cu, window, scale, noise_scale,
                                                lam, init)
    assert torch.allclose(model.double(), want, atol=1e-4)
    assert torch.allclose(dense.double(), want, atol=1e-4)
    probe = torch.randn(T, H, hd, generator=torch.Generator().manual_seed(1))
    grads_model = torch.autograd.grad((model * probe).sum(), (q, k, qn, kn, v, lam))
    grads_dense = torch.autograd.grad((dense * probe).sum(), (q, k, qn, kn, v, lam))
    for name, a, b in zip("q k qn kn v lam".split(), grads_model, grads_dense):
        assert b.abs().max() > 0, name
        # lambda's gradient sums terms over every output element that largely cancel, and the
        # CPU's flash-style attention keeps fp32 errors of about 1e-5 of their size: up to 4e-4
        # over 200 probes (against 5e-6 for the dense maps), on gradients of size 1 to 40
        atol = 1e-3 if name == "lam" else 1e-4
        assert torch.allclose(a, b, atol=atol, rtol=1e-4), name


@pytest.mark.parametrize("groups,lambdas", [(3, 1), (1, 3)], ids=["diff", "cmd"])
def test_lambda_zero_leaves_the_signal_attention_exactly(groups, lambdas):
    """lambda = 0: the output is the signal attention, normalised and scaled, bit for bit, and
    the noise pair has no influence."""
    T, H, hd = 17, 3, 8
    cu = torch.tensor([0, 9, 17], dtype=torch.int32)
    q, k, qn, kn, v, _ = (t.detach() for t in differential_inputs(T, H, hd, 8, groups, lambdas))
    zero = torch.zeros(lambdas)
    got = tg.differential_attention(q, k, qn, kn, v, cu, T, 5, 0.3, 0.2, zero, 0.25, tg.Paths())
    signal = tg.attention(q, k, v, cu, T, 5, 0.3, tg.Paths())
    assert torch.equal(got, tg.rms_norm(signal) * 0.75)
    other = tg.differential_attention(q, k, -qn, 2 * kn, v, cu, T, 5, 0.3, 0.2, zero, 0.25,
                                      tg.Paths())
    assert torch.equal(got, other)


# =================================================================================================
# lambda: the paper's formula, starting at lambda_init
# =================================================================================================

def test_lambda_init_is_the_papers_schedule():
    assert tg.lambda_init(0) == pytest.approx(0.2)
    for layer in range(11):
        assert tg.lambda_init(layer) == pytest.approx(ref_lambda_init(layer + 1), abs=1e-12)


def test_differential_lambdas_formula():
    v = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    want = [math.exp(float(v[0, g] @ v[1, g])) - math.exp(float(v[2, g] @ v[3, g])) + 0.5
            for g in range(3)]
    assert tg.differential_lambdas(v, 0.5).tolist() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("attn,groups", [("diff", 1), ("cmd", 2), ("cmd_mla", 2)])
def test_lambda_starts_at_lambda_init_and_learns(attn, groups):
    cfg = tiny_cfg(attn)
    torch.manual_seed(0)
    m = tg.GPT(cfg, world_size=1, max_positions=64)
    vectors = m.noise_lambdas.detach()
    assert vectors.shape == (6, 4, groups, 32) and vectors.dtype == torch.float32
    for slot, layer in enumerate(VARIANT_LAYERS):
        lam = torch.exp((vectors[slot, 0] * vectors[slot, 1]).sum(-1)) - torch.exp(
            (vectors[slot, 2] * vectors[slot, 3]).sum(-1)) + ref_lambda_init(layer + 1)
        assert torch.equal(lam, torch.full((groups,), ref_lambda_init(layer + 1)).float())
    assert vectors[:, 0::2].abs().min() > 0            # query vectors random, key vectors zero
    T = 24
    ids, cu = random_tokens(T)
    loss = m(ids, torch.randint(0, 200, (T,)), cu, ref_bigram(ids, cfg.bigram_vocab_size),
             torch.tensor([1.0]), (3, 7), T)
    loss.backward()
    assert m.noise_lambdas.grad[:, 1::2].abs().amin(dim=(-2, -1)).gt(0).all()  # every key vector


def test_lambda_zero_makes_the_noise_weights_irrelevant_in_the_model():
    """cmd with every lambda set to 0 (exp(0) - exp(log(1 + init)) + init): the noise bank gets
    exactly zero gradient and the loss ignores it."""
    cfg = tiny_cfg("cmd")
    T = 24
    m = random_model(T=T, cfg=cfg)
    with torch.no_grad():
        m.noise_lambdas.zero_()
        for slot, layer in enumerate(VARIANT_LAYERS):   # lq2 . lk2 = log(1 + lambda_init)
            m.noise_lambdas[slot, 2, :, 0] = 1.0
            m.noise_lambdas[slot, 3, :, 0] = math.log(1 + tg.lambda_init(layer))
    ids, cu = random_tokens(T)
    args = (ids, torch.randint(0, 200, (T,)), cu, ref_bigram(ids, cfg.bigram_vocab_size),
            torch.tensor([1.0]), (3, 7), T)
    loss = m(*args)
    loss.backward()
    assert m.noise_qk_bank.grad.abs().max() < 1e-6 * m.attn_bank.grad.abs().max()
    with torch.no_grad():
        m.noise_qk_bank.normal_()
    assert m(*args).item() == pytest.approx(loss.item(), rel=1e-5)


# =================================================================================================
# Each variant's whole sublayer against a loop-by-loop restatement
# =================================================================================================

def rotate_rows(u, cos, sin):
    """Pairs (2m, 2m+1) of every row turned by the model's tables (rotary is tested apart)."""
    out = u.clone()
    out[..., 0::2] = cos[..., 0::2] * u[..., 0::2] + sin[..., 0::2] * u[..., 1::2]
    out[..., 1::2] = cos[..., 1::2] * u[..., 1::2] + sin[..., 1::2] * u[..., 0::2]
    return out


def ref_variant_heads(m, layer, x):
    """q, k, v (T, H, hd) before QK-norm and position, and the noise rows (query's, key's) or
    None, as issue 22 describes them."""
    cfg = m.cfg
    T, d, H, hd = x.shape[0], cfg.model_dim, cfg.num_heads, cfg.head_dim
    sc = m.scalars
    slot = VARIANT_LAYERS.index(layer)
    noise = None
    if cfg.attn in ("mla", "cmd_mla"):
        W_dq, W_uq, W_dkv, W_ukv = (getattr(m, name)[slot] for name in
                                    ("mla_dq_bank", "mla_uq_bank", "mla_dkv_bank", "mla_ukv_bank"))
        c_q = x @ (sc[2 * layer] * W_dq).T
        latent = x @ (sc[2 * layer] * W_dkv).T
        c_kv, k_rope = latent[:, :cfg.mla_kv_rank], latent[:, cfg.mla_kv_rank:]
        q = (c_q @ W_uq[:d].T).reshape(T, H, hd)
        k_content = (c_kv @ W_ukv[:d // 2].T).reshape(T, H, hd // 2)
        k = torch.cat([torch.stack([k_rope] * H, 1), k_content], -1)   # rope half shared
        v = (c_kv @ W_ukv[d // 2:d // 2 + d].T).reshape(T, H, hd)
        if cfg.attn == "cmd_mla":
            noise = (c_q @ W_uq[d:].T, c_kv @ W_ukv[d // 2 + d:].T)
    else:
        attn_slot = layer if layer < 6 else layer - 1
        W = m.attn_bank[attn_slot]
        q, k, v = ((x @ (sc[2 * layer] * W[r * d:(r + 1) * d]).T).reshape(T, H, hd)
                   for r in range(3))
        N = torch.cat([m.noise_qk_bank[2 * slot], m.noise_qk_bank[2 * slot + 1]])
        half = N.shape[0] // 2
        noise = (x @ N[:half].T, x @ N[half:].T)
    return q, k, v, noise


def ref_variant_sublayer(m, layer, x, doc, window, out_gate):
    cfg = m.cfg
    T, d, H, hd, n = x.shape[0], cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.cmd_noise_dim
    q, k, v, noise = ref_variant_heads(m, layer, x)
    cos, sin = m.rotary.cos[:T, None].float(), m.rotary.sin[:T, None].float()

    def positioned(q, k):
        q, k = rotate_rows(ref_rmsnorm(q), cos, sin), rotate_rows(ref_rmsnorm(k), cos, sin)
        if layer in (3, 10):   # key offset: the non-rotating half from the previous token
            half = hd // 2
            k = torch.cat([k[:, :, :half], torch.cat([k[:1, :, half:], k[:-1, :, half:]])], -1)
        return q, k

    q, k = positioned(q, k)
    scale = m.rotary.attn_scale
    if noise is None:
        y = torch.stack([ref_attention_rows(q[:, h], k[:, h], v[:, h], doc, window, scale)
                         for h in range(H)], 1)
    else:
        slot = VARIANT_LAYERS.index(layer)
        L = m.noise_lambdas[slot]
        init = ref_lambda_init(layer + 1)
        lam = torch.exp((L[0] * L[1]).sum(-1)) - torch.exp((L[2] * L[3]).sum(-1)) + init
        if cfg.attn == "diff":   # per-head noise pair, positioned like the signal
            qn, kn = positioned(noise[0].reshape(T, H, hd), noise[1].reshape(T, H, hd))
            noise_scale = scale
        else:                    # one shared pair of width n, no position
            qn, kn = ref_rmsnorm(noise[0])[:, None], ref_rmsnorm(noise[1])[:, None]
            noise_scale = scale * hd / n
        y = ref_differential_rows(q, k, qn, kn, v, doc, window, scale, noise_scale, lam, init)
    y = y.float() * out_gate[:, :, None]
    W_o = m.mla_o_bank[VARIANT_LAYERS.index(layer)] if cfg.attn in ("mla", "cmd_mla") else \
        m.attn_bank[layer if layer < 6 else layer - 1][3 * d:]
    return y.reshape(T, d) @ (m.scalars[2 * layer + 1] * W_o).T


@pytest.mark.parametrize("attn", VARIANTS)
@pytest.mark.parametrize("layer", [1, 10])          # a short-window layer, a key-offset layer
@pytest.mark.parametrize("symbolic_windows", [False, True])
def test_variant_sublayer_matches_restatement(attn, layer, symbolic_windows):
    """After a YaRN update, so that the softmax scale is not the initial one: with
    --symbolic_windows the queries (signal and noise) carry its factor instead of the scale."""
    torch.manual_seed(7)
    T = 20
    m = random_model(T=T, cfg=tiny_cfg(attn, symbolic_windows=symbolic_windows))
    m.rotary.apply_yarn(8, 24)
    assert m.rotary.attn_scale > 1.2 * tg.INITIAL_ATTN_SCALE
    ids, cu = random_tokens(T, n_docs=3)
    doc = [int((cu <= t).sum()) for t in range(T)]
    x = ref_rmsnorm(torch.randn(T, 64)).requires_grad_()
    gate = torch.rand(T, 2)
    y = m.attn(layer, m.attention_weights()[layer], x, None, None, cu, T, 5, gate)
    y_ref = ref_variant_sublayer(m, layer, x, doc, 5, gate)
    assert (y - y_ref).norm() / y_ref.norm() < 1e-4
    probe = torch.randn_like(y)
    params = [p for name, p in m.named_parameters() if name.endswith("bank") or name ==
              "noise_lambdas" or name == "scalars"]
    grads = torch.autograd.grad((y * probe).sum(), [x, *params], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, *params], allow_unused=True)
    names = ["x"] + [name for name, p in m.named_parameters() if any(p is q for q in params)]
    for name, a, b in zip(names, grads, grads_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9, name


def test_paired_layers_keep_standard_attention():
    for attn in VARIANTS:
        weights = tg.GPT(tiny_cfg(attn), 1, 8).attention_weights()
        for layer in PAIRED:
            assert weights[layer].noise_qk is None and weights[layer].latent is None
            assert weights[layer].qkv.shape == (3 * 64, 64)
        for layer in VARIANT_LAYERS:
            assert (weights[layer].noise_qk is not None) == (attn in ("diff", "cmd"))
            assert (weights[layer].latent is not None) == (attn in ("mla", "cmd_mla"))


# =================================================================================================
# MLA with full ranks and identity down projections is ordinary attention
# =================================================================================================

def test_mla_with_identity_factors_is_ordinary_attention():
    """Full ranks, W_dq = I, W_dkv = [I; W_kr], W_uq = W_q, W_ukv = [content rows of W_k; W_v]:
    with a standard model whose keys' rotating halves are one shared projection W_kr in every
    head (the one thing MLA's decoupled key cannot express otherwise), the two models must agree
    on the whole forward."""
    T, d, hd = 24, 64, 32
    std = random_model(T=T)
    cfg = tg.Hyperparameters(**{**TINY.__dict__, "attn": "mla", "mla_q_rank": d, "mla_kv_rank": d})
    mla = random_model(T=T, cfg=cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        for name, p in std.named_parameters():
            if name != "attn_bank":
                getattr(mla, name).copy_(p)
        for slot, layer in enumerate(VARIANT_LAYERS):
            W = std.attn_bank[tg.ATTN_LAYERS.index(layer)]
            W_kr = torch.randn(hd // 2, d) * 0.1
            for h in range(2):   # every head's rotating key rows: the one shared projection
                W[d + h * hd:d + h * hd + hd // 2] = W_kr
            W_k_content = torch.cat([W[d + h * hd + hd // 2:d + (h + 1) * hd] for h in range(2)])
            mla.mla_dq_bank[slot] = eye
            mla.mla_uq_bank[slot] = W[:d]
            mla.mla_dkv_bank[slot] = torch.cat([eye, W_kr])
            mla.mla_ukv_bank[slot] = torch.cat([W_k_content, W[2 * d:3 * d]])
            mla.mla_o_bank[slot] = W[3 * d:]
        for slot, layer in enumerate(PAIRED):
            mla.attn_bank[slot] = std.attn_bank[tg.ATTN_LAYERS.index(layer)]
    ids, cu = random_tokens(T)
    bg = ref_bigram(ids, TINY.bigram_vocab_size)
    h_std = std.final_hidden(std.lookup(ids, bg), cu, (5, 13), T)
    h_mla = mla.final_hidden(mla.lookup(ids, bg), cu, (5, 13), T)
    assert (h_mla - h_std).norm() / h_std.norm() < 1e-5


# =================================================================================================
# Configuration, banks and parameter counts
# =================================================================================================

def test_bad_attention_settings_are_clear_errors():
    with pytest.raises(ValueError,
                       match=r"attn='flash': expected one of standard, diff, cmd, mla, cmd_mla"):
        tg.Hyperparameters(attn="flash")
    with pytest.raises(SystemExit, match=r"--attn='diffs': expected one of"):
        tg.parse_config(["--attn=diffs"])
    with pytest.raises(ValueError, match=r"cmd_noise_dim=0: expected a positive width"):
        tg.Hyperparameters(cmd_noise_dim=0)
    with pytest.raises(ValueError, match=r"mla_q_rank=1024: expected at most model_dim=768"):
        tg.Hyperparameters(attn="mla", mla_q_rank=1024)
    with pytest.raises(ValueError, match=r"mla_kv_rank=128: expected at most model_dim=64"):
        tg.Hyperparameters(**{**tg.PRESETS["smoke"], **FULL_WIDTH_QK}, attn="cmd_mla",
                           mla_q_rank=32, mla_kv_rank=128)
    # the latent ranks are checked only where they are used: the default fits the real model
    smoke = {**tg.PRESETS["smoke"], **FULL_WIDTH_QK}
    assert tg.Hyperparameters(**smoke, attn="cmd").mla_q_rank == 384
    with pytest.raises(SystemExit) as e:
        tg.parse_config(["--attn=diff"])
    assert str(e.value) == ("--attn=diff needs --qk_head_dim=0: the attention variants build "
                            "their heads with Q and K as wide as V (head_dim)")


def test_defaults_leave_every_preset_as_it_was():
    for preset in tg.PRESETS.values():
        cfg = tg.Hyperparameters(**preset)
        assert cfg.attn == "standard" and not cfg.noise_attention and not cfg.latent_attention
        assert not {"noise_qk_bank", "noise_lambdas", "mla_o_bank"} & set(tg.param_labels(cfg))


def count(shape):
    return math.prod(shape)


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("preset", ["record74", "speedrun"])
def test_parameter_counts(world_size, preset):
    """Restated: 6 variant layers; banks padded to a multiple of the world size (as qk_bank)."""
    d, H, hd, n, q_rank, kv_rank = 768, 6, 128, 128, 384, 256
    base_cfg = tg.Hyperparameters(**{**tg.PRESETS[preset], **FULL_WIDTH_QK})
    with torch.device("meta"):
        base = sum(p.numel() for p in tg.GPT(base_cfg, world_size, 2).parameters())

    def pad(k):
        return -(-k // world_size) * world_size
    paired_groups = preset == "speedrun"
    if paired_groups:   # qk_bank: H head-pair blocks (2 hd, d) per layer, vo_bank: V and O
        standard_layers = {10: pad(10 * H) * 2 * hd * d + pad(20) * d * d,
                           4: pad(4 * H) * 2 * hd * d + pad(8) * d * d}
        noise_bank = pad(6 * 2 * H // 2) * 2 * hd * d
    else:
        standard_layers = {10: 10 * 4 * d * d, 4: 4 * 4 * d * d}
        noise_bank = pad(12) * d * d
    latent = pad(6) * (q_rank * d + d * q_rank + (kv_rank + hd // 2) * d + 3 * d // 2 * kv_rank
                       + d * d)
    latent_noise = pad(6) * (n * q_rank + n * kv_rank)
    want = {"diff": base + noise_bank + 6 * 4 * hd,
            "cmd": base + pad(12) * n * d + 6 * 4 * H * hd,
            "mla": base - standard_layers[10] + standard_layers[4] + latent,
            "cmd_mla": base - standard_layers[10] + standard_layers[4] + latent + latent_noise
            + 6 * 4 * H * hd}
    for attn, total in want.items():
        cfg = tg.Hyperparameters(**{**tg.PRESETS[preset], **FULL_WIDTH_QK}, attn=attn)
        with torch.device("meta"):
            m = tg.GPT(cfg, world_size, 2)
        assert sum(p.numel() for p in m.parameters()) == total, attn
        assert sorted(name for name, _ in m.named_parameters()) == sorted(tg.param_labels(cfg))
        for name, p in m.named_parameters():   # every NorMuon bank splits evenly over the ranks
            spec = next(s for s in tg.PARAM_TABLE if s.label == name)
            if spec.optimizer == "normuon":
                assert tg.matrix_view(name, p).shape[0] % world_size == 0, (attn, name)


def test_variant_banks_pad_with_zeros_and_restore_without_the_padding():
    torch.manual_seed(0)
    for attn in VARIANTS:
        cfg = tiny_cfg(attn)
        m8 = tg.GPT(cfg, world_size=8, max_positions=8)
        for label, (matrices, _, _) in tg.variant_bank_shapes(cfg).items():
            bank = getattr(m8, label)
            assert bank.shape[0] == -(-matrices // 8) * 8 and bank[matrices:].abs().max() == 0
            assert bank[:matrices].abs().amin(dim=(1, 2)).gt(0).all()
            assert tg.unpadded_rows(label, cfg) == matrices


def test_flops_count_the_variant_matrices_and_the_noise_call():
    cfg = tg.Hyperparameters(**tg.PRESETS["record74"])
    s = tg.Schedule(cfg).at(0)          # windows 128 / 384 tokens; layers 3 and 10 long
    d = 768
    context = 4 * 128 / 2 + 2 * 384 / 2   # the six variant layers: 1, 4, 7, 8 short; 3, 10 long
    base = tg.flops_per_token(cfg, s)
    diff = tg.flops_per_token(tg.Hyperparameters(attn="diff"), s)
    assert diff - base == pytest.approx(3 * (2 * 6 * 2 * d * d + 4 * d * context))
    mla = tg.flops_per_token(tg.Hyperparameters(attn="mla"), s)
    latent = 384 * d * 2 + (256 + 64) * d + 1152 * 256 + d * d
    assert mla - base == pytest.approx(3 * 2 * 6 * (latent - 4 * d * d))


@pytest.mark.parametrize("attn", VARIANTS)
def test_variants_run_with_every_speedrun_change(attn):
    """XSA, the MUDD value correction, the gates, DC attention and the cached single stream all
    act around the attention call, so they combine with every variant: a finite loss and a
    gradient for every parameter."""
    cfg = tiny_cfg(attn, base={**tg.SPEEDRUN, **SPEEDRUN_TINY_SIZES})
    T = 24
    m = random_model(T=T, cfg=cfg)
    ids, cu = random_tokens(T)
    loss = m(ids, torch.randint(0, 200, (T,)), cu, ref_bigram(ids, cfg.bigram_vocab_size),
             torch.tensor([1.0, 0.5]), (3, 7), T)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# =================================================================================================
# A few training steps of each variant
# =================================================================================================

@needs_corpus
@needs_tokenizer
@pytest.mark.parametrize("attn", VARIANTS)
def test_smoke_preset_trains_with_each_variant(attn):
    cfg = tg.Hyperparameters(**{**tg.PRESETS["smoke"], **TINY_FILES, **FULL_WIDTH_QK,
                                **HALF_BATCHES}, attn=attn, mla_q_rank=16, mla_kv_rank=16,
                             cmd_noise_dim=16)
    losses, params = train_steps(cfg, steps=6)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(torch.isfinite(p.float()).all() for p in params.values())


@pytest.mark.gpu
@pytest.mark.parametrize("groups,n", [(6, 128), (1, 128), (1, 64)])
def test_differential_attention_flash_path_on_gpu(groups, n):
    torch.manual_seed(3)
    T, H, hd = 4096, 6, 128
    cu = torch.tensor([0, 700, 1500, 1501, 4000] + [4096] * 4, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, H, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qn, kn = (torch.randn(T, groups, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lam = torch.full((groups,), 0.5, device="cuda")
    got = tg.differential_attention(q, k, qn, kn, v, cu, T, 384, 0.1, 0.1, lam, 0.2,
                                    tg.Paths(attention="varlen"))
    want = tg.differential_attention_reference(q, k, qn, kn, v, cu, 384, 0.1, 0.1, lam, 0.2)
    assert (got.float() - want).abs().max() < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("attn", VARIANTS)
def test_variant_compiles_and_matches_the_dense_path_on_gpu(attn):
    """The whole speedrun forward with the variant, compiled with fullgraph over flash attention,
    against the same model eager over the dense reference."""
    torch.manual_seed(5)
    cfg = tiny_cfg(attn, base={**tg.SPEEDRUN, **SPEEDRUN_TINY_SIZES})
    T = 512
    m = tg.GPT(cfg, world_size=1, max_positions=2 * T).cuda()
    m.rotary.reset()
    ids, cu = random_tokens(T, n_docs=5)
    args = (ids.int().cuda(), torch.randint(0, 200, (T,)).cuda(), cu.cuda(),
            ref_bigram(ids, cfg.bigram_vocab_size).int().cuda(), torch.tensor([1.0, 0.5]).cuda(),
            (1 * 128, 3 * 128), T)
    dense = m(*args).item()
    m.paths = tg.Paths(attention="varlen")
    flash = torch.compile(m, fullgraph=True, dynamic=False)(*args).item()
    assert flash == pytest.approx(dense, rel=2e-2)
