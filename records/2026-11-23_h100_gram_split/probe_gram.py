"""Probe: symmetric Gram kernels with TMA operand loads and the reduction split over SPLIT programs
(the last of a tile's programs to finish adds the partial sums and stores the tile). The tile
product and the stores are triton_kernels' own. Compares tilings against the landed kernel and
cuBLAS at the optimizer's shapes; "landed" was the pointer-load kernel of 18268b8 when the recorded
outputs were made, and is the TMA kernel since f6c2ab3.
Run from the repository root on a GPU: python3 probe_gram.py round1|round2 (the tiling lists of
the two outputs), or under TRITON_INTERPRET=1 for a correctness check at small sizes."""
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, ".")
import triton_kernels as tk
from triton_kernels import _gram_tile_product, _lower_triangle_tile, _store_gram_tile

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda"


@triton.jit
def _gram_kernel(a_desc, b_desc, c_ptr, a_ptr, ws_ptr, counter_ptr, alpha, beta, n, r,
                 stride_ab, stride_an, stride_ar, stride_cb, stride_cm, stride_cn,
                 TRANSPOSED: tl.constexpr, ADD_BETA_A: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    """The landed kernel's tile product and stores, with the reduction split over SPLIT programs."""
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    tile = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    tile_row, tile_col = _lower_triangle_tile(tile, BLOCK_M // BLOCK_N)
    batch = tl.program_id(1)
    row0 = tile_row * BLOCK_M
    col0 = tile_col * BLOCK_N
    r_part = tl.cdiv(tl.cdiv(r, BLOCK_R), SPLIT) * BLOCK_R
    r_begin = part * r_part
    acc = _gram_tile_product(a_desc, b_desc, batch, row0, col0, r_begin, tl.minimum(r, r_begin + r_part),
                             TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_R, INTERPRETED)
    last = True
    if SPLIT > 1:   # partial sums through a workspace; the tile's last program adds them in order
        slot = batch * tl.num_programs(0) // SPLIT + tile
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ws = ws_ptr + slot.to(tl.int64) * (SPLIT * BLOCK_M * BLOCK_N) + tile_offsets
        tl.store(ws + part * (BLOCK_M * BLOCK_N), acc, cache_modifier=".cg")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + slot, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLIT - 1
        if last:
            tl.debug_barrier()
            acc = tl.load(ws, cache_modifier=".cg")
            for p in tl.static_range(1, SPLIT):
                acc += tl.load(ws + p * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
            tl.store(counter_ptr + slot, 0)
    if last:
        _store_gram_tile(acc, a_ptr, c_ptr, alpha, beta, batch, row0, col0, n,
                         stride_ab, stride_an, stride_ar, stride_cb, stride_cm, stride_cn,
                         ADD_BETA_A, BLOCK_M, BLOCK_N, INTERPRETED)


_COUNTERS = {}


def gram(A, out, transposed, alpha=1.0, beta=0.0, add_beta_a=False, BLOCK_M=128, BLOCK_N=128,
         BLOCK_R=64, SPLIT=1, num_warps=8, num_stages=4):
    batches, rows, cols = A.shape
    n, r = (cols, rows) if transposed else (rows, cols)
    a_desc, b_desc = (TensorDescriptor.from_tensor(A, [1, BLOCK_R, size] if transposed else [1, size, BLOCK_R])
                      for size in (BLOCK_M, BLOCK_N))
    tile_rows = triton.cdiv(n, BLOCK_M)
    tiles = BLOCK_M // BLOCK_N * tile_rows * (tile_rows + 1) // 2
    ws = counter = A
    if SPLIT > 1:
        ws = torch.empty(batches * tiles * SPLIT * BLOCK_M * BLOCK_N, dtype=torch.float32, device=A.device)
        key = (A.device, batches * tiles)
        if key not in _COUNTERS:
            _COUNTERS[key] = torch.zeros(batches * tiles, dtype=torch.int32, device=A.device)
        counter = _COUNTERS[key]
    stride_an, stride_ar = (A.stride(2), A.stride(1)) if transposed else (A.stride(1), A.stride(2))
    _gram_kernel[(tiles * SPLIT, batches)](
        a_desc, b_desc, out, A, ws, counter, alpha, beta, n, r, A.stride(0), stride_an, stride_ar,
        out.stride(0), out.stride(1), out.stride(2), TRANSPOSED=transposed, ADD_BETA_A=add_beta_a,
        SPLIT=SPLIT, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, INTERPRETED=INTERP,
        **({} if INTERP else dict(num_warps=num_warps, num_stages=num_stages)))


def capture_graph(fn, calls=20):
    """A CUDA graph of `calls` calls of fn, captured after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    return graph


def replay_us(graph, calls, rounds):
    """Microseconds per call in each of `rounds` replays of a graph of `calls` calls."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return times


def graph_us(fn, calls=20, rounds=7):
    """Median and per-round microseconds per call of fn replayed from a CUDA graph."""
    times = replay_us(capture_graph(fn, calls), calls, rounds)
    return statistics.median(times), times


def main():
    torch.manual_seed(0)
    if INTERP:
        cases = [("XTX", (2, 100, 48), True, False), ("XXT", (2, 40, 72), False, False),
                 ("baCAA", (2, 40, 40), False, True)]
        configs = [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_R=16, SPLIT=s) for n in (16, 8) for s in (1, 2, 3)]
    else:
        cases = [("XTX", (3, 3072, 768), True, False), ("XTX", (24, 3072, 768), True, False),
                 ("XXT", (5, 768, 768), False, False), ("baCAA", (5, 768, 768), False, True),
                 ("baCAA", (3, 768, 768), False, True)]
        tilings = {   # (BLOCK_M, BLOCK_N, BLOCK_R, SPLIT, warps, stages)
            "round1": [(128, 128, 64, 1, 8, 4), (128, 128, 64, 2, 8, 4), (128, 128, 64, 2, 8, 3),
                       (128, 128, 64, 3, 8, 4), (128, 128, 64, 4, 8, 4), (64, 64, 64, 1, 4, 4),
                       (64, 64, 128, 1, 4, 3), (64, 64, 64, 2, 4, 4)],
            "round2": [(128, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (128, 128, 64, 1, 8, 5),
                       (128, 128, 128, 1, 8, 3), (128, 128, 64, 1, 4, 4), (128, 64, 64, 1, 4, 4),
                       (128, 64, 64, 1, 8, 4), (128, 64, 128, 1, 4, 3), (64, 64, 64, 1, 4, 4),
                       (64, 64, 64, 1, 4, 6), (64, 64, 128, 1, 4, 3), (64, 64, 128, 1, 4, 4),
                       (64, 64, 256, 1, 4, 2), (64, 64, 128, 2, 4, 3)],
        }[sys.argv[1]]
        configs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, SPLIT=s, num_warps=w, num_stages=st)
                   for bm, bn, br, s, w, st in tilings]
    header = ["config"] + [f"{name} {shape}" for name, shape, _, _ in cases]
    table = [header]
    inputs = []
    for name, shape, transposed, add in cases:
        A = torch.randn(*shape, device=DEVICE)
        if add:
            A = (A + A.mT) / 64
        A = A.bfloat16()
        size = shape[2] if transposed else shape[1]
        ref = (A.float().mT @ A.float()) if transposed else (A.float() @ A.float().mT)
        if add:
            ref = 0.5 * (A.float() @ A.float()) - 2.0 * A.float()
        inputs.append((A, A.new_empty(shape[0], size, size), transposed, add, ref))

    def run(config, A, out, transposed, add):
        if config == "landed":
            return tk._symmetric_gram(A, out, transposed, 0.5, -2.0, add)
        if config == "cublas":
            return torch.baddbmm(A, A, A, beta=-2.0, alpha=0.5) if add else (A.mT @ A if transposed else A @ A.mT)
        return gram(A, out, transposed, 0.5, -2.0, add, **config)

    for config in (["landed", "cublas"] if not INTERP else []) + configs:
        label = config if isinstance(config, str) else " ".join(f"{k}={v}" for k, v in config.items())
        row = [label]
        for A, out, transposed, add, ref in inputs:
            try:
                out.fill_(float("nan"))
                for _ in range(3):   # repeated calls: the counters must reset themselves
                    run(config, A, out, transposed, add)
                result = out if config != "cublas" else run(config, A, out, transposed, add)
                err = ((result.float() - ref).abs().max() / ref.abs().max()).item()
                sym = torch.equal(result, result.mT)
                cell = f"err {err:.1e}{'' if sym else ' ASYM'}"
                if not INTERP:
                    cell = f"{graph_us(lambda: run(config, A, out, transposed, add))[0]:.1f} ({cell})"
            except Exception as error:
                cell = f"fail: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
            row.append(cell)
        table.append(row)
        print(" | ".join(row), flush=True)
    print()
    print("| " + " | ".join(table[0]) + " |")
    print("|---" * len(table[0]) + "|")
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
