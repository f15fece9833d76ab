"""The tools in records/: step_times.py, compare_losses.py, measure.sh, profile_steps.py,
bench_kernels.py and kernel_registers.py (stats.py and run.sh are tested in test_stats.py).

Logs are written here in the format train_gpt.py writes (its own config block, then step lines),
with step times and losses chosen so that the expected medians and differences are known.
"""
import importlib.util
import lzma
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CORPUS, ROOT, needs_corpus, stages_option


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"records_{name}", os.path.join(ROOT, "records", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_tool(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, **kwargs)


def write_log(path, cfg, step_ms=None, losses=None):
    """A run log: the config block as train_gpt.py writes it, then step and progress lines."""
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=8)
    lines = ["(source and environment)", tg.config_report(cfg, run)]
    total = 0
    for step, ms in enumerate(step_ms or [], start=1):
        total += ms
        lines.append(f"step:{step}/{cfg.num_train_steps} train_time:{total}ms step_avg:{total / step:.2f}ms")
    for step, loss in sorted((losses or {}).items()):
        lines.append(f"progress step {step}/{cfg.num_train_steps} train_loss:{loss:.4f} tokens/s:1 "
                     f"step_time:1.0ms eta:0m00s")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -------------------------------------------------------------------------------------------------
# step_times.py
# -------------------------------------------------------------------------------------------------

def test_step_times_medians_per_stage_from_the_logged_schedule(tmp_path):
    # 12 scheduled steps in three stages of 4, then 3 extension steps; the stage rows are not the
    # defaults, so the tool must read them back from the log's config block
    cfg = tg.parse_config(["--preset=smoke", "--num_scheduled_iterations=12",
                           "--num_extension_iterations=3",
                           stages_option(batch_tokens=(512, 1024, 2048))])
    step_ms = [90, 10, 11, 12] + [95, 20, 21, 26] + [99, 30, 33, 34] + [98, 40, 45]
    log = write_log(tmp_path / "run.txt", cfg, step_ms)
    step_times = load_tool("step_times")
    read_cfg, _ = step_times.read_log(log)
    assert read_cfg.stages == cfg.stages
    assert step_times.stage_medians(log, skip=1) == [(3, 11), (3, 21), (3, 33), (2, 42.5)]
    result = run_tool("records/step_times.py", log, "--skip", "1")
    assert result.returncode == 0, result.stderr
    assert "   11.0 ( 3)   21.0 ( 3)   33.0 ( 3)   42.5 ( 2)" in result.stdout


def test_step_times_names_a_file_that_is_no_log(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    result = run_tool("records/step_times.py", str(path))
    assert result.returncode != 0 and "no config block found" in result.stderr


# -------------------------------------------------------------------------------------------------
# compare_losses.py
# -------------------------------------------------------------------------------------------------

def test_compare_losses_side_by_side(tmp_path):
    cfg = tg.Hyperparameters(**tg.PRESETS["smoke"])
    a = write_log(tmp_path / "a.txt", cfg, losses={1: 10.0, 2: 9.0, 3: 8.0, 4: 7.0})
    b = write_log(tmp_path / "b.txt", cfg, losses={1: 10.0, 2: 9.01, 3: 7.95})
    result = run_tool("records/compare_losses.py", a, b)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["2", "9.0000", "9.0100", "+0.0100"]
    assert lines[-1] == "largest difference: 0.0500 at step 3 (over 3 steps)"


# -------------------------------------------------------------------------------------------------
# measure.sh
# -------------------------------------------------------------------------------------------------

FAKE_TORCHRUN = """#!/bin/sh
echo "$@ | $NCCL_NVLS_ENABLE $TORCH_SYMM_MEM_DISABLE_MULTICAST | $TORCHINDUCTOR_CACHE_DIR" >> "$FAKE_TORCHRUN_CALLS"
"""


@pytest.fixture
def measure_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    shards = tmp_path / "shards"
    shards.mkdir()
    payload = np.arange(300, dtype="<u2").tobytes()
    (shards / "corpus_train_000001.bin.xz").write_bytes(lzma.compress(payload))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SHARDS": str(shards),
           "FAKE_TORCHRUN_CALLS": str(tmp_path / "calls.txt")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)     # torch may have set it in this process
    return env, shards, tmp_path / "calls.txt", payload


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
@pytest.mark.parametrize("protocol,options", [
    ("T", "--num_scheduled_iterations=150 --num_extension_iterations=10 --val_every=0 --cycle_train_data=true"),
    ("L", "--stop_after_steps=200 --val_every=50"),
    ("C", "--num_scheduled_iterations=210 --num_extension_iterations=6 --val_every=70"),
])
def test_measure_sh_runs_each_protocol(measure_env, protocol, options):
    env, shards, calls, payload = measure_env
    result = subprocess.run([os.path.join(ROOT, "records", "measure.sh"), protocol, "/tmp/out", "--seed=3"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (shards / "corpus_train_000001.bin").read_bytes() == payload   # unpacked beside its .xz
    assert calls.read_text() == (
        f"--standalone --nproc_per_node=1 train_gpt.py --train_files={shards}/corpus_train_*.bin "
        f"--val_files={shards}/corpus_val_*.bin --val_tokens=2097152 --log_dir=/tmp/out {options} "
        f"--seed=3 | 0 1 | \n")


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
def test_measure_sh_startup_protocol_runs_cold_warm_and_shipped(measure_env, tmp_path):
    env, shards, calls, _ = measure_env
    out = tmp_path / "out"
    (out / "caches" / "local").mkdir(parents=True)      # left by an earlier run: cold removes it
    (out / "caches" / "local" / "stale").write_text("x")
    result = subprocess.run([os.path.join(ROOT, "records", "measure.sh"), "S", str(out)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (out / "caches" / "local" / "stale").exists()
    T = "--num_scheduled_iterations=150 --num_extension_iterations=10 --val_every=0 --cycle_train_data=true"
    common = (f"--standalone --nproc_per_node=1 train_gpt.py --train_files={shards}/corpus_train_*.bin "
              f"--val_files={shards}/corpus_val_*.bin --val_tokens=2097152 --log_dir={out} {T}")
    cache = f"--compile_cache={out}/compile_cache.bin"
    assert calls.read_text().splitlines() == [
        f"{common} --log_dir={out}/cold {cache} | 0 1 | {out}/caches/local/inductor",
        f"{common} --log_dir={out}/warm | 0 1 | {out}/caches/local/inductor",
        f"{common} --log_dir={out}/shipped {cache} | 0 1 | {out}/caches/fresh/inductor"]


def test_measure_sh_rejects_an_unknown_protocol(measure_env):
    env, _, calls, _ = measure_env
    result = subprocess.run([os.path.join(ROOT, "records", "measure.sh"), "X", "/tmp/out"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown protocol 'X' (expected T, L, C, S or smoke)" in result.stderr
    assert not calls.exists()


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
def test_measure_sh_runs_another_checkouts_trainer(measure_env, tmp_path):
    env, shards, calls, _ = measure_env
    baseline = tmp_path / "baseline" / "train_gpt.py"
    baseline.parent.mkdir()
    baseline.write_text("")
    result = subprocess.run([os.path.join(ROOT, "records", "measure.sh"), "T", "/tmp/out"],
                            env={**env, "TRAIN_GPT": str(baseline)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().startswith(f"--standalone --nproc_per_node=1 {baseline} "
                                        f"--train_files={shards}/corpus_train_*.bin ")


def test_measure_sh_rejects_a_missing_trainer(measure_env, tmp_path):
    env, shards, calls, _ = measure_env
    missing = tmp_path / "nowhere" / "train_gpt.py"
    result = subprocess.run([os.path.join(ROOT, "records", "measure.sh"), "T", "/tmp/out"],
                            env={**env, "TRAIN_GPT": str(missing)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"TRAIN_GPT='{missing}': no such file" in result.stderr
    assert not calls.exists()
    assert not (shards / "corpus_train_000001.bin").exists()    # refused before unpacking


FAKE_TORCHRUN_ON_A_GPU = """#!/bin/sh
echo "GPU $CUDA_VISIBLE_DEVICES: $*" >> "$FAKE_TORCHRUN_CALLS"
case "$*" in *--seed=99*) exit 3 ;; esac
"""


def measure_many(env, tmp_path, protocol, runs, **settings):
    (tmp_path / "bin" / "torchrun").write_text(FAKE_TORCHRUN_ON_A_GPU)
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text(runs)
    return subprocess.run([os.path.join(ROOT, "records", "measure_many.sh"), protocol,
                           str(tmp_path / "out"), str(runs_file)],
                          env={**env, **settings}, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
def test_measure_many_spreads_the_runs_over_the_gpus(measure_env, tmp_path):
    env, shards, calls, payload = measure_env
    runs = ("# speedrun against record74\n\n"
            "speedrun --seed=0 --train_files=/data/corpus_train_*.bin\n"
            "record74 --preset=record74 --seed=0\n"
            "  # indented comment\n"
            "speedrun --seed=1\n")
    result = measure_many(env, tmp_path, "C", runs, GPUS="2")
    assert result.returncode == 0, result.stderr
    assert (shards / "corpus_train_000001.bin").read_bytes() == payload
    out = tmp_path / "out"
    C = "--num_scheduled_iterations=210 --num_extension_iterations=6 --val_every=70"
    common = (f"--standalone --nproc_per_node=1 train_gpt.py --train_files={shards}/corpus_train_*.bin "
              f"--val_files={shards}/corpus_val_*.bin --val_tokens=2097152")
    # runs 0 and 2 share slot 0 (GPU 0) one after the other, and a group's runs its folder; run 1
    # has GPU 1; globs stay as written
    assert sorted(calls.read_text().splitlines()) == sorted([
        f"GPU 0: {common} --log_dir={out}/speedrun {C} --seed=0 --train_files=/data/corpus_train_*.bin",
        f"GPU 1: {common} --log_dir={out}/record74 {C} --preset=record74 --seed=0",
        f"GPU 0: {common} --log_dir={out}/speedrun {C} --seed=1"])
    assert sorted(result.stdout.splitlines()) == ["record74.1: done (GPU 1)",
                                                  "speedrun.1: done (GPU 0)",
                                                  "speedrun.2: done (GPU 0)"]
    assert {p.name for p in out.glob("*.out")} == {"speedrun.1.out", "record74.1.out",
                                                   "speedrun.2.out"}


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
def test_measure_many_reports_a_failed_run_and_still_runs_the_rest(measure_env, tmp_path):
    env, _, calls, _ = measure_env
    result = measure_many(env, tmp_path, "L", "bad --seed=99\ngood --seed=1\n", GPUS="1",
                          PER_GPU="2")
    assert result.returncode == 1
    assert f"bad.1: FAILED with exit status 3 (GPU 0), see {tmp_path}/out/bad.1.out" in result.stdout
    assert "good.1: done (GPU 0)" in result.stdout
    lines = calls.read_text().splitlines()          # two runs share GPU 0: no helper beside them
    assert len(lines) == 2 and all(line.endswith(" --compile_ahead=false") for line in lines)


@pytest.mark.skipif(shutil.which("xz") is None, reason="measure.sh unpacks shards with xz")
def test_measure_many_compiles_each_configuration_first(measure_env, tmp_path):
    env, shards, calls, _ = measure_env
    result = measure_many(env, tmp_path, "T", "a --seed=0\nb --seed=0\na --seed=1\n", GPUS="1",
                          PRECOMPILE_PER_GPU="2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    T = "--num_scheduled_iterations=150 --num_extension_iterations=10 --val_every=0 --cycle_train_data=true"
    common = (f"--standalone --nproc_per_node=1 train_gpt.py --train_files={shards}/corpus_train_*.bin "
              f"--val_files={shards}/corpus_val_*.bin --val_tokens=2097152")
    lines = calls.read_text().splitlines()
    # both groups' compile passes side by side (two slots on GPU 0, so no compile-ahead helper),
    # before any timed run, which then run one at a time
    assert sorted(lines[:2]) == [
        f"GPU 0: {common} --log_dir={out}/.precompile/a {T} --seed=0 --compile_only --compile_ahead=false",
        f"GPU 0: {common} --log_dir={out}/.precompile/b {T} --seed=0 --compile_only --compile_ahead=false"]
    assert lines[2:] == [f"GPU 0: {common} --log_dir={out}/a {T} --seed=0",
                         f"GPU 0: {common} --log_dir={out}/b {T} --seed=0",
                         f"GPU 0: {common} --log_dir={out}/a {T} --seed=1"]
    assert sorted(result.stdout.splitlines()[:2]) == ["a.1: compiled (GPU 0)", "b.1: compiled (GPU 0)"]
    assert {p.name for p in (out / ".precompile").glob("*.out")} == {"a.1.out", "b.1.out"}


@pytest.mark.parametrize("protocol,runs,settings,message", [
    ("T", "a\n", dict(GPUS="1", PER_GPU="2"),
     "PER_GPU=2 with protocol T: timings need a GPU each (PER_GPU=1)"),
    ("X", "a\n", dict(GPUS="1"), "unknown protocol 'X' (expected L, C, T or S)"),
    ("C", "a/b --seed=0\n", dict(GPUS="1"), "group name 'a/b' in"),
    ("C", "# nothing\n", dict(GPUS="1"), "names no run"),
    ("C", "a\n", dict(GPUS="0"), "GPUS='0': expected the number of GPUs to use"),
    ("T", "a\n", dict(GPUS="1", PRECOMPILE_PER_GPU="two"),
     "PRECOMPILE_PER_GPU='two': expected a number of compile passes per GPU (0: none)"),
    ("S", "a\n", dict(GPUS="1", PRECOMPILE_PER_GPU="2"),
     "PRECOMPILE_PER_GPU with protocol S: it measures the compiles"),
])
def test_measure_many_rejects_bad_input_before_running(measure_env, tmp_path, protocol, runs,
                                                       settings, message):
    env, _, calls, _ = measure_env
    result = measure_many(env, tmp_path, protocol, runs, **settings)
    assert result.returncode == 2
    assert message in result.stderr
    assert not calls.exists()


# -------------------------------------------------------------------------------------------------
# profile_steps.py, bench_kernels.py and kernel_registers.py
# -------------------------------------------------------------------------------------------------

# dc_attention's backward spills a few registers at the tiling measured fastest (4 warps, see
# triton_kernels._DC_TILES); more than this many bytes per thread would be a different kernel
DC_BACKWARD_SPILL_BYTES = 128


def test_launched_kernels_fit_their_registers():
    """Compiled for the H100 as the trainer launches them, no kernel spills registers but
    dc_attention's backward, and that one only a little (ptxas's report; Triton runs interpreted in
    this process, so the tool runs in its own)."""
    if load_tool("kernel_registers").ptxas_path() is None:
        pytest.skip("this Triton ships no ptxas")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = run_tool("records/kernel_registers.py", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel")]
    assert len(rows) == 25
    for label, warps, registers, spills, *_ in rows:
        allowed = DC_BACKWARD_SPILL_BYTES if label.strip().startswith("dc_attention backward") else 0
        assert int(spills) <= allowed, f"{label}: {registers} registers, {spills} bytes of spills"


def test_kernel_registers_specialises_arguments_as_a_launch_does():
    """Triton compiles a launch for pointers and integers divisible by 16 and makes integers
    equal to 1 constants; the register tool must compile the same kernel."""
    tool = load_tool("kernel_registers")

    def kernel(x_ptr, n, stride, one, BLOCK):
        pass
    kernel.arg_names = ["x_ptr", "n", "stride", "one", "BLOCK"]
    signature, constants, attrs = tool.specialised(
        kernel, {"x_ptr": "*bf16", "n": 49152, "stride": 79, "one": 1})
    assert signature == {"x_ptr": "*bf16", "n": "i32", "stride": "i32", "one": "constexpr"}
    assert constants == {"one": 1}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}


def test_profile_steps_sorts_kernels_by_kind():
    kind = load_tool("profile_steps").kernel_kind
    assert kind("triton_per_fused_abs_add_amax_cat_view_37") == "compiled PyTorch ops (Inductor)"
    assert kind("_gemm_epilogue_kernel") == "triton_kernels.py"
    assert kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == \
        "flash attention"
    assert kind("nvjet_sm90_tst_128x160_64x5_2x4_h_bz_NTT") == "cuBLAS GEMMs"
    assert kind("Memcpy HtoD (Pinned -> Device)") == "copies and fills"
    assert kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


@needs_corpus
def test_profile_steps_on_the_cpu(tmp_path):
    corpus = CORPUS
    # one micro-batch a step: a quarter of the ops, whose profiler events take most of the time;
    # the trainer's stage table (written with '=') halves stage 2's batch
    result = run_tool("records/profile_steps.py", "--stages", "2", "--steps", "1", "--top", "5",
                      "--preset=smoke", "--model_dim=32", "--head_dim=16", "--qk_head_dim=12",
                      "--mlp_hidden=64", "--micro_batches_per_step=1",
                      stages_option(batch_tokens=(1024, 512, 1024)),
                      f"--train_files={corpus}/corpus_train_*.bin",
                      f"--val_files={corpus}/corpus_val_*.bin", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=== stage 2:" in result.stdout and "ms/step median without the profiler" in result.stdout
    assert "Self CPU" in result.stdout   # the profiler's table
    gemms = result.stdout.split("GEMMs by op and shape, the most time first:\n")[1].splitlines()
    assert gemms[0].startswith("| op | shapes |")
    assert gemms[2].startswith("| aten::mm | (")   # the CPU's matmuls, no ceiling
    assert gemms[2].endswith("| - |")
    assert any("(512, 32)" in row for row in gemms)   # stage 2: 512 tokens, the preset has 1024


def test_gemm_rows_give_the_rate_against_the_ceiling():
    profile_steps = load_tool("profile_steps")
    op = types.SimpleNamespace
    averages = [
        # FP8 cuBLAS: 8 calls of 2 x 1024 x 768 x 3072 FLOPs in 1 ms: 38.65 TFLOP/s of 1440
        op(key="aten::_scaled_mm", input_shapes=[[1024, 768], [768, 3072], [], []], count=8,
           device_time_total=1000.0, cpu_time_total=50.0),
        # the MLP kernel takes W1 as (hidden, d): 4 calls of 2 x 4096 x 3072 x 768 in 2.5 ms
        op(key="nanogpt_triton::linear_relu_square_forward", input_shapes=[[4096, 768], [3072, 768]],
           count=4, device_time_total=2500.0, cpu_time_total=80.0),
        op(key="aten::add", input_shapes=[[4096, 768], [4096, 768]], count=9,
           device_time_total=9000.0, cpu_time_total=1.0),
    ]
    rows = profile_steps.gemm_rows(averages, steps=2, cuda=True, top=10)
    assert rows[2:] == [
        "| nanogpt_triton::linear_relu_square_forward | (4096, 768) x (3072, 768) | 2 | 1.25 | 30.9 "
        "| 4 (bf16) |",
        "| aten::_scaled_mm | (1024, 768) x (768, 3072) | 4 | 0.50 | 38.7 | 3 (fp8) |"]
    assert len(profile_steps.gemm_rows(averages, steps=2, cuda=True, top=1)) == 3


def test_largest_kernels_sum_each_kernels_launches():
    profile_steps = load_tool("profile_steps")
    launches = [("_mtp_ce_kernel", 3000.0), ("nvjet_sm90_tst_a", 1000.0),
                ("_mtp_ce_kernel", 3000.0), ("triton_poi_fused_add_0", 500.0),
                ("nvjet_sm90_tst_a", 2500.0)]     # 10 ms of kernels over 2 steps
    rows = profile_steps.largest_kernels(launches, steps=2, top=2)
    assert rows[2:] == ["| _mtp_ce_kernel | triton_kernels.py | 1 | 3.00 | 60.0% |",
                        "| nvjet_sm90_tst_a | cuBLAS GEMMs | 1 | 1.75 | 35.0% |"]
    row = profile_steps.largest_kernels([("void " + "x" * 100, 1.0)], steps=1, top=5)[2]
    assert row.startswith("| void " + "x" * 72 + "... | other |")   # long names cut to 80


@pytest.mark.parametrize("length, window", [(1, 0), (5, 0), (5, 2), (5, 4), (5, 9), (40, 7)])
def test_causal_window_pairs_count_what_the_reference_attention_sees(length, window):
    profile_steps = load_tool("profile_steps")
    (_, visible), = tg.document_windows(torch.tensor([0, length]), window)
    assert profile_steps.causal_window_pairs(length, window) == int(visible.sum())


def test_attention_flops_follow_the_model_calls():
    """Every attention layer as the model calls it: paired layers over the doubled bounds with
    half the heads, the long window in LONG_WINDOW_LAYERS; pairs counted by the dense
    reference's masks."""
    profile_steps = load_tool("profile_steps")
    cfg = tg.parse_config(["--preset=smoke"])
    cu_seqlens, windows = [0, 3, 3, 11, 12], (2, 5)

    def pairs(bounds, window):
        return sum(int(v.sum()) for _, v in tg.document_windows(torch.tensor(bounds), window))
    expected = 0
    for layer in tg.ATTN_LAYERS:
        window = windows[1] if layer in tg.LONG_WINDOW_LAYERS else windows[0]
        if layer in tg.PAIRED_HEAD_LAYERS:
            expected += 4 * cfg.head_dim * (cfg.num_heads // 2) * pairs([2 * c for c in cu_seqlens], window)
        else:
            expected += 4 * cfg.head_dim * cfg.num_heads * pairs(cu_seqlens, window)
    assert profile_steps.attention_flops(cu_seqlens, windows, cfg) == expected
    diff = tg.parse_config(["--preset=smoke", "--attn=diff", "--qk_head_dim=0"])
    assert profile_steps.attention_flops(cu_seqlens, windows, diff) is None


def test_attention_rows_rate_forward_and_backward_apart():
    profile_steps = load_tool("profile_steps")
    flash = [("void pytorch_flash::flash_fwd_kernel<A>", 1000.0),
             ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<A>", 2000.0),
             ("void pytorch_flash::flash_bwd_convert_dq_kernel<A>", 500.0),
             ("nvjet_sm90_tst_a", 9000.0)]
    # 158 GFLOP forward over two steps in 1 ms: 158 TFLOP/s, 20% of 790; the backward does 2.5x
    # the work in 2.5 ms, the same rate
    rows = profile_steps.attention_rows(flash, forward_flops=158 * 10**9, steps=2)
    assert rows[2:] == ["| forward | 1 | 0.50 | 79.0 | 158.0 | 20 |",
                        "| backward | 2 | 1.25 | 197.5 | 158.0 | 20 |"]
    ours = [("_attention_forward_kernel", 500.0), ("_attention_backward_keys_kernel", 1000.0),
            ("_attention_backward_queries_kernel", 1500.0), ("_mtp_ce_kernel", 700.0)]
    rows = profile_steps.attention_rows(ours, forward_flops=158 * 10**9, steps=2)
    assert rows[2:] == ["| forward | 1 | 0.25 | 79.0 | 316.0 | 40 |",
                        "| backward | 2 | 1.25 | 197.5 | 158.0 | 20 |"]


def test_batch_bounds_keep_each_micro_batch_with_its_windows():
    profile_steps = load_tool("profile_steps")
    loader = types.SimpleNamespace()
    handed_out = iter([torch.tensor([0, 4, 6]), torch.tensor([0, 6, 6])])
    loader.next_batch = lambda *args: types.SimpleNamespace(cu_seqlens=next(handed_out))
    original = loader.next_batch
    cfg = tg.parse_config(["--preset=smoke"])
    with profile_steps.BatchBounds(loader) as bounds:
        bounds.windows = (1, 3)
        loader.next_batch(6, 6, 1)
        bounds.windows = (2, 4)
        loader.next_batch(6, 6, 1)
    assert loader.next_batch is original
    assert bounds.forward_flops(cfg) == (profile_steps.attention_flops([0, 4, 6], (1, 3), cfg)
                                         + profile_steps.attention_flops([0, 6, 6], (2, 4), cfg))


def test_largest_compiled_kernels_keep_their_full_names():
    profile_steps = load_tool("profile_steps")
    long_name = "triton_poi_fused__fused_rms_norm__fused_rms_norm_backward__to_copy_add_mul_" + "x" * 60
    launches = [(long_name, 3000.0), ("triton_red_fused_abs_amax_cat_view_49", 1000.0),
                (long_name, 3000.0), ("_mtp_ce_kernel", 9000.0)]
    assert profile_steps.largest_compiled_kernels(launches, steps=2, top=5) == [
        f"     3.00 ms/step, 1 calls: {long_name}",
        "     0.50 ms/step, 0.5 calls: triton_red_fused_abs_amax_cat_view_49"]


def test_idle_gaps_between_busy_intervals():
    profile_steps = load_tool("profile_steps")
    busy = [(30, 40), (0, 10), (12, 20), (15, 25), (60, 61), (41, 50)]
    # uncovered: 10-12 (2), 25-30 (5), 40-41 (1), 50-60 (10); nested and overlapping merged
    assert profile_steps.idle_gaps(busy, min_gap=2) == [(50, 10), (25, 5), (10, 2)]
    assert profile_steps.idle_gaps(busy, min_gap=6) == [(50, 10)]
    assert profile_steps.idle_gaps([], min_gap=1) == []


def test_bench_row_gives_throughput_against_the_measured_ceiling():
    bench = load_tool("bench_kernels")
    ceilings = bench.Ceilings(bf16_tflops=800.0, fp8_tflops=1600.0, copy_gbps=4000.0)
    # 2 GB moved in 1 ms GPU-only: 2000 GB/s, half the copy ceiling
    result = bench.Result("copy-like", "(n,)", ours_ms=1.25, eager_ms=2.5, compiled_ms=5.0,
                          ours_gpu_ms=1.0, best_ref_gpu_ms=3.0, ours_host_us=7.0, work=2e9,
                          unit="GB/s", ceiling="copy")
    cells = [c.strip() for c in result.row(ceilings).strip("|").split("|")]
    assert cells[5] == "2.00x"                    # best PyTorch (eager 2.5 ms) over ours (1.25 ms)
    assert cells[8] == "3.00x"                    # GPU-only
    assert cells[9] == "2000 GB/s" and cells[10] == "50%"


def test_bench_flop_counts_of_the_mlps():
    bench = load_tool("bench_kernels")
    T, d = 3, 768
    assert bench.relu2_mlp_flops(T, d, 3072) == T * 6 * (2 * d * 3072)   # 6 GEMMs
    P = 3160   # r = 79
    forward = 2 * d * 79 + P + 2 * P * d            # h, the products, y (seeds.md A.1: 4.98 M)
    backward = 2 * (2 * d * 79) + P + 2 * (2 * P * d) + 4 * P   # dU, dx; products again; dW, G; dh
    assert forward == 4_978_264
    assert bench.pairwise_mlp_flops(T, d, 79) == T * (forward + backward)


def test_bench_pairwise_parts_rate_counts_the_pair_tiles(monkeypatch):
    """The pieces' table on the CPU (kernels interpreted, every timing 1 ns): the pair-tile
    kernels' rate counts every product of the tiles, padding included."""
    import triton_kernels as tk
    bench = load_tool("bench_kernels")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "bench_gpu", lambda fn: (fn(), 1e-6)[1])
    T, d, ranks = 16, 16, (5, 11)
    lines = bench.pairwise_parts_sweep(tk, T=T, d=d, ranks=ranks)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in lines[2:]}
    assert list(rows) == ["features h = relu(x U^T)", "forward kernel (y = q W)",
                          "backward kernels (dh, dW)", "whole layer, fwd + bwd (autograd)"]
    assert all(cells[:2] == ["0.0", "0.0"] for cells in rows.values())   # 1 ns in microseconds
    block = tk._pairwise_tiles()["PAIR_BLOCK"]
    tiles = {r: (-(-r // block)) * (-(-r // block) + 1) // 2 for r in ranks}
    forward = [2 * T * tiles[r] * block * block * d / 1e-9 / 1e12 for r in ranks]
    assert rows["forward kernel (y = q W)"][2] == f"{forward[0]:.0f} / {forward[1]:.0f}"
    assert rows["backward kernels (dh, dW)"][2] == f"{2 * forward[0]:.0f} / {2 * forward[1]:.0f}"
    assert rows["features h = relu(x U^T)"][2] == "- / -"


def test_bench_attention_documents(monkeypatch):
    bench = load_tool("bench_kernels")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    cu = bench.attention_batch(49152)
    lengths = cu[1:] - cu[:-1]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 49152
    assert 1 <= lengths.min() and lengths.max() <= 2048           # stage 3 cuts at 2,048
    assert 600 < lengths.float().mean() < 760                       # near the corpus's 756
    assert torch.equal(cu, bench.attention_batch(49152))           # the same documents each run


def test_bench_attention_sweep_times_every_tiling(monkeypatch):
    """The sweep's table on the CPU (kernels interpreted, every timing 1 ns, the dense reference
    standing in for torch's flash attention): one row per candidate, and the trainer's tiling
    restored afterwards."""
    import triton_kernels as tk
    bench = load_tool("bench_kernels")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "bench_gpu", lambda fn: (fn(), 1e-6)[1])
    monkeypatch.setattr(bench, "flash_attention", lambda cu, window: lambda q, k, v:
                        tg.attention_reference(q, k, v, cu, window, 0.12))
    used = tk._ATTENTION_TILES
    lines = bench.attention_tiling_sweep(tk, H=1, hd=16, stages=(("a", 40, 7, 30), ("b", 24, 3, 9)))
    assert lines[0] == ("| tiling | a (40 tokens, window 7): fwd us | fwd + bwd us | "
                        "b (24 tokens, window 3): fwd us | fwd + bwd us |")
    assert len(lines) == 3 + len(tk._ATTENTION_TILINGS)
    assert lines[2] == "| flash attention (varlen_attn) | 0.0 | 0.0 | 0.0 | 0.0 |"
    assert lines[3].split(" | ")[0].endswith("(used)")
    assert tk._ATTENTION_TILES is used


@pytest.mark.gpu
def test_bench_kernels_writes_its_table(tmp_path):
    result = run_tool("records/bench_kernels.py", "--cases", "transposes", "--no-sweeps",
                      "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = tmp_path.iterdir()
    text = report.read_text()
    assert "Ceilings, measured in this run" in text
    rows = [line for line in text.splitlines() if line.startswith("| transpose_")]
    assert len(rows) == 3 and all("GB/s" in row and "%" in row for row in rows)
