"""The rest of #344: the packed FP8 QKV projection (`fp8_qkv`) and the fused Q/K preparation kernel
(`fused_qk_prep`), against plain statements written here: the kernel and its reference (the
model's own ops) against an fp64 statement at ragged shapes, outputs and gradients; the e4m3
weight copies bit for bit; the FP8 GEMMs against the exact product of their rounded operands and
against the unrounded fp64 product; the copies made once per optimizer step from the weights,
reset by the warm-up; the paths; and tracing by torch.compile.
"""
import dataclasses

import pytest
import torch

import train_gpt as tg
from conftest import needs_corpus, needs_tokenizer
from test_kernels import DEV, rel_norm_error
from test_model import bf16_model, random_model, step_by_paths
from test_qk_head_dim import plain_rmsnorm, plain_rotate
from test_recipe import SPEEDRUN_TINY, TINY_SMOKE

tk = tg.triton_kernels
needs_kernels = pytest.mark.skipif(not (tk.INTERPRET or torch.cuda.is_available()),
                                   reason="the kernels need CUDA or TRITON_INTERPRET=1")
BF16_ULP = 2.0 ** -8      # the spacing of bf16 relative to a value, at most


# =================================================================================================
# Q/K preparation: norm, rotary, key offset, zero padding, layout
# =================================================================================================

def plain_qk_prep(q, k, cos, sin, paired, key_offset, width):
    """fp64: every head RMS-normed and turned at its position (2t + h % 2 in paired layers, else t);
    with the key offset, each key's second half taken from the token before (token 0 keeps its
    own); zero columns up to width; paired layers as rows 2t (heads 0..H/2-1) and 2t+1 (heads
    H/2..H-1) of H/2 slots."""
    T, H, w = q.shape
    positions = torch.tensor([[2 * t + h % 2 if paired else t for h in range(H)] for t in range(T)])
    c, s = cos.double()[positions], sin.double()[positions]
    q, k = (plain_rotate(plain_rmsnorm(t.double()), c, s) for t in (q, k))
    if key_offset:
        before = k[(torch.arange(T) - 1).clamp_min(0)]
        k = torch.cat([k[..., :w // 2], before[..., w // 2:]], -1)
    zeros = torch.zeros(T, H, width - w, dtype=torch.float64)
    q, k = torch.cat([q, zeros], -1), torch.cat([k, zeros], -1)
    if paired:
        q, k = (torch.stack([t[:, :H // 2], t[:, H // 2:]], 1).reshape(2 * T, H // 2, width)
                for t in (q, k))
    return q, k


QK_CASES = [  # T, H, w, width, paired, key_offset: no T a multiple of the 16-token block
    (37, 3, 12, 16, False, True),
    (21, 4, 20, 28, True, False),
    (19, 2, 8, 8, False, False),
    (33, 6, 24, 40, False, True),
]


def qk_inputs(T, H, w, dtype, seed):
    """q and k as the projection leaves them: strided views of one (T, 2 H w + 5) tensor."""
    torch.manual_seed(seed)
    rows = (3 * torch.randn(T, 2 * H * w + 5, device=DEV)).to(dtype)
    q, k = rows[:, :H * w].view(T, H, w), rows[:, H * w:2 * H * w].view(T, H, w)
    return [t.detach().requires_grad_() for t in (q, k)], rows


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,w,width,paired,key_offset", QK_CASES)
@pytest.mark.parametrize("q_scale", [None, 1.37])
def test_qk_prep_kernel_and_reference_against_fp64(T, H, w, width, paired, key_offset, dtype,
                                                   q_scale):
    """Outputs and the gradients of q and k, with and without a factor on the queries. fp32: both
    within 1e-5 of the fp64 statement. bf16: the kernel rounds once (within a bf16 step of fp64
    everywhere), the reference after each op."""
    rot = tg.Rotary(w, 2 * T + 3)
    rot.reset()
    rot.to(DEV)
    (q, k), _ = qk_inputs(T, H, w, dtype, seed=T)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k)]
    want = plain_qk_prep(*leaves, rot.cos.cpu(), rot.sin.cpu(), paired, key_offset, width)
    scale = None
    if q_scale is not None:
        want = (want[0] * q_scale, want[1])
        scale = torch.tensor(q_scale, device=DEV)
    grads = [torch.randn(t.shape, dtype=torch.float64) for t in want]
    sum(((t * g).sum() for t, g in zip(want, grads))).backward()
    shape = (2 * T, H // 2, width) if paired else (T, H, width)
    for prep in (tk.qk_prep, tg.qk_prep_reference):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k)]
        got = prep(*inputs, rot.cos, rot.sin, paired, key_offset, width, scale)
        sum(((t.double() * g.to(DEV)).sum() for t, g in zip(got, grads))).backward()
        for out, exact in zip(got, want):
            assert out.shape == shape and out.dtype == dtype
            out = out.detach().double().cpu()
            if dtype == torch.float32:
                assert (out - exact).abs().max() < 1e-5, prep.__name__
            elif prep is tk.qk_prep:
                assert ((out - exact).abs() <= BF16_ULP * exact.abs() + 1e-6).all()
            else:
                assert rel_norm_error(out, exact) < 2 * BF16_ULP
            assert out.view(T, H, width)[..., w:].eq(0).all()
        for t, leaf in zip(inputs, leaves):
            bound = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
            assert rel_norm_error(t.grad.cpu(), leaf.grad) < bound, prep.__name__


@needs_kernels
def test_qk_prep_rejects_bad_arguments():
    rot = tg.Rotary(12, 20)
    rot.reset()
    (q, k), _ = qk_inputs(10, 3, 12, torch.bfloat16, seed=0)
    cos, sin = rot.cos.to(DEV), rot.sin.to(DEV)
    with pytest.raises(ValueError, match=r"qk_prep: expected a head width w that is a multiple of "
                                         r"4, width >= w and \(paired\) an even head count"):
        tk.qk_prep(q, k, cos, sin, True, False, 16)
    with pytest.raises(ValueError, match="width >= w"):
        tk.qk_prep(q, k, cos, sin, False, False, 8)
    with pytest.raises(ValueError, match=r"cos and sin must be \(10 or more, 12\) tables"):
        tk.qk_prep(q, k, cos[:9], sin[:9], False, False, 16)
    with pytest.raises(ValueError, match=r"q_scale must hold one value, got shape \(2,\)"):
        tk.qk_prep(q, k, cos, sin, False, False, 16, torch.ones(2, device=DEV))


# =================================================================================================
# The e4m3 weight copies and the packed FP8 GEMMs
# =================================================================================================

def e4m3_bits(t):
    return t.view(torch.uint8)


def check_packed_quantisation(quantize, top, bottom, scales):
    """out = e4m3 of [top; bottom] x (1 / scale) (the reciprocal and the product rounded to fp32,
    then to the nearest e4m3 value, saturating at 448) per layer, and out_t its exact transpose,
    bit for bit."""
    L, rows, d = top.shape[0], top.shape[1] + bottom.shape[1], top.shape[2]
    packed = torch.cat([top, bottom], 1).float()
    want = (packed * (1 / scales[:, None, None])).clamp(-448, 448).to(torch.float8_e4m3fn)
    out = torch.empty(L, rows, d, dtype=torch.float8_e4m3fn, device=top.device)
    out_t = torch.empty(L, d, rows, dtype=torch.float8_e4m3fn, device=top.device)
    quantize(top, bottom, scales, out, out_t)
    assert torch.equal(e4m3_bits(out), e4m3_bits(want))
    assert torch.equal(e4m3_bits(out_t), e4m3_bits(want.mT.contiguous()))
    return out


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_kernels), False],
                         ids=["kernel", "reference"])
def test_packed_weights_quantise_in_both_layouts(use_kernel):
    """From strided sources (every other matrix of a bank, as V in vo_bank), rows not a multiple
    of the tile."""
    torch.manual_seed(0)
    L, r1, d = 3, 56, 48
    top = (torch.randn(2 * L + 1, r1, d, device=DEV) * 0.05).bfloat16()[1::2]
    bottom = (torch.randn(2 * L, d, d, device=DEV) * 0.05).bfloat16()[::2]
    scales = torch.cat([top, bottom], 1).float().abs().amax((1, 2)) / 448
    scales[1] /= 1.5      # this layer's largest values saturate at 448
    quantize = tk.quantize_packed_e4m3 if use_kernel else tk.quantize_packed_e4m3_reference
    out = check_packed_quantisation(quantize, top, bottom, scales)
    assert out[1].float().abs().max() == 448


def fp8_inputs(T, n, d, seed=0):
    torch.manual_seed(seed)
    x = tg.rms_norm(torch.randn(T, d, device=DEV)).bfloat16()
    W = (0.5 / d ** 0.5 * torch.randn(n, d, device=DEV)).bfloat16()
    scale = (W.float().abs().max() / 448).reshape(1)
    W8 = (W.float() / scale).to(torch.float8_e4m3fn)
    return x, W, torch.tensor(0.7, device=DEV), W8, W8.t().contiguous(), scale


def exact_rounded(t, fp8_max, dtype):
    """t as its FP8 copy at the exact scale max|t| / fp8_max holds it, in fp64."""
    scale = t.float().abs().max() / fp8_max
    return (t.float() / scale).to(dtype).double() * scale.double()


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_kernels), False],
                         ids=["kernel", "emulation"])
def test_packed_qkv_fp8_forward_and_gradients(use_kernel):
    """T = 37 rows (not a multiple of the tile), n = 80 = 2 x 2 heads x 12 + 32. Against the exact
    product of the rounded operands (x in e4m3 at max|x| / 448, dy in e5m2 at max|dy| / 57344, W
    as its e4m3 copies): within bf16 rounding. Against the unrounded fp64 math: within 6 % (norm)
    forward, 10 % for dx (e5m2 keeps 2 mantissa bits), 1 % for the bf16 dW and dlambda."""
    T, n, d = 37, 80, 32
    x, W, lam, W8, W8t, scale = fp8_inputs(T, n, d)
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, lam)]
    project = tk.packed_qkv_fp8 if use_kernel else tk.packed_qkv_fp8_reference
    y = project(*leaves, W8, W8t, scale)
    dy = torch.randn(T, n, device=DEV).bfloat16()
    y.backward(dy)
    W_rounded = W8.double() * scale.double()
    dx_exact = exact_rounded(dy, 57344, torch.float8_e5m2) @ W_rounded * 0.7
    y_exact = exact_rounded(x, 448, torch.float8_e4m3fn) @ W_rounded.T * 0.7
    for got, exact in ((y, y_exact), (leaves[0].grad, dx_exact)):
        assert got.dtype == torch.bfloat16
        bound = BF16_ULP * exact.abs() + 1e-5 * exact.abs().max()
        assert ((got.double() - exact).abs() <= bound).all()
    plain = [t.detach().double().requires_grad_() for t in (x, W, lam)]
    y_plain = plain[0] @ plain[1].T * plain[2]
    y_plain.backward(dy.double())
    assert rel_norm_error(y, y_plain) < 0.06
    for leaf, exact, bound in zip(leaves, plain, (0.1, 0.01, 0.01)):
        assert rel_norm_error(leaf.grad, exact.grad) < bound


@needs_kernels
def test_packed_qkv_fp8_rejects_bad_arguments():
    x, W, lam, W8, W8t, scale = fp8_inputs(16, 80, 32)
    with pytest.raises(ValueError, match=r"packed_qkv_fp8: W8t must have shape \(32, 80\)"):
        tk.packed_qkv_fp8(x, W, lam, W8, W8, scale)
    with pytest.raises(ValueError, match="n and d must be multiples of 16"):
        tk.packed_qkv_fp8(x[:, :24], W[:72, :24], lam, W8[:72, :24], W8t[:24, :72], scale)
    with pytest.raises(ValueError, match="W8 must have dtype"):
        tk.packed_qkv_fp8(x, W, lam, W8.float(), W8t, scale)


@needs_kernels
def test_both_kernels_trace_as_one_graph():
    """torch.compile(fullgraph=True) traces both autograd functions and their custom ops (a graph
    break would raise); compiled forward and backward equal the eager ones."""
    T, H, w, d = 24, 2, 12, 32
    x, W, lam, W8, W8t, scale = fp8_inputs(T, 2 * H * w + d, d)
    rot = tg.Rotary(w, 2 * T)
    rot.reset()
    rot.to(DEV)

    def layer(x, W, lam):
        rows = tk.packed_qkv_fp8(x, W, lam, W8, W8t, scale)
        q, k = rows[:, :H * w].view(T, H, w), rows[:, H * w:2 * H * w].view(T, H, w)
        q, k = tk.qk_prep(q, k, rot.cos, rot.sin, True, False, 16)
        return (q.float() * k.float()).sum() + rows[:, 2 * H * w:].float().square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, W, lam)]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (eager, eager_grads), (traced, traced_grads) = results
    assert torch.equal(eager, traced)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))


# =================================================================================================
# The model: paths, the once-per-update copies, the warm-up
# =================================================================================================

@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
def test_gpu_paths_of_the_packed_qkv_and_the_qk_kernel(monkeypatch, capability):
    """On a GPU with FP8 both run as kernels; without FP8 the packed QKV is emulated; neither
    without the Triton kernels, and every CPU run takes the PyTorch forms."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cfg = tg.Hyperparameters(**tg.PRESETS["speedrun"])
    paths = tg.resolve_paths(cfg, torch.device("cuda"))
    fp8 = capability >= (8, 9)
    assert (paths.qkv, paths.qk_prep) == ("triton" if fp8 else "torch", "triton")
    report = [line for line in paths.report() if line.startswith(("path qkv", "path qk_prep"))]
    assert report[0] == ("path qkv: triton (Triton kernels on CUDA)" if fp8 else
                         "path qkv: torch (compute capability 8.0: no FP8: the packed FP8 QKV's "
                         "math emulated in PyTorch)")
    plain = tg.resolve_paths(dataclasses.replace(cfg, use_triton_kernels=False), torch.device("cuda"))
    assert (plain.qkv, plain.qk_prep) == ("torch", "torch")
    cpu = tg.resolve_paths(cfg, torch.device("cpu"))
    assert (cpu.qkv, cpu.qk_prep) == ("torch", "torch")


def restated_packed_e4m3(model):
    """Each standard attention layer's rows [Q head pairs; K head pairs; V] from the banks, in
    e4m3 at its exact max / 448 (fp32 division), stacked: (L, n, d)."""
    H, L = model.cfg.num_heads, len(tg.ATTN_LAYERS)
    layers = []
    for j in range(L):
        W = torch.cat([*model.qk_bank.detach()[H * j:H * (j + 1)], model.vo_bank.detach()[2 * j]])
        layers.append((W.float() / (W.float().abs().max() / 448)).to(torch.float8_e4m3fn))
    return torch.stack(layers)


@needs_corpus
@needs_tokenizer
def test_weights_are_quantised_once_per_optimizer_step(monkeypatch):
    """One quantisation at the start and one after each optimizer step (four micro-batches each,
    none in a forward), each from the current weights; the warm-up's reset restores the first."""
    calls = []
    reference = tk.quantize_packed_e4m3_reference

    def counting(*args):
        calls.append(1)
        return reference(*args)

    monkeypatch.setattr(tk, "quantize_packed_e4m3_reference", counting)
    cfg = tg.Hyperparameters(**TINY_SMOKE)
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=4)
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    fp8 = trainer.model.fp8_qkv_weights
    first = e4m3_bits(fp8.weight_e4m3).clone()
    assert len(calls) == 1 and torch.equal(first, e4m3_bits(restated_packed_e4m3(trainer.model)))
    previous = first
    for step in range(3):
        trainer.train_step(step, trainer.advance(step))
        assert len(calls) == step + 2 and fp8.quantizations.item() == step + 2
        want = restated_packed_e4m3(trainer.model)
        assert torch.equal(e4m3_bits(fp8.weight_e4m3), e4m3_bits(want))
        assert torch.equal(e4m3_bits(fp8.weight_e4m3_t), e4m3_bits(want.mT.contiguous()))
        assert not torch.equal(e4m3_bits(fp8.weight_e4m3), previous)     # the weights moved
        previous = e4m3_bits(fp8.weight_e4m3).clone()
    fresh = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    fresh.warmup(last_step=2)    # steps 0 and 1: two optimizer steps, then the reset
    state = fresh.model.fp8_qkv_weights
    assert state.quantizations.item() == 1 and torch.equal(e4m3_bits(state.weight_e4m3), first)


@pytest.mark.skipif(not tk.INTERPRET, reason="compares with the interpreter's exact arithmetic")
def test_kernel_paths_train_like_the_reference_paths(monkeypatch):
    """One training forward and backward of the tiny speedrun model through the kernels against
    the same model through their PyTorch forms. The Q/K kernel on the fp32 model (where neither
    rounds to bf16): the same loss and gradients up to fp32 rounding. The FP8 GEMM kernels on the
    bf16 model: the same products of the same FP8 operands as the emulation, so the same loss
    and gradients up to the order of the fp32 sums. (In bf16 the Q/K kernel's single rounding
    moves this tiny model's gradients by as much as bf16 itself does: test_qk_prep_kernel_and_
    reference_against_fp64 bounds it against fp64 instead.) The FP8 GEMMs run on the Triton
    backend: in the interpreter it sums in the emulation's order, so the two paths round alike;
    a CPU scaled matmul sums in another, and a last-bit difference in one layer's output flips
    e4m3 and e5m2 roundings in the next, which moves this tiny model's gradients by tens of
    percent (test_fp8_gemm_rounds_the_sum_of_exact_products_once checks both backends alone)."""
    monkeypatch.setattr(tk, "_FP8_GEMM", "triton")
    T = 32
    for model, paths, bound in ((random_model(T=T, cfg=SPEEDRUN_TINY), tg.Paths(qk_prep="triton"),
                                 1e-4),
                                (bf16_model(T, SPEEDRUN_TINY), tg.Paths(qkv="triton"), 1e-2)):
        torch.manual_seed(3)
        (kernel_loss, kernel_grads), (reference_loss, reference_grads) = step_by_paths(
            model, T, paths, tg.Paths())
        assert abs(kernel_loss - reference_loss) < 0.1 * bound * reference_loss
        for name, want in reference_grads.items():
            assert want.norm() > 0, name
            assert (kernel_grads[name] - want).norm() < bound * want.norm(), name


def test_record74_has_no_fp8_qkv_state():
    cfg = tg.Hyperparameters(**tg.PRESETS["record74"])
    with torch.device("meta"):
        model = tg.GPT(cfg, world_size=8, max_positions=2)
    assert model.fp8_qkv_weights is None
    assert not any(name.startswith("fp8_qkv") for name in model.state_dict())
    speedrun = tg.GPT(tg.Hyperparameters(**tg.PRESETS["smoke"]), world_size=1, max_positions=2)
    assert speedrun.fp8_qkv_weights.weight_e4m3.shape == (10, 2 * 2 * 24 + 64, 64)
    assert speedrun.fp8_qkv_weights.weight_e4m3_t.shape == (10, 64, 2 * 2 * 24 + 64)


def test_packed_qkv_needs_the_separate_qk_bank():
    with pytest.raises(SystemExit) as e:
        tg.parse_config(["--qk_head_pair_groups=false", "--qk_head_dim=0"])
    assert str(e.value) == ("--fp8_qkv=true needs --qk_head_pair_groups=true (fp8_qkv is built "
                            "on qk_head_pair_groups)")


# =================================================================================================
# The speedrun's shapes on a GPU
# =================================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("paired,key_offset", [(True, False), (False, True)])
def test_qk_prep_at_the_speedrun_shape_on_gpu(paired, key_offset):
    T, H, w, width = 16384, 6, 96, 128
    rot = tg.Rotary(w, 2 * T).cuda()
    rot.reset()
    (q, k), _ = qk_inputs(T, H, w, torch.bfloat16, seed=1)
    got = tk.qk_prep(q, k, rot.cos, rot.sin, paired, key_offset, width)
    want = tg.qk_prep_reference(q, k, rot.cos, rot.sin, paired, key_offset, width)
    for a, b in zip(got, want):   # one rounding against one per op
        assert rel_norm_error(a, b) < 2 * BF16_ULP


@pytest.mark.gpu
def test_qk_prep_compiled_gives_the_eager_result_on_gpu():
    """Inside a compiled graph (as the model runs it) the kernel's outputs and input gradients
    are those of the eager call, bit for bit."""
    T, H, w, width = 2048, 6, 96, 128
    rot = tg.Rotary(w, 2 * T).cuda()
    rot.reset()
    grads = [torch.randn(T, H, width, device="cuda").bfloat16() for _ in range(2)]

    def prep_and_grads(fn, paired):
        (q, k), _ = qk_inputs(T, H, w, torch.bfloat16, seed=2)
        outs = [t.view(T, H, width) for t in fn(q, k, rot.cos, rot.sin, paired, not paired, width)]
        return [*outs, *torch.autograd.grad(outs, (q, k), grads)]

    compiled = torch.compile(tk.qk_prep, fullgraph=True)
    for paired in (False, True):
        for got, want in zip(prep_and_grads(compiled, paired), prep_and_grads(tk.qk_prep, paired)):
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_packed_qkv_fp8_at_the_speedrun_shape_on_gpu():
    """T = 16384, d = 768, n = 2 x 6 x 96 + 768: kernels against the emulation (fp32 sums of the
    same operands, in another order)."""
    x, W, lam, W8, W8t, scale = fp8_inputs(16384, 1920, 768)
    results = []
    for project in (tk.packed_qkv_fp8, tk.packed_qkv_fp8_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, W, lam)]
        y = project(*leaves, W8, W8t, scale)
        y.backward(torch.ones_like(y))
        results.append([y, *(t.grad for t in leaves)])
    for got, want in zip(*results):
        assert rel_norm_error(got, want) < 1e-2


@pytest.mark.gpu
def test_packed_weights_quantise_at_the_speedrun_shape_on_gpu():
    """The speedrun's ten layers from views of its banks (Q/K blocks of 2 x 96 rows, V every other
    matrix of vo_bank). At these sizes a kernel that also stored the transposed fp8 tile wrote
    foreign bytes into about a quarter of it."""
    torch.manual_seed(2)
    L, H, w, d = 10, 6, 96, 768
    qk_bank = (0.03 * torch.randn(H * L + 2, 2 * w, d, device="cuda")).bfloat16()
    vo_bank = (0.03 * torch.randn(2 * L + 2, d, d, device="cuda")).bfloat16()
    top, bottom = qk_bank[:H * L].view(L, 2 * H * w, d), vo_bank[0:2 * L:2]
    scales = torch.cat([top, bottom], 1).float().abs().amax((1, 2)) / 448
    check_packed_quantisation(tk.quantize_packed_e4m3, top, bottom, scales)
