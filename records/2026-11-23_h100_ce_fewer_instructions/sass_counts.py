"""Instruction counts of the CE kernel's loops, without a GPU: compiles _mtp_ce_kernel of a copy
of triton_kernels.py for sm_90 (the launch's specialisation: 16-byte aligned pointers, strides and
sizes divisible by 16), disassembles it with the nvdisasm that Triton ships, and prints the
registers and, for every loop, its instruction count and opcode histogram. The numbers in the
README come from Triton 3.6.0, the version of the GPU machine:

    pip install triton==3.6.0 torch
    python records/2026-11-23_h100_ce_fewer_instructions/sass_counts.py [triton_kernels.py] [--block-v 4096]

The pass-1 and pass-2 loops are the two unrolled loops with MUFU (pass 1: about 2.5 per logit,
pass 2: one MUFU.TANH per logit); divide their counts by the logits a thread handles per
iteration (4 blocks x BLOCK_V / 512 threads).
"""
import argparse
import collections
import importlib.util
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARG_TYPES = dict(logits_ptr="*bf16", stride_row="i32", targets_ptr="*i64", w_ptr="*fp32", losses_ptr="*fp32",
                 grad_ptr="*fp8e5", stride_grad="i32", grad_scale="fp32", n_rows="i32", n_cols="i32")
DIVISIBLE_BY_16 = ["logits_ptr", "stride_row", "targets_ptr", "w_ptr", "losses_ptr", "grad_ptr", "stride_grad",
                   "n_rows", "n_cols"]


def compile_kernel(path, block_v, num_warps):
    os.environ.pop("TRITON_INTERPRET", None)
    spec = importlib.util.spec_from_file_location("kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module._mtp_ce_kernel
    params = list(inspect.signature(fn.fn).parameters)
    constants = dict(K=3, K_POW2=4, BLOCK_V=block_v, INTERPRETED=False)
    source = ASTSource(fn, {p: ARG_TYPES.get(p, "constexpr") for p in params},
                       constexprs={(params.index(k),): v for k, v in constants.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in DIVISIBLE_BY_16})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def loops(sass):
    """(label, [opcode, ...]) of every block that a later branch jumps back to."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x.split("*/", 1)[1].strip() for x in lines[labels[m.group(1)] + 1:i + 1] if "*/" in x]
            found.append((m.group(1), [b.split()[1 if b.startswith("@") else 0].split(".")[0] for b in body]))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="triton_kernels.py")
    parser.add_argument("--block-v", type=int, default=4096)
    parser.add_argument("--num-warps", type=int, default=16)
    args = parser.parse_args()
    kernel = compile_kernel(args.path, args.block_v, args.num_warps)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm, "-c", cubin.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([nvdisasm.replace("nvdisasm", "cuobjdump"), "-res-usage", cubin.name],
                               check=True, capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage).group(1)
    print(f"triton {triton.__version__}, BLOCK_V {args.block_v}, {args.num_warps} warps, {registers} registers")
    for label, ops in loops(sass):
        counts = collections.Counter(ops).most_common()
        print(f"{label}: {len(ops)} instructions: " + " ".join(f"{op}:{n}" for op, n in counts))


if __name__ == "__main__":
    main()
