"""Probe: the CE kernel with fewer instructions per logit, stage by stage, against the kernel of
2404283, and a device copy of the logits as the bandwidth reference. T = 16384, V = 50304, K = 3;
GPU-only times (CUDA-graph replays of 20 calls), registers per thread, and agreement with the
first variant (losses, e5m2 gradient codes).

Run from the repository root:
    python3 records/2026-11-23_h100_ce_fewer_instructions/probe_ce_instructions.py
It loads every variants/*.py (copies of triton_kernels.py; the README says how to rebuild them)
under its own op namespace. Environment:
    VARIANTS=v0_head,v4_final   only these variants (default: all)
    MAXNREG=32                  also launch each variant with these register caps ('' for none)
    TILES=2048x16,4096x32       BLOCK_V x num_warps of the launches (default 2048x16)
    MODE=passes|power           passes: PASSES passes over the variants, back to back
                                power: REPEATS rounds of (idle 2 s, burst, 3 s of load, sustained)
    COPY=1                      also time a copy of the logits (bytes read + written)
"""
import glob
import importlib.util
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "2026-11-23_h100_gram_split"))
from probe_gram import capture_graph, replay_us   # noqa: E402
CALLS = 20   # kernel calls per CUDA-graph replay


def setup():
    """The inputs of the earlier CE probes: a copy of setup() in
    ../2026-11-23_h100_gram_split/probe_ce_l2.py, which no longer imports with this kernel file."""
    torch.manual_seed(0)
    T, V = 16384, 50304
    targets = torch.randint(0, V, (T,), device="cuda")
    w = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    logits = (torch.randn(T, V, device="cuda") * 3.0).bfloat16()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    return logits, targets, w, 0.75 / 448


def load(path, index):
    """Import a copy of triton_kernels.py with its custom ops renamed, so that copies coexist."""
    source = open(path).read().replace("nanogpt_triton::", f"ce_probe_{index}::")
    module_path = f"/tmp/ce_probe_{index}.py"
    with open(module_path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"ce_probe_{index}", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps(codes):
    code = codes.view(torch.uint8).int()
    return torch.where(code >= 0x80, -(code & 0x7F), code & 0x7F)


def back_to_back(graphs, passes):
    """Median of 5 replays per variant, `passes` passes over the variants in alternating order."""
    times = {key: [] for key, _ in graphs}
    for p in range(passes):
        for key, graph in (graphs if p % 2 == 0 else graphs[::-1]):
            times[key].append(statistics.median(replay_us(graph, CALLS, 5)))
        print(f"pass {p + 1}: " + ", ".join(f"{k} {t[-1]:.0f}" for k, t in times.items()), flush=True)
    return times


def power_rounds(graphs, repeats, idle_s=2.0, sustain_s=3.0):
    """Each variant in turn, `repeats` times: after idle_s without work (clocks back at the
    maximum), the median of 5 replays (a burst of about 100 ms); then after sustain_s of replays
    (the board at its power limit), the median of 10 more."""
    burst, sustained = {key: [] for key, _ in graphs}, {key: [] for key, _ in graphs}
    for _ in range(repeats):
        for key, graph in graphs:
            time.sleep(idle_s)
            t0 = time.time()
            burst[key].append(statistics.median(replay_us(graph, CALLS, 5)))
            end = time.time() + sustain_s
            while time.time() < end:
                replay_us(graph, CALLS, 5)
            sustained[key].append(statistics.median(replay_us(graph, CALLS, 10)))
            print(f"{t0:.1f} {key}: burst {burst[key][-1]:.0f} us, sustained {sustained[key][-1]:.0f} us", flush=True)
    return burst, sustained


def main():
    logits, targets, w, grad_scale = setup()
    T, V = logits.shape
    names = os.environ.get("VARIANTS", "").split(",") if os.environ.get("VARIANTS") else None
    paths = [p for p in sorted(glob.glob(f"{HERE}/variants/*.py"))
             if names is None or os.path.basename(p)[:-3] in names]
    caps = [None] + [int(r) for r in os.environ.get("MAXNREG", "32").split(",") if r]
    tiles = [tuple(int(x) for x in t.split("x")) for t in os.environ.get("TILES", "2048x16").split(",")]

    graphs, n_bytes, first = [], {}, None
    print("| variant | tile | maxnreg | registers | max loss rel. diff | codes differing | max step |")
    print("|---|---|---|---|---|---|---|")
    for index, path in enumerate(paths):
        module, name = load(path, index), os.path.basename(path)[:-3]
        for (block_v, warps), maxnreg in [(tile, cap) for tile in tiles for cap in caps]:
            losses = torch.empty(T, device="cuda")
            grad = torch.empty(T, V, dtype=torch.float8_e5m2, device="cuda")
            extra = {} if maxnreg is None else {"maxnreg": maxnreg}

            def launch(module=module, losses=losses, grad=grad, extra=extra, block_v=block_v, warps=warps):
                return module._mtp_ce_kernel[(T,)](
                    logits, logits.stride(0), targets, w, losses, grad, grad.stride(0), grad_scale, T, V,
                    K=3, K_POW2=4, INTERPRETED=False, BLOCK_V=block_v, num_warps=warps, **extra)
            kernel = launch()
            torch.cuda.synchronize()
            if first is None:
                first = (losses.clone(), steps(grad))
            loss_diff = ((losses - first[0]).abs() / first[0].abs()).max().item()
            step_diff = (steps(grad) - first[1]).abs()
            tile = "" if tiles == [(2048, 16)] else f"/{block_v}x{warps}"
            print(f"| {name} | {block_v}x{warps} | {maxnreg} | {kernel.n_regs} | {loss_diff:.1e} | "
                  f"{(step_diff > 0).float().mean().item():.4%} | {step_diff.max().item()} |", flush=True)
            key = f"{name}{tile}/{maxnreg}"
            graphs.append((key, capture_graph(launch, CALLS)))
            n_bytes[key] = T * V * 3          # bf16 logits read, e5m2 gradient written
    if os.environ.get("COPY") == "1":
        copy_dst = torch.empty_like(logits)
        graphs.append(("copy", capture_graph(lambda: copy_dst.copy_(logits), CALLS)))
        n_bytes["copy"] = T * V * 4

    if os.environ.get("MODE", "passes") == "passes":
        times = back_to_back(graphs, int(os.environ.get("PASSES", "2")))
        print("\n| variant | us per pass | best us | GB/s (best) | % of 3.0 TB/s |")
        print("|---|---|---|---|---|")
        for key, t in times.items():
            gbps = n_bytes[key] / min(t) / 1e3
            print(f"| {key} | {' '.join(f'{x:.0f}' for x in t)} | {min(t):.0f} | {gbps:.0f} | {gbps / 3000:.0%} |")
        return
    burst, sustained = power_rounds(graphs, int(os.environ.get("REPEATS", "3")))
    gbps = {key: (n_bytes[key] / statistics.median(burst[key]) / 1e3,
                  n_bytes[key] / statistics.median(sustained[key]) / 1e3) for key in burst}
    copy = gbps.get("copy")
    print("\n| variant | burst us | sustained us | GB/s burst / sustained | % of 3.0 TB/s | % of the copy, same way |")
    print("|---|---|---|---|---|---|")
    for key in burst:
        b, s = gbps[key]
        of_copy = f"{b / copy[0]:.0%} / {s / copy[1]:.0%}" if copy else "-"
        print(f"| {key} | {' '.join(f'{x:.0f}' for x in burst[key])} | {' '.join(f'{x:.0f}' for x in sustained[key])} | "
              f"{b:.0f} / {s:.0f} | {b / 3000:.0%} / {s / 3000:.0%} | {of_copy} |")


if __name__ == "__main__":
    main()
