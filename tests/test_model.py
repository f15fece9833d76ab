"""The model against a slow, direct restatement of the record's forward pass, written here.

The restatement loops over tokens, heads and layers with explicit indices, so a wiring mistake in
the fast flattened forward (paired-head layout, key offset, skip/backout/lanes, ...) shows up as a
large difference. Both run in fp32 on a tiny configuration with every parameter randomised
(several start at zero, which would hide wiring mistakes).
"""
import dataclasses
import math
import sys
import types

import pytest
import torch

import train_gpt as tg

TINY = tg.Hyperparameters(vocab_size=200, num_heads=2, head_dim=32, model_dim=64, mlp_hidden=96,
                          bigram_vocab_mult=1)
EPS = torch.finfo(torch.float32).eps


def ref_rmsnorm(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def ref_softcap(l):
    return 23 * torch.sigmoid((l + 5) / 7.5)


def ref_freqs(head_dim, history=()):
    """Per-dimension rotary frequencies (head_dim,), after the given (old, new) YaRN updates."""
    n = head_dim // 4
    f = torch.tensor([(1 / 1024) ** (j / (n - 1)) for j in range(n)], dtype=torch.float64)
    for old, new in history:
        ramp = ((old * f / (2 * math.pi) - 1) / 31).clamp(0, 1)
        f = f * (old / new + ramp * (1 - old / new))
    return torch.cat([f.repeat_interleave(2), torch.zeros(head_dim // 2, dtype=torch.float64)])


def ref_rotate(u, pos, freqs):
    """u (hd,) rotated at integer position pos: pairs (2k, 2k+1) turn by pos * f_k."""
    ang = (pos * freqs).float()
    c, s = ang.cos(), ang.sin()
    out = u.clone()
    for k in range(0, u.numel(), 2):
        out[k] = c[k] * u[k] + s[k] * u[k + 1]
        out[k + 1] = c[k] * u[k + 1] - s[k] * u[k]
    return out


def ref_attention_rows(q_rows, k_rows, v_rows, doc_rows, window, scale):
    """Rows attend to rows j <= i of the same document with i - j <= window (q and k may be
    narrower than v)."""
    out = torch.zeros_like(v_rows)
    for i in range(q_rows.size(0)):
        keys = [j for j in range(i + 1) if doc_rows[j] == doc_rows[i] and i - j <= window]
        scores = torch.stack([q_rows[i] @ k_rows[j] for j in keys]) * scale
        p = torch.softmax(scores, 0)
        out[i] = sum(p[n] * v_rows[j] for n, j in enumerate(keys))
    return out


def ref_forward_hidden(m: tg.GPT, ids, cu_seqlens, bg, windows):
    cfg = m.cfg
    T, d, H, hd, V = ids.numel(), cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731  (lambdas are cast to bf16)
    sc = m.scalars.detach()
    doc = [int((cu_seqlens <= t).sum()) for t in range(T)]
    freqs = ref_freqs(hd)
    attn_scale = 0.1
    E = m.embed.detach()
    e = E[ids].clone()
    for t in range(T - 1, 0, -1):   # smear uses the raw previous embedding
        g = torch.sigmoid(m.smear_gate.detach()[0] @ E[ids[t]][:12])
        e[t] = E[ids[t]] + sc[22] * g * E[ids[t - 1]]
    x0 = ref_rmsnorm(e)
    b = m.bigram_embed.detach()[bg]
    ve_layers = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}
    attn_slot = {i: (i if i < 6 else i - 1) for i in range(11) if i != 6}

    def attention_sublayer(i, x):
        W = m.attn_bank.detach()[attn_slot[i]]
        qkv = x @ (sc[2 * i] * W[:3 * d]).T
        q = qkv[:, :d].reshape(T, H, hd)
        k = qkv[:, d:2 * d].reshape(T, H, hd)
        v = qkv[:, 2 * d:].reshape(T, H, hd).clone()
        q, k = ref_rmsnorm(q), ref_rmsnorm(k)
        paired = i in (0, 2, 5, 9)
        window = windows[1] if i in (3, 10) else windows[0]
        if i in ve_layers:
            ve = m.value_embeds.detach()[ve_layers[i] * V + ids].reshape(T, H, hd)
            G = m.ve_gate_bank.detach()[ve_layers[i]]
            for t in range(T):
                for h in range(H):
                    inp = x[t, :12] if paired else torch.cat([x[t, :6], ve[t].reshape(-1)[:6]])
                    v[t, h] += 2 * torch.sigmoid(G[h] @ inp) * ve[t, h]
        y = torch.zeros(T, H, hd)
        if paired:
            qr, kr = torch.zeros_like(q), torch.zeros_like(k)
            for t in range(T):
                for h in range(H):   # head h of group h // 2 rotates at position 2t + h % 2
                    qr[t, h] = ref_rotate(q[t, h], 2 * t + h % 2, freqs)
                    kr[t, h] = ref_rotate(k[t, h], 2 * t + h % 2, freqs)
            half = H // 2
            for j in range(half):   # slot j: row 2t = head j of token t, row 2t+1 = head j+H/2
                rows = [(t, j + r * half) for t in range(T) for r in (0, 1)]
                Q = torch.stack([qr[t, h] for t, h in rows])
                K = torch.stack([kr[t, h] for t, h in rows])
                Vv = torch.stack([v[t, h] for t, h in rows])
                out = ref_attention_rows(Q, K, Vv, [doc[t] for t, _ in rows], window, attn_scale)
                for n, (t, h) in enumerate(rows):
                    y[t, h] = out[n]
        else:
            qr, kr = torch.zeros_like(q), torch.zeros_like(k)
            for t in range(T):
                for h in range(H):
                    qr[t, h] = ref_rotate(q[t, h], t, freqs)
                    kr[t, h] = ref_rotate(k[t, h], t, freqs)
            if i in (3, 10):   # key offset: upper half of each key comes from the previous token
                shifted = kr.clone()
                shifted[1:, :, hd // 2:] = kr[:-1, :, hd // 2:]
                kr = shifted
            for h in range(H):
                y[:, h] = ref_attention_rows(qr[:, h], kr[:, h], v[:, h], doc, window, attn_scale)
        A = m.attn_gate_bank.detach()[attn_slot[i]]
        for t in range(T):
            for h in range(H):
                y[t, h] = y[t, h] * torch.sigmoid(A[h] @ x[t, :12])
        return y.reshape(T, d) @ (sc[2 * i + 1] * W[3 * d:]).T

    def mlp_sublayer(i, x):
        c_fc, c_proj = m.mlp_bank.detach()[i, 0], m.mlp_bank.detach()[i, 1]
        return torch.relu(x @ c_fc.T) ** 2 @ c_proj

    R, P = bf(m.resid_lambdas.detach()), bf(m.post_lambdas.detach())
    X0L, BL = bf(m.x0_lambdas.detach()), bf(m.bigram_lambdas.detach())
    lane0 = x0 + BL[0] * b
    lane1 = None
    S = B = None
    for i in range(11):
        if i == 6:
            skip_w = torch.sigmoid(sc[24]) * 2 * torch.sigmoid(x0[:, :12] @ m.skip_gate.detach()[0])
            lane0 = lane0 + skip_w[:, None] * S
            lane0 = R[6, 1] * lane0 + P[6, 1, 0] * mlp_sublayer(6, ref_rmsnorm(lane0))
            continue
        inj = X0L[i] * x0 + (BL[i] * b if i >= 1 else 0)
        if i < 7:
            a = attention_sublayer(i, ref_rmsnorm(lane0))
            lane0 = R[i, 0] * lane0 + a + inj
            if i == 3:
                S = lane0.clone()
            lane0 = R[i, 1] * lane0 + P[i, 1, 0] * mlp_sublayer(i, ref_rmsnorm(lane0))
        else:
            if i == 7:
                lane1 = lane0.clone()
            a = attention_sublayer(i, ref_rmsnorm(lane0))
            lane0 = R[i, 0] * lane0 + P[i, 0, 0] * a + inj
            lane1 = R[i, 0] * lane1 + P[i, 0, 1] * a
            mm = mlp_sublayer(i, ref_rmsnorm(lane1))
            lane0 = R[i, 1] * lane0 + P[i, 1, 0] * mm
            lane1 = R[i, 1] * lane1 + P[i, 1, 1] * mm
            if i == 7:
                B = lane0.clone()
    return ref_rmsnorm((lane0 + lane1) / 2 - sc[23] * B)


def ref_bigram(ids, table_rows):
    M = table_rows - 1
    return torch.tensor([M] + [((36313 * int(ids[t])) ^ (27191 * int(ids[t - 1]))) % M
                               for t in range(1, len(ids))])


def random_model(world_size=1, T=48, cfg=TINY):
    m = tg.GPT(cfg, world_size, max_positions=4 * T)
    with torch.no_grad():
        for p in m.parameters():   # fresh nonzero values everywhere, at init-like scales
            p.copy_(p.float() * 0.5 + 0.05 * torch.randn_like(p.float()))
        m.scalars[24] = -1.0
    m.float()
    m.rotary.reset()
    m.requantize_fp8_weights()   # the e4m3 copies of the new weights
    return m


def random_tokens(T, n_docs=4):
    ids = torch.randint(0, 200, (T,))
    starts = sorted(torch.randperm(T - 1)[:n_docs - 1].add(1).tolist())
    cu = torch.tensor([0] + starts + [T] * 3, dtype=torch.int32)
    return ids, cu


def test_forward_matches_direct_restatement():
    T = 40
    m = random_model(T=T)
    ids, cu = random_tokens(T)
    bg = ref_bigram(ids, TINY.bigram_vocab_size)
    windows = (5, 13)
    h = m.final_hidden(m.lookup(ids, bg), cu, windows, max_seqlen=T)
    h_ref = ref_forward_hidden(m, ids, cu, bg, windows)
    err = (h - h_ref).norm() / h_ref.norm()
    # both fp32 from the same weights; only the rotary tables are bf16 in the model (7.8)
    assert err < 2e-2, err


def test_six_heads_pair_as_0_3_1_4_2_5():
    """With 6 heads (the real count) pairing adjacent heads instead would be caught here."""
    cfg = tg.Hyperparameters(vocab_size=200, num_heads=6, head_dim=16, model_dim=96,
                             mlp_hidden=64, bigram_vocab_mult=1)
    T = 24
    m = random_model(T=T, cfg=cfg)
    ids, cu = random_tokens(T, n_docs=2)
    bg = ref_bigram(ids, cfg.bigram_vocab_size)
    h = m.final_hidden(m.lookup(ids, bg), cu, (6, 11), max_seqlen=T)
    h_ref = ref_forward_hidden(m, ids, cu, bg, (6, 11))
    assert (h - h_ref).norm() / h_ref.norm() < 2e-2


def test_training_and_validation_losses():
    T = 32
    m = random_model(T=T)
    ids, cu = random_tokens(T)
    tgt = torch.randint(0, 200, (T,))
    bg = ref_bigram(ids, TINY.bigram_vocab_size)
    h = m.final_hidden(m.lookup(ids, bg), cu, (8, 16), T)
    logits = (h @ m.lm_head).double()
    z = ref_softcap(logits)
    lse = torch.logsumexp(z, -1)
    w = [1.0, 0.5, 0.2]
    expected = 0.0
    for t in range(T):            # same logits row t for targets t, t+1, t+2; no document masking
        for k, wk in enumerate(w):
            if t + k < T:
                expected += wk * (lse[t] - z[t, tgt[t + k]])
    grad_scale = 0.25
    got = m(ids, tgt, cu, bg, torch.tensor(w), (8, 16), T, grad_scale)
    assert torch.allclose(got.double(), expected * grad_scale, rtol=1e-4)
    # validation: mean next-token CE over all padded-vocab columns
    val = m(ids, tgt, cu, bg, None, (8, 16), T)
    expected_val = (lse - z[torch.arange(T), tgt]).mean()
    assert torch.allclose(val.double(), expected_val, rtol=1e-3)


@pytest.mark.parametrize("use_kernels", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not tg.triton_kernels.INTERPRET,
                                                reason="the kernel on CPU tensors needs TRITON_INTERPRET=1")),
])
def test_sparse_table_grads_sum_to_the_dense_gradients(use_kernels):
    """Rows as leaves + scatter-add over micro-batches == autograd's dense table gradients."""
    T = 32
    m = random_model(T=T)
    w = torch.tensor([1.0, 0.5])
    batches = []
    for _ in range(3):   # repeated tokens, so rows of one table collect several gradients
        ids, cu = random_tokens(T)
        bigram_ids = ref_bigram(ids, TINY.bigram_vocab_size)
        # int32 ids, as the data loader makes them
        batches.append((ids.int(), torch.randint(0, 200, (T,)), cu, bigram_ids.int()))
    for ids, tgt, cu, bg in batches:
        m(ids, tgt, cu, bg, w, (8, 16), T, 0.5).backward()
    dense = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    sparse = tg.SparseTableGrads(m, use_kernels)
    for ids, tgt, cu, bg in batches:
        rows = sparse.lookup(ids, bg)
        m(ids, tgt, cu, bg, w, (8, 16), T, 0.5, rows).backward()
        sparse.accumulate()
    for name, p in m.named_parameters():
        if name in tg.TableRows._fields:
            assert p.grad is None, f"{name} got a dense gradient"
    sparse.flush()
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, dense[name], rtol=1e-5, atol=1e-7), name
        assert p.grad.abs().sum() > 0, name
    assert all(total.abs().sum() == 0 for total in sparse.sums.values()), "sums not restarted"


def test_sparse_table_rows_reuse_one_leaf_per_table_and_shape():
    """A micro-batch's rows are copied into one fp32 leaf per table and batch shape (a CUDA graph
    reads them where they are); a lookup before the previous rows' accumulate() would overwrite
    them and is refused."""
    m = random_model(T=32)
    sparse = tg.SparseTableGrads(m, use_kernels=False)
    ids, _ = random_tokens(32)
    bigram_ids = ref_bigram(ids, TINY.bigram_vocab_size).int()
    first = sparse.lookup(ids.int(), bigram_ids)
    assert torch.equal(first.embed, m.embed[ids].float())
    with pytest.raises(RuntimeError, match="accumulate"):
        sparse.lookup(ids.int(), bigram_ids)
    sparse.accumulate()
    other_ids = (ids + 1) % TINY.vocab_size
    again = sparse.lookup(other_ids.int(), bigram_ids)
    assert all(a is b for a, b in zip(first, again))
    assert torch.equal(again.embed, m.embed[other_ids].float())
    sparse.accumulate()
    shorter = sparse.lookup(ids[:16].int(), bigram_ids[:16])
    assert all(a is not b for a, b in zip(first, shorter)) and shorter.embed.shape[0] == 16


def test_transposed_head_equals_standard_linear():
    m = random_model()
    h = torch.randn(10, TINY.model_dim)
    linear = torch.nn.Linear(TINY.model_dim, TINY.padded_vocab_size, bias=False)
    with torch.no_grad():
        linear.weight.copy_(m.lm_head.T)
    assert torch.allclose(h @ m.lm_head, linear(h), atol=1e-5)


def test_head_gemm_paths_compute_one_bf16_product():
    """Paths.head_gemm: the fp32 GEMM of the bf16 operands, rounded once, and the bf16 GEMM give
    the logits and both gradients of the same math: the exact sums of exact products rounded to
    bf16 (to within one rounding step: the order of the fp32 sums is the GEMM's)."""
    m = bf16_model(T=64)
    torch.manual_seed(1)
    h = torch.randn(64, TINY.model_dim).bfloat16()
    grad = torch.randn(64, TINY.padded_vocab_size).bfloat16()
    W = m.lm_head.detach().double()
    exact = dict(logits=h.double() @ W, h=grad.double() @ W.T, lm_head=h.double().T @ grad.double())
    for gemm in ("fp32", "bf16"):
        m.paths = tg.Paths(head_gemm=gemm)
        m.lm_head.grad = None
        x = h.clone().requires_grad_()
        logits = m.head_logits(x)
        logits.backward(grad)
        got = dict(logits=logits, h=x.grad, lm_head=m.lm_head.grad)
        for name, value in got.items():
            assert value.dtype == torch.bfloat16, (gemm, name)
            torch.testing.assert_close(value.double(), exact[name], rtol=2 ** -8, atol=1e-6,
                                       msg=lambda m: f"{gemm} {name}: {m}")


def test_init_values_and_tied_copy():
    torch.manual_seed(0)
    m = tg.GPT(TINY, world_size=8, max_positions=8)
    assert torch.equal(m.embed, m.lm_head.T)          # exact transposed copy at init
    assert m.attn_bank.dtype == m.mlp_bank.dtype == torch.bfloat16
    bound = 1 / 32 * math.sqrt(768 / TINY.model_dim)   # sqrt(3) * 0.5 / sqrt(d)
    assert m.attn_bank.float().abs().max() <= bound * (1 + 2**-8)   # bf16 rounding of the edge
    assert m.mlp_bank[:, 1].abs().max() == 0            # c_proj starts at zero
    assert m.scalars.numel() == 32 and m.scalars[:22:2].eq(0.5).all() and m.scalars[1:22:2].eq(1).all()
    assert m.scalars[22:25].tolist() == [0.0, 0.5, -1.5] and m.scalars[25:].eq(1).all()
    assert m.post_lambdas[7:, 0, 1].eq(1.5).all() and m.post_lambdas[:7].eq(1).all()
    assert torch.allclose(m.resid_lambdas, torch.full((11, 2), math.sqrt(1.1)))
    assert m.mlp_bank.shape[0] == 12                   # one padding layer at world size 8
    assert m.mlp_bank[11].abs().max() == 0 and m.mlp_bank[:11, 0].abs().min() > 0
    # the real layers' initial weights do not depend on the padding (same math on any world size)
    torch.manual_seed(0)
    m1 = tg.GPT(TINY, world_size=1, max_positions=8)
    assert torch.equal(m1.mlp_bank, m.mlp_bank[:11]) and torch.equal(m1.lm_head, m.lm_head)
    assert tg.GPT(TINY, world_size=1, max_positions=8).mlp_bank.shape[0] == 11
    assert tg.GPT(TINY, world_size=1, max_positions=8).scalars.numel() == 25


def test_parameter_count_at_world_size_8():
    with torch.device("meta"):
        m = tg.GPT(tg.Hyperparameters(), world_size=8, max_positions=2)
    assert sum(p.numel() for p in m.parameters()) == 543_818_952


NO_FP8_MLP = dict(fp8_mlp_up=False, fp8_mlp_down=False, fp8_mlp_backward=False)


@pytest.mark.parametrize("preset, extra", [
    ("record74", {}), ("speedrun", {}), ("speedrun", dict(mlp="pairwise", **NO_FP8_MLP)),
    *[("speedrun", dict(attn=attn, qk_head_dim=0)) for attn in ("diff", "cmd", "mla", "cmd_mla")]])
def test_model_is_built_on_the_device_it_is_asked_for(preset, extra):
    """The trainer builds the model under its device (a GPU draws the initial weights), so every
    parameter and buffer must follow the default device: one made on the host by name would stay
    there on a GPU."""
    cfg = tg.Hyperparameters(**{**tg.PRESETS[preset], **extra})
    with torch.device("meta"):
        m = tg.GPT(cfg, world_size=8, max_positions=2)
    named = [*m.named_parameters(), *m.named_buffers()]
    assert [name for name, t in named if not t.is_meta] == []
    if cfg.bigram_sign_trick:
        assert "bigram_signs" in dict(named)


def test_summary_command(capsys):
    tg.main(["--summary", "--preset=record74", "--world_size=8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "total parameters: 543,818,952"
    assert out[0].startswith("world size 8 ")
    labels = [line.split()[0] for line in out[2:-1]]
    assert sorted(labels) == sorted(tg.param_labels(tg.Hyperparameters()))


def test_summary_takes_the_world_size_of_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    tg.main(["--summary", "--preset=smoke"])   # 4 micro-batches: world size 8 would not fit
    out = capsys.readouterr().out.splitlines()
    # 26,300,033 before #344 narrowed the 20 Q/K head-pair blocks of 2 x 32 rows to 2 x 24
    want = 26_300_033 - 20 * 2 * (32 - 24) * 64
    assert out[0].startswith("world size 1 ") and out[-1] == f"total parameters: {want:,}"
    monkeypatch.setenv("WORLD_SIZE", "2")
    tg.main(["--summary", "--preset=smoke"])
    assert capsys.readouterr().out.startswith("world size 2 ")


def test_rotary_yarn_frequencies_and_scale():
    rot = tg.Rotary(128, max_positions=64)
    rot.reset()
    assert rot.attn_scale == 0.1
    history = []
    for old, new, scale in [(384, 896, 0.116946), (896, 1408, 0.127518), (1408, 1664, 0.131778)]:
        rot.apply_yarn(old, new)
        history.append((old, new))
        assert abs(rot.attn_scale - scale) < 1e-6
        assert rot.query_scale.item() == pytest.approx(rot.attn_scale / 0.1, rel=1e-6)
        f = ref_freqs(128, history)
        assert torch.allclose(rot.freqs.double().repeat_interleave(2), f[:64], rtol=1e-5)
        ang = torch.arange(64, dtype=torch.float64)[:, None] * f[None]
        assert torch.allclose(rot.cos.double(), ang.cos(), atol=4e-3)   # bf16 table
        signed_sin = ang.sin() * torch.tensor([1.0, -1.0]).repeat(64).double()
        assert torch.allclose(rot.sin.double(), signed_sin, atol=4e-3)
    rot.reset()
    assert rot.attn_scale == 0.1 and torch.allclose(rot.freqs.double(), ref_freqs(128)[:64:2])
    assert rot.query_scale.item() == 1.0


def test_rotate_matches_pairwise_formula():
    freqs = ref_freqs(32)
    rot = tg.Rotary(32, max_positions=16)
    rot.reset()
    u = torch.randn(16, 32)
    got = tg.rotate(u, rot.cos.float(), rot.sin.float())
    for p in range(16):
        assert torch.allclose(got[p], ref_rotate(u[p], p, freqs), atol=2e-2)
    assert torch.equal(got[:, 16:], u[:, 16:])   # the upper half never rotates


def test_attention_reference_mask_vs_dense_softmax():
    rows, heads, hd = 30, 2, 8
    q, k, v = (torch.randn(rows, heads, hd) for _ in range(3))
    cu = torch.tensor([0, 7, 7, 19, 30, 30], dtype=torch.int32)
    doc = [int((cu <= i).sum()) for i in range(rows)]
    got = tg.attention_reference(q, k, v, cu, window=5, scale=0.3)
    for h in range(heads):
        want = ref_attention_rows(q[:, h], k[:, h], v[:, h], doc, 5, 0.3)
        assert torch.allclose(got[:, h], want, atol=1e-5)


def test_rmsnorm_matches_definition():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    want = (x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).bfloat16()
    assert torch.equal(tg.rms_norm(x), want)


@pytest.mark.gpu
def test_varlen_attention_matches_reference_on_gpu():
    torch.manual_seed(1)
    rows, heads, hd = 4096, 6, 128
    q, k, v = (torch.randn(rows, heads, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 700, 1500, 1501, 4000] + [4096] * 4, dtype=torch.int32, device="cuda")
    for window in (128, 384, 2047):
        got = tg.attention(q, k, v, cu, 4096, window, 0.1, tg.Paths(attention="varlen"))
        want = tg.attention_reference(q.float(), k.float(), v.float(), cu, window, 0.1)
        assert (got.float() - want).abs().max() < 2e-2


@pytest.mark.gpu
def test_fp8_head_close_to_bf16_head_on_gpu():
    torch.manual_seed(2)
    T, d, V = 4096, 768, 50304
    cfg = tg.Hyperparameters()
    h = tg.rms_norm(torch.randn(T, d, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    W = (torch.randn(d, V, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda")
    w = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    losses = {}
    for use_kernels in (True, False):
        loss = tg.triton_kernels.softcapped_mtp_cross_entropy(
            h, targets, w, W, cfg.head_x_scale, cfg.head_w_scale, cfg.head_grad_scale, use_kernels)
        losses[use_kernels] = (loss.item(), *torch.autograd.grad(loss, (h, W)))
    exact = tg.triton_kernels.softcapped_mtp_cross_entropy_reference(
        h.float(), targets, w, W.float())
    exact_grads = torch.autograd.grad(exact, (h, W))
    for loss, dh, dW in losses.values():
        # e4m3 operands keep 3 mantissa bits and the logits gradient travels in e5m2 (2 bits):
        # about 5% per element, far less on the loss
        assert abs(loss - exact.item()) / exact.item() < 0.01
        for got, want in zip((dh, dW), exact_grads):
            assert (got.float() - want).norm() / want.norm() < 0.1


def test_flash_attn3_is_optional_and_called_like_the_reference(monkeypatch):
    lines = []
    monkeypatch.setitem(sys.modules, "kernels", None)          # the package is not installed
    assert tg.load_flash_attn3(lines.append) is None
    assert len(lines) == 1 and "using torch varlen_attn" in lines[0]

    calls = []

    def fake_fa3(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal, window_size):
        calls.append((max_q, max_k, softmax_scale, causal, window_size))
        assert cu_q is cu_k
        ref = tg.attention_reference(q, k, v, cu_q, window_size[0], softmax_scale)
        return ref, None                                        # (out, lse) like some builds

    hub = types.SimpleNamespace(get_kernel=lambda repo: types.SimpleNamespace(
        flash_attn_varlen_func=fake_fa3) if repo == tg.FLASH_ATTN3_HUB_REPO else None)
    monkeypatch.setitem(sys.modules, "kernels", hub)
    fa3 = tg.load_flash_attn3(lines.append)
    assert fa3 is fake_fa3
    q, k, v = (torch.randn(20, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 9, 20, 20], dtype=torch.int32)
    got = tg.attention(q, k, v, cu, 20, 4, 0.25, tg.Paths(attention="flash_attn3", flash_attn3=fa3))
    assert calls == [(20, 20, 0.25, True, (4, 0))]
    assert torch.equal(got, tg.attention_reference(q, k, v, cu, 4, 0.25))


# -------------------------------------------------------------------------------------------------
# Execution paths: decided once, and every fast path computes what its reference does
# -------------------------------------------------------------------------------------------------

PATH_OPS = ["mlp", "lm_head", "head_gemm", "loss", "attention", "dc_attention", "optimizer",
            "table_grads", "qkv", "qk_prep", "compile", "cuda_graphs"]


def test_cpu_paths_are_the_references():
    lines = []
    paths = tg.resolve_paths(tg.Hyperparameters(flash_attn3=True), torch.device("cpu"), lines.append)
    assert paths == tg.Paths()   # PyTorch everywhere, not compiled
    report = paths.report()
    assert [line.split(":")[0] for line in report] == [f"path {op}" for op in PATH_OPS]
    assert report[0] == "path mlp: torch (CPU: the PyTorch reference of every kernel)"
    assert report[2] == "path head_gemm: fp32 (CPU: faster than its bf16 GEMM, the same sums)"
    assert report[4] == "path attention: dense (--flash_attn3=true needs CUDA; CPU reference)"
    assert report[8:10] == ["path qkv: torch (--fp8_qkv=false: bf16)",
                            "path qk_prep: torch (--fused_qk_prep=false)"]
    assert report[10] == ("path compile: off (CPU: the dense attention's loop over documents does "
                          "not compile)")
    assert report[11] == "path cuda_graphs: off (--cuda_graphs=false)"
    assert lines == []   # FlashAttention-3 is not even looked for on a CPU
    cpu_graphs = tg.resolve_paths(tg.Hyperparameters(cuda_graphs=True), torch.device("cpu"))
    assert not cpu_graphs.cuda_graphs
    assert cpu_graphs.report()[11] == ("path cuda_graphs: off (CUDA graphs are made by "
                                       "torch.compile on CUDA: CPU: the dense attention's loop "
                                       "over documents does not compile)")


@pytest.mark.gpu
def test_gpu_paths_take_every_kernel():
    device = torch.device("cuda")
    paths = tg.resolve_paths(tg.Hyperparameters(), device)
    assert paths == tg.Paths(mlp="triton", lm_head="fp8", head_gemm="bf16", loss="triton",
                             attention="varlen", dc_attention="triton", optimizer="triton",
                             table_grads="triton", compile=True)
    plain = tg.resolve_paths(tg.Hyperparameters(use_triton_kernels=False, compile=False), device)
    assert plain == tg.Paths(lm_head="fp8", head_gemm="bf16", attention="varlen")
    assert plain.report()[0] == "path mlp: torch (--use_triton_kernels=false)"


@pytest.mark.parametrize("capability,head", [((9, 0), "fp8"), ((8, 9), "fp8"), ((8, 0), "bf16")])
def test_gpu_paths_follow_the_configuration_and_fp8_support(monkeypatch, capability, head):
    """The decision for a GPU, taken on any machine: only the capability query touches CUDA."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    device = torch.device("cuda")
    kernel_loss = "triton" if head == "fp8" else "torch"
    assert tg.resolve_paths(tg.Hyperparameters(), device) == tg.Paths(
        mlp="triton", lm_head=head, head_gemm="bf16", loss=kernel_loss, attention="varlen",
        dc_attention="triton", optimizer="triton", table_grads="triton", compile=True)
    plain = tg.resolve_paths(tg.Hyperparameters(use_triton_kernels=False, compile=False), device)
    assert plain == tg.Paths(lm_head=head, head_gemm="bf16", attention="varlen")
    assert tg.resolve_paths(tg.Hyperparameters(cuda_graphs=True), device).cuda_graphs
    assert not tg.resolve_paths(tg.Hyperparameters(cuda_graphs=True, compile=False),
                                device).cuda_graphs
    lines = plain.report()
    assert lines[0] == "path mlp: torch (--use_triton_kernels=false)"
    capability_text = f"compute capability {capability[0]}.{capability[1]}"
    assert lines[1] == f"path lm_head: {head} ({capability_text}" + (
        ")" if head == "fp8" else ": no FP8)")
    # the pairwise MLP: cuBLAS on the products in memory unless its fused kernels are asked for
    pairwise = dict(mlp="pairwise", fp8_mlp_up=False, fp8_mlp_down=False, fp8_mlp_backward=False)
    assert tg.resolve_paths(tg.Hyperparameters(**pairwise), device).mlp == "cublas"
    assert tg.resolve_paths(tg.Hyperparameters(**pairwise, pairwise_fused=True),
                            device).mlp == "triton"
    assert tg.resolve_paths(tg.Hyperparameters(**pairwise, use_triton_kernels=False),
                            device).mlp == "torch"
    # the FP8 MLP (#84, with #89) takes its kernel only where the GPU has FP8, else its PyTorch
    # emulation
    for fp8_cfg in (tg.Hyperparameters(fp8_mlp_up=True),
                    tg.Hyperparameters(fp8_mlp_up=True, fp8_mlp_down=True)):
        fp8_mlp = tg.resolve_paths(fp8_cfg, device)
        assert fp8_mlp.mlp == ("triton" if head == "fp8" else "torch")
        if head == "bf16":
            assert fp8_mlp.report()[0] == (f"path mlp: torch ({capability_text}: no FP8: the FP8 "
                                           f"MLP's math emulated in PyTorch)")


def test_paths_reject_unknown_and_contradictory_choices():
    with pytest.raises(ValueError,
                       match=r"Paths.mlp='cuda': expected one of \('torch', 'triton', 'cublas'\)"):
        tg.Paths(mlp="cuda")
    with pytest.raises(ValueError, match="loss='triton' needs lm_head='fp8'"):
        tg.Paths(loss="triton")
    with pytest.raises(ValueError, match="attention='flash_attn3' needs the loaded function"):
        tg.Paths(attention="flash_attn3")
    with pytest.raises(ValueError, match="cuda_graphs=True needs compile=True"):
        tg.Paths(cuda_graphs=True)


def bf16_model(T, cfg=TINY):
    """A tiny model in its training dtypes (bf16 banks), every parameter randomised."""
    m = tg.GPT(cfg, world_size=1, max_positions=4 * T)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.float() * 0.5 + 0.05 * torch.randn_like(p.float()))
    m.rotary.reset()
    m.requantize_fp8_weights()   # the e4m3 copies of the new weights
    return m


def step_by_paths(model, T: int, *paths: tg.Paths) -> list[tuple[float, dict]]:
    """(loss, fp32 gradient of every parameter) of one training forward and backward on random
    tokens, with the model taking each of `paths` in turn."""
    ids, cu = random_tokens(T)
    targets = torch.randint(0, 200, (T,))
    bigram_ids = ref_bigram(ids, model.cfg.bigram_vocab_size)
    w = torch.tensor([1.0, 0.5, 0.25])
    results = []
    for p in paths:
        model.paths = p
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets, cu, bigram_ids, w, (8, 16), T, 0.5)
        loss.backward()
        results.append((loss.item(), {name: q.grad.float() for name, q in model.named_parameters()}))
    return results


def test_grad_bound_switch_rescales_only_the_backward():
    """--fp8_mlp_grad_bound reaches the model's MLPs and changes only the e5m2 scale of d_pre:
    the same loss bit for bit (no forward changes), the same gradients for the last MLP's c_fc
    and c_proj (its dY, d_pre and post do not depend on that scale), and other gradients that
    differ (each MLP's dx, through e5m2 d_pre at another scale). How close those stay is
    test_kernels.py's test_fp8_backward_with_grad_bound: rounding noise compounds through the
    layers of this tiny random model."""
    cfg = dataclasses.replace(TINY, fp8_mlp_up=True, fp8_mlp_down=True, fp8_mlp_backward=True,
                              mlp_pre_from_post=True)
    T, results = 32, []
    for grad_bound in (False, True):
        torch.manual_seed(3)
        model = bf16_model(T, dataclasses.replace(cfg, fp8_mlp_grad_bound=grad_bound))
        results += step_by_paths(model, T, tg.Paths(lm_head="fp8"))
    (loss, grads), (bound_loss, bound_grads) = results
    assert bound_loss == loss
    last = grads["mlp_bank"][tg.NUM_LAYERS - 1]
    assert last[0].norm() > 0 and last[1].norm() > 0
    assert torch.equal(bound_grads["mlp_bank"][tg.NUM_LAYERS - 1], last)
    assert not torch.equal(bound_grads["mlp_bank"], grads["mlp_bank"])


@pytest.mark.skipif(not tg.triton_kernels.INTERPRET,
                    reason="the kernels on CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("fp8_mlp", ["bf16", "forward", "backward", "grad_bound"],
                         ids=["bf16-mlp", "fp8-mlp", "fp8-mlp-backward", "fp8-mlp-grad-bound"])
def test_kernel_paths_train_like_the_reference_paths(fp8_mlp):
    """One training forward and backward through the MLP and loss kernels against the same model
    through their PyTorch references (both with the FP8 head): the same loss, and gradients equal
    up to the kernels' bf16 and e5m2 roundings. Also with both MLP projections in FP8 (#84, #89),
    and in the backward pass too (#344, with relu(pre) from post as the kernels do; and with
    --fp8_mlp_grad_bound's scale of d_pre): there the
    loss is PyTorch's on both sides, since the loss kernel's last-bit differences in the logits
    gradient flip e5m2 roundings of the MLP gradients, layer after layer (up to 12 % on a
    parameter's gradient in this tiny model)."""
    torch.manual_seed(3)
    T = 32
    fp8, backward = fp8_mlp != "bf16", fp8_mlp in ("backward", "grad_bound")
    model = bf16_model(T, dataclasses.replace(TINY, fp8_mlp_up=fp8, fp8_mlp_down=fp8,
                                              fp8_mlp_backward=backward,
                                              fp8_mlp_grad_bound=fp8_mlp == "grad_bound",
                                              mlp_pre_from_post=backward))
    kernels = tg.Paths(mlp="triton", lm_head="fp8", loss="torch" if backward else "triton")
    (kernel_loss, kernel_grads), (reference_loss, reference_grads) = step_by_paths(
        model, T, kernels, tg.Paths(lm_head="fp8"))
    assert abs(kernel_loss - reference_loss) < 1e-3 * reference_loss
    for name, want in reference_grads.items():
        got = kernel_grads[name]
        assert want.norm() > 0, name
        assert (got - want).norm() < 0.05 * want.norm(), name
