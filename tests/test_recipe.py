"""The changes of records #77-#89, #344 and #350 against plain restatements written here from the
records' descriptions: the composed attention, XSA, MUDD, the gates, the single stream and the
narrower Q/K heads (one slow, loop-by-loop forward of the whole speedrun model; the narrow heads
also in test_qk_head_dim.py), the prefix-token table, the validation mask,
the bigram signs, the schedule, and the switches themselves (each can be turned off, all off is
record #74, contradictions fail).
"""
import dataclasses
import functools
import inspect
import math
import os
import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CORPUS, needs_corpus, needs_tokenizer
from test_model import (bf16_model, random_model, random_tokens, ref_attention_rows, ref_bigram,
                        ref_rmsnorm)

SPEEDRUN_TINY_SIZES = dict(vocab_size=200, num_heads=2, head_dim=32, model_dim=64, mlp_hidden=96,
                           bigram_vocab_mult=1.0, qk_head_dim=24)   # #344: Q/K 3/4 of the head
SPEEDRUN_TINY = tg.Hyperparameters(**{**tg.SPEEDRUN, **SPEEDRUN_TINY_SIZES})


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


# =================================================================================================
# Dynamically composed attention (#85) and exclusive self-attention (#82, #86)
# =================================================================================================

def ref_dc_attention(q, k, v, doc, scale, w1, w2, window):
    """Loop by loop: P_g(t, .) softmax of head g over the keys s of t's document, t - window < s
    <= t; a(t, s) = sum_g w1_g(t) / rms_h(w1(t)) P_g(t, s); out_h(t) = w2_h(t) sum_s a(t, s) v_h(s)."""
    T, H, _ = q.shape
    out = torch.zeros_like(v, dtype=torch.float64)
    for t in range(T):
        keys = [s for s in range(max(0, t - window + 1), t + 1) if doc[s] == doc[t]]
        rms = math.sqrt(sum(float(w1[t, g]) ** 2 for g in range(H)) / H + 1e-6)
        a = torch.zeros(len(keys), dtype=torch.float64)
        for g in range(H):
            scores = torch.tensor([float(q[t, g] @ k[s, g]) * scale for s in keys], dtype=torch.float64)
            a += float(w1[t, g]) / rms * torch.softmax(scores, 0)
        for h in range(H):
            out[t, h] = float(w2[t, h]) * sum(a[n] * v[s, h].double() for n, s in enumerate(keys))
    return out


def test_dc_attention_reference_matches_loops():
    torch.manual_seed(0)
    T, H, hd = 23, 3, 8
    q, k, v = (torch.randn(T, H, hd) for _ in range(3))
    w1, w2 = torch.randn(T, H), torch.randn(T, H)
    cu = torch.tensor([0, 6, 6, 17, 23, 23], dtype=torch.int32)
    doc = [int((cu <= t).sum()) for t in range(T)]
    for window in (1, 4, 112):
        want = ref_dc_attention(q, k, v, doc, 0.3, w1, w2, window)
        for chunk in (4, 7, 128):   # several query chunks, a ragged last one, a single one
            got = tg.triton_kernels.dc_attention_reference(q, k, v, cu, 0.3, w1, w2, window=window, chunk=chunk)
            assert torch.allclose(got.double(), want, atol=1e-5), (window, chunk)


def test_exclusive_self_attention_removes_a_share_of_the_value_direction():
    torch.manual_seed(1)
    y, v = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    share = torch.tensor([0.0, 0.5, 1.0])
    got = tg.exclusive_self_attention(y, v, share)
    unit = v / v.norm(dim=-1, keepdim=True)                 # #82's form: through the unit value
    want = y - share[:, None] * (y * unit).sum(-1, keepdim=True) * unit
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[:, 0], y[:, 0])                 # share 0: unchanged
    assert (got[:, 2] * v[:, 2]).sum(-1).abs().max() < 1e-4  # share 1: orthogonal to v


# =================================================================================================
# The whole speedrun forward, restated loop by loop
# =================================================================================================

def coefficients(w1, w2, b2, x, scale):
    return (gelu(x @ w1.T) @ w2.T + b2) * scale


def e4m3_exact(t):
    """t rounded to e4m3 after scaling its largest magnitude to 448, and scaled back."""
    scale = t.abs().max() / 448
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def ref_attention(m, i, x, ids, doc, windows, W_q, W_k, W_v, W_o, ve=None, ve_gate=None,
                  v_extra=None, xsa=None, out_gate=None, dc=None):
    """One attention sublayer of the speedrun model on the normed input x (T, d)."""
    cfg = m.cfg
    T, d, H, hd = x.shape[0], cfg.model_dim, cfg.num_heads, cfg.head_dim
    qk = cfg.qk_head_dim or hd
    sc = m.scalars.detach()
    cos, sin = m.rotary.cos.float(), m.rotary.sin.float()   # the model's tables: rotary is tested apart
    if cfg.fp8_qkv:   # #344: x and the layer's rows [W_q; W_k; W_v] rounded to e4m3 at max / 448
        x = e4m3_exact(x)
        W_q, W_k, W_v = e4m3_exact(torch.cat([W_q, W_k, W_v])).split([H * qk, H * qk, d])
    q = (x @ (sc[2 * i] * W_q).T).reshape(T, H, qk)         # #344: Q and K narrower than V
    k = (x @ (sc[2 * i] * W_k).T).reshape(T, H, qk)
    v = (x @ (sc[2 * i] * W_v).T).reshape(T, H, hd).clone()
    q, k = ref_rmsnorm(q), ref_rmsnorm(k)
    paired = i in (0, 2, 5, 9)
    window = windows[1] if i in (3, 10) else windows[0]
    if ve is not None:
        for t in range(T):
            for h in range(H):
                v[t, h] += ve_gate[t, h] * ve[t, h]
    if v_extra is not None:
        v += v_extra.reshape(T, H, hd)
    qr, kr = torch.zeros_like(q), torch.zeros_like(k)
    for t in range(T):
        for h in range(H):
            p = 2 * t + h % 2 if paired else t
            for n in range(0, qk, 2):   # pairs (n, n+1) turn; the table's odd sines are negated
                qr[t, h, n] = cos[p, n] * q[t, h, n] + sin[p, n] * q[t, h, n + 1]
                qr[t, h, n + 1] = cos[p, n + 1] * q[t, h, n + 1] + sin[p, n + 1] * q[t, h, n]
                kr[t, h, n] = cos[p, n] * k[t, h, n] + sin[p, n] * k[t, h, n + 1]
                kr[t, h, n + 1] = cos[p, n + 1] * k[t, h, n + 1] + sin[p, n + 1] * k[t, h, n]
    if i in (3, 10):   # key offset
        shifted = kr.clone()
        shifted[1:, :, qk // 2:] = kr[:-1, :, qk // 2:]
        kr = shifted
    y = torch.zeros(T, H, hd)
    if paired:
        half = H // 2
        for j in range(half):
            rows = [(t, j + r * half) for t in range(T) for r in (0, 1)]
            out = ref_attention_rows(torch.stack([qr[t, h] for t, h in rows]),
                                     torch.stack([kr[t, h] for t, h in rows]),
                                     torch.stack([v[t, h] for t, h in rows]),
                                     [doc[t] for t, _ in rows], window, 0.1)
            for n, (t, h) in enumerate(rows):
                y[t, h] = out[n]
    else:
        for h in range(H):
            y[:, h] = ref_attention_rows(qr[:, h], kr[:, h], v[:, h], doc, window, 0.1)
    if xsa is not None:
        for t in range(T):
            for h in range(H):
                y[t, h] -= torch.tanh(xsa[t, h]) * (y[t, h] @ v[t, h]) / (v[t, h] @ v[t, h]) * v[t, h]
    if dc is not None:
        y += ref_dc_attention(qr, kr, v, doc, 0.1, dc[0], dc[1], 112).float()
    if out_gate is not None:
        y = y * out_gate[:, :, None]
    return y.reshape(T, d) @ (sc[2 * i + 1] * W_o).T


def ref_speedrun_hidden(m, ids, cu_seqlens, bg, windows):
    """Records #77-#89 and #344 as their descriptions state them, on the tiny model."""
    cfg = m.cfg
    T, d, H, hd, V = ids.numel(), cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    sc = m.scalars.detach()
    doc = [int((cu_seqlens <= t).sum()) for t in range(T)]
    E = m.embed.detach()
    e = E[ids].clone()
    for t in range(T - 1, 0, -1):
        g = torch.sigmoid(m.smear_gate.detach()[0] @ E[ids[t]][:12])
        e[t] = E[ids[t]] + sc[22] * g * E[ids[t - 1]]
    x0 = ref_rmsnorm(e)
    # #83: the bigram row times the sign row of (previous id XOR id) mod 8192, row 0 first
    sign_rows = [0] + [(int(ids[t - 1]) ^ int(ids[t])) % 8192 for t in range(1, T)]
    b = m.bigram_embed.detach()[bg] * m.bigram_signs[sign_rows]
    ve_table = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}
    ve_all = [m.value_embeds.detach()[n * V + ids] for n in range(5)]
    # #80: per layer slot j, Q head-pair blocks Hj..Hj+H/2-1, then K's, in qk_bank; V, O in vo_bank
    qk, vo = m.qk_bank.detach(), m.vo_bank.detach()
    pairs = H // 2
    slot = {i: (i if i < 6 else i - 1) for i in range(11) if i != 6}

    def weights(i):
        j = slot[i]
        base = 2 * pairs * j
        W_q = torch.cat([qk[base + p] for p in range(pairs)])
        W_k = torch.cat([qk[base + pairs + p] for p in range(pairs)])
        return W_q, W_k, vo[2 * j], vo[2 * j + 1]

    def static_ve_gate(i, x, ve):
        G = m.ve_gate_bank.detach()[ve_table[i]]
        inputs = x[:, :12] if i in (0, 2, 5, 9) else torch.cat([x[:, :6], ve[:, :6]], 1)
        return 2 * torch.sigmoid(inputs @ G.T)

    def e4m3_at(t, scale):   # #89: rounded to e4m3 at a given scale, clipped to +-448
        return (t * (1 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    def mlp(i, x):
        if cfg.mlp == "pairwise":   # every product h_a h_b, a <= b, of the r ReLU features
            h = torch.relu(x @ m.pairwise_u_bank.detach()[i].T)
            r = h.shape[1]
            q = torch.stack([h[:, a] * h[:, b] for a in range(r) for b in range(a, r)], 1)
            return q @ m.pairwise_w_bank.detach()[i]
        W1, W2 = m.mlp_bank.detach()[i]
        if cfg.fp8_mlp_up:
            x, W1 = e4m3_exact(x), e4m3_exact(W1)   # #84
        post = torch.relu(x @ W1.T) ** 2
        if cfg.fp8_mlp_down:   # a fresh model: post at scale 1, W2 at its exact max / 448
            post, W2 = e4m3_at(post, 1.0), e4m3_exact(W2)
        return post @ W2

    # #85: gates from x0 (pre) and from the stream entering layer 4 (post)
    gw1, gw2, gb2, gs = (m.gate_w1.detach(), m.gate_w2.detach(), m.gate_b2.detach(),
                         m.gate_scales.detach())
    n_pre = 3 * H + 8
    pre = coefficients(gw1[0], gw2[:n_pre], gb2[:n_pre], x0, gs[0])
    xsa = {1: pre[:, 0:H], 3: pre[:, H:2 * H]}
    out_gate = {3: pre[:, 2 * H:3 * H]}
    x0_w = {layer: pre[:, 3 * H + n] for n, layer in enumerate((0, 1, 2, 3))}
    b_w = {layer: pre[:, 3 * H + 4 + n] for n, layer in enumerate((0, 1, 2, 3))}
    # #81: MUDD coefficients
    mw1, mw2, mb2 = m.mudd_w1.detach(), m.mudd_w2.detach(), m.mudd_b2.detach()
    R, P = bf(m.resid_lambdas.detach()), bf(m.post_lambdas.detach())

    x = x0 + b_w[0][:, None] * b
    h0 = x.clone()
    h3 = h7 = h9 = None
    for i in range(11):
        r_a, p_a, r_m, p_m = R[i, 0], P[i, 0], R[i, 1], P[i, 1]
        ve_gate = v_extra = None
        if i == 4:
            post = coefficients(gw1[1], gw2[n_pre:], gb2[n_pre:], x, gs[1])
            xsa[4], xsa[7] = post[:, 0:H], post[:, H:2 * H]
            out_gate[10] = post[:, 2 * H:3 * H]
            for n, layer in enumerate((4, 5, 7, 8, 9)):
                x0_w[layer] = post[:, 3 * H + n]
                b_w[layer] = post[:, 3 * H + 5 + n]
            skip_g = post[:, 3 * H + 10]
            dc = (post[:, 3 * H + 11:4 * H + 11], post[:, 4 * H + 11:5 * H + 11])
        x0_term, inj_x0, b_term = x0_w.get(i), x0, b_w.get(i)
        if i == 10:   # MUDD block 0 on h9
            h9 = x.clone()
            c = coefficients(mw1[0], mw2[:14], mb2[:14], x, 0.1)
            v_extra = c[:, 0:1] * h0 + c[:, 1:2] * h7 + c[:, 2:3] * h9
            x = (1 + c[:, 5:6]) * x + c[:, 3:4] * h0 + c[:, 4:5] * h7
            ve_gate = torch.stack([c[:, 6]] * (H // 2) + [c[:, 7]] * (H // 2), 1)
            r_a, p_a, r_m, p_m = c[:, 8:9], c[:, 9:10], c[:, 12:13], c[:, 13:14]
            x0_term, inj_x0, b_term = c[:, 10], h0, c[:, 11]
        if i == 6:
            x = x + (torch.sigmoid(sc[24]) * skip_g)[:, None] * h3
            x = r_m * x + p_m * mlp(6, ref_rmsnorm(x))
            continue
        a_in = ref_rmsnorm(h7) if i >= 8 else ref_rmsnorm(x)
        ve = ve_all[ve_table[i]].reshape(T, H, hd) if i in ve_table else None
        if ve is not None and ve_gate is None:
            ve_gate = static_ve_gate(i, a_in, ve.reshape(T, d))
        a = ref_attention(m, i, a_in, ids, doc, windows, *weights(i), ve=ve, ve_gate=ve_gate,
                          v_extra=v_extra, xsa=xsa.get(i), out_gate=out_gate.get(i),
                          dc=dc if i == 10 else None)
        x = r_a * x + p_a * a + x0_term[:, None] * inj_x0 + (b_term[:, None] * b if i > 0 else 0)
        x = r_m * x + p_m * mlp(i, ref_rmsnorm(x))
        if i == 3:
            h3 = x.clone()
        if i == 7:
            h7 = x.clone()
    c = coefficients(mw1[1], mw2[14:], mb2[14:], x, 0.1)
    x = x + c[:, 0:1] * h0 + c[:, 1:2] * h7 + c[:, 2:3] * h9 + c[:, 3:4] * ve_all[0] + c[:, 4:5] * h3
    return ref_rmsnorm(x)


@pytest.mark.parametrize("mlp", ["relu2", "pairwise"])
def test_speedrun_forward_matches_direct_restatement(mlp):
    # seed 5: no activation lies within fp32 noise of an e4m3 rounding midpoint, where the model and
    # the restatement could round apart (at seed 4 one of the FP8 QKV's inputs does, by 2e-7)
    torch.manual_seed(5)
    T = 20
    m = random_model(T=T, cfg=tg.Hyperparameters(**{**tg.SPEEDRUN, **SPEEDRUN_TINY_SIZES, "mlp": mlp,
                                                    "pairwise_rank": 6,
                                                    "fp8_mlp_up": mlp == "relu2",
                                                    "fp8_mlp_down": mlp == "relu2",
                                                    "fp8_mlp_backward": mlp == "relu2"}))
    with torch.no_grad():   # coefficients of order one, so that every term they weigh shows
        for p in (m.mudd_b2, m.gate_b2):
            p.normal_(0, 5)
        for p in (m.mudd_w2, m.gate_w2):
            p.normal_(0, 0.3)
        m.bigram_embed.normal_(0, 0.5)
    ids, cu = random_tokens(T, n_docs=3)
    bg = ref_bigram(ids, SPEEDRUN_TINY.bigram_vocab_size)
    rows = m.lookup(ids, bg)
    rows = rows._replace(bigram_embed=rows.bigram_embed * m.bigram_sign_rows(ids))
    h = m.final_hidden(rows, cu, (5, 13), max_seqlen=T)
    h_ref = ref_speedrun_hidden(m, ids, cu, bg, (5, 13))
    err = (h - h_ref).norm() / h_ref.norm()
    assert err < 1e-4, err


@pytest.mark.skipif(not (tg.triton_kernels.INTERPRET or torch.cuda.is_available()),
                    reason="the kernel needs CUDA or TRITON_INTERPRET=1")
def test_speedrun_forward_with_the_dc_attention_kernel():
    torch.manual_seed(5)
    T = 40
    # the training dtypes: bf16 activations. Without #89's e4m3 post: at a fresh model's scale
    # (1.0, coarse for this tiny model's post) it turns the two paths' last-bit differences into
    # rounding flips that outweigh what is compared here; and without #344's e4m3 QKV, whose
    # different inputs to layer 10 bring this seed's flips near the bound
    m = bf16_model(T, dataclasses.replace(SPEEDRUN_TINY, fp8_mlp_down=False,
                                          fp8_mlp_backward=False, fp8_qkv=False))
    with torch.no_grad():
        m.gate_b2.normal_(0, 2)
        pre, post = m.gate_layouts
        names = post.names
        start = pre.size + sum(post.widths[:names.index("dc_w2")])
        m.gate_b2[start:start + post.widths[names.index("dc_w2")]] = 200.0   # w2 = 20: the term outweighs bf16 noise
    ids, cu = random_tokens(T, n_docs=3)
    rows = m.lookup(ids, ref_bigram(ids, SPEEDRUN_TINY.bigram_vocab_size))
    h_torch = m.final_hidden(rows, cu, (5, 13), max_seqlen=T)
    m.paths = tg.Paths(dc_attention="triton")
    h_kernel = m.final_hidden(rows, cu, (5, 13), max_seqlen=T)
    m.cfg = dataclasses.replace(m.cfg, dc_attention=False)
    h_without = m.final_hidden(rows, cu, (5, 13), max_seqlen=T)
    effect = (h_torch.double() - h_without.double()).norm()
    err = (h_kernel.double() - h_torch.double()).norm()
    assert 0 < err < 0.05 * effect, (err, effect)    # not the same code, the same math


def test_speedrun_model_parameters_start_as_the_records_state():
    torch.manual_seed(0)
    m = tg.GPT(SPEEDRUN_TINY, world_size=8, max_positions=8)
    assert m.post_lambdas.shape == (11, 2) and m.post_lambdas.eq(1).all()       # #77
    H = SPEEDRUN_TINY.num_heads
    assert m.qk_bank.shape == (tg.padded_count(10 * H, 8), 2 * 24, 64)          # #80, #344
    assert m.qk_bank[10 * H:].abs().max() == 0 and m.vo_bank[20:].abs().max() == 0
    assert m.mudd_w2.abs().max() == 0 and m.gate_w2.abs().max() == 0            # #81, #85
    mudd = (m.mudd_b2 * tg.MUDD_SCALE).tolist()   # the static values they replace
    assert mudd[6:14] == pytest.approx([2, 2, math.sqrt(1.1), 1, 0, 0.05, math.sqrt(1.1), 1])
    assert mudd[14:] == pytest.approx([0, -0.5, 0, 0, 0])                    # block 1: old backout
    gates = (m.gate_b2 * 0.1).tolist()
    assert gates[2 * H:3 * H] == pytest.approx([0.25] * H)                      # out gate of layer 3
    assert gates[3 * H + 4:3 * H + 8] == pytest.approx([0.05] * 4)              # bigram 0-3
    assert m.bigram_signs.abs().eq(1).all() and m.bigram_signs.shape == (8192, 64)
    other = tg.GPT(SPEEDRUN_TINY, world_size=8, max_positions=8)
    assert torch.equal(m.bigram_signs, other.bigram_signs)   # the same on every rank
    assert sorted(name for name, _ in m.named_parameters()) == sorted(tg.param_labels(SPEEDRUN_TINY))


def test_bigram_sign_rows():
    m = tg.GPT(SPEEDRUN_TINY, world_size=1, max_positions=8)
    ids = torch.tensor([5, 9000, 7, 7, 8191], dtype=torch.int32)
    rows = m.bigram_sign_rows(ids)
    for t, row in enumerate([0, (5 ^ 9000) % 8192, (9000 ^ 7) % 8192, 0, (7 ^ 8191) % 8192]):
        assert torch.equal(rows[t], m.bigram_signs[row])


# =================================================================================================
# Switches: each turns off alone, all off is record #74, contradictions fail
# =================================================================================================

SWITCH_OFF = {field: tg.Hyperparameters.__dataclass_fields__[field].default
              for change in tg.RECORD_CHANGES for field in change.on}
# the smoke presets set their own sizes and schedule
SMOKE_SWITCH_OFF = {field: value for field, value in SWITCH_OFF.items() if field not in tg.SMOKE}


@pytest.mark.parametrize("change", tg.RECORD_CHANGES, ids=lambda c: f"{c.record}:{next(iter(c.on))}")
def test_every_change_turns_off_alone(change):
    """The speedrun with one change off (and the changes built on it) still builds and trains.
    Switches in no preset (experiments) are off in the speedrun already."""
    off = {field: SWITCH_OFF[field] for field in change.on}
    while dependants := [switch for switch, needs in tg.SWITCH_REQUIRES.items()
                         if switch in SWITCH_OFF and switch not in off
                         and any(field in needs for field in off)]:
        off.update({switch: SWITCH_OFF[switch] for switch in dependants})
    cfg = tg.Hyperparameters(**{**tg.SPEEDRUN, **SPEEDRUN_TINY_SIZES, **off})
    torch.manual_seed(0)
    m = tg.GPT(cfg, world_size=1, max_positions=64)
    assert sorted(name for name, _ in m.named_parameters()) == sorted(tg.param_labels(cfg))
    T = 16
    ids, cu = random_tokens(T, n_docs=2)
    loss = m(ids, torch.randint(0, 200, (T,)), cu, ref_bigram(ids, cfg.bigram_vocab_size),
             torch.tensor([1.0, 0.5]), (4, 8), T,
             prefix_weight=torch.tensor([0.25]) if cfg.prefix_loss_weight > 0 else None)
    loss.backward()
    assert math.isfinite(loss.item())



def test_speedrun_is_record74_plus_the_changes():
    paths_off = {field: tg.Hyperparameters.__dataclass_fields__[field].default
                 for field in {**tg.SPEEDRUN_PATHS, **tg.SPEEDRUN_STARTUP}}
    assert set(tg.SPEEDRUN_PATHS) <= tg.RUN_ONLY_FIELDS     # paths never change the math
    everything_off = tg.Hyperparameters(**{**tg.PRESETS["speedrun"], **SWITCH_OFF, **paths_off})
    assert everything_off == tg.Hyperparameters(**tg.PRESETS["record74"])
    smoke_off = tg.Hyperparameters(**{**tg.PRESETS["smoke"], **SMOKE_SWITCH_OFF})
    assert smoke_off == tg.Hyperparameters(**tg.PRESETS["smoke_record74"])


def test_contradictory_switches_fail_in_one_line():
    with pytest.raises(SystemExit) as e:
        tg.parse_config(["--mudd_gates=true", "--preset=record74", "--mudd=true", "--xsa=true"])
    assert str(e.value) == ("--mudd=true needs --single_stream=true (mudd is built on "
                            "single_stream)")
    with pytest.raises(SystemExit, match="dc_attention=true needs --mudd_gates=true"):
        tg.parse_config(["--mudd_gates=false"])
    with pytest.raises(SystemExit) as e:    # #89's FP8 post comes from #84's kernel
        tg.parse_config(["--fp8_mlp_down=true", "--fp8_mlp_up=false"])
    assert str(e.value) == ("--fp8_mlp_down=true needs --fp8_mlp_up=true (fp8_mlp_down is "
                            "built on fp8_mlp_up)")
    with pytest.raises(SystemExit) as e:    # #344's FP8 backward reads #89's weight copies
        tg.parse_config(["--fp8_mlp_down=false"])
    assert str(e.value) == ("--fp8_mlp_backward=true needs --fp8_mlp_down=true (fp8_mlp_backward "
                            "is built on fp8_mlp_up and fp8_mlp_down)")
    with pytest.raises(SystemExit) as e:
        tg.parse_config(["--preset=record74", "--fp8_mlp_backward=true"])
    assert str(e.value) == ("--fp8_mlp_backward=true needs --fp8_mlp_up=true --fp8_mlp_down=true "
                            "(fp8_mlp_backward is built on fp8_mlp_up and fp8_mlp_down)")
    with pytest.raises(SystemExit) as e:    # its scale bounds the FP8 backward's d_pre
        tg.parse_config(["--fp8_mlp_backward=false", "--fp8_mlp_grad_bound=true"])
    assert str(e.value) == ("--fp8_mlp_grad_bound=true needs --fp8_mlp_backward=true "
                            "(fp8_mlp_grad_bound is built on fp8_mlp_backward)")


def test_speedrun_schedule():
    s = tg.Schedule(tg.Hyperparameters(**tg.PRESETS["speedrun"]))
    assert s.stage_ends == [423, 847, 1270, 1270 + 30] and s.split_step == 847
    assert s.cooldown_start == 508
    assert [s.prefix_weight(step) for step in (0, 422)] == [0.25, 0.25]
    assert s.prefix_weight(423) == pytest.approx(0.25) and s.prefix_weight(847) == 0.0
    assert s.prefix_weight(635) == pytest.approx(0.25 * (1 - 212 / 424))
    assert s.at(1299).prefix_weight == 0.0


def test_tight_cu_seqlens():
    assert [tg.cu_seqlens_length(T, tight=True) for T in (16384, 32768, 49152)] == [64, 96, 128]
    assert [tg.cu_seqlens_length(T) for T in (16384, 32768, 49152)] == [128, 128, 256]
    assert tg.cu_seqlens_length(1000, tight=True) == tg.cu_seqlens_length(1000) == 128


# =================================================================================================
# Prefix-token loss (#88) and validation mask (#350)
# =================================================================================================

def test_prefix_token_table_against_brute_force():
    vocabulary = {b"a": 0, b"b": 1, b"ab": 2, b"abc": 3, b"abd": 4, b"ba": 5, b"abcde": 6, b"x": 7,
                  b"ac": 8}
    table = tg.prefix_token_table(vocabulary, 10)
    for token, t in vocabulary.items():
        prefixes = [other for other in vocabulary if token.startswith(other) and other != token]
        want = vocabulary[max(prefixes, key=len)] if prefixes else -1
        assert table[t] == want, token
    assert table[9] == -1   # an id outside the vocabulary (padding)


@needs_tokenizer
def test_prefix_token_table_of_gpt2():
    vocabulary = tg.gpt2_vocabulary()
    table = tg.prefix_token_table(vocabulary, 50304)
    assert table[vocabulary[b" hello"]] == vocabulary[b" hell"]
    assert table[vocabulary[b"a"]] == -1 and table[50256] == -1   # single bytes, the separator


TEXT = ("The committee's report, published on 12 March 2019, didn't address the budget. "
        "Researchers at the university said they'd examine 3,400 samples -- about 15% more than "
        "last year's total.\n\nIn the meantime, officials haven't commented.   Several residents, "
        "however, told reporters: \"We're worried about what's coming next!\" Café owners agreed.\n"
        "Prices rose from $4.99 to $5.49 (an increase of ~10%), and the line at 5:30pm was long. "
        "@user123 wrote #hashtags, e-mails and URLs like https://example.com/path?x=1&y=2 too.")


@needs_tokenizer
def test_val_mask_never_masks_what_the_tokenizer_produces():
    import tiktoken
    tokens = tiktoken.get_encoding("gpt2").encode_ordinary(TEXT)
    masked = {tuple(pair) for pair in tg.val_mask_pairs(tg.gpt2_vocabulary()).tolist()}
    assert len(masked) > 10_000
    produced = set(zip(tokens[:-1], tokens[1:]))
    assert not produced & masked


@needs_tokenizer
def test_val_mask_masks_pairs_the_tokenizer_cannot_produce():
    vocabulary = tg.gpt2_vocabulary()
    masked = {tuple(pair) for pair in tg.val_mask_pairs(vocabulary).tolist()}
    v = vocabulary
    # a lone space before a word: the space always opens the word's chunk, and " the" is a token
    assert (v[b" "], v[b"the"]) in masked
    # digits stay in one chunk, and "12" is a token
    assert (v[b"1"], v[b"2"]) in masked
    # letters stay in one chunk, and "hello" is a token
    assert (v[b"hel"], v[b"lo"]) in masked
    # but not after a contraction chunk, which may end between two letters ("'s" + "ome")
    assert (v[b"'s"], v[b"ome"]) not in masked
    # nor across a possible chunk border: a letter then a digit
    assert (v[b"a"], v[b"1"]) not in masked


@needs_tokenizer
def test_val_mask_cache_is_written_once_and_keyed(tmp_path):
    lines = []
    first = tg.load_val_mask_pairs(str(tmp_path), lines.append)
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith(f"val_mask_gpt2_v{tg.VAL_MASK_VERSION}_") and "built" in lines[0]
    second = tg.load_val_mask_pairs(str(tmp_path), lines.append)
    assert "read from" in lines[1] and np.array_equal(first, second)


def test_packed_mask_rows_unpack_to_the_pairs():
    pairs = np.array([[0, 0], [0, 9], [3, 15], [3, 7]], dtype=np.int32)
    table = torch.from_numpy(tg.packed_mask_table(pairs, 16))
    dense = tg.unpack_mask_rows(table)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[pairs[:, 0], pairs[:, 1]] = True
    assert torch.equal(dense, want)


def test_masked_validation_loss():
    """Masked columns get the fixed soft-capped logit -60 before the cross-entropy."""
    torch.manual_seed(5)
    T = 16
    m = random_model(T=T, cfg=SPEEDRUN_TINY)
    ids, cu = random_tokens(T)
    targets = torch.randint(0, 200, (T,))
    pairs = np.array([[int(ids[t]), c] for t in range(0, T, 3) for c in (int(targets[t]) ^ 1, 7)])
    bits = torch.from_numpy(tg.packed_mask_table(pairs, 256))[ids]
    bg = ref_bigram(ids, SPEEDRUN_TINY.bigram_vocab_size)
    plain, masked = m(ids, targets, cu, bg, None, (5, 13), T, val_mask_bits=bits)
    rows = m.lookup(ids, bg)
    rows = rows._replace(bigram_embed=rows.bigram_embed * m.bigram_sign_rows(ids))
    z = 23 * torch.sigmoid((m.final_hidden(rows, cu, (5, 13), T) @ m.lm_head + 5) / 7.5)
    want_plain = (torch.logsumexp(z, 1) - z[torch.arange(T), targets]).mean()
    for a, c in pairs:
        z[ids == a, c] = -60.0
    want_masked = (torch.logsumexp(z, 1) - z[torch.arange(T), targets]).mean()
    assert plain.item() == pytest.approx(want_plain.item(), rel=1e-5)
    assert masked.item() == pytest.approx(want_masked.item(), rel=1e-5)
    assert masked.item() < plain.item()


def test_prefix_loss_joins_the_training_loss():
    torch.manual_seed(6)
    T = 16
    m = random_model(T=T, cfg=SPEEDRUN_TINY)
    m.prefix_table.copy_(torch.randint(-1, 200, (256,)))
    ids, cu = random_tokens(T)
    targets = torch.randint(0, 200, (T,))
    bg = ref_bigram(ids, SPEEDRUN_TINY.bigram_vocab_size)
    w = torch.tensor([1.0, 0.5])
    with_prefix = m(ids, targets, cu, bg, w, (5, 13), T, 1.0, prefix_weight=torch.tensor([0.25]))
    without = m(ids, targets, cu, bg, w, (5, 13), T, 1.0, prefix_weight=torch.tensor([0.0]))
    rows = m.lookup(ids, bg)
    rows = rows._replace(bigram_embed=rows.bigram_embed * m.bigram_sign_rows(ids))
    z = (23 * torch.sigmoid((m.final_hidden(rows, cu, (5, 13), T) @ m.lm_head + 5) / 7.5)).double()
    lse = torch.logsumexp(z, 1)
    prefix = m.prefix_table[targets]
    term = sum(0.25 * (lse[t] - z[t, prefix[t]]) for t in range(T) if prefix[t] >= 0)
    assert (with_prefix - without).item() == pytest.approx(term.item(), rel=1e-3)


# =================================================================================================
# Whole steps: record #74 kept exactly
# =================================================================================================

def train_steps(cfg, steps=3):
    """A few CPU training steps of the Trainer on the corpus: losses and final parameters."""
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"),
                 grad_accum_steps=cfg.micro_batches_per_step)
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    losses = [trainer.train_step(step, trainer.advance(step)).item() for step in range(steps)]
    return losses, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


TINY_FILES = dict(train_files=f"{CORPUS}/corpus_train_*.bin", val_files=f"{CORPUS}/corpus_val_*.bin",
                  model_dim=32, head_dim=16, mlp_hidden=64)
# the smoke preset on that model: Q/K 3/4 of its heads, as the preset's 24 of 32
TINY_SMOKE = {**tg.PRESETS["smoke"], **TINY_FILES, "qk_head_dim": 12}
# Half the smoke preset's tokens a step, in two micro-batches of 256 rather than four of 256: for
# the tests of whole runs, whose CPU time is mostly the 50,304-column loss. Every step still runs
# its graphs on a second batch (and FP8 slot).
HALF_BATCHES = dict(micro_batches_per_step=2, stages=tuple(
    stage._replace(batch_tokens=stage.batch_tokens // 2)
    for stage in tg.PRESETS["smoke"]["stages"]))


@pytest.fixture(scope="module")
def record74_steps():
    """The record #74 smoke preset's three train_steps on the tiny model (losses, parameters),
    computed once for the two tests below; neither changes them."""
    return train_steps(tg.Hyperparameters(**{**tg.PRESETS["smoke_record74"], **TINY_FILES}))


@needs_corpus
@needs_tokenizer
def test_every_switch_off_reproduces_record74_bit_for_bit(record74_steps):
    switched_off = tg.Hyperparameters(**{**TINY_SMOKE, **SMOKE_SWITCH_OFF})
    losses_a, params_a = record74_steps
    losses_b, params_b = train_steps(switched_off)
    assert losses_a == losses_b
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    speedrun_losses, _ = train_steps(tg.Hyperparameters(**TINY_SMOKE))
    assert speedrun_losses != losses_a


# Train losses of these three steps from the record #74 trainer as it was before the later records
# came in (commit 3dfa78e), on this CPU configuration; rounded as the log prints them. CPUs differ
# in their float kernels' summation order: AMD EPYC machines gave 10.4892 and 10.4893 for the third
# step with the same code, so the tolerance is 2e-3 (the speedrun preset's third loss differs by
# 0.28).
RECORD74_PINNED_LOSSES = [10.7988, 10.8001, 10.4888]


@needs_corpus
@needs_tokenizer
def test_record74_trains_as_before_the_later_records(record74_steps):
    losses, _ = record74_steps
    assert [round(loss, 4) for loss in losses] == pytest.approx(RECORD74_PINNED_LOSSES, abs=2e-3)


# =================================================================================================
# #89: the delayed scales of the FP8 down-projection
# =================================================================================================

def test_fp8_weight_scales_bootstrap_then_follow_the_previous_max():
    """The start and the first 16 optimizer steps quantise c_proj at its exact max / 448, later
    ones at 1.12 x the max of the quantisation before / 448, saturating what outgrew that."""
    scales = tg.FP8DelayedScales(slots=4, hidden=32, d=16, compile_quantize=False)
    torch.manual_seed(0)
    base = torch.randn(11, 32, 16)
    previous_max = None
    for n in range(21):    # n = 0: the start; then after optimizer step n
        growth = 1 + 0.01 * n + (1.0 if n == 19 else 0.0)   # a jump past the margin at 19
        c_proj = (base * growth).bfloat16()
        scales.quantize_weights(c_proj)
        current_max = c_proj.double().abs().amax(dim=(1, 2))
        want = current_max / 448 if n <= 16 else previous_max * 1.12 / 448
        assert torch.allclose(scales.weight_scales.double(), want, rtol=1e-6, atol=0), n
        ratio = c_proj.double().mT / scales.weight_scales.double()[:, None, None]
        want_e4m3 = e4m3_at(c_proj.mT, scales.weight_scales)
        assert torch.equal(scales.weight_e4m3.view(torch.uint8), want_e4m3), n
        assert (ratio.abs().max() > 449) == (n == 19), n    # only the jump saturates
        previous_max = current_max
    assert scales.quantizations.item() == 21


def e4m3_at(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale (per matrix, (L,)) in e4m3 as raw bits: t times the fp32 reciprocal of the
    scale, the product rounded to fp32 (it is exact in fp64), then to e4m3, saturating at 448."""
    inv_scale = (1 / scale.float()).double()[:, None, None]
    return (t.double() * inv_scale).float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


def test_fp8_backward_quantises_c_fc_in_both_layouts_at_delayed_scales():
    """--fp8_mlp_backward: c_fc follows c_proj's rule (exact max / 448 at the start and after the
    first 16 optimizer steps, then 1.12 x the previous max / 448), into c_fc_e4m3 and its
    transpose; c_proj's row-major copy is the transpose of #89's, at the same scale."""
    scales = tg.FP8DelayedScales(slots=4, hidden=32, d=16, compile_quantize=False, backward=True)
    torch.manual_seed(1)
    base_fc, base_proj = torch.randn(11, 32, 16), torch.randn(11, 32, 16)
    previous_max = None
    for n in range(21):
        growth = 1 + 0.01 * n + (1.0 if n == 19 else 0.0)
        c_fc, c_proj = (base_fc * growth).bfloat16(), (base_proj * (2 - 0.01 * n)).bfloat16()
        scales.quantize_weights(c_proj, c_fc)
        current_max = c_fc.double().abs().amax(dim=(1, 2))
        want = current_max / 448 if n <= 16 else previous_max * 1.12 / 448
        assert torch.allclose(scales.c_fc_scales.double(), want, rtol=1e-6, atol=0), n
        q = e4m3_at(c_fc, scales.c_fc_scales)
        assert torch.equal(scales.c_fc_e4m3.view(torch.uint8), q), n
        assert torch.equal(scales.c_fc_e4m3_t.view(torch.uint8), q.mT), n
        assert torch.equal(scales.c_proj_e4m3.view(torch.uint8), e4m3_at(c_proj, scales.weight_scales))
        assert torch.equal(scales.c_proj_e4m3.mT.view(torch.uint8), scales.weight_e4m3.view(torch.uint8))
        previous_max = current_max
    assert scales.c_fc_e4m3_t.is_contiguous() and scales.weight_e4m3.is_contiguous()
    with pytest.raises(ValueError, match="c_fc must be given exactly when backward=True"):
        scales.quantize_weights(c_proj)


@needs_corpus
@needs_tokenizer
def test_fp8_weights_are_quantised_once_per_optimizer_update(monkeypatch):
    """--fp8_mlp_backward (the smoke preset): c_fc and c_proj are quantised at the start and
    once after each optimizer step, not in every forward (4 micro-batches per step here); every
    forward of a step reads the copies made from the weights the step started with."""
    quantized, seen = [], []
    quantize = tg.FP8DelayedScales.quantize_weights
    reference = tg.triton_kernels.linear_relu_square_fp8_backward_reference

    def counting(self, c_proj, c_fc=None):
        quantized.append(torch.stack([c_fc, c_proj], 1).clone())
        quantize(self, c_proj, c_fc)

    def recording(x, W1, W2, weights, *args, **kwargs):
        seen.append([weights.W1_8.view(torch.uint8).clone(), weights.W2_8.view(torch.uint8).clone(),
                     weights.W1_8t.view(torch.uint8).clone(), weights.W2_8t.view(torch.uint8).clone()])
        return reference(x, W1, W2, weights, *args, **kwargs)

    monkeypatch.setattr(tg.FP8DelayedScales, "quantize_weights", counting)
    monkeypatch.setattr(tg.triton_kernels, "linear_relu_square_fp8_backward_reference", recording)
    cfg = tg.Hyperparameters(**TINY_SMOKE)
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=4)
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    assert len(quantized) == 1                   # at the start
    L, bank = tg.NUM_LAYERS, trainer.model.mlp_bank
    for step in range(2):
        start = bank[:L].detach().clone()
        assert torch.equal(quantized[-1], start)  # the copies follow the weights
        seen.clear()
        trainer.train_step(step, trainer.advance(step))
        assert len(quantized) == step + 2        # one more, after the optimizer step
        assert not torch.equal(bank[:L], start)  # which changed the weights
        # the exact scales of the first steps: max / 448 per matrix, in fp32
        scale = (start.double().abs().amax(dim=(2, 3)) / 448).float().clamp_min(1e-30)  # c_proj: 0
        c_fc, c_proj = e4m3_at(start[:, 0], scale[:, 0]), e4m3_at(start[:, 1], scale[:, 1])
        assert len(seen) == 4 * L                # every micro-batch's forward of every layer
        for n, (W1_8, W2_8, W1_8t, W2_8t) in enumerate(seen):
            layer = n % L
            assert torch.equal(W1_8, c_fc[layer]) and torch.equal(W1_8t, c_fc[layer].T)
            assert torch.equal(W2_8, c_proj[layer]) and torch.equal(W2_8t, c_proj[layer].T)
    assert trainer.model.fp8_scales.quantizations.item() == 3


def restated_post_max(x: torch.Tensor, W1: torch.Tensor) -> float:
    """max of #84's post = bf16(relu(bf16(x8 W1_8^T sx sw))^2), x8 = e4m3(x / sx), sx = max|x| / 448
    (and W1 alike), in fp64 up to the roundings."""
    def e4m3(t):
        scale = t.double().abs().max() / 448
        return (t.double() / scale).float().to(torch.float8_e4m3fn).double() * scale
    pre = (e4m3(x) @ e4m3(W1).T).float().bfloat16().double()
    return torch.relu(pre).square().max().item()


@needs_corpus
@needs_tokenizer
@pytest.mark.parametrize("fp8_backward", [False, True], ids=["89", "344-backward"])
def test_fp8_activation_scales_per_slot(monkeypatch, fp8_backward):
    """Every micro-batch slot scales each layer's post by 1.80 x the max its own forward saw in the
    previous step / 448 (1.0 at the first step); evaluation takes the exact scale (None) and
    changes no slot's scale. The same with #344's FP8 backward, whose forward is #89's."""
    calls = []
    name = ("linear_relu_square_fp8_backward_reference" if fp8_backward
            else "linear_relu_square_fp8_reference")
    reference = getattr(tg.triton_kernels, name)
    signature = inspect.signature(reference)

    def recording(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        act_scale = arguments.get("act_scale")
        calls.append((None if act_scale is None else act_scale.item(),
                      restated_post_max(arguments["x"].detach(), arguments["W1"].detach())))
        return reference(*args, **kwargs)

    monkeypatch.setattr(tg.triton_kernels, name, recording)
    cfg = tg.Hyperparameters(**{**TINY_SMOKE, "fp8_mlp_backward": fp8_backward})
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=4)
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    for step in range(2):
        trainer.train_step(step, trainer.advance(step))
    L, slots = tg.NUM_LAYERS, 4
    (first, second), calls = [calls[:slots * L], calls[slots * L:]], []
    assert [scale for scale, _ in first] == [1.0] * (slots * L)
    for (scale, _), (_, seen) in zip(second, first):   # slot j's layer i, one step apart
        assert scale == pytest.approx(1.80 * seen / 448, rel=1e-2)
    state = trainer.model.fp8_scales.act_scales
    want = torch.tensor([seen for _, seen in second]).view(slots, L).T * 1.80 / 448
    assert torch.allclose(state.double(), want.double(), rtol=1e-2)
    assert len(set(state[0].tolist())) == slots    # the slots really saw different maxima
    before = state.clone()
    batch = next(iter(tg.val_batches(trainer.val_files, 1024, 1024, 0, 1, 4, run.device,
                                     cfg.bigram_vocab_size)))
    trainer.eval_forward(batch, trainer.schedule.windows(0))
    assert [scale for scale, _ in calls] == [None] * L and torch.equal(state, before)


# =================================================================================================
# The speedrun step under torch.compile
# =================================================================================================

def maskable_attention(q, k, v, cu_seqlens, window, scale):
    """Windowed causal attention within documents as one masked softmax over all rows: no
    per-document loop, so dynamo can trace it as flash attention is traced on a GPU."""
    positions = torch.arange(q.shape[0])
    document = torch.searchsorted(cu_seqlens, positions, right=True)
    delta = positions[:, None] - positions[None, :]
    mask = (delta >= 0) & (delta <= window) & (document[:, None] == document[None, :])
    q, k, v = (t.transpose(0, 1).float() for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.transpose(0, 1).to(torch.bfloat16)


@needs_corpus
@needs_tokenizer
@pytest.mark.parametrize("cuda_graphs,mode", [(False, None), (True, "reduce-overhead")])
def test_cuda_graphs_compile_the_model_in_reduce_overhead_mode(monkeypatch, cuda_graphs, mode):
    """--cuda_graphs asks torch.compile for CUDA graphs of the model (its "reduce-overhead"
    mode), and only of the model: the optimizer's functions run between the graphs."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append((fn, options)) or fn)
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=4)
    trainer = tg.Trainer(tg.Hyperparameters(**TINY_SMOKE), run, log=lambda line, console=True: None,
                         paths=tg.Paths(compile=True, cuda_graphs=cuda_graphs))
    modes = {fn is trainer.model: options.get("mode") for fn, options in calls}
    assert modes == {True: mode, False: None}
    # with CUDA graphs every trainable parameter copies its first gradient of a step
    hooked = {bool(p._backward_hooks) for p in trainer.model.parameters() if p.requires_grad}
    assert hooked == {cuda_graphs}


def test_the_first_gradient_of_a_step_is_copied_and_the_rest_added():
    """What autograd would keep as .grad is a copy; a later gradient passes as it is, since
    autograd adds it into .grad at once."""
    param = torch.zeros(3, requires_grad=True)
    incoming = torch.tensor([1.0, 2.0, 3.0])
    first = tg.owned_first_gradient(param, incoming)
    assert torch.equal(first, incoming) and first.data_ptr() != incoming.data_ptr()
    param.grad = first
    assert tg.owned_first_gradient(param, incoming) is incoming
    # as a hook in two backward passes: the gradients still add up
    param.grad = None
    param.register_hook(functools.partial(tg.owned_first_gradient, param))
    (param * torch.ones(3)).sum().backward()
    (param * 2).sum().backward()
    assert param.grad.tolist() == [3.0, 3.0, 3.0]


@needs_corpus
@needs_tokenizer
def test_validation_sums_each_batch_before_the_next_reuses_its_memory():
    """Under CUDA graphs every replay writes its output into the same memory: validation must
    take each batch's loss before running the next. Here every batch returns one buffer,
    overwritten with the batch's number (1, 2, ...): the mean is (n + 1) / 2, not n."""
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=4)
    trainer = tg.Trainer(tg.Hyperparameters(**TINY_SMOKE), run, log=lambda line, console=True: None)
    output = torch.zeros(2)
    calls = []

    def replay(batch, windows):
        calls.append(batch)
        return output.fill_(float(len(calls)))
    trainer.eval_forward = replay
    val_loss, masked = trainer.validate(trainer.schedule.windows(0))
    n = len(calls)
    assert n > 1
    assert val_loss == masked == pytest.approx((n + 1) / 2)


@pytest.mark.gpu
@needs_corpus
@needs_tokenizer
def test_cuda_graphs_train_like_the_compiled_model_on_gpu():
    """The smoke preset compiled, with and without CUDA graphs: the same losses (up to the
    atomic adds of the table gradients and of flash attention's backward, whose order varies)."""
    cfg = dict(tg.PRESETS["smoke"], train_files=f"{CORPUS}/corpus_train_*.bin",
               val_files=f"{CORPUS}/corpus_val_*.bin", compile=True)
    run = tg.Run(rank=0, world_size=1, device=torch.device("cuda"), grad_accum_steps=4)
    losses = {}
    for cuda_graphs in (False, True):
        trainer = tg.Trainer(tg.Hyperparameters(**cfg, cuda_graphs=cuda_graphs), run,
                             log=lambda line, console=True: None)
        assert trainer.paths.cuda_graphs == cuda_graphs
        losses[cuda_graphs] = [trainer.train_step(step, trainer.advance(step)).item()
                               for step in range(4)]
    assert losses[True] == pytest.approx(losses[False], abs=2e-3)


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs counted from zero: none left over from another test, none left behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def warmed_up_on_cpu(cfg, monkeypatch):
    """A Trainer of cfg on the CPU compiled by dynamo with the aot_eager backend (no code
    generation, so a CPU will do), warmed up; by step, the graphs each warm-up step compiled,
    and its seconds in all, compiling and tracing as the log reports them. The caller patches the
    dense attention to maskable_attention, which dynamo can trace."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(
        fn, **{**options, "backend": "aot_eager"}))
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"),
                 grad_accum_steps=cfg.micro_batches_per_step)
    lines = []
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: lines.append(line),
                         paths=tg.Paths(compile=True))
    trainer.warmup(cfg.num_train_steps)
    graphs, seconds = {}, {}
    for name, total in run.startup.phases.items():
        if name.startswith("warm-up step"):
            step = int(name.split()[2])
            graphs[step] = int(name.split(", ")[1].split()[0])
            (line,) = [line for line in lines if line.startswith(f"warm-up step {step}: ")]
            compiling, tracing, inductor, rest = map(float, re.match(
                r".*: compiling ([\d.]+)s \(tracing ([\d.]+)s, inductor ([\d.]+)s, "
                r"rest (-?[\d.]+)s\)", line).groups())
            assert inductor == 0 and rest >= 0                  # aot_eager: no inductor
            assert line.endswith("; inductor per graph (s): none"), line
            seconds[step] = dict(total=total, compiling=compiling, tracing=tracing)
    return trainer, graphs, seconds


# The compiled runs: three stages of two steps and an extension of two, eight steps, at half
# batches; validation batches of 2048 tokens, 1024 a micro-batch. The speedrun's symbolic windows,
# whose YaRN factor scales the queries (as --dynamic_stages does) rather than the scores.
COMPILED_TINY = tg.Hyperparameters(**{**TINY_SMOKE, **HALF_BATCHES, "num_scheduled_iterations": 6,
                                      "num_extension_iterations": 2, "val_batch_tokens": 2048,
                                      "symbolic_windows": True})


@pytest.fixture(scope="module")
def eager_losses_of_compiled_tiny():
    """The losses of COMPILED_TINY's whole run, eager, over maskable_attention as the compiled
    runs have it: what both tests below compare their compiled steps with, trained once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tg, "attention_reference", maskable_attention)
        losses, _ = train_steps(COMPILED_TINY, steps=COMPILED_TINY.num_train_steps)
    return losses


@needs_corpus
@needs_tokenizer
def test_speedrun_step_and_evaluation_compile_as_whole_graphs(monkeypatch, fresh_dynamo,
                                                              eager_losses_of_compiled_tiny):
    """The model's forward and backward, its evaluation and the optimizer's update functions
    trace with fullgraph=True (a graph break would raise). With the symbolic windows, the
    warm-up steps of stage 1 and the first steps of stages 2 and 3 compile something new and the
    extension's nothing (its batch is stage 3's; its windows and YaRN factor are values); after
    the warm-up a whole run compiles nothing, and trains like the eager model. One evaluation
    graph serves the windows of the first stage, the extension and the final validation, each
    giving the eager model's losses."""
    cfg = COMPILED_TINY
    monkeypatch.setattr(tg, "attention_reference", maskable_attention)
    trainer, graphs, seconds = warmed_up_on_cpu(cfg, monkeypatch)
    assert list(graphs) == [0, 1, 2, 4, 6], graphs                    # stages: 2, 4, 6
    assert all(graphs[step] for step in (0, 1, 2, 4)) and graphs[6] == 0, graphs
    # the log splits each warm-up step's time into compiling (tracing a part of it) and running
    assert all(0 < seconds[step]["tracing"] < seconds[step]["compiling"] < seconds[step]["total"]
               for step in (0, 1, 2, 4)), seconds
    compiled = tg.compiled_graphs()
    losses = [trainer.train_step(step, trainer.advance(step)).item()
              for step in range(cfg.num_train_steps)]
    assert tg.compiled_graphs() == compiled        # the warm-up compiled everything
    assert losses == pytest.approx(eager_losses_of_compiled_tiny, abs=1e-3)

    batch = next(iter(tg.val_batches(trainer.val_files, 1024, 1024, 0, 1, 4, trainer.run.device,
                                     cfg.bigram_vocab_size)))
    generator = torch.Generator().manual_seed(0)   # weights far enough from their start (zero
    with torch.no_grad():                          # output projections) for the windows to matter
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(p.dtype))
    schedule = trainer.schedule
    windows = [schedule.windows(0), schedule.windows(cfg.num_train_steps - 1),
               schedule.final_val_windows()]
    compiled_losses = [trainer.eval_forward(batch, windows[0])]
    compiled = tg.compiled_graphs()
    compiled_losses += [trainer.eval_forward(batch, w) for w in windows[1:]]
    assert tg.compiled_graphs() == compiled        # one evaluation graph for all three
    with torch.compiler.set_stance("force_eager"):
        eager_losses = [trainer.eval_forward(batch, w) for w in windows]
    compiled_losses, eager_losses = torch.stack(compiled_losses), torch.stack(eager_losses)
    assert (compiled_losses[0] - compiled_losses[1]).abs().min() > 1e-3   # the windows matter
    assert compiled_losses.flatten().tolist() == pytest.approx(eager_losses.flatten().tolist(),
                                                               abs=1e-5)   # plain, masked


@needs_corpus
@needs_tokenizer
def test_dynamic_stages_compile_one_step_graph_for_every_stage(monkeypatch, fresh_dynamo,
                                                               eager_losses_of_compiled_tiny):
    """--dynamic_stages (on the speedrun's symbolic windows, as `--dynamic_stages=true` gives
    it): the first step compiles the model with the batch length, the windows and max_seqlen
    symbolic, and no later stage compiles anything (their warm-ups compile nothing); the steps
    train like the eager model's."""
    cfg = dataclasses.replace(COMPILED_TINY, dynamic_stages=True)
    monkeypatch.setattr(tg, "attention_reference", maskable_attention)
    trainer, graphs, seconds = warmed_up_on_cpu(cfg, monkeypatch)
    assert graphs[0] > 0 and graphs[2] == graphs[4] == graphs[6] == 0, graphs  # stages: 2, 4, 6
    assert seconds[2]["compiling"] == seconds[4]["compiling"] == seconds[6]["compiling"] == 0
    losses = [trainer.train_step(step, trainer.advance(step)).item()
              for step in range(cfg.num_train_steps)]
    assert losses == pytest.approx(eager_losses_of_compiled_tiny, abs=1e-3)
