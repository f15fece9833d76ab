"""Probe of the CE kernel, T = 16384, V = 50304, K = 3, GPU-only times (CUDA graph replays).
  setaside: does pass 2 find more of its row in L2 when only the first PROTECT blocks of pass 1
            are loaded with evict_last, or when the device sets aside L2 for persisting accesses
            (cudaLimitPersistingL2CacheSize)? DUMMY replaces the arithmetic by one FMA (the floor).
  targets:  the K targets held as a vector (landed) or as scalars.
The kernel is the landed _mtp_ce_kernel with those knobs added. Run from the repository root on
a GPU: python3 probe_ce_l2.py setaside|targets."""
import ctypes
import glob
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "2026-11-23_h100_ce_cheaper_math"))
import triton_kernels as tk
from probe_ce_layouts import _load_targets3, _loss3, _store_target_grads3
from probe_gram import graph_us
from triton_kernels import _LOG2E, _grad_terms, _lse_terms, _mtp_targets, _softcap, _store_e5m2


@triton.jit
def _kernel(logits_ptr, stride_row, targets_ptr, w_ptr, losses_ptr, grad_ptr, stride_grad, grad_scale,
            n_rows, n_cols, K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_V: tl.constexpr,
            PROTECT: tl.constexpr, DUMMY: tl.constexpr, TARGETS: tl.constexpr):
    grad_factor = (23.0 / 7.5) / tl.cast(grad_scale, tl.float32)
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    grad_row_ptr = grad_ptr + row.to(tl.int64) * stride_grad
    cols = tl.arange(0, BLOCK_V)
    n_blocks = n_cols // BLOCK_V
    n_full = n_blocks * BLOCK_V
    tail = cols < n_cols - n_full
    if TARGETS == 2:    # K = 3 scalars, their logits loaded now, soft-capped after pass 1
        t0, t1, t2, w0, w1, w2, l0, l1, l2 = _load_targets3(row, row_ptr, targets_ptr, w_ptr, n_rows, n_cols)
    else:
        target, weight = _mtp_targets(row, targets_ptr, w_ptr, n_rows, n_cols, K, K_POW2)
        in_row = (target >= 0) & (target < n_cols)
        l_target = tl.load(row_ptr + target, mask=in_row, other=0.0).to(tl.float32)
        if TARGETS == 0:
            z_target, s_target = _softcap(l_target)
    sum_exp = tl.zeros((BLOCK_V // 2,), dtype=tl.float32)
    protect = tl.minimum(n_blocks, PROTECT)
    for i in tl.range(0, protect, loop_unroll_factor=4):
        logits = tl.load(row_ptr + i * BLOCK_V + cols, eviction_policy="evict_last").to(tl.float32)
        if DUMMY:
            sum_exp += tl.sum(tl.reshape(logits, (BLOCK_V // 2, 2)), axis=1)
        else:
            sum_exp += _lse_terms(logits, tail, False, False)
    for i in tl.range(protect, n_blocks, loop_unroll_factor=4):
        logits = tl.load(row_ptr + i * BLOCK_V + cols).to(tl.float32)
        if DUMMY:
            sum_exp += tl.sum(tl.reshape(logits, (BLOCK_V // 2, 2)), axis=1)
        else:
            sum_exp += _lse_terms(logits, tail, False, False)
    if n_full < n_cols:
        logits = tl.load(row_ptr + n_full + cols, mask=tail, other=0.0).to(tl.float32)
        sum_exp += _lse_terms(logits, tail, True, False)
    if DUMMY:   # keep the exponent of pass 2 in range whatever the sum
        lse = 23.0 + tl.log(tl.abs(tl.sum(sum_exp, axis=0)) + 1.0)
    else:
        lse = 23.0 + tl.log(tl.sum(sum_exp, axis=0))
    if TARGETS == 2:
        z0, s0 = _softcap(l0)
        z1, s1 = _softcap(l1)
        z2, s2 = _softcap(l2)
        tl.store(losses_ptr + row, _loss3(lse, w0, w1, w2, z0, z1, z2))
        weight_sum = w0 + w1 + w2
    else:
        if TARGETS == 1:
            z_target, s_target = _softcap(l_target)
        tl.store(losses_ptr + row, tl.sum(tl.where(weight > 0, weight * (lse - z_target), 0.0), axis=0))
        weight_sum = tl.sum(weight, axis=0)
    lse_shift = (11.5 - lse) * _LOG2E
    scale = 0.25 * weight_sum * grad_factor
    if n_full < n_cols:
        logits = tl.load(row_ptr + n_full + cols, mask=tail, other=0.0).to(tl.float32)
        _store_e5m2(grad_row_ptr + n_full + cols, _grad_terms(logits, lse_shift, scale, False), tail, True, False)
    for i in tl.range(0, n_blocks, loop_unroll_factor=4):
        c0 = (n_blocks - 1 - i) * BLOCK_V
        logits = tl.load(row_ptr + c0 + cols, eviction_policy="evict_first").to(tl.float32)
        if DUMMY:
            g = logits * scale + lse_shift
        else:
            g = _grad_terms(logits, lse_shift, scale, False)
        _store_e5m2(grad_row_ptr + c0 + cols, g, None, True, False)
    tl.debug_barrier()
    if TARGETS == 2:
        _store_target_grads3(grad_row_ptr, lse, weight_sum, grad_factor, t0, t1, t2, w0, w1, w2,
                             z0, z1, z2, s0, s1, s2, 0, n_cols, False)
    else:
        same_column = target[:, None] == target[None, :]
        dz = weight_sum * tl.exp(z_target - lse) - tl.sum(tl.where(same_column, weight[None, :], 0.0), axis=1)
        _store_e5m2(grad_row_ptr + target, dz * s_target * (1.0 - s_target) * grad_factor, in_row, False, False)



def launch(logits, targets, w, grad_scale, protect, dummy=False, targets_mode=0):
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    grad = torch.empty(n_rows, n_cols, dtype=torch.float8_e5m2, device=logits.device)
    _kernel[(n_rows,)](logits, logits.stride(0), targets, w, losses, grad, grad.stride(0), grad_scale,
                       n_rows, n_cols, K=3, K_POW2=4, BLOCK_V=2048, PROTECT=protect, DUMMY=dummy,
                       TARGETS=targets_mode,
                       num_warps=16)
    return losses, grad


def cudart():
    import torch as _t
    roots = [os.path.dirname(_t.__file__) + "/lib"] + glob.glob(
        os.path.join(os.path.dirname(os.path.dirname(_t.__file__)), "nvidia", "**", "lib"), recursive=True)
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "libcudart.so*"))):
            return ctypes.CDLL(path)
    return ctypes.CDLL("libcudart.so")


def set_persisting_l2(lib, nbytes):
    status = lib.cudaDeviceSetLimit(ctypes.c_int(0x06), ctypes.c_size_t(nbytes))   # PersistingL2CacheSize
    value = ctypes.c_size_t(0)
    lib.cudaDeviceGetLimit(ctypes.byref(value), ctypes.c_int(0x06))
    return status, value.value


def setup():
    torch.manual_seed(0)
    T, V = 16384, 50304
    targets = torch.randint(0, V, (T,), device="cuda")
    w = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    logits = (torch.randn(T, V, device="cuda") * 3.0).bfloat16()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, L2 {props.L2_cache_size / 2**20:.0f} MiB, {props.multi_processor_count} SMs, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    return logits, targets, w, 0.75 / 448


def report(label, fn, n_bytes):
    median, times = graph_us(fn, rounds=5)
    print(f"| {label} | {median:.0f} us ({' '.join(f'{t:.0f}' for t in times)}) | "
          f"{n_bytes / median / 1e3:.0f} GB/s | {n_bytes / median / 1e3 / 3000:.0%} |", flush=True)


def main_setaside():
    """Partial evict_last and the persisting-L2 set-aside (probe_ce_l2_setaside.txt)."""
    logits, targets, w, grad_scale = setup()
    lib = cudart()
    max_persist = ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(max_persist), ctypes.c_int(108), ctypes.c_int(0))   # MaxPersistingL2CacheSize
    print(f"max persisting L2: {max_persist.value / 2**20:.1f} MiB")
    variants = [("landed kernel", lambda: tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale))]
    for protect in (99, 16, 12, 8, 4):
        variants.append((f"protect {protect}", lambda p=protect: launch(logits, targets, w, grad_scale, p)))
    for protect in (99, 12):
        variants.append((f"floor (DUMMY), protect {protect}",
                         lambda p=protect: launch(logits, targets, w, grad_scale, p, True)))
    for set_aside in (0, max_persist.value // 2, max_persist.value):
        print("persisting L2 limit set (status, bytes):", set_persisting_l2(lib, set_aside))
        for label, fn in variants:
            report(f"{label}, set-aside {set_aside / 2**20:.0f} MiB", fn, logits.numel() * 3)


def main_targets():
    """How the K targets are held (probe_ce_targets.txt)."""
    logits, targets, w, grad_scale = setup()
    ref_losses, ref_grad = tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale)
    variants = [("landed kernel", lambda: tk.softcapped_mtp_losses_and_grad(logits, targets, w, grad_scale))]
    for mode, label in ((0, "vector targets (landed)"), (1, "vector targets, soft cap after pass 1"),
                        (2, "3 scalar targets, soft cap after pass 1")):
        variants.append((f"probe copy: {label}", lambda m=mode: launch(logits, targets, w, grad_scale, 99, False, m)))
        losses, grad = variants[-1][1]()
        print(label, "vs landed: losses equal", torch.equal(losses, ref_losses), "grad equal",
              torch.equal(grad.view(torch.uint8), ref_grad.view(torch.uint8)))
    for _ in range(2):
        for label, fn in variants:
            report(label, fn, logits.numel() * 3)

if __name__ == "__main__":
    {"setaside": main_setaside, "targets": main_targets}[sys.argv[1]]()
