"""Profile a few training steps on one GPU (or the CPU) and print where the time goes.

    python records/profile_steps.py [--stages 1 3] [--steps 4] [--trace DIR] [train_gpt.py options ...]

`--stages 1 3` picks the stages to profile; train_gpt.py's own stage table passes through written
with '=', as every train_gpt.py option is (`--stages="((...), ...)"`).

For each chosen stage it compiles that stage's shapes (two untimed steps), times `--steps` steps
(even and odd, so Adam steps are included; on a GPU each step's time is read from events
recorded between the steps, so the queue is never drained), runs them again under the profiler
and prints the kernels (on the CPU: the operators) with the most time and the GPU time by kind of
kernel. On a GPU it also lists where the GPU sat idle between kernels and what the host was
running meanwhile: the host stalls that make short steps slow and scattered. A last profiled run
of the same steps records the ops' input shapes, for the GEMMs by op and shape with the rate each
reaches against the bf16 or FP8 ceiling, and attention's rate from the documents and windows of
the profiled micro-batches. `--trace DIR` writes each stage's Chrome trace there.
Meant for finding what to speed up; the numbers are not a timing protocol.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_gpt as tg  # noqa: E402


def idle_gaps(busy: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    """(start, length) of every stretch of at least min_gap that no (start, end) interval in
    `busy` covers, between the first start and the last end; longest first."""
    gaps = []
    covered_until = None
    for start, end in sorted(busy):
        if covered_until is not None and start - covered_until >= min_gap:
            gaps.append((covered_until, start - covered_until))
        covered_until = end if covered_until is None else max(covered_until, end)
    return sorted(gaps, key=lambda gap: -gap[1])


def host_ops_during(events, start: float, end: float, top: int = 3) -> str:
    """The outermost host operators that ran during [start, end], by time spent inside it."""
    overlap: dict[str, float] = {}
    for e in events:
        if e.device_type != DeviceType.CPU or e.cpu_parent is not None:
            continue
        inside = min(end, e.time_range.end) - max(start, e.time_range.start)
        if inside > 0:
            overlap[e.name] = overlap.get(e.name, 0.0) + inside
    names = sorted(overlap, key=lambda n: -overlap[n])[:top]
    return ", ".join(f"{n} ({overlap[n] / 1000:.2f} ms)" for n in names) or "nothing profiled"


def print_idle_gaps(prof, steps: int, top: int) -> None:
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == DeviceType.CUDA]
    if not kernels:
        return
    gaps = idle_gaps(kernels, min_gap=20.0)          # microseconds
    span = max(end for _, end in kernels) - min(start for start, _ in kernels)
    idle = sum(length for _, length in gaps)
    print(f"GPU idle between kernels (gaps of 20 us or more): {idle / 1000 / steps:.2f} ms per "
          f"step of {span / 1000 / steps:.2f} ms; the longest, with what the host ran meanwhile:")
    for start, length in gaps[:top]:
        print(f"  {length / 1000:8.2f} ms  {host_ops_during(events, start, start + length)}")


# Kinds of GPU kernels, by name; the first that matches wins, the rest are "other".
KERNEL_KINDS = (
    ("compiled PyTorch ops (Inductor)", lambda name: name.startswith("triton_")),
    ("triton_kernels.py", lambda name: name.startswith("_") and name.endswith("_kernel")),
    ("flash attention", lambda name: "flash" in name),
    ("cuBLAS GEMMs", lambda name: name.startswith(("nvjet", "sm90_", "cutlass"))
     or "gemm" in name.lower()),
    ("NCCL", lambda name: "nccl" in name.lower()),
    ("copies and fills", lambda name: name.startswith(("Memcpy", "Memset"))
     or "copy" in name.lower() or "fill" in name.lower()),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, matches in KERNEL_KINDS if matches(name)), "other")


def gpu_kernels(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel the profiler saw."""
    return [(e.name, e.time_range.end - e.time_range.start) for e in prof.events()
            if e.device_type == DeviceType.CUDA]


def time_and_calls_by(kernels: list[tuple[str, float]], group) -> tuple[dict, dict]:
    """Microseconds and launches of the kernels summed per group(name)."""
    time_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for name, us in kernels:
        key = group(name)
        time_us[key] = time_us.get(key, 0.0) + us
        calls[key] = calls.get(key, 0) + 1
    return time_us, calls


def print_gpu_time_by_kind(kernels: list[tuple[str, float]], steps: int) -> None:
    """GPU time and kernel launches per step of each kind of kernel: how much is GEMM, how much
    the compiled element-wise work, and how many launches the host must issue per step."""
    time_us, launches = time_and_calls_by(kernels, kernel_kind)
    total = sum(time_us.values())
    if not total:
        return
    print("GPU time by kind of kernel, per step:")
    for kind in sorted(time_us, key=lambda k: -time_us[k]):
        print(f"  {kind:34s} {time_us[kind] / 1000 / steps:8.2f} ms "
              f"{100 * time_us[kind] / total:5.1f}%  {launches[kind] / steps:7.0f} kernels")
    print(f"  {'all':34s} {total / 1000 / steps:8.2f} ms         "
          f"{sum(launches.values()) / steps:7.0f} kernels")


def largest_kernels(kernels: list[tuple[str, float]], steps: int, top: int) -> list[str]:
    """A table of the kernels with the most GPU time, from (name, microseconds) per launch: calls
    and ms per step, and each one's share of all kernels' time."""
    time_us, calls = time_and_calls_by(kernels, lambda name: name)
    total = sum(time_us.values())
    lines = ["| kernel | kind | calls/step | ms/step | share |", "|---|---|---|---|---|"]
    for name in sorted(time_us, key=lambda n: -time_us[n])[:top]:
        short = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"| {short} | {kernel_kind(name)} | {calls[name] / steps:g} | "
                     f"{time_us[name] / 1000 / steps:.2f} | {100 * time_us[name] / total:.1f}% |")
    return lines


def largest_compiled_kernels(kernels: list[tuple[str, float]], steps: int, top: int) -> list[str]:
    """Inductor's kernels with the most GPU time, by full name: the name lists the ops fused into
    the kernel, which the tables cut short."""
    time_us, calls = time_and_calls_by(kernels, lambda name: name)
    compiled = [name for name in time_us if kernel_kind(name) == "compiled PyTorch ops (Inductor)"]
    return [f"  {time_us[name] / 1000 / steps:7.2f} ms/step, {calls[name] / steps:g} calls: {name}"
            for name in sorted(compiled, key=lambda n: -time_us[n])[:top]]


# The GEMMs of a step, by the op that launches them: FLOPs from the op's input shapes, and the
# ceiling that applies. The dense bf16 and FP8 rates measured on the H200 (the spec's measure.md);
# the H100 computes at the same rates.
CEILING_TFLOPS = {"bf16": 790.0, "fp8": 1440.0}


def matmul_flops(shapes: list) -> int:
    """a (m, k) @ b (k, n)."""
    (m, k), (_, n) = shapes[0], shapes[1]
    return 2 * m * k * n


def linear_flops(shapes: list) -> int:
    """a (m, k) @ b^T for b (n, k), as the kernels of triton_kernels.py take their operands."""
    (m, k), (n, _) = shapes[0], shapes[1]
    return 2 * m * n * k


GEMM_OPS = {
    "aten::mm": (matmul_flops, "bf16"),
    "aten::_scaled_mm": (matmul_flops, "fp8"),
    "nanogpt_triton::linear_relu_square_forward": (linear_flops, "bf16"),
    "nanogpt_triton::linear_relu_square_backward": (linear_flops, "bf16"),
    "nanogpt_triton::linear_relu_square_fp8_forward": (linear_flops, "fp8"),
    "nanogpt_triton::linear_relu_square_fp8_post": (linear_flops, "fp8"),
    "nanogpt_triton::linear_relu_square_fp8_backward": (linear_flops, "fp8"),
    "nanogpt_triton::fp8_linear": (linear_flops, "fp8"),
}


def gemm_rows(averages, steps: int, cuda: bool, top: int) -> list[str]:
    """The GEMM ops with the most time, one row per op and input shapes: calls and ms per step,
    the rate reached and its share of the ceiling. `averages`: key_averages grouped by input
    shape (on the CPU its times are host times, and no ceiling applies)."""
    rows = []
    for e in averages:
        if e.key not in GEMM_OPS or len(e.input_shapes) < 2:
            continue
        flops_of, precision = GEMM_OPS[e.key]
        us = e.device_time_total if cuda else e.cpu_time_total
        if us > 0:
            rows.append((us, e.key, e.input_shapes[:2], e.count, flops_of(e.input_shapes) * e.count,
                         precision))
    lines = ["| op | shapes | calls/step | ms/step | TFLOP/s | % of ceiling |",
             "|---|---|---|---|---|---|"]
    for us, name, shapes, count, flops, precision in sorted(rows, reverse=True)[:top]:
        tflops = flops / us / 1e6
        ceiling = f"{100 * tflops / CEILING_TFLOPS[precision]:.0f} ({precision})" if cuda else "-"
        shape_text = " x ".join("(" + ", ".join(map(str, shape)) + ")" for shape in shapes)
        lines.append(f"| {name} | {shape_text} | {count / steps:g} | {us / 1000 / steps:.2f} "
                     f"| {tflops:.1f} | {ceiling} |")
    return lines


# Attention's work, from the documents of the micro-batches it ran on, so that its kernels (torch's
# flash attention or triton_kernels.windowed_attention) get a rate against the bf16 ceiling too. A
# query sees the keys of its own document within its left window; each (query, key) pair costs
# 2 x head_dim FLOPs in QK^T and as many in PV (Q and K zero-padded to V's width, as the kernels
# compute them). The backward does 2.5 times the forward's work: it recomputes QK^T and adds dV,
# dP, dQ and dK.
ATTENTION_BACKWARD_WORK = 2.5


def causal_window_pairs(length: int, window: int) -> int:
    """(query, key) pairs in a document of `length` rows where row i sees rows i - window to i."""
    ramp = min(length, window + 1)          # the first rows see every row before them
    return ramp * (ramp + 1) // 2 + (length - ramp) * (window + 1)


def attention_flops(cu_seqlens: list[int], windows: tuple[int, int],
                          cfg: tg.Hyperparameters) -> int | None:
    """Forward FLOPs of one micro-batch's attention calls, for its document bounds and the
    step's (short, long) windows in tokens. A paired-head layer attends over twice the rows (each
    document twice as long) with half the heads. None where cfg.attn puts other kernels in the
    unpaired layers."""
    if cfg.attn != "standard":
        return None
    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    short, long = windows
    flops = 0
    for layer in tg.ATTN_LAYERS:
        window = long if layer in tg.LONG_WINDOW_LAYERS else short
        paired = layer in tg.PAIRED_HEAD_LAYERS
        heads = cfg.num_heads // 2 if paired else cfg.num_heads
        pairs = sum(causal_window_pairs(2 * n if paired else n, window) for n in lengths)
        flops += 4 * cfg.head_dim * heads * pairs
    return flops


def is_attention_kernel(name: str) -> bool:
    return kernel_kind(name) == "flash attention" or name.startswith("_attention_")


def attention_rows(kernels: list[tuple[str, float]], forward_flops: int, steps: int) -> list[str]:
    """The attention kernels' time per step, forward and backward apart, with the rate their
    FLOPs (forward_flops over all profiled steps) reach against the bf16 ceiling."""
    lines = ["| attention | kernels | ms/step | GFLOP/step | TFLOP/s | % of ceiling |",
             "|---|---|---|---|---|---|"]
    for label, flops in (("forward", forward_flops),
                         ("backward", ATTENTION_BACKWARD_WORK * forward_flops)):
        launches = [(name, us) for name, us in kernels if is_attention_kernel(name)
                    and any(word in name.lower() for word in ("bwd", "backward"))
                    == (label == "backward")]
        us = sum(t for _, t in launches)
        if not us:
            continue
        tflops = flops / us / 1e6
        lines.append(f"| {label} | {len({name for name, _ in launches})} | {us / 1000 / steps:.2f} | "
                     f"{flops / 1e9 / steps:.1f} | {tflops:.1f} | "
                     f"{100 * tflops / CEILING_TFLOPS['bf16']:.0f} |")
    return lines


class BatchBounds:
    """Keeps the document bounds (cu_seqlens) of every micro-batch the trainer's loader hands out
    while recording, each with the windows of its step, without reading them back meanwhile."""

    def __init__(self, loader):
        self.loader, self.next_batch = loader, loader.next_batch
        self.batches: list[tuple[torch.Tensor, tuple[int, int]]] = []
        self.windows = (0, 0)

    def __enter__(self):
        def recorded(*args, **kwargs):
            batch = self.next_batch(*args, **kwargs)
            self.batches.append((batch.cu_seqlens, self.windows))
            return batch
        self.loader.next_batch = recorded
        return self

    def __exit__(self, *exc):
        self.loader.next_batch = self.next_batch

    def forward_flops(self, cfg: tg.Hyperparameters) -> int | None:
        flops = [attention_flops(cu_seqlens.tolist(), windows, cfg)
                 for cu_seqlens, windows in self.batches]
        return None if None in flops else sum(flops)


def step_times_ms(trainer, steps, cuda: bool) -> list[float]:
    """Each step's time: on a GPU between events recorded after each step (no draining)."""
    tg.synchronize(trainer.run.device)
    if not cuda:
        times = []
        for step in steps:
            t0 = time.perf_counter()
            trainer.train_step(step, trainer.advance(step))
            times.append(1000 * (time.perf_counter() - t0))
        return times
    marks = [torch.cuda.Event(enable_timing=True)]
    marks[0].record()
    for step in steps:
        trainer.train_step(step, trainer.advance(step))
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--stages", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default="", help="folder for the Chrome traces")
    stage_table = [arg for arg in sys.argv[1:] if arg.startswith("--stages=")]
    args, options = parser.parse_known_args([a for a in sys.argv[1:] if a not in stage_table])
    cfg = tg.parse_config(options + stage_table)
    run = tg.setup_distributed()
    run.grad_accum_steps = tg.check_config(cfg, run.world_size)
    trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for stage in args.stages:
        if not 1 <= stage <= len(cfg.stages):
            raise SystemExit(f"--stages: stage {stage} does not exist (1 to {len(cfg.stages)})")
        start = trainer.schedule.stage_starts[stage - 1] + 2
        for step in range(start, start + 2):   # compile this stage's graphs (even and odd)
            trainer.train_step(step, trainer.advance(step))
        steps = range(start + 2, start + 2 + args.steps)
        times = step_times_ms(trainer, steps, cuda)
        with profile(activities=activities) as prof, BatchBounds(trainer.loader) as bounds:
            t0 = time.perf_counter()
            for step in steps:
                settings = trainer.advance(step)
                bounds.windows = settings.windows
                trainer.train_step(step, settings)
            tg.synchronize(run.device)
            profiled_ms = 1000 * (time.perf_counter() - t0) / args.steps
        print(f"\n=== stage {stage}: {statistics.median(times):.1f} ms/step median without the "
              f"profiler (min {min(times):.1f}, max {max(times):.1f}; {args.steps} steps), "
              f"{profiled_ms:.1f} with it")
        print("step times (ms): " + " ".join(f"{t:.1f}" for t in times))
        if cuda:   # the run's peaks so far: this stage and every one before it
            print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated, "
                  f"{torch.cuda.max_memory_reserved() / 2**20:,.0f} MiB reserved")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top,
                                        max_name_column_width=70))
        kernels = gpu_kernels(prof)
        print_gpu_time_by_kind(kernels, args.steps)
        if kernels:
            print("The largest kernels:")
            print("\n".join(largest_kernels(kernels, args.steps, top=10)))
            print("Inductor's largest kernels, by full name:")
            print("\n".join(largest_compiled_kernels(kernels, args.steps, top=10)))
        forward_flops = bounds.forward_flops(cfg)
        if forward_flops and any(is_attention_kernel(name) for name, _ in kernels):
            print("\n".join(attention_rows(kernels, forward_flops, args.steps)))
        print_idle_gaps(prof, args.steps, top=10)
        if trainer.paths.cuda_graphs:   # a graph's replay records its kernels but not their ops
            print("GEMMs by op and shape: not seen inside CUDA graphs (profile with "
                  "--cuda_graphs=false)")
        else:
            # the same steps again with the ops' input shapes recorded: recording them costs host
            # time per op, which would lengthen the idle gaps above
            with profile(activities=activities, record_shapes=True) as shapes:
                for step in steps:
                    trainer.train_step(step, trainer.advance(step))
                tg.synchronize(run.device)
            print("GEMMs by op and shape, the most time first:")
            print("\n".join(gemm_rows(shapes.key_averages(group_by_input_shape=True), args.steps,
                                      cuda, top=args.top)))
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"stage{stage}.json"))


if __name__ == "__main__":
    main()
