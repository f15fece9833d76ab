"""Registers and spills per thread of the Triton kernels at the tilings the trainer launches,
compiled for the H100 (sm_90a) on any machine, without a GPU: Triton lowers each kernel to PTX and
the ptxas it ships reports what the kernel needs.

    python records/kernel_registers.py

A kernel that spills, or needs so many registers that few of its programs fit on an SM at once,
is slow for a reason no timing names; this shows it before a GPU run. (The numbers are for the
installed Triton, which may differ from the GPU machine's.)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_kernels as tk  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def ptxas_path() -> str | None:
    """The ptxas Triton uses for sm_90, or None where this Triton has none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:
        return None


def registers_and_spills(fn, signature: dict, constexprs: dict, num_warps: int,
                         num_stages: int = 3) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores per thread) of fn compiled for the H100."""
    source = ASTSource(fn, {**signature, **{name: "constexpr" for name in constexprs}},
                       constexprs=constexprs)
    kernel = triton.compile(source, target=H100,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                 os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return registers, int(spills.group(1)) if spills else 0


def pointers(names: str, dtype: str) -> dict:
    return {name: f"*{dtype}" for name in names.split()}


def ints(names: str) -> dict:
    return {name: "i32" for name in names.split()}


def qk_prep_kernels(H=6, w=96, width=128):
    """#344's Q/K preparation, forward and backward, on a plain layer with the key offset and
    on a paired one, at triton_kernels._QK_PREP_TILES."""
    forward = {**pointers("q_ptr k_ptr q_out_ptr k_out_ptr cos_ptr sin_ptr", "bf16"),
               **ints("T q_stride_t q_stride_h k_stride_t k_stride_h table_stride"), "eps": "fp32"}
    backward = {**pointers("dq_ptr dk_ptr q_ptr k_ptr dq_in_ptr dk_in_ptr cos_ptr sin_ptr", "bf16"),
                **ints("T q_stride_t q_stride_h k_stride_t k_stride_h table_stride"),
                "eps": "fp32"}
    tiles = tk._QK_PREP_TILES
    for paired, key_offset in ((False, True), (True, False)):
        constexprs = dict(H=H, W_IN=w, W_OUT=width, PAIRED=paired, KEY_OFFSET=key_offset,
                          OUT_BF16=True, BLOCK_T=tiles["BLOCK_T"],
                          BLOCK_W=triton.next_power_of_2(width))
        layer = "paired" if paired else "plain, key offset"
        yield f"qk_prep forward ({layer})", tk._qk_prep_forward_kernel, forward, constexprs, tiles["num_warps"]
        yield f"qk_prep backward ({layer})", tk._qk_prep_backward_kernel, backward, constexprs, tiles["num_warps"]


def dc_attention_kernels(H=6, hd=128, window=112):
    """#85's composed attention at triton_kernels._DC_TILES."""
    block, span = tk._DC_TILES["BLOCK"], triton.next_power_of_2(tk._DC_TILES["BLOCK"] + window - 1)
    common = dict(H=H, HD=hd, WINDOW=window, BLOCK=block)
    bf16 = pointers("q_ptr k_ptr v_ptr", "bf16")
    tables = {"doc_ptr": "*i32", **pointers("w1n_ptr w2_ptr", "bf16")}
    num_warps = tk._DC_TILES["num_warps"]
    yield ("dc_attention forward", tk._dc_attention_forward_kernel,
           {**bf16, **tables, "out_ptr": "*bf16", "lse_ptr": "*fp32", "T": "i32", "scale": "fp32"},
           {**common, "KEYS": span}, num_warps)
    yield ("dc_attention backward, queries", tk._dc_attention_backward_queries_kernel,
           {**bf16, **tables, "lse_ptr": "*fp32", "dy_ptr": "*bf16", "dq_ptr": "*bf16",
            **pointers("dw1n_ptr dw2_ptr delta_ptr", "fp32"), "T": "i32", "scale": "fp32"},
           {**common, "KEYS": span}, num_warps)
    yield ("dc_attention backward, keys", tk._dc_attention_backward_keys_kernel,
           {**bf16, **tables, "lse_ptr": "*fp32", "dy_ptr": "*bf16", "delta_ptr": "*fp32",
            **pointers("dk_ptr dv_ptr", "bf16"), "T": "i32", "scale": "fp32"},
           {**common, "QUERIES": span}, num_warps)


def gemm_epilogue_kernels():
    """The MLP's GEMM with its epilogues (bf16 and #89/#344's FP8 forms) at
    triton_kernels._GEMM_TILES."""
    tiles = dict(tk._GEMM_TILES)
    num_warps, num_stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    for label, epilogue, operand, aux, scaled in (
            ("MLP forward, bf16", tk.RELU2_FORWARD, "bf16", "bf16", False),
            ("MLP backward, bf16", tk.RELU2_BACKWARD, "bf16", "bf16", False),
            ("MLP forward, FP8 with post8 (#89)", tk.RELU2_FP8_FORWARD, "fp8e4nv", "fp8e4nv", True),
            ("MLP backward, FP8 with max (#344)", tk.RELU2_BACKWARD_MAX, "fp8e5", "bf16", True)):
        signature = {"a_desc": f"tensordesc<{operand}[{bm}, {bk}]>",
                     "b_desc": f"tensordesc<{'fp8e4nv' if scaled else operand}[{bn}, {bk}]>",
                     "out_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>",
                     "aux_desc": f"tensordesc<{aux}[{bm}, {bn // 2}]>",
                     **ints("m n k rows_per_batch"), "alpha": "fp32",
                     **pointers("scale_ptr act_scale_ptr maxima_ptr", "fp32")}
        constexprs = dict(EPILOGUE=epilogue.value, SCALED=scaled, NUM_PROGRAMS=132, **tiles)
        yield label, tk._gemm_epilogue_kernel, signature, constexprs, num_warps, num_stages


KERNEL_FAMILIES = (gemm_epilogue_kernels, qk_prep_kernels, dc_attention_kernels)


def main() -> None:
    if ptxas_path() is None:
        sys.exit("kernel_registers.py needs the ptxas that Triton's NVIDIA backend ships; none found.")
    print("| kernel | warps | registers per thread | spill stores (bytes per thread) |")
    print("|---|---|---|---|")
    for family in KERNEL_FAMILIES:
        for label, fn, signature, constexprs, num_warps, *stages in family():
            registers, spills = registers_and_spills(fn, signature, constexprs, num_warps, *stages)
            print(f"| {label} | {num_warps} | {registers} | {spills} |", flush=True)


if __name__ == "__main__":
    main()
