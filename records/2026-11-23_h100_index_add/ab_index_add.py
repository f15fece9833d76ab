"""A/B in one process: lookup-table gradient accumulation by index_add_rows against index_add_,
per-step wall times at stages 1 and 3 on the same compiled graphs. Run from the repository root:

    python3 records/2026-11-23_h100_index_add/ab_index_add.py [train_gpt.py options ...]
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402
import triton_kernels as tk  # noqa: E402

cfg = tg.parse_config(sys.argv[1:])
run = tg.setup_distributed()
run.grad_accum_steps = tg.check_config(cfg, run.world_size)
trainer = tg.Trainer(cfg, run, log=lambda line, console=True: None)
variants = {"kernel": tk.index_add_rows, "index_add_": tk.index_add_rows_reference}
for stage in (1, 3):
    start = trainer.schedule.stage_starts[stage - 1] + 2
    for step in range(start, start + 2):   # compile this stage's graphs
        trainer.train_step(step, trainer.advance(step))
    step = start + 2
    for round_ in range(3):
        for name, fn in variants.items():
            trainer.table_grads.index_add_rows = fn
            times = []
            for _ in range(6):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.train_step(step, trainer.advance(step))
                step += 1
                torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - t0))
            print(f"stage {stage} round {round_} {name:10s}: median {statistics.median(times):.1f} ms  "
                  f"{[round(t) for t in times]}", flush=True)
