"""Start-up: the report of where the time goes, and the compile cache carried between machines."""
import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import CORPUS, ROOT, needs_corpus, needs_tokenizer
from test_main import TINY


def test_process_age_counts_from_the_process_start():
    code = "import time; time.sleep(0.6); import train_gpt; print(train_gpt.process_age_s())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert 0.6 <= float(out) < 60


def test_startup_clock_adds_up_its_phases():
    clock = tg.StartupClock()
    clock.phases.clear()            # this test process is old: count from now
    clock.start = time.perf_counter()
    with clock.phase("a"):
        time.sleep(0.2)
    clock.record("b", 0.5)
    with clock.phase("a"):
        time.sleep(0.1)
    lines = clock.report(total_s=1.0)
    assert lines[0] == "startup: 1.0s from launch to the first timed step"
    seconds = dict(re.fullmatch(r"startup phase (.+): (-?[\d.]+)s", line).groups()
                   for line in lines[1:])
    assert list(seconds) == ["a", "b", "other"]
    assert float(seconds["a"]) == pytest.approx(0.3, abs=0.05)
    assert float(seconds["b"]) == 0.5
    assert float(seconds["other"]) == pytest.approx(0.2, abs=0.05)


def test_startup_clock_names_a_long_stretch_between_phases():
    clock = tg.StartupClock()
    clock.phases.clear()
    clock.start = time.perf_counter()
    with clock.phase("a"):
        time.sleep(0.05)
    time.sleep(0.7)                 # work that no phase names
    with clock.phase("b"):
        time.sleep(0.05)
    time.sleep(0.1)                 # too short to name
    clock.record("c", 0.0)
    seconds = dict(re.fullmatch(r"startup phase (.+): (-?[\d.]+)s", line).groups()
                   for line in clock.report(total_s=clock.elapsed_s())[1:])
    assert list(seconds) == ["a", "between a and b", "b", "c", "other"]
    assert float(seconds["between a and b"]) == pytest.approx(0.7, abs=0.1)
    assert float(seconds["other"]) == pytest.approx(0.1, abs=0.05)


@needs_corpus
@needs_tokenizer
def test_startup_phases_cover_the_time_to_the_first_step(tmp_path):
    """A real run in a fresh process: the named phases account for the start-up within a second,
    and the start-up fits inside the process's wall time."""
    begin = time.perf_counter()
    subprocess.run([sys.executable, "train_gpt.py", *TINY, "--stop_after_steps=2",
                    f"--log_dir={tmp_path}"], cwd=ROOT, capture_output=True, check=True)
    wall_s = time.perf_counter() - begin
    (log,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if n.endswith(".txt")]
    text = open(log).read()
    total = float(re.search(r"^startup: ([\d.]+)s from launch", text, re.M).group(1))
    phases = dict(re.findall(r"^startup phase (.+): (-?[\d.]+)s$", text, re.M))
    for name in ("interpreter start and imports", "distributed set-up", "preflight",
                 "log header", "data open", "model build", "optimizer build",
                 "garbage collection"):
        assert name in phases
    named = sum(float(s) for name, s in phases.items() if name != "other")
    assert abs(total - named) < 1.0
    assert float(phases["interpreter start and imports"]) > 0
    assert total < wall_s


# -------------------------------------------------------------------------------------------------
# Compile cache. Each process gets its own empty inductor cache directory, as a fresh machine has.

COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    import train_gpt as tg
    mode, path, key = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if mode == "load":
        kernels = tg.load_compile_cache(path, key, print)
        print("loaded:", kernels is not None, json.dumps(kernels))
    layer = torch.nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(32.0).view(4, 8) / 32)
        layer.bias.zero_()
    f = torch.compile(lambda x: torch.relu(layer(x)).square(), fullgraph=True, dynamic=False)
    before, start = tg.compile_totals(), time.perf_counter()
    print("output:", f(torch.ones(2, 8)).sum().item())
    print("compile:", tg.compile_summary(before, tg.compile_totals(), time.perf_counter() - start))
    if mode == "save":
        tg.save_compile_cache(path, key, [["_gemm_epilogue_kernel", '{"name": "x"}']], print)
    print("misses:", tg.compile_totals()["inductor miss"])
""")
KEY = {"code": "abc", "torch": torch.__version__, "model_dim": "768"}


def run_in_fresh_process(tmp_path, script: str, args: list[str], name: str) -> str:
    """stdout of `script` run with `args` in a new interpreter whose compile caches live in
    tmp_path under `name`. TORCHINDUCTOR_VEC_ISA_OK=1: Inductor takes the CPU's vector
    instruction sets from its flags instead of compiling and loading a test program for each into
    the (empty) cache directory, some 15 s per process on two cores; no graph, and nothing the
    compile cache holds, comes from that probe."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor_{name}"),
               TRITON_CACHE_DIR=str(tmp_path / f"triton_{name}"), TORCHINDUCTOR_VEC_ISA_OK="1")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def compile_in_fresh_process(tmp_path, mode: str, path: str, key: dict, name: str) -> str:
    return run_in_fresh_process(tmp_path, COMPILE_SCRIPT, [mode, path, json.dumps(key)], name)


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compile_cache")
    path = str(tmp_path / "graphs.bin")
    out = compile_in_fresh_process(tmp_path, "save", path, KEY, "first")
    return tmp_path, path, out


COMPILE_LINE = re.compile(r"compile: compiling ([\d.]+)s \(tracing ([\d.]+)s, inductor ([\d.]+)s, "
                          r"rest (-?[\d.]+)s\), running ([\d.]+)s; caches: inductor (\d+) hit / "
                          r"(\d+) miss / (\d+) bypass.*; inductor per graph \(s\): ([\d. ]+|none)$",
                          re.MULTILINE)


def test_compile_cache_is_written_by_the_first_run(saved_cache):
    _, path, out = saved_cache
    assert re.search(r"misses: [1-9]", out)                  # it compiled
    # and the compile's report splits the time and counts the miss
    *times, per_graph = COMPILE_LINE.search(out).groups()
    _, tracing, inductor, rest, running, hits, misses, _ = map(float, times)
    assert tracing > 0 and inductor > 0 and rest >= 0 and running >= 0
    assert (hits, misses) == (0, 1)
    # Inductor's time is its graphs' (the forward; its backward is compiled at the first backward)
    graph_seconds = [float(t) for t in per_graph.split()]
    assert sum(graph_seconds) == pytest.approx(inductor, abs=0.01 * len(graph_seconds))
    assert f"compile cache {path}: written" in out
    assert "MiB and 1 Triton kernel specialisations" in out
    with open(path, "rb") as f:
        assert f.readline() == tg.COMPILE_CACHE_MAGIC
        assert json.loads(f.readline()) == KEY
        assert json.loads(f.readline()) == [["_gemm_epilogue_kernel", '{"name": "x"}']]
    assert not os.path.exists(path + ".tmp")


def test_compile_cache_spares_a_fresh_machine_the_compilation(saved_cache):
    tmp_path, path, first = saved_cache
    out = compile_in_fresh_process(tmp_path, "load", path, KEY, "second")
    assert 'loaded: True [["_gemm_epilogue_kernel", "{\\"name\\": \\"x\\"}"]]' in out
    assert "misses: 0" in out
    assert COMPILE_LINE.search(out).groups()[5:7] == ("1", "0")    # inductor: one hit, no miss
    weights = torch.arange(32.0).view(4, 8) / 32
    expected = 2 * float(weights.sum(1).square().sum())     # two rows of ones, positive weights
    assert float(re.search(r"output: ([\d.]+)", out).group(1)) == pytest.approx(expected)


def test_compile_cache_built_for_another_run_is_rejected_in_one_line(saved_cache):
    _, path, _ = saved_cache
    lines = []
    assert not tg.load_compile_cache(path, {**KEY, "model_dim": "1024"}, lines.append)
    assert lines == [f"compile cache {path}: built for another run (model_dim 768 -> 1024); "
                     f"compiling afresh and replacing it"]


def test_missing_or_foreign_compile_cache_is_reported(tmp_path):
    lines = []
    missing = str(tmp_path / "none.bin")
    assert not tg.load_compile_cache(missing, KEY, lines.append)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04 something else\n")
    assert not tg.load_compile_cache(str(foreign), KEY, lines.append)
    older = tmp_path / "older.bin"       # the first format: no kernel line
    older.write_bytes(b"train_gpt.py compile cache 1\n" + json.dumps(KEY).encode() + b"\nPK")
    assert tg.load_compile_cache(str(older), KEY, lines.append) is None
    assert lines == [f"compile cache {missing}: not there yet; compiling, then writing it",
                     f"compile cache {foreign}: unreadable (not a compile cache of train_gpt.py "
                     f"in this version); compiling afresh and replacing it",
                     f"compile cache {older}: unreadable (not a compile cache of train_gpt.py "
                     f"in this version); compiling afresh and replacing it"]


def test_triton_kernels_are_recorded_as_triton_compiles_them(monkeypatch):
    """Triton calls its post-compile hook with the kernel and its specialisation data; only
    triton_kernels.py's are kept, each once, and a hook installed before still runs."""
    import triton
    earlier = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda **kwargs: earlier.append(kwargs["fn"].name))
    record = tg.record_triton_kernels()
    hook = triton.knobs.runtime.jit_post_compile_hook

    def compiled(module: str, name: str, data: str | None) -> None:
        fn = SimpleNamespace(module=module, name=name, jit_function=None)
        compile = {"key": "k"} if data is None else {"key": "k", "specialization_data": data}
        hook(key="k", repr=name, fn=fn, compile=compile, is_manual_warmup=False,
             already_compiled=False)

    compiled("triton_kernels", "_gemm_epilogue_kernel", '{"a": 1}')
    compiled("torch._inductor.runtime", "triton_poi_fused_0", '{"b": 2}')
    compiled("triton_kernels", "_gemm_epilogue_kernel", '{"a": 1}')      # again: kept once
    compiled("triton_kernels", "_transpose_kernel", '{"c": 3}')
    compiled("triton_kernels", "_old_triton", None)                       # no data: skipped
    assert record == [["_gemm_epilogue_kernel", '{"a": 1}'], ["_transpose_kernel", '{"c": 3}']]
    assert earlier == ["_gemm_epilogue_kernel", "triton_poi_fused_0", "_gemm_epilogue_kernel",
                       "_transpose_kernel", "_old_triton"]


def test_triton_precompile_reports_what_it_could_not_compile(tmp_path):
    """Workers that fail (here: no GPU, and a name that is no kernel) cost one log line; the
    kernels then compile at their first launch as without the file."""
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=1)
    precompile = tg.TritonPrecompile([["_gemm_epilogue_kernel", "{}"], ["softcap", "{}"]], run)
    lines = []
    precompile.finish(lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        "compile cache: 2 of 2 Triton kernel specialisations were not precompiled (")
    assert lines[0].endswith("); they compiled at their first launch")


AUTOGRAD_FUNCTION_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import train_gpt as tg

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x.square() * grad

    if sys.argv[1] == "cache":
        tg.cache_graphs_with_autograd_functions()
    f = torch.compile(lambda x: Cube.apply(x).sum(), fullgraph=True, dynamic=False)
    x = torch.arange(4.0, requires_grad=True)
    f(x).backward()
    outcomes = torch._dynamo.utils.counters["aot_autograd"]
    print("grad:", x.grad.tolist())
    print("aot_autograd:", *(outcomes[f"autograd_cache_{o}"] for o in ("hit", "miss", "bypass")))
""")


def test_training_graphs_with_autograd_functions_are_cached(tmp_path):
    """A graph that calls an autograd function (as the Triton and FP8 paths do) bypasses
    AOTAutograd's cache unless the trainer's switch lets it in; then a second process on the same
    machine loads it instead of tracing it again, and computes the same gradient."""
    def compile_and_step(mode: str, name: str) -> tuple[str, str]:
        out = run_in_fresh_process(tmp_path, AUTOGRAD_FUNCTION_SCRIPT, [mode], name)
        return (re.search(r"grad: (.*)", out).group(1),
                re.search(r"aot_autograd: (.*)", out).group(1))

    assert compile_and_step("default", "default") == ("[0.0, 3.0, 12.0, 27.0]", "0 0 1")
    assert compile_and_step("cache", "cached") == ("[0.0, 3.0, 12.0, 27.0]", "0 1 0")
    assert compile_and_step("cache", "cached") == ("[0.0, 3.0, 12.0, 27.0]", "1 0 0")


def test_compile_cache_key_changes_with_graph_fields_only():
    run = tg.Run(rank=0, world_size=1, device=torch.device("cpu"), grad_accum_steps=8)
    base = tg.compile_cache_key(tg.Hyperparameters(), run)
    assert tg.compile_cache_key(tg.Hyperparameters(seed=7, log_dir="x"), run) == base
    changed = tg.compile_cache_key(tg.Hyperparameters(model_dim=512), run)
    assert {k for k in base if base[k] != changed[k]} == {"model_dim"}
    graphs = tg.compile_cache_key(tg.Hyperparameters(cuda_graphs=True), run)
    assert {k for k in base if base[k] != graphs[k]} == {"cuda_graphs"}
    run2 = tg.Run(rank=0, world_size=2, device=torch.device("cpu"), grad_accum_steps=4)
    assert tg.compile_cache_key(tg.Hyperparameters(), run2)["world_size"] == "2"


# -------------------------------------------------------------------------------------------------
# --compile_ahead: a helper process compiles the later stages' steps

def test_config_argv_gives_back_the_configuration():
    """The helper is started with config_argv(cfg): parse_config must rebuild cfg exactly, the
    stages' tuples, the floats and the paths included."""
    configs = [tg.Hyperparameters(**preset) for preset in tg.PRESETS.values()]
    configs.append(tg.parse_config([*TINY, "--adam_lr=0.0123456789", "--log_dir=a dir/with space",
                                    "--compile_ahead=true", "--val_mask_cache="]))
    for cfg in configs:
        assert tg.parse_config(tg.config_argv(cfg)) == cfg


def test_compile_ahead_shares_the_later_stages_in_consecutive_runs():
    """The extension runs stage 3's graph under the symbolic windows, so it goes to the helper
    of stage 3: the later shares are the larger."""
    assert tg.CompileAhead.shares([50, 100, 150], 1) == [[50, 100, 150]]
    assert tg.CompileAhead.shares([50, 100, 150], 2) == [[50], [100, 150]]
    assert tg.CompileAhead.shares([50, 100, 150], 3) == [[50], [100], [150]]
    assert tg.CompileAhead.shares([50, 100, 150], 8) == [[50], [100], [150]]
    assert tg.CompileAhead.shares([10, 20, 30, 40, 50], 3) == [[10], [20, 30], [40, 50]]


@pytest.mark.parametrize("world_size", [1, 4])
def test_compile_ahead_helper_runs_this_configuration_in_its_own_process_group(world_size,
                                                                              monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    cfg = tg.parse_config([*TINY, "--log_dir=/runs/a", "--compile_ahead=true",
                           "--compile_ahead_helpers=2", "--compile_cache=/caches/c.bin"])
    argv, env, output = tg.CompileAhead.command(cfg, rank=2, world_size=world_size, port=41234,
                                                report_fd=9, steps=[100, 150], helper=1)
    assert argv[:2] == [sys.executable, os.path.join(ROOT, "train_gpt.py")]
    assert argv[-1] == "--compile_ahead_helper"
    helper = tg.parse_config(argv[2:-1])
    assert helper == tg.dataclasses.replace(cfg, compile_ahead=False, compile_cache="",
                                            log_dir="/runs/a/compile_ahead/helper1")
    assert output == "/runs/a/compile_ahead/helper1/rank2.out"
    assert env["TRAIN_GPT_COMPILE_AHEAD_FD"] == "9"
    assert env["TRAIN_GPT_COMPILE_AHEAD_STEPS"] == "100,150"
    if world_size == 1:
        assert env["MASTER_PORT"] == "29500" and "TORCHELASTIC_USE_AGENT_STORE" not in env
    else:
        assert env["MASTER_PORT"] == "41234" and env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert env["DIST_TIMEOUT_MINUTES"] == "5"


def test_free_ports_are_distinct_and_free():
    ports = tg.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))         # would raise if something held it


def fake_helpers(tmp_path, *codes: str) -> tuple[tg.CompileAhead, list[str]]:
    """A CompileAhead over stand-in processes, one running each of `codes`, with `reports` their
    shared pipe."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, FD=str(write_fd))
    processes = []
    for code in codes:
        script = f"import os, time; reports = os.fdopen(int(os.environ['FD']), 'w')\n{code}"
        processes.append(subprocess.Popen([sys.executable, "-c", script], env=env,
                                          pass_fds=(write_fd,)))
    os.close(write_fd)
    lines = []
    return tg.CompileAhead(processes, os.fdopen(read_fd), str(tmp_path), lines.append), lines


def test_compile_ahead_waits_for_each_stage_and_reports_a_helper_that_fails_once(tmp_path):
    ahead, lines = fake_helpers(tmp_path, "print(1, file=reports, flush=True)\n"
                                          "time.sleep(0.5)\n"
                                          "print(2, file=reports, flush=True)\n"
                                          "raise SystemExit(3)")
    begin = time.perf_counter()
    ahead.wait_for(2)                          # waits through stage 1's report and the sleep
    assert time.perf_counter() - begin >= 0.5 and ahead.stages_done == {1, 2} and lines == []
    ahead.wait_for(3)
    ahead.wait_for(4)
    assert lines == [f"compile ahead: the helpers ended (exit codes 3, see {tmp_path}) "
                     f"before stage 3; compiling the rest here"]
    ahead.stop("the warm-up is over")          # it has ended: nothing to stop
    assert len(lines) == 1


def test_compile_ahead_takes_each_stage_from_whichever_helper_reports_it(tmp_path):
    """Two helpers on one pipe, the second reporting first; one that fails leaves the other's
    stages usable."""
    ahead, lines = fake_helpers(tmp_path, "time.sleep(0.5)\nprint(1, file=reports, flush=True)",
                                "print(2, file=reports, flush=True)\n"
                                "print(3, file=reports, flush=True)\nraise SystemExit(1)")
    ahead.wait_for(3)
    assert ahead.stages_done == {2, 3}
    ahead.wait_for(1)
    assert ahead.stages_done == {1, 2, 3} and lines == []      # the failure cost nothing
    ahead.stop("the warm-up is over")


def test_compile_ahead_stop_ends_the_helpers_that_still_run(tmp_path):
    ahead, lines = fake_helpers(tmp_path, "time.sleep(60)", "pass", "time.sleep(60)")
    ahead.processes[1].wait()
    begin = time.perf_counter()
    ahead.stop("step 0 compiled nothing")
    assert time.perf_counter() - begin < 10
    assert all(process.returncode is not None for process in ahead.processes)
    assert lines == ["compile ahead: stopped 2 of 3 helpers (step 0 compiled nothing)"]


@pytest.mark.parametrize("symbolic", [True, False])
def test_compile_ahead_helper_evaluates_only_where_each_stage_has_its_own_evaluation_graph(
        symbolic, monkeypatch):
    """Under symbolic windows the run's step 0 compiles the evaluation graph of every stage, so a
    helper runs only the training steps of its share; with the windows as constants each stage
    evaluates in a graph of its own, which the helper compiles too."""
    evaluated = []

    class StubTrainer:
        def __init__(self, cfg, run, log, paths):
            self.schedule = SimpleNamespace(stage_name=lambda stage: f"stage {stage + 1}")

        def symbolic_windows(self):
            return symbolic

        def first_val_batch(self):
            return "val batch"

        def warmup_step(self, step, val_batch):
            evaluated.append((step, val_batch))
            return SimpleNamespace(stage=step // 50)

    read_fd, write_fd = os.pipe()
    monkeypatch.setattr(tg, "Trainer", StubTrainer)
    monkeypatch.setenv(tg.COMPILE_AHEAD_FD, str(write_fd))
    monkeypatch.setenv(tg.COMPILE_AHEAD_STEPS, "50,100")
    run = SimpleNamespace(startup=tg.StartupClock())
    tg.compile_later_stages(None, run, lambda line: None, None)
    with os.fdopen(read_fd) as reports:
        assert reports.read().split() == ["1", "2"]
    batch = None if symbolic else "val batch"
    assert evaluated == [(50, batch), (100, batch)]


@needs_corpus
@needs_tokenizer
def test_compile_ahead_helpers_of_two_ranks_report_every_later_stage(tmp_path):
    """The helper's mode on the CPU (eager), started as two ranks' runs start it: the two helpers
    form their own process group on the port rank 0 picked, each runs the warm-up steps it is
    given (the first of each later stage) and reports each one's stage on its pipe; no timed
    step."""
    cfg = tg.parse_config([*TINY, f"--log_dir={tmp_path}"])
    (port,), helpers = tg.free_ports(1), []
    for rank in range(2):
        read_fd, write_fd = os.pipe()
        argv, env, _ = tg.CompileAhead.command(cfg, rank, world_size=2, port=port,
                                               report_fd=write_fd, steps=[28, 56, 84], helper=0)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        process = subprocess.Popen(argv, cwd=ROOT, env=env, pass_fds=(write_fd,),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        os.close(write_fd)
        helpers.append((process, os.fdopen(read_fd)))
    for process, reports in helpers:
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
        assert reports.read().split() == ["1", "2", "3"]    # stages 2, 3 and the extension
        reports.close()
    (log,) = glob.glob(str(tmp_path / "compile_ahead" / "helper0" / "*.txt"))   # rank 0 logs
    text = open(log).read()
    assert "world_size=2" in text
    assert not re.search(r"^step:\d+/", text, re.M)                 # no timed step
    done = re.findall(r"^compile ahead: step (\d+) \((.+)\) done .*s after", text, re.M)
    assert done == [("28", "stage 2"), ("56", "stage 3"), ("84", "extension")], done  # 84 + 6


@pytest.mark.gpu
@needs_corpus
@needs_tokenizer
def test_compile_ahead_leaves_the_later_stages_nothing_to_compile_on_gpu(tmp_path):
    """The smoke preset compiled with empty caches: two helpers compile stage 2, and stage 3
    and the extension, so this process's warm-up steps there load every graph from the caches."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "train_gpt.py", "--preset=smoke",
                             f"--log_dir={tmp_path}", f"--train_files={CORPUS}/corpus_train_*.bin",
                             f"--val_files={CORPUS}/corpus_val_*.bin", "--compile=true",
                             "--symbolic_windows=true", "--compile_ahead=true",
                             "--compile_ahead_helpers=2", "--compile_only"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = [n for n in os.listdir(tmp_path) if n.endswith(".txt")]
    text = open(tmp_path / log).read()
    assert "compile ahead: helpers compile the later stages' warm-up steps [[28], [56, 84]]" in text
    assert not re.search(r"^compile ahead: .*compiling the rest here", text, re.M)  # not the code
    later = re.findall(r"^warm-up step (\d+): .*caches: inductor (\d+) hit / (\d+) miss", text,
                       re.M)[2:]
    assert len(later) == 3 and all(int(misses) == 0 for _, _, misses in later), later


@pytest.mark.gpu
@needs_corpus
@needs_tokenizer
def test_shipped_compile_cache_precompiles_the_triton_kernels_on_gpu(tmp_path):
    """The smoke preset compiled with --compile_cache, then again from the file with empty local
    caches (a fresh machine): the file lists the Triton kernels' specialisations, and the second
    run precompiles every one of them."""
    def compile_only(name: str) -> str:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / name / "inductor"),
                   TRITON_CACHE_DIR=str(tmp_path / name / "triton"))
        result = subprocess.run([sys.executable, "train_gpt.py", "--preset=smoke",
                                 f"--log_dir={tmp_path / name}",
                                 f"--train_files={CORPUS}/corpus_train_*.bin",
                                 f"--val_files={CORPUS}/corpus_val_*.bin", "--compile=true",
                                 f"--compile_cache={tmp_path / 'cache.bin'}", "--compile_only"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        (log,) = glob.glob(str(tmp_path / name / "*.txt"))
        return open(log).read()

    written = int(re.search(r"written, [\d.]+ MiB and (\d+) Triton kernel specialisations",
                            compile_only("first")).group(1))
    assert written >= 10
    second = compile_only("second")
    assert f"MiB and {written} Triton kernel specialisations" in second          # loaded
    assert (f"compile cache: {written} Triton kernel specialisations precompiled in"
            in second), second[-3000:]
