"""#344's narrower Q/K heads (`qk_head_dim`) against plain statements written here: one attention
layer with Q and K at 96 and V at 128 (outputs and gradients; the model pads Q and K with zero
columns, the statement never does), the attention calls on padded against narrow heads, rotary
at 96, the banks and parameter counts, and the configuration's errors.
"""
import math

import pytest
import torch

import train_gpt as tg
from test_kernels import DEV, dc_attention_fp64, rel_norm_error
from test_model import random_model, random_tokens, ref_bigram, ref_freqs

# the real head widths on a small model: two heads, Q and K 96 wide, V 128
NARROW = tg.Hyperparameters(vocab_size=200, num_heads=2, head_dim=128, model_dim=256,
                            mlp_hidden=64, bigram_vocab_mult=1.0, qk_head_pair_groups=True,
                            qk_head_dim=96)
SCALE = 0.1   # the softmax scale before any YaRN update
EPS = torch.finfo(torch.float32).eps


# =================================================================================================
# Plain statements
# =================================================================================================

def plain_rmsnorm(x):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS)


def plain_attention(q, k, v, doc, window, scale):
    """Row i: softmax over the rows j of its document with 0 <= i - j <= window of scale q_i.k_j,
    times v. q, k (rows, w); v (rows, hd), any w."""
    i = torch.arange(q.shape[0])
    delta = i[:, None] - i[None, :]
    visible = (delta >= 0) & (delta <= window) & (doc[:, None] == doc[None, :])
    scores = (q @ k.T * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def plain_rotate(u, cos, sin):
    """Pairs (2j, 2j+1) of u (..., w) turn: (a, b) -> (c a + s b, c b - s a), with c and s the
    table's entries at 2j (the model's table stores the sine of odd entries negated)."""
    a, b = u[..., 0::2], u[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([c * a + s * b, c * b - s * a], -1).flatten(-2)


def plain_layer(m, layer, x, doc, window, qk_bank, vo_bank):
    """Attention layer `layer` (no value embedding, gates or XSA) of m on the normed input x
    (T, d), from the banks given: Q and K never padded, so their heads stay qk_head_dim wide."""
    cfg = m.cfg
    T, d, H, hd, w = x.shape[0], cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.qk_head_dim
    slot = layer if layer < 6 else layer - 1                 # layer 6 has no attention
    blocks = qk_bank[H * slot:H * (slot + 1)]                # Q's H/2 head pairs, then K's
    W_q, W_k = torch.cat(list(blocks[:H // 2])), torch.cat(list(blocks[H // 2:]))
    W_v, W_o = vo_bank[2 * slot], vo_bank[2 * slot + 1]
    lam, lam_o = m.scalars.detach().double()[2 * layer:2 * layer + 2]
    q = plain_rmsnorm((x @ (lam * W_q).T).view(T, H, w))
    k = plain_rmsnorm((x @ (lam * W_k).T).view(T, H, w))
    v = (x @ (lam * W_v).T).view(T, H, hd)
    cos, sin = m.rotary.cos.double(), m.rotary.sin.double()  # the tables are tested below
    paired = layer in (0, 2, 5, 9)
    # paired layers: head h of token t sits at position 2t + h % 2, and slot j holds heads j and
    # j + H/2 of every token, in token order
    positions = torch.tensor([[2 * t + h % 2 if paired else t for h in range(H)] for t in range(T)])
    cos, sin = cos[positions], sin[positions]
    q, k = plain_rotate(q, cos, sin), plain_rotate(k, cos, sin)
    if layer in (3, 10):   # key offset: the non-rotating half of each key from the previous token
        k = torch.cat([k[:, :, :w // 2], torch.cat([k[:1, :, w // 2:], k[:-1, :, w // 2:]])], -1)
    y = torch.zeros(T, H, hd, dtype=torch.float64)
    if paired:
        for j in range(H // 2):
            heads = [j, j + H // 2]
            rows = lambda t: t[:, heads].reshape(2 * T, -1)  # noqa: E731
            doc_rows = doc.repeat_interleave(2)
            y[:, heads] = plain_attention(rows(q), rows(k), rows(v), doc_rows, window,
                                          SCALE).view(T, 2, hd)
    else:
        for h in range(H):
            y[:, h] = plain_attention(q[:, h], k[:, h], v[:, h], doc, window, SCALE)
    return y.reshape(T, d) @ (lam_o * W_o).T


# =================================================================================================
# The layer and the attention calls
# =================================================================================================

@pytest.mark.parametrize("layer", [0, 3, 4], ids=["paired", "long+key_offset", "short"])
def test_narrow_qk_layer_matches_the_unpadded_statement(layer):
    torch.manual_seed(1)
    T = 24
    m = random_model(T=T, cfg=NARROW)
    assert m.qk_bank.shape[1:] == (2 * 96, 256) and m.rotary.cos.shape[1] == 96
    _, cu = random_tokens(T, n_docs=3)
    doc = torch.tensor([int((cu <= t).sum()) for t in range(T)])
    window = 9
    x = torch.randn(T, 256, requires_grad=True)
    got = m.attn(layer, m.attention_weights()[layer], tg.rms_norm(x), ve=None, ve_gate=None,
                 cu_seqlens=cu, max_seqlen=T, window=window, out_gate=None)
    dy = torch.randn(T, 256)
    got.backward(dy)

    leaves = [t.detach().double().requires_grad_() for t in (x, m.qk_bank, m.vo_bank)]
    want = plain_layer(m, layer, plain_rmsnorm(leaves[0]), doc, window, *leaves[1:])
    want.backward(dy.double())
    assert (got.double() - want).norm() < 1e-5 * want.norm()
    for model_grad, leaf in zip((x.grad, m.qk_bank.grad, m.vo_bank.grad), leaves):
        assert leaf.grad.norm() > 0
        assert (model_grad.double() - leaf.grad).norm() < 1e-5 * leaf.grad.norm()


def test_attention_on_zero_padded_heads_is_attention_on_the_narrow_ones():
    """The dense reference on Q/K padded to V's width, against the plain statement on Q/K at 96:
    outputs and the gradients of the narrow Q and K."""
    torch.manual_seed(2)
    T, H = 30, 3
    q, k = (torch.randn(T, H, 96, requires_grad=True) for _ in range(2))
    v = torch.randn(T, H, 128, requires_grad=True)
    cu = torch.tensor([0, 11, 11, 30, 30], dtype=torch.int32)
    doc = torch.tensor([int((cu <= t).sum()) for t in range(T)])
    padded = [tg.zero_pad_heads(t, 128) for t in (q, k)]
    assert padded[0].shape == (T, H, 128) and padded[0][..., 96:].eq(0).all()
    got = tg.attention(*padded, v, cu, T, 7, 0.3, tg.Paths())
    dy = torch.randn(T, H, 128)
    got.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.stack([plain_attention(*(t[:, h] for t in leaves), doc, 7, 0.3)
                        for h in range(H)], 1)
    want.backward(dy.double())
    assert (got.double() - want).abs().max() < 1e-5
    for tensor, leaf in zip((q, k, v), leaves):
        assert tensor.grad.shape == leaf.shape
        assert (tensor.grad.double() - leaf.grad).abs().max() < 1e-5


@pytest.mark.parametrize("use_kernel", [
    pytest.param(True, marks=pytest.mark.skipif(
        not (tg.triton_kernels.INTERPRET or torch.cuda.is_available()),
        reason="the kernel needs CUDA or TRITON_INTERPRET=1")),
    False], ids=["kernel", "reference"])
def test_composed_attention_on_zero_padded_heads(use_kernel):
    """The DC kernel takes one power-of-two width: Q/K of 12 padded to V's 16 give the composed
    attention of the narrow heads (the dense fp64 statement of test_kernels), with gradients."""
    torch.manual_seed(3)
    T, H = 37, 3
    q, k = (torch.randn(T, H, 12, device=DEV).bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(T, H, 16, device=DEV).bfloat16().requires_grad_()
    w1, w2 = (torch.randn(T, H, device=DEV).bfloat16().requires_grad_() for _ in range(2))
    cu = torch.tensor([0, 9, 9, 37, 37], dtype=torch.int32, device=DEV)
    fn = tg.triton_kernels.dc_attention if use_kernel else tg.triton_kernels.dc_attention_reference
    out = fn(tg.zero_pad_heads(q, 16), tg.zero_pad_heads(k, 16), v, cu, 0.12, w1, w2, window=20)
    dy = torch.randn(T, H, 16, device=DEV).bfloat16()
    out.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w1, w2)]
    exact = dc_attention_fp64(*leaves[:3], cu, 0.12, *leaves[3:], 20)
    exact.backward(dy.double())
    assert rel_norm_error(out, exact) < 1e-2
    for got, ref, name in zip((q, k, v, w1, w2), leaves, ("dq", "dk", "dv", "dw1", "dw2")):
        assert got.grad.shape == ref.shape and rel_norm_error(got.grad, ref.grad) < 2e-2, name


@pytest.mark.gpu
def test_flash_attention_on_zero_padded_heads_on_gpu():
    torch.manual_seed(4)
    T, H = 4096, 6
    cu = torch.tensor([0, 700, 1500, 1501, 4000] + [4096] * 4, dtype=torch.int32, device="cuda")
    q, k = (torch.randn(T, H, 96, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(T, H, 128, device="cuda", dtype=torch.bfloat16)
    padded = [tg.zero_pad_heads(t, 128) for t in (q, k)]
    got = tg.attention(*padded, v, cu, T, 384, SCALE, tg.Paths(attention="varlen"))
    want = tg.attention_reference(*padded, v, cu, 384, SCALE)
    assert (got.float() - want.float()).abs().max() < 2e-2


# =================================================================================================
# Rotary at 96
# =================================================================================================

def test_rotary_at_96_turns_24_pairs_over_the_range_of_128():
    """24 frequencies (1/1024)^(j/23) on the pairs of dims 0-47 (half the head, as 32 on 0-63 at
    128), dims 48-95 still; the tables are cos and sign-alternated sin of position x frequency."""
    rot = tg.Rotary(96, max_positions=40)
    rot.reset()
    f = torch.tensor([(1 / 1024) ** (j / 23) for j in range(24)], dtype=torch.float64)
    assert torch.allclose(rot.freqs.double(), f, rtol=1e-6)
    assert f[0] == 1 and f[-1] == pytest.approx(1 / 1024)
    per_dim = torch.cat([f.repeat_interleave(2), torch.zeros(48, dtype=torch.float64)])
    assert torch.equal(per_dim, ref_freqs(96))   # the full width's statement at 96
    angles = torch.arange(40, dtype=torch.float64)[:, None] * per_dim
    assert torch.allclose(rot.cos.double(), angles.cos(), atol=4e-3)   # bf16 tables
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(48)
    assert torch.allclose(rot.sin.double(), angles.sin() * signs, atol=4e-3)
    assert rot.cos[:, 48:].eq(1).all() and rot.sin[:, 48:].eq(0).all()
    u = torch.randn(40, 96)
    turned = tg.rotate(u, rot.cos.float(), rot.sin.float())
    assert torch.equal(turned[:, 48:], u[:, 48:])
    # a turn keeps each pair's length
    pair_norms = lambda t: t[:, :48].unflatten(-1, (24, 2)).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pair_norms(turned), pair_norms(u), rtol=1e-2)


def test_rotary_at_96_takes_the_yarn_updates_of_128():
    """YaRN's stretch depends on each frequency alone, and the scale on the windows: the same
    updates as at 128 (restated in test_model's ref_freqs)."""
    rot = tg.Rotary(96, max_positions=8)
    rot.reset()
    history = [(384, 896), (896, 1408)]
    for old, new in history:
        rot.apply_yarn(old, new)
    assert torch.allclose(rot.freqs.double().repeat_interleave(2), ref_freqs(96, history)[:48],
                          rtol=1e-5)
    assert rot.attn_scale == pytest.approx(0.127518, abs=1e-6)


# =================================================================================================
# Banks, parameter counts, configuration
# =================================================================================================

def test_speedrun_banks_and_parameter_count_at_world_size_8():
    """qk_bank: 10 layers x 6 heads' blocks, padded to 64 for 8 ranks, each (2 x 96, 768); the
    rest as before #344 (643,749,784 parameters with 128-wide blocks)."""
    cfg = tg.Hyperparameters(**tg.PRESETS["speedrun"])
    assert cfg.qk_head_dim == 96 and cfg.num_train_steps == 1270 + 30
    with torch.device("meta"):
        m = tg.GPT(cfg, world_size=8, max_positions=2)
    assert m.qk_bank.shape == (64, 2 * 96, 768)
    assert m.vo_bank.shape == (24, 768, 768)
    assert tg.matrix_view("qk_bank", m.qk_bank).shape == (64, 192, 768)   # one per NorMuon group
    narrowed = 64 * 2 * (128 - 96) * 768
    assert sum(p.numel() for p in m.parameters()) == 643_749_784 - narrowed


def test_narrow_banks_pad_with_zeros_on_every_world_size():
    torch.manual_seed(0)
    for world_size in (1, 2, 4, 8):
        m = tg.GPT(NARROW, world_size=world_size, max_positions=8)
        real = 10 * 2
        assert m.qk_bank.shape == (-(-real // world_size) * world_size, 192, 256)
        assert m.qk_bank[real:].eq(0).all()
        assert m.qk_bank[:real].abs().amin(dim=(1, 2)).gt(0).all()
        assert tg.unpadded_rows("qk_bank", NARROW) == real


def test_flops_count_q_and_k_at_their_width():
    cfg = tg.Hyperparameters(**tg.PRESETS["speedrun"])
    full = tg.Hyperparameters(**{**tg.PRESETS["speedrun"], "qk_head_dim": 0})
    s = tg.Schedule(cfg).at(0)        # windows 128 / 384 tokens; layers 3 and 10 long
    narrower = 2 * 6 * (128 - 96)     # fewer Q and K columns per layer
    context = 8 * 128 / 2 + 2 * 384 / 2 + 112 / 2   # and the composed attention's window
    want = 3 * (2 * 10 * narrower * 768 + narrower * context)
    assert tg.flops_per_token(full, s) - tg.flops_per_token(cfg, s) == pytest.approx(want)


def test_defaults_and_presets():
    assert tg.Hyperparameters().qk_head_dim == 0 and tg.Hyperparameters().qk_width == 128
    assert tg.Hyperparameters(**tg.PRESETS["record74"]).qk_head_dim == 0
    assert tg.Hyperparameters(**tg.PRESETS["smoke"]).qk_width == 24          # 96 / 128 of 32
    assert tg.Hyperparameters(**tg.PRESETS["smoke_record74"]).qk_width == 32


@pytest.mark.parametrize("value", [-4, 2, 4, 94, 132])
def test_bad_widths_are_one_clear_error(value):
    with pytest.raises(SystemExit) as e:
        tg.parse_config([f"--qk_head_dim={value}"])
    assert str(e.value) == (f"--qk_head_dim={value}: expected 0 (as wide as head_dim) or a "
                            f"multiple of 4 from 8 to head_dim=128 (rotary turns qk_head_dim/4 "
                            f"pairs of dimensions, at least 2, and leaves the other half alone)")


def test_narrow_qk_needs_the_separate_qk_bank():
    with pytest.raises(SystemExit) as e:
        tg.parse_config(["--preset=record74", "--qk_head_dim=96"])
    assert str(e.value) == ("--qk_head_dim=96 needs --qk_head_pair_groups=true (qk_head_dim is "
                            "built on qk_head_pair_groups)")
    with pytest.raises(SystemExit, match="^--qk_head_dim=96 needs --qk_head_pair_groups=true"):
        tg.parse_config(["--qk_head_pair_groups=false"])
    assert tg.parse_config(["--qk_head_pair_groups=false", "--qk_head_dim=0",
                            "--fp8_qkv=false"]).qk_width == 128


@pytest.mark.parametrize("attn", ["diff", "cmd", "mla", "cmd_mla"])
def test_attention_variants_refuse_narrow_qk(attn):
    with pytest.raises(SystemExit) as e:
        tg.parse_config([f"--attn={attn}"])
    assert str(e.value) == (f"--attn={attn} needs --qk_head_dim=0: the attention variants build "
                            f"their heads with Q and K as wide as V (head_dim)")
    assert tg.parse_config([f"--attn={attn}", "--qk_head_dim=0"]).attn == attn


def test_narrow_model_trains_a_step():
    """Every parameter of the smoke-sized speedrun model gets a gradient through the padded
    attention, and the loss is finite."""
    torch.manual_seed(6)
    cfg = tg.Hyperparameters(**{**tg.SPEEDRUN, "vocab_size": 200, "num_heads": 2, "head_dim": 32,
                                "model_dim": 64, "mlp_hidden": 96, "bigram_vocab_mult": 1.0,
                                "qk_head_dim": 8})
    T = 16
    m = random_model(T=T, cfg=cfg)
    ids, cu = random_tokens(T, n_docs=2)
    loss = m(ids, torch.randint(0, 200, (T,)), cu, ref_bigram(ids, cfg.bigram_vocab_size),
             torch.tensor([1.0, 0.5]), (4, 8), T, prefix_weight=torch.tensor([0.25]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert m.qk_bank.grad[:20].abs().amin(dim=(1, 2)).gt(0).all()
