"""Profile a few training steps on one GPU (or the CPU) and print where the time goes.

    python records/profile_steps.py [--stages 1 3] [--steps 4] [train_gpt.py options ...]

For each chosen stage it compiles that stage's shapes (two untimed steps), times `--steps` steps
(even and odd, so Adam steps are included), runs them again under the profiler and prints both
step times and the kernels (on the CPU: the operators) with the most time. Meant for finding what
to speed up; the numbers are not a timing protocol.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_gpt as tg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    args, options = parser.parse_known_args()
    cfg = tg.parse_config(options)
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
        tg.synchronize(run.device)
        t0 = time.perf_counter()
        for step in steps:
            trainer.train_step(step, trainer.advance(step))
        tg.synchronize(run.device)
        plain_ms = 1000 * (time.perf_counter() - t0) / args.steps
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for step in steps:
                trainer.train_step(step, trainer.advance(step))
            tg.synchronize(run.device)
            profiled_ms = 1000 * (time.perf_counter() - t0) / args.steps
        print(f"\n=== stage {stage}: {plain_ms:.1f} ms/step without the profiler, "
              f"{profiled_ms:.1f} with it ({args.steps} steps each)")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top,
                                        max_name_column_width=70))


if __name__ == "__main__":
    main()
