"""Probe: a persistent CE kernel whose programs pipeline rows, pass 1 of row r + P interleaved
block by block with pass 2 of row r (P programs). Each program then keeps about one row of
logits in L2 at any time, and its instruction stream always mixes both passes' loads, stores and
arithmetic. T = 16384, V = 50304, K = 3; GPU-only times (CUDA graph replays).
Run from the repository root: python3 records/2026-11-23_h100_ce_pipelined/probe_ce_pipelined.py
(TRITON_INTERPRET=1 on a CPU: a small correctness check against the landed kernel only).
The inputs and the timer are those of ../2026-11-23_h100_gram_split/probe_ce_l2.py and probe_gram.py."""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "2026-11-23_h100_gram_split"))
import triton_kernels as tk
from probe_ce_l2 import setup
from probe_gram import graph_us
from triton_kernels import _LOG2E, _grad_terms, _lse_terms, _mtp_targets, _softcap, _store_e5m2

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
REGISTERS = [None]   # (registers, spills) of the last compiled launch


@triton.jit
def _row_targets(row, logits_ptr, stride_row, targets_ptr, w_ptr, n_rows, n_cols,
                 K: tl.constexpr, K_POW2: tl.constexpr):
    target, weight = _mtp_targets(row, targets_ptr, w_ptr, n_rows, n_cols, K, K_POW2)
    in_row = (target >= 0) & (target < n_cols)
    l_target = tl.load(logits_ptr + tl.cast(row, tl.int64) * stride_row + target, mask=in_row, other=0.0)
    return target, weight, l_target.to(tl.float32)


@triton.jit
def _lse_block(row_ptr, c0, cols, tail, MASKED: tl.constexpr, EVICT: tl.constexpr,
               DUMMY: tl.constexpr, INTERPRETED: tl.constexpr):
    if MASKED:
        logits = tl.load(row_ptr + c0 + cols, mask=tail, other=0.0).to(tl.float32)
    elif EVICT:
        logits = tl.load(row_ptr + c0 + cols, eviction_policy="evict_last").to(tl.float32)
    else:
        logits = tl.load(row_ptr + c0 + cols).to(tl.float32)
    if DUMMY:
        return tl.sum(tl.reshape(logits, (logits.shape[0] // 2, 2)), axis=1)
    return _lse_terms(logits, tail, MASKED, INTERPRETED)


@triton.jit
def _grad_block(row_ptr, grad_row_ptr, c0, cols, tail, lse_shift, scale, MASKED: tl.constexpr,
                DUMMY: tl.constexpr, INTERPRETED: tl.constexpr):
    if MASKED:
        logits = tl.load(row_ptr + c0 + cols, mask=tail, other=0.0).to(tl.float32)
    else:
        logits = tl.load(row_ptr + c0 + cols, eviction_policy="evict_first").to(tl.float32)
    if DUMMY:
        g = logits * scale + lse_shift
    else:
        g = _grad_terms(logits, lse_shift, scale, INTERPRETED)
    _store_e5m2(grad_row_ptr + c0 + cols, g, tail if MASKED else None, True, INTERPRETED)


@triton.jit
def _row_loss(row, sum_exp, target, weight, l_target, losses_ptr, DUMMY: tl.constexpr):
    if DUMMY:
        lse = 23.0 + tl.log(tl.abs(tl.sum(sum_exp, axis=0)) + 1.0)
    else:
        lse = 23.0 + tl.log(tl.sum(sum_exp, axis=0))
    z_target, _ = _softcap(l_target)
    tl.store(losses_ptr + row, tl.sum(tl.where(weight > 0, weight * (lse - z_target), 0.0), axis=0))
    return lse


@triton.jit
def _target_grads(grad_row_ptr, target, weight, l_target, lse, n_cols, grad_factor,
                  INTERPRETED: tl.constexpr):
    tl.debug_barrier()
    z_target, s_target = _softcap(l_target)
    weight_sum = tl.sum(weight, axis=0)
    same_column = target[:, None] == target[None, :]
    dz = weight_sum * tl.exp(z_target - lse) - tl.sum(tl.where(same_column, weight[None, :], 0.0), axis=1)
    in_row = (target >= 0) & (target < n_cols)
    _store_e5m2(grad_row_ptr + target, dz * s_target * (1.0 - s_target) * grad_factor, in_row, False,
                INTERPRETED)


@triton.jit
def _pipelined_kernel(
    logits_ptr, stride_row, targets_ptr, w_ptr, losses_ptr, grad_ptr, stride_grad, grad_scale,
    n_rows, n_cols,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_V: tl.constexpr, UNROLL: tl.constexpr,
    EVICT: tl.constexpr, DUMMY: tl.constexpr, INTERPRETED: tl.constexpr,
):
    grad_factor = (23.0 / 7.5) / tl.cast(grad_scale, tl.float32)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    n_blocks = n_cols // BLOCK_V
    n_full = n_blocks * BLOCK_V
    tail = cols < n_cols - n_full

    # pass 1 of the program's first row
    row = tl.program_id(0)
    target, weight, l_target = _row_targets(row, logits_ptr, stride_row, targets_ptr, w_ptr, n_rows, n_cols, K, K_POW2)
    row_ptr = logits_ptr + tl.cast(row, tl.int64) * stride_row
    sum_exp = tl.zeros((BLOCK_V // 2,), dtype=tl.float32)
    for i in tl.range(0, n_blocks, loop_unroll_factor=UNROLL):
        sum_exp += _lse_block(row_ptr, i * BLOCK_V, cols, tail, False, EVICT, DUMMY, INTERPRETED)
    if n_full < n_cols:
        sum_exp += _lse_block(row_ptr, n_full, cols, tail, True, EVICT, DUMMY, INTERPRETED)
    lse = _row_loss(row, sum_exp, target, weight, l_target, losses_ptr, DUMMY)

    # steady state: pass 2 of `row` (backwards) interleaved with pass 1 of the next row
    for next_row in tl.range(row + n_programs, n_rows, n_programs):
        next_target, next_weight, next_l_target = _row_targets(
            next_row, logits_ptr, stride_row, targets_ptr, w_ptr, n_rows, n_cols, K, K_POW2)
        next_ptr = logits_ptr + tl.cast(next_row, tl.int64) * stride_row
        grad_row_ptr = grad_ptr + tl.cast(row, tl.int64) * stride_grad
        lse_shift = (11.5 - lse) * _LOG2E
        scale = 0.25 * tl.sum(weight, axis=0) * grad_factor
        if n_full < n_cols:
            _grad_block(row_ptr, grad_row_ptr, n_full, cols, tail, lse_shift, scale, True, DUMMY, INTERPRETED)
        sum_exp = tl.zeros((BLOCK_V // 2,), dtype=tl.float32)
        for i in tl.range(0, n_blocks, loop_unroll_factor=UNROLL):
            sum_exp += _lse_block(next_ptr, i * BLOCK_V, cols, tail, False, EVICT, DUMMY, INTERPRETED)
            _grad_block(row_ptr, grad_row_ptr, (n_blocks - 1 - i) * BLOCK_V, cols, tail, lse_shift, scale,
                        False, DUMMY, INTERPRETED)
        if n_full < n_cols:
            sum_exp += _lse_block(next_ptr, n_full, cols, tail, True, EVICT, DUMMY, INTERPRETED)
        _target_grads(grad_row_ptr, target, weight, l_target, lse, n_cols, grad_factor, INTERPRETED)
        lse = _row_loss(next_row, sum_exp, next_target, next_weight, next_l_target, losses_ptr, DUMMY)
        row, row_ptr, target, weight, l_target = next_row, next_ptr, next_target, next_weight, next_l_target

    # pass 2 of the last row
    grad_row_ptr = grad_ptr + tl.cast(row, tl.int64) * stride_grad
    lse_shift = (11.5 - lse) * _LOG2E
    scale = 0.25 * tl.sum(weight, axis=0) * grad_factor
    if n_full < n_cols:
        _grad_block(row_ptr, grad_row_ptr, n_full, cols, tail, lse_shift, scale, True, DUMMY, INTERPRETED)
    for i in tl.range(0, n_blocks, loop_unroll_factor=UNROLL):
        _grad_block(row_ptr, grad_row_ptr, (n_blocks - 1 - i) * BLOCK_V, cols, tail, lse_shift, scale,
                    False, DUMMY, INTERPRETED)
    _target_grads(grad_row_ptr, target, weight, l_target, lse, n_cols, grad_factor, INTERPRETED)


def pipelined(logits, targets, w, grad_scale, n_programs, block_v=2048, num_warps=16, unroll=2,
              evict=True, dummy=False, maxnreg=None):
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    grad = torch.empty(n_rows, n_cols, dtype=torch.float8_e5m2, device=logits.device)
    launch = dict(num_warps=num_warps)
    if maxnreg:
        launch["maxnreg"] = maxnreg
    K = w.numel()
    compiled = _pipelined_kernel[(min(n_rows, n_programs),)](
        logits, logits.stride(0), targets, w, losses, grad, grad.stride(0), grad_scale, n_rows, n_cols,
        K=K, K_POW2=triton.next_power_of_2(K), BLOCK_V=block_v, UNROLL=unroll, EVICT=evict, DUMMY=dummy,
        INTERPRETED=INTERP, **launch)
    if not INTERP:
        REGISTERS[0] = (compiled.n_regs, compiled.n_spills)
    return losses, grad


def same(a, b):
    return torch.equal(a[0], b[0]), torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))


def main_cpu():
    torch.manual_seed(0)
    for T, V, w, programs in ((37, 700, [1.0, 0.5, 0.25], 5), (21, 512, [1.0], 21), (9, 600, [0.5, 0.0], 16)):
        logits = (torch.randn(T, V) * 4).bfloat16()
        targets = torch.randint(0, V, (T,))
        targets[-2] = -1
        w = torch.tensor(w)
        ref = tk.softcapped_mtp_losses_and_grad(logits, targets, w, 0.75 / 448)
        got = pipelined(logits, targets, w, 0.75 / 448, programs, block_v=256, num_warps=4)
        print(T, V, programs, "losses equal, grad equal:", same(got, ref))


def main_gpu():
    logits, targets, w, grad_scale = setup()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ref = tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale)
    variants = [("landed kernel", lambda: tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale))]
    for per_sm, block_v, warps, unroll, evict, maxnreg in (
            (2, 2048, 16, 1, True, 64), (2, 2048, 16, 2, True, 64), (2, 2048, 16, 4, True, 64),
            (2, 4096, 16, 1, True, 64), (2, 4096, 16, 2, True, 64), (2, 2048, 16, 2, False, 64),
            (4, 2048, 8, 1, True, 64), (4, 2048, 8, 2, True, 64), (4, 1024, 8, 2, True, 64),
            (3, 2048, 8, 2, True, 80)):
        label = f"pipelined {per_sm}/SM {block_v}x{warps} u{unroll}{'' if evict else ' no-evict'}" \
                f"{f' r{maxnreg}' if maxnreg else ''}"
        fn = (lambda p=per_sm, b=block_v, nw=warps, u=unroll, e=evict, r=maxnreg:
              pipelined(logits, targets, w, grad_scale, sms * p, b, nw, u, e, False, r))
        try:
            out = fn()
            print(f"  {label}: regs, spills {REGISTERS[0]}; equal to landed (losses, grad): {same(out, ref)}",
                  flush=True)
        except Exception as error:
            print(f"  {label}: failed: {type(error).__name__}: {error}"[:300], flush=True)
            continue
        variants.append((label, fn))
    for per_sm, warps, unroll in ((2, 16, 2), (2, 16, 4), (4, 8, 2)):
        variants.append((f"floor (one FMA), pipelined {per_sm}/SM 2048x{warps} u{unroll} r64",
                         lambda p=per_sm, nw=warps, u=unroll: pipelined(
                             logits, targets, w, grad_scale, sms * p, num_warps=nw, unroll=u, dummy=True,
                             maxnreg=64)))
    n_bytes = logits.numel() * 3
    for round_ in range(2):
        print(f"round {round_ + 1}: | variant | median us (rounds) | GB/s | of 3.0 TB/s |", flush=True)
        for label, fn in variants:
            median, times = graph_us(fn, rounds=5)
            print(f"| {label} | {median:.0f} ({' '.join(f'{t:.0f}' for t in times)}) | "
                  f"{n_bytes / median / 1e3:.0f} | {n_bytes / median / 1e3 / 3000:.0%} |", flush=True)


if __name__ == "__main__":
    main_cpu() if INTERP else main_gpu()
