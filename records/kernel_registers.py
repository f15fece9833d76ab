"""Registers, spills, shared memory, pipelined loads and the matrix instruction of the Triton
kernels, compiled for the H100 (sm_90a) as the trainer launches them at the speedrun's shapes, on
any machine and without a GPU: Triton lowers each kernel, and the ptxas it ships reports what the
kernel needs.

    python records/kernel_registers.py

A kernel that spills, needs so many registers that few of its programs share an SM, waits on
every load (none pipelined) or multiplies on the pre-Hopper instruction (mma, not wgmma) is slow
for a reason no timing names; this shows it before a GPU run. Triton compiles a launch for its
arguments: pointers and integers divisible by 16 as such (their loads can then be vectorised and
pipelined), integers equal to 1 as constants. Each kernel here is described by example argument
values at the speedrun's shapes, from which the same specialisation follows; compiled without it,
a kernel looks unaligned, and one that is pipelined at run time shows unpipelined. (The numbers
are for the installed Triton, which may differ from the GPU machine's.)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_kernels as tk  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
TOKENS = 49152          # one rank's tokens per micro-batch in the speedrun's last stage
HEADS, HEAD_DIM, QK_WIDTH, MODEL_DIM, HIDDEN = 6, 128, 96, 768, 3072
VOCAB, PADDED_VOCAB = 50257, 50304


class Kernel(NamedTuple):
    """One launch: args maps each runtime argument to its type ("*bf16", "fp32", a descriptor
    type) or, for an integer, an example value, from which the specialisation follows."""
    label: str
    fn: object
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3


class Report(NamedTuple):
    registers: int             # per thread
    spills: int                # bytes of spill stores per thread
    shared: int                # bytes of shared memory per program
    async_loads: int           # loads the pipeliner made asynchronous (cp.async or TMA)
    mma: str                   # "wgmma" (Hopper), "mma" (the older instruction) or "-"


def ptxas_path() -> str | None:
    """The ptxas Triton uses for sm_90, or None where this Triton has none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:
        return None


def specialised(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) as Triton's launcher makes them from these arguments:
    pointers are 16-byte aligned (PyTorch's allocations and the trainer's views are), integers
    divisible by 16 are marked so, and integers equal to 1 become constants."""
    signature, constants, attrs = {}, {}, {}
    for name, arg in args.items():
        position = (fn.arg_names.index(name),)
        if isinstance(arg, int) and arg == 1:
            signature[name], constants[name] = "constexpr", 1
        elif isinstance(arg, int):
            signature[name] = "i32"
            if arg % 16 == 0:
                attrs[position] = [["tt.divisibility", 16]]
        else:
            signature[name] = arg
            if arg.startswith("*"):
                attrs[position] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_and_report(kernel: Kernel) -> Report:
    """The kernel compiled for the H100, and what its code needs."""
    signature, constants, attrs = specialised(kernel.fn, kernel.args)
    # a constexpr the launch leaves out takes its default, as at a launch
    defaults = {p.name: p.default for p in kernel.fn.params
                if p.is_constexpr and p.has_default and p.name not in kernel.constexprs}
    constexprs = {**constants, **defaults, **kernel.constexprs}
    source = ASTSource(kernel.fn, {**signature, **{name: "constexpr" for name in
                                                   {**defaults, **kernel.constexprs}}},
                       constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=H100, options={"num_warps": kernel.num_warps,
                                                             "num_stages": kernel.num_stages})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                 os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    ttgir = compiled.asm["ttgir"]
    async_loads = ttgir.count("ttg.async_copy_global_to_local") + ttgir.count(
        "ttng.async_tma_copy_global_to_local")
    mma = "wgmma" if "warp_group_dot" in ttgir else "mma" if "tt.dot " in ttgir else "-"
    return Report(registers, int(spills.group(1)) if spills else 0, compiled.metadata.shared,
                  async_loads, mma)


def pointers(names: str, dtype: str) -> dict:
    return {name: f"*{dtype}" for name in names.split()}


def gemm_epilogue_kernels():
    """The MLP's GEMM with its epilogues (bf16 and #89/#344's FP8 forms) at
    triton_kernels._GEMM_TILES or _FP8_GEMM_TILES, on stage 3's up-projection."""
    for label, epilogue, operand, aux, scaled in (
            ("MLP forward, bf16", tk.RELU2_FORWARD, "bf16", "bf16", False),
            ("MLP backward, bf16", tk.RELU2_BACKWARD, "bf16", "bf16", False),
            ("MLP forward, FP8 with post8 (#89)", tk.RELU2_FP8_FORWARD, "fp8e4nv", "fp8e4nv", True),
            ("MLP backward, FP8 with max (#344)", tk.RELU2_BACKWARD_MAX, "fp8e5", "bf16", True),
            ("MLP backward, FP8 with d_pre8", tk.RELU2_BACKWARD_FP8, "fp8e5", "bf16", True)):
        tiles = dict(tk._FP8_GEMM_TILES if scaled else tk._GEMM_TILES)
        num_warps, num_stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
        args = {"a_desc": f"tensordesc<{operand}[{bm}, {bk}]>",
                "b_desc": f"tensordesc<{'fp8e4nv' if scaled else operand}[{bn}, {bk}]>",
                "out_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>",
                "aux_desc": f"tensordesc<{aux}[{bm}, {bn // 2}]>",
                "out8_desc": f"tensordesc<{'fp8e5' if epilogue is tk.RELU2_BACKWARD_FP8 else 'bf16'}"
                             f"[{bm}, {bn // 2}]>",
                "m": TOKENS, "n": HIDDEN, "k": MODEL_DIM, "rows_per_batch": TOKENS, "alpha": "fp32",
                **pointers("scale_ptr fp8_scale_ptr maxima_ptr", "fp32")}
        constexprs = dict(EPILOGUE=epilogue.value, SCALED=scaled, NUM_PROGRAMS=132, **tiles)
        yield Kernel(label, tk._gemm_epilogue_kernel, args, constexprs, num_warps, num_stages)


def qk_prep_kernels():
    """#344's Q/K preparation, forward and backward, on a plain layer with the key offset and
    on a paired one, at triton_kernels._QK_PREP_TILES; Q and K are views of the packed QKV rows."""
    row = 2 * HEADS * QK_WIDTH + MODEL_DIM
    strides = dict(T=TOKENS, q_stride_t=row, q_stride_h=QK_WIDTH, k_stride_t=row,
                   k_stride_h=QK_WIDTH, table_stride=QK_WIDTH, eps="fp32")
    forward = {**pointers("q_ptr k_ptr q_out_ptr k_out_ptr cos_ptr sin_ptr", "bf16"),
               **pointers("q_scale_ptr", "fp32"), **strides}
    backward = {**pointers("dq_ptr dk_ptr q_ptr k_ptr dq_in_ptr dk_in_ptr cos_ptr sin_ptr", "bf16"),
                **pointers("q_scale_ptr", "fp32"), **strides}
    tiles = tk._QK_PREP_TILES
    for paired, key_offset in ((False, True), (True, False)):
        constexprs = dict(H=HEADS, W_IN=QK_WIDTH, W_OUT=HEAD_DIM, PAIRED=paired,
                          KEY_OFFSET=key_offset, Q_SCALE=False, OUT_BF16=True,
                          BLOCK_T=tiles["BLOCK_T"], BLOCK_W=HEAD_DIM)
        layer = "paired" if paired else "plain, key offset"
        yield Kernel(f"qk_prep forward ({layer})", tk._qk_prep_forward_kernel, forward,
                     constexprs, tiles["num_warps"])
        yield Kernel(f"qk_prep backward ({layer})", tk._qk_prep_backward_kernel, backward,
                     constexprs, tiles["num_warps"])


def dc_attention_kernels(window=112):
    """#85's composed attention at triton_kernels._DC_TILES."""
    block = tk._DC_TILES["BLOCK"]
    span = triton.next_power_of_2(block + window - 1)
    common = dict(H=HEADS, HD=HEAD_DIM, WINDOW=window, BLOCK=block)
    inputs = {**pointers("q_ptr k_ptr v_ptr", "bf16"), "doc_ptr": "*i32",
              **pointers("w1n_ptr w2_ptr", "fp32")}
    sizes = dict(T=TOKENS, scale="fp32")
    launch = (tk._DC_TILES["num_warps"], tk._DC_TILES["num_stages"])
    yield Kernel("dc_attention forward", tk._dc_attention_forward_kernel,
                 {**inputs, "out_ptr": "*bf16", "lse_ptr": "*fp32", **sizes},
                 {**common, "KEYS": span}, *launch)
    yield Kernel("dc_attention backward, queries", tk._dc_attention_backward_queries_kernel,
                 {**inputs, "lse_ptr": "*fp32", "dy_ptr": "*bf16", "dq_ptr": "*bf16",
                  **pointers("dw1n_ptr dw2_ptr delta_ptr", "fp32"), **sizes},
                 {**common, "KEYS": span}, *launch)
    yield Kernel("dc_attention backward, keys", tk._dc_attention_backward_keys_kernel,
                 {**inputs, "lse_ptr": "*fp32", "dy_ptr": "*bf16", "delta_ptr": "*fp32",
                  **pointers("dk_ptr dv_ptr", "bf16"), **sizes},
                 {**common, "QUERIES": span}, *launch)


def attention_kernels(tiles=None, window=640):
    """The windowed attention (--triton_attention) at triton_kernels._ATTENTION_TILES, on a
    plain layer of stage 3: Q and K from qk_prep (contiguous), V a view of the packed QKV rows."""
    tiles = tiles or tk._ATTENTION_TILES
    row = 2 * HEADS * QK_WIDTH + MODEL_DIM
    strides = dict(stride_qt=HEADS * HEAD_DIM, stride_qh=HEAD_DIM, stride_kt=HEADS * HEAD_DIM,
                   stride_kh=HEAD_DIM, stride_vt=row, stride_vh=HEAD_DIM)
    inputs = {**pointers("q_ptr k_ptr v_ptr", "bf16"), "doc_start_ptr": "*i32"}
    sizes = dict(T=TOKENS, window=window, qk_scale="fp32")
    saved = {"dout_ptr": "*bf16", **pointers("lse_ptr delta_ptr", "fp32")}

    def launch(label, fn, args, kernel):
        tile = dict(tiles[kernel])
        num_warps, num_stages = tile.pop("num_warps"), tile.pop("num_stages")
        return Kernel(label, fn, args, dict(H=HEADS, D=HEAD_DIM, **tile), num_warps, num_stages)

    yield launch("attention forward", tk._attention_forward_kernel,
                 {**inputs, "out_ptr": "*bf16", "lse_ptr": "*fp32", **sizes, **strides}, "forward")
    yield launch("attention backward, queries", tk._attention_backward_queries_kernel,
                 {**inputs, "out_ptr": "*bf16", **saved, "dq_ptr": "*bf16", **sizes,
                  "scale": "fp32", **strides},
                 "queries")
    yield launch("attention backward, keys", tk._attention_backward_keys_kernel,
                 {**inputs, **saved, "doc_end_ptr": "*i32", **pointers("dk_ptr dv_ptr", "bf16"),
                  **sizes, "scale": "fp32", **strides}, "keys")


def loss_and_copy_kernels():
    """The LM head's fused cross-entropy (#75/#79), the transposed copy of its e5m2 gradient
    (#76), the embedding tables' row sums and the packed QKV weights' quantisation (#344)."""
    yield Kernel("cross-entropy forward + backward", tk._mtp_ce_kernel,
                 {"logits_ptr": "*bf16", "stride_row": PADDED_VOCAB, "targets_ptr": "*i64",
                  "w_ptr": "*fp32", "extra_targets_ptr": "*i64", "extra_w_ptr": "*fp32",
                  "losses_ptr": "*fp32", "grad_ptr": "*fp8e5", "stride_grad": PADDED_VOCAB,
                  "grad_scale": "fp32", "n_rows": TOKENS, "n_cols": VOCAB},
                 dict(K=3, K_POW2=4, HAS_EXTRA=True, BLOCK_V=tk._CE_TILE["BLOCK_V"]),
                 tk._CE_TILE["num_warps"])
    yield Kernel("transpose (e5m2 gradient)", tk._transpose_kernel,
                 {"src_ptr": "*u8", "dst_ptr": "*u8", "m": TOKENS, "n": PADDED_VOCAB,
                  "stride_sm": PADDED_VOCAB, "stride_sn": 1, "stride_dn": TOKENS, "stride_dm": 1},
                 dict(ADD=False, BLOCK_M=64, BLOCK_N=64), 4)
    yield Kernel("index_add_rows (embedding gradients)", tk._index_add_rows_kernel,
                 {"out_ptr": "*fp32", "stride_ol": PADDED_VOCAB * MODEL_DIM,
                  "stride_or": MODEL_DIM, "src_ptr": "*fp32", "stride_sl": TOKENS * MODEL_DIM,
                  "stride_st": MODEL_DIM, "sorted_ptr": "*i64", "order_ptr": "*i64",
                  "n_index": TOKENS, "n_rows": PADDED_VOCAB, "n_cols": MODEL_DIM},
                 dict(CHUNK=16, BLOCK_D=512), 4)
    packed = 2 * HEADS * QK_WIDTH
    yield Kernel("quantize packed QKV weights", tk._quantize_packed_kernel,
                 {"top_ptr": "*bf16", "bottom_ptr": "*bf16", "scale_ptr": "*fp32",
                  "out_ptr": "*fp8e4nv", "top_rows": packed, "rows": packed + MODEL_DIM,
                  "cols": MODEL_DIM, "top_batch": packed * MODEL_DIM, "top_row": MODEL_DIM,
                  "bottom_batch": 2 * MODEL_DIM * MODEL_DIM, "bottom_row": MODEL_DIM},
                 dict(BLOCK_R=64, BLOCK_C=64), 4)


def optimizer_kernels():
    """Polar Express's symmetric Gram product X X^T on an MLP matrix, at the largest of
    triton_kernels._GRAM_CONFIGS."""
    config = tk._GRAM_CONFIGS[0]
    blocks = config.kwargs
    n, r, batches = MODEL_DIM, HIDDEN, 12
    yield Kernel("Gram product X X^T (Polar Express)", tk._symmetric_gram_kernel,
                 {"row_desc": f"tensordesc<bf16[1, {blocks['BLOCK_M']}, {blocks['BLOCK_R']}]>",
                  "col_desc": f"tensordesc<bf16[1, {blocks['BLOCK_N']}, {blocks['BLOCK_R']}]>",
                  "a_ptr": "*bf16", "c_ptr": "*bf16", "alpha": "fp32", "beta": "fp32",
                  "n": n, "r": r, "num_batches": batches, "stride_ab": n * r, "stride_an": r,
                  "stride_ar": 1, "stride_cb": n * n, "stride_cm": n, "stride_cn": 1},
                 dict(TRANSPOSED=False, ADD_BETA_A=False, **blocks), config.num_warps,
                 config.num_stages)


def pairwise_kernels(r=79):
    """The pairwise MLP's kernels (--mlp=pairwise): the fused ones at
    triton_kernels._PAIRWISE_TILES, and the cuBLAS form's two."""
    tiles = tk._PAIRWISE_TILES
    block = tiles["PAIR_BLOCK"]
    width = -(-r // block) * block
    blocks = width // block
    sizes = dict(T=TOKENS, r=r, d=MODEL_DIM, h_stride=width)

    def launch(label, fn, args, stage, **constexprs):
        tile = dict(tiles[stage])
        num_warps, num_stages = tile.pop("num_warps"), tile.pop("num_stages")
        return Kernel(label, fn, args, dict(BLOCK=block, **tile, **constexprs), num_warps,
                      num_stages)

    yield launch("pairwise forward", tk._pairwise_forward_kernel,
                 {**pointers("h_ptr w_ptr y_ptr", "bf16"), **sizes, "num_blocks": blocks}, "forward")
    yield launch("pairwise backward, dW", tk._pairwise_dw_kernel,
                 {**pointers("dy_ptr h_ptr dw_ptr", "bf16"), **sizes, "num_blocks": blocks}, "dw")
    yield launch("pairwise backward, dh", tk._pairwise_dh_kernel,
                 {**pointers("dy_ptr h_ptr w_ptr", "bf16"), "dh_ptr": "*fp32", **sizes,
                  "num_blocks": blocks}, "dh", BLOCKS_POW2=triton.next_power_of_2(blocks))
    # the cuBLAS form's kernels at triton_kernels._PAIR_KERNEL_TILES, on the same padded h
    # and rows of q and G padded to 8 columns
    q_width = tk._aligned_pair_width(r)
    products, contract = (dict(tk._PAIR_KERNEL_TILES[kernel])
                          for kernel in ("products", "contract"))
    yield Kernel("pair products (cuBLAS form)", tk._pair_products_kernel,
                 {**pointers("h_ptr q_ptr", "bf16"), "T": TOKENS, "r": r, "h_stride": width,
                  "q_stride": q_width},
                 dict(BLOCK_T=products["BLOCK_T"], FEATURES_POW2=triton.next_power_of_2(r)),
                 products["num_warps"])
    yield Kernel("pair contraction, dh (cuBLAS form)", tk._pair_contract_kernel,
                 {**pointers("g_ptr h_ptr", "bf16"), "dh_ptr": "*fp32", "T": TOKENS, "r": r,
                  "g_stride": q_width, "h_stride": width},
                 dict(BLOCK_T=contract["BLOCK_T"], FEATURES_POW2=triton.next_power_of_2(width)),
                 contract["num_warps"])


KERNEL_FAMILIES = (gemm_epilogue_kernels, qk_prep_kernels, dc_attention_kernels,
                   attention_kernels, loss_and_copy_kernels, optimizer_kernels, pairwise_kernels)
COLUMNS = ("kernel", "warps", "registers per thread", "spill stores (bytes per thread)",
           "shared memory (KB)", "pipelined loads", "matrix instruction")


def main() -> None:
    if ptxas_path() is None:
        sys.exit("kernel_registers.py needs the ptxas that Triton's NVIDIA backend ships; none found.")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for family in KERNEL_FAMILIES:
        for kernel in family():
            report = compile_and_report(kernel)
            print(f"| {kernel.label} | {kernel.num_warps} | {report.registers} | {report.spills} "
                  f"| {report.shared / 1024:.0f} | {report.async_loads} | {report.mma} |", flush=True)


if __name__ == "__main__":
    main()
