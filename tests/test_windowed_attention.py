"""triton_kernels.windowed_attention (section 13) against a dense fp64 oracle, the model's CPU
reference (train_gpt.attention_reference) and, on a GPU, torch's flash attention; and the path
that picks it (--triton_attention)."""
import pytest
import torch

import train_gpt as tg
import triton_kernels as tk
from conftest import CORPUS, needs_corpus, needs_tokenizer
from test_kernels import DEV, assert_compiles_like_eager, rel_norm_error

# 53 rows: four query blocks of the interpreter's 16, the last ragged; documents of 9, 0 (an empty
# slot, as padded cu_seqlens hold), 31 and 13 rows, then the padding's repeated T
RAGGED_BOUNDS = [0, 9, 9, 40, 53, 53]
# a document of 87 rows, in which whole blocks of 16 keys lie inside every row's window: the
# kernels' unmasked loops
LONG_BOUNDS = [0, 3, 90, 100]


def attention_fp64(q, k, v, cu_seqlens, window, scale):
    """Row i attends to the rows j of its document with i - window <= j <= i: dense (T, T) maps
    per head in fp64."""
    q, k, v = (t.double() for t in (q, k, v))
    positions = torch.arange(q.shape[0], device=q.device)
    doc = (cu_seqlens[None, :].long() <= positions[:, None]).sum(1)
    distance = positions[:, None] - positions[None, :]
    visible = (doc[:, None] == doc[None, :]) & (distance >= 0) & (distance <= window)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hts,shd->thd", probs, v)


def attention_inputs(T, H, D, device, strided_v=False):
    q, k = (torch.randn(T, H, D, device=device).bfloat16() for _ in range(2))
    if strided_v:   # V as the model slices it out of the packed QKV rows: rows 2 H D apart
        v = torch.randn(T, 2 * H * D, device=device).bfloat16()[:, H * D:].unflatten(1, (H, D))
    else:
        v = torch.randn(T, H, D, device=device).bfloat16()
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("bounds, window", [(RAGGED_BOUNDS, 0), (RAGGED_BOUNDS, 5),
                                            (RAGGED_BOUNDS, 100), (LONG_BOUNDS, 37),
                                            (LONG_BOUNDS, 200)])
@pytest.mark.parametrize("strided_v", [False, True])
def test_windowed_attention_matches_the_dense_oracle(bounds, window, strided_v):
    """Output and gradients within bf16 rounding of the fp64 oracle (a window of 0: every row
    sees only itself, so Q and K get no gradient), and of the model's CPU reference."""
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    T = bounds[-1]
    leaves = attention_inputs(T, 2, 16, DEV, strided_v)
    assert leaves[2].stride(0) == (64 if strided_v else 32)
    d_out = torch.randn(T, 2, 16, device=DEV)
    out = tk.windowed_attention(*leaves, cu, window, 0.3)
    grads = torch.autograd.grad(out, leaves, d_out.bfloat16())
    exact = attention_fp64(*leaves, cu, window, 0.3)
    exact_grads = torch.autograd.grad(exact, leaves, d_out.double())
    assert out.dtype == torch.bfloat16 and rel_norm_error(out, exact) < 1e-2
    for name, g, e in zip("qkv", grads, exact_grads):
        if window == 0 and name in "qk":
            assert g.abs().max() < 1e-2 * grads[2].abs().max(), name
        else:
            assert rel_norm_error(g, e) < 1e-2, name
    reference = tg.attention_reference(*leaves, cu, window, 0.3)
    assert rel_norm_error(out, reference) < 1e-2


def test_document_bounds_of_every_row():
    cu = torch.tensor([0, 3, 3, 7, 10, 10], dtype=torch.int32)
    starts, ends = tk.document_bounds(cu, 10)
    assert starts.tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 7, 7]
    assert ends.tolist() == [3, 3, 3, 7, 7, 7, 7, 10, 10, 10]
    assert starts.dtype == ends.dtype == torch.int32


def test_windowed_attention_compiles_fullgraph():
    leaves = attention_inputs(24, 2, 16, DEV)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEV)

    def term(q, k, v):
        return tk.windowed_attention(q, k, v, cu, 6, 0.2).float().square().sum()

    assert_compiles_like_eager(term, leaves)


def test_a_symbolic_window_compiles_once():
    """Under --symbolic_windows the window reaches the kernel as the size of an empty tensor
    that dynamo keeps symbolic; the op must not specialise on it (one graph for every window)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    leaves = attention_inputs(24, 2, 16, DEV)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEV)

    def term(q, k, v, windows):
        return tk.windowed_attention(q, k, v, cu, windows.size(0), 0.2).float().square().sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(term, backend=counter, fullgraph=True)
    for window in (6, 9, 3):
        windows = torch.empty(window, 0, device=DEV)
        torch._dynamo.mark_dynamic(windows, 0)
        assert torch.equal(compiled(*leaves, windows), term(*leaves, windows))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_windowed_attention_rejects_bad_arguments():
    q = torch.randn(8, 2, 16, device=DEV).bfloat16()
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        tk.windowed_attention(q[..., :12], q[..., :12], q[..., :12], cu, 4, 1.0)
    with pytest.raises(ValueError, match="window at least 0"):
        tk.windowed_attention(q, q, q, cu, -1, 1.0)
    with pytest.raises(ValueError, match=r"k must have shape \(8, 2, 16\)"):
        tk.windowed_attention(q, q[:4], q, cu, 4, 1.0)
    with pytest.raises(ValueError, match="v must have dtype"):
        tk.windowed_attention(q, q, q.float(), cu, 4, 1.0)


def test_triton_attention_path_is_chosen_on_a_gpu_with_the_kernels(monkeypatch):
    """The decision for a GPU, taken on any machine (only the capability query touches CUDA)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    gpu = torch.device("cuda")
    paths = tg.resolve_paths(tg.Hyperparameters(triton_attention=True), gpu)
    assert paths.attention == "triton"
    assert "path attention: triton (--triton_attention=true)" in paths.report()
    assert tg.resolve_paths(tg.Hyperparameters(), gpu).attention == "varlen"
    plain = tg.resolve_paths(tg.Hyperparameters(triton_attention=True, use_triton_kernels=False), gpu)
    assert "path attention: varlen (--use_triton_kernels=false)" in plain.report()
    cpu = tg.resolve_paths(tg.Hyperparameters(triton_attention=True), torch.device("cpu"))
    assert cpu.attention == "dense"


def test_model_attention_takes_the_kernel_on_the_triton_path():
    """train_gpt.attention with Paths(attention="triton") runs the kernel (interpreted on a
    CPU): the dense path's result within bf16 rounding, for a paired layer's doubled rows."""
    cu = torch.tensor(RAGGED_BOUNDS, dtype=torch.int32, device=DEV)
    q, k, v = (t.detach() for t in attention_inputs(53, 2, 16, DEV))
    rows = (2 * 53, 1, 16)       # paired heads: two rows per token, half the heads
    q2, k2, v2 = (t.reshape(rows) for t in (q, k, v))
    kernel = tg.attention(q2, k2, v2, 2 * cu, 2 * 31, 7, 0.3, tg.Paths(attention="triton"))
    dense = tg.attention(q2, k2, v2, 2 * cu, 2 * 31, 7, 0.3, tg.Paths(attention="dense"))
    assert rel_norm_error(kernel, dense) < 1e-2


@pytest.mark.gpu
def test_windowed_attention_matches_flash_attention_on_gpu():
    """Stage 3's shape (6 heads of 128, the short window), documents of uneven lengths: the
    kernel within bf16 rounding of torch's flash attention, output and gradients."""
    from torch.nn.attention.varlen import varlen_attn
    T, window = 8192, 640
    cuts = sorted(torch.randint(1, T, (8,)).tolist())
    cu = torch.tensor([0, *cuts, T], dtype=torch.int32, device="cuda")
    max_len = int((cu[1:] - cu[:-1]).max())
    leaves = attention_inputs(T, 6, 128, "cuda", strided_v=True)
    d_out = torch.randn(T, 6, 128, device="cuda").bfloat16()
    out = tk.windowed_attention(*leaves, cu, window, 0.12)
    flash = varlen_attn(*leaves, cu, cu, max_len, max_len, scale=0.12, window_size=(window, 0))
    assert rel_norm_error(out, flash) < 1e-2
    for g, f in zip(torch.autograd.grad(out, leaves, d_out),
                    torch.autograd.grad(flash, leaves, d_out)):
        assert rel_norm_error(g, f) < 2e-2


@pytest.mark.gpu
@needs_corpus
@needs_tokenizer
def test_triton_attention_trains_like_flash_attention_on_gpu():
    """The smoke preset compiled as the speedrun runs (CUDA graphs, symbolic windows), with and
    without --triton_attention: the same losses over six steps, up to the kernels' rounding."""
    cfg = dict(tg.PRESETS["smoke"], train_files=f"{CORPUS}/corpus_train_*.bin",
               val_files=f"{CORPUS}/corpus_val_*.bin", compile=True, cuda_graphs=True,
               symbolic_windows=True)
    run = tg.Run(rank=0, world_size=1, device=torch.device("cuda"), grad_accum_steps=4)
    losses = {}
    for triton_attention in (False, True):
        trainer = tg.Trainer(tg.Hyperparameters(**cfg, triton_attention=triton_attention), run,
                             log=lambda line, console=True: None)
        assert trainer.paths.attention == ("triton" if triton_attention else "varlen")
        losses[triton_attention] = [trainer.train_step(step, trainer.advance(step)).item()
                                    for step in range(6)]
    assert losses[True] == pytest.approx(losses[False], abs=2e-2)
