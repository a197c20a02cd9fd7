"""scripts/gpu_check.py (`make gpu-check`) without a GPU: the arch list, the time-limit logic,
the phase plan, the exit status, the target table and its verdicts, the summary writer (from a
recorded target CSV, tests/data/gpu_targets_recorded.csv), and the dry run end to end (the
isolation of the CUDA test phase: tests/test_pytest_per_file.py)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.utils import run_python_with_packages_hidden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)
Phase, Result = gpu_check.Phase, gpu_check.Result
targets = gpu_check.targets_module()
RECORDED = os.path.join(ROOT, "tests", "data", "gpu_targets_recorded.csv")


def test_arch_list_from_capabilities():
    assert gpu_check.arch_list([(9, 0)]) == "9.0"
    assert gpu_check.arch_list([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0"  # distinct, sorted
    assert gpu_check.arch_list([(12, 0), (8, 6)]) == "8.6;12.0"  # numeric, not string, order
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_check.arch_list([])


def phases(*specs):
    return [Phase(f"p{i}", nominal, minimum, ("true",)) for i, (nominal, minimum) in enumerate(specs)]


def test_phase_limit_is_nominal_when_time_is_plentiful():
    plan = phases((100, 10), (50, 20), (30, 5))
    assert gpu_check.phase_limit(plan, 0, 0.0, 1000) == 100
    assert gpu_check.phase_limit(plan, 1, 100.0, 1000) == 50


def test_phase_limit_reserves_the_later_minimums():
    plan = phases((100, 10), (50, 20), (30, 5))
    # 80 s budget: the later phases need 25 s -> the first may use 55.
    assert gpu_check.phase_limit(plan, 0, 0.0, 80) == 55
    # 60 s in, 20 s left, 5 reserved for the last -> 15 < minimum 20: do not start.
    assert gpu_check.phase_limit(plan, 1, 60.0, 80) == 0
    # The last phase gets what is left, if at least its minimum.
    assert gpu_check.phase_limit(plan, 2, 72.0, 80) == 8
    assert gpu_check.phase_limit(plan, 2, 76.0, 80) == 0
    # A run that overran never gets a negative limit.
    assert gpu_check.phase_limit(plan, 2, 500.0, 80) == 0


def test_phase_limit_reserves_nothing_for_the_if_time_remains_phases():
    plan = [Phase("a", 100, 10, ("true",)), Phase("b", 50, 20, ("true",), reserved=False)]
    assert gpu_check.phase_limit(plan, 0, 0.0, 100) == 100  # b's minimum is not held back
    assert gpu_check.phase_limit(plan, 1, 90.0, 100) == 0  # 10 s left < b's minimum: not started


def test_default_plan_fits_the_budget_and_covers_every_bench(tmp_path):
    plan = gpu_check.plan(str(tmp_path), jobs=16, arch="9.0")
    names = [p.name for p in plan]
    assert names[:4] == ["build", "check-registration", "tests-cuda", "targets"]
    benches = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "bench"))
                     if f.startswith("bench_") and f.endswith(".py"))
    assert [n.split(":", 1)[1] for n in names if n.startswith("bench:")] == benches
    build = dict(plan[0].env)
    assert build["TORCH_CUDA_ARCH_LIST"] == "9.0" and build["ANN_KERNELS_MAX_JOBS"] == build["MAX_JOBS"] == "16"
    # ninja from the interpreter's own bin directory comes first on the build's PATH.
    assert build["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
    assert sum(p.minimum_s for p in plan if p.reserved) <= gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.DEFAULT_BUDGET_S <= 9.5 * 60  # a 10-minute command on the device machine
    # The target mode comes before the other benchmarks and is guaranteed its minimum.
    target_phase = plan[3]
    assert target_phase.reserved and target_phase.fails_run and "{deadline_s}" in " ".join(target_phase.command)
    assert target_phase.command[1].endswith(os.path.join("bench", "targets.py"))
    tests = plan[2]
    assert tests.command[1].endswith("pytest_per_file.py") and ("-m", "cuda") == tests.command[6:8]
    assert "--slow-keep=4" in tests.command
    assert "--slow-keep=1" in gpu_check.plan(str(tmp_path), jobs=16, arch="9.0", full=True)[2].command
    for p in plan[4:]:
        if p.command:
            assert p.command[-5:-1] == ("--device", "cuda", "--quick", "--out")
            assert not p.reserved  # only if time remains after the targets


def test_interpreter_only_files_are_run_apart(tmp_path):
    forced = tmp_path / "test_forced.py"
    forced.write_text('import os\n\nos.environ["TRITON_INTERPRET"] = "1"  # before triton\n')
    plain = tmp_path / "test_plain.py"
    plain.write_text('import os\nif x:\n    os.environ["TRITON_INTERPRET"] = "1"\n')
    assert gpu_check.interpreter_only(str(forced)) and not gpu_check.interpreter_only(str(plain))
    plan = gpu_check.plan(str(tmp_path), jobs=2, arch="8.0")
    tests = next(p for p in plan if p.name == "tests-cuda")
    ignored = sorted(c.split("=", 1)[1] for c in tests.command if c.startswith("--ignore="))
    expected = sorted(p for p in (os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                                  if f.startswith("test_") and f.endswith(".py")) if gpu_check.interpreter_only(p))
    assert ignored == expected


def test_bench_convention_detection(tmp_path):
    good = tmp_path / "bench_good.py"
    good.write_text('p.add_argument("--device")\np.add_argument("--quick")\np.add_argument("--out")\n')
    bad = tmp_path / "bench_bad.py"
    bad.write_text('p.add_argument("--quick")\n')
    assert gpu_check.follows_bench_convention(str(good)) and not gpu_check.follows_bench_convention(str(bad))


def test_run_phase_times_out_and_kills_the_process_group(tmp_path):
    # A shell that starts a child which would outlive a plain kill of the parent.
    phase = Phase("hang", 1, 0, ("bash", "-c", "sleep 30 & sleep 30"))
    result = gpu_check.run_phase(phase, 1.0, str(tmp_path / "hang.log"))
    assert result.status == "timeout" and result.seconds < 15
    ok = gpu_check.run_phase(Phase("ok", 10, 0, ("true",)), 10, str(tmp_path / "ok.log"))
    failed = gpu_check.run_phase(Phase("bad", 10, 0, ("false",)), 10, str(tmp_path / "bad.log"))
    skipped = gpu_check.run_phase(Phase("late", 10, 5, ("true",)), 0.0, str(tmp_path / "late.log"))
    assert (ok.status, failed.status, skipped.status) == ("ok", "failed", "skipped")
    assert (tmp_path / "bad.log").read_text().startswith("$ false")


def test_run_phase_passes_its_own_deadline_below_the_limit(tmp_path):
    phase = Phase("own-deadline", 60, 0, ("bash", "-c", "echo deadline={deadline_s}"))
    assert gpu_check.run_phase(phase, 60.0, str(tmp_path / "d.log")).status == "ok"
    assert "deadline=50\n" in (tmp_path / "d.log").read_text()


def verdicts_of(rows):
    return targets.judge(rows)


def test_exit_status_counts_failures_and_missed_targets():
    counting, extra = Phase("tests-cuda", 1, 0, ("x",)), Phase("bench:x", 1, 0, ("x",), fails_run=False)
    assert gpu_check.exit_status([Result(counting, "ok", 1, 1), Result(extra, "timeout", 1, 1)]) == 0
    assert gpu_check.exit_status([Result(counting, "failed", 1, 1)]) == 1
    assert gpu_check.exit_status([Result(counting, "timeout", 1, 1)]) == 1
    assert gpu_check.exit_status([Result(counting, "skipped", 0, 0)]) == 0
    assert gpu_check.exit_status([Result(counting, "ok", 1, 1)], missing=["tqdm"]) == 1
    # A missed target is a verdict with its own exit status, never a note.
    verdicts = verdicts_of(targets.read_rows(RECORDED))
    assert any(v.status == "missed" for v in verdicts)
    assert gpu_check.exit_status([Result(counting, "ok", 1, 1)], verdicts) == 3
    assert gpu_check.exit_status([Result(counting, "failed", 1, 1)], verdicts) == 1  # a broken check wins
    met_only = [v for v in verdicts if v.status != "missed"]
    assert gpu_check.exit_status([Result(counting, "ok", 1, 1)], met_only) == 0


def test_target_table_parses_and_matches_bench_readme():
    units = targets.validate_targets()
    assert units[0] == ("logits", (4, 8192, 32000), "bf16")
    assert [u[1] for u in units[1:]] == [(4, 1024, 256, 32000), (8, 512, 256, 50257), (2, 2048, 512, 128256)]
    with open(os.path.join(ROOT, "bench", "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    for op, shape, dtype in units:  # every measured shape is a README target shape
        assert str(shape).replace(" ", "") in readme.replace(" ", "") and dtype in readme
    bad = targets.Target("logits", (4, 8192), "bf16", "time", "eager", 0.5, "x")
    with pytest.raises(ValueError, match=r"TARGETS\[0\].*shape: expected 3 positive ints"):
        targets.validate_targets((bad,))
    with pytest.raises(ValueError, match="baseline"):
        targets.validate_targets((targets.Target("linear", (1, 2, 3, 4), "bf16", "time", "hbm_floor", 1, "x"),))
    with pytest.raises(ValueError, match="listed twice"):
        targets.validate_targets(targets.TARGETS[:1] * 2)


def test_verdicts_from_a_recorded_csv():
    lines = [v.line() for v in verdicts_of(targets.read_rows(RECORDED))]
    assert lines[0].startswith("NOT MEASURED: logits op 4x8192x32000 bf16, >= 2x Liger")
    assert "Liger-Kernel is not installed" in lines[0]
    assert lines[1] == "MET: logits op 4x8192x32000 bf16, >= 3x eager: 2 ms = 0.222x eager's 9 ms (target <= 0.333x)"
    assert lines[2].startswith("MISSED: logits op 4x8192x32000 bf16, <= 1.3x the HBM floor: 2 ms = 1.43x")
    assert lines[3].startswith("MISSED: linear op 4x1024x256x32000 bf16, <= 1.1x torch.compile's time: 5 ms = 1.25x")
    # 10 MB against 4 * 1024 * 32000 bf16 logits = 250 MB.
    assert "MET: linear op 4x1024x256x32000 bf16, extra peak" in lines[4] and "= 0.04x the logits' 250 MB" in lines[4]
    assert lines[5].startswith("MISSED") and lines[6].startswith("MISSED") and "OutOfMemoryError" in lines[6]
    assert all(line.startswith("NOT MEASURED") and "did not reach it" in line for line in lines[7:])
    assert len(lines) == len(targets.TARGETS)


def test_target_runner_past_its_deadline_writes_not_measured_rows(tmp_path):
    import torch

    path = targets.run_targets(str(tmp_path), torch.device("cpu"), deadline_s=0.0)
    rows = targets.read_rows(path)
    assert len(rows) == sum(len(targets.PROVIDERS[op]) for op, _, _ in targets.validate_targets())
    assert all(r["notes"].startswith("not measured: the deadline") for r in rows)
    assert {v.status for v in targets.judge(rows)} == {"not measured"}


def test_extra_peak_is_the_allocator_peak_beyond_inputs_and_gradients(monkeypatch):
    """The CUDA path of the peak probe with the allocator statistics stubbed (no GPU here):
    peak - memory before the step - the gradients the step leaves."""
    import types

    import torch

    stats = {"allocated": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: stats.update(peak=stats["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: stats["peak"])
    leaves = [torch.zeros(1024, 256, requires_grad=True), torch.zeros(512, dtype=torch.bfloat16, requires_grad=True)]
    leaves[0].grad = torch.ones(1024, 256)  # a gradient left over from a previous step: not counted
    stats["allocated"] = 50 * 2**20

    def step():
        for t in leaves:
            t.grad = torch.ones_like(t)
        stats["peak"] = stats["allocated"] + 8 * 2**20 + 1024 * 256 * 4 + 512 * 2  # 8 MB of temporaries

    assert targets.extra_peak_mb(step, leaves, types.SimpleNamespace(type="cuda")) == 8.0
    assert math.isnan(targets.extra_peak_mb(step, leaves, torch.device("cpu")))


def test_summary_opens_with_the_target_verdicts_then_tests_then_skips(tmp_path):
    (tmp_path / "targets").mkdir()
    shutil.copy(RECORDED, tmp_path / "targets" / targets.CSV_NAME)
    (tmp_path / "tests-cuda.xml").write_text(
        '<testsuites><testsuite name="tests/test_a.py" tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_a" name="test_x[cuda]"><failure message="AssertionError: 3 != 4">t'
        '</failure></testcase></testsuite></testsuites>')
    bench_dir = tmp_path / "bench_demo"
    bench_dir.mkdir()
    (bench_dir / "demo.csv").write_text(
        "op,provider,shape,metric,p20,p50,p80\n"
        "loss,ours,4x8192x32000,fwd_bwd_ms,1,2,3\nloss,eager,4x8192x32000,fwd_bwd_ms,5,6,7\n")
    (tmp_path / "check-registration.log").write_text("ops ...\nFAIL: TRITON IS NOT INSTALLED: ...\n")
    results = [Result(Phase("tests-cuda", 1, 0, ("x",)), "ok", 3.0, 10.0),
               Result(Phase("targets", 1, 0, ("x",)), "ok", 10.0, 10.0),
               Result(Phase("bench:bench_slow", 1, 0, ("x",), fails_run=False), "timeout", 10.0, 10.0,
                      "killed after 10 s"),
               Result(Phase("bench:bench_demo", 1, 0, ("x",)), "skipped", 0.0, 0.0, "no time left in the budget")]
    text = gpu_check.write_outputs(str(tmp_path), results, 540, 13.0)
    lines = text.splitlines()
    assert lines[2] == "## GPU targets (2 met, 4 missed, 3 not measured; bench/README.md)"
    assert lines[3].startswith("- NOT MEASURED") and lines[5].startswith("- MISSED: logits op")
    assert lines[13] == "## CUDA tests"
    assert lines[14] == "- **FAIL: TRITON IS NOT INSTALLED: ...**"
    assert lines[15].startswith("- 5 tests: 1 failed, 0 errors, 2 skipped")
    assert lines[16] == "- FAILED tests/test_a.py::test_x[cuda]: AssertionError: 3 != 4"
    skips = text.split("## Skipped, and why")[1].split("## Run")[0]
    assert "phase bench:bench_slow timed out" in skips and "bench:bench_demo: no time left" in skips
    if importlib.util.find_spec("liger_kernel") is None:
        assert "Liger-Kernel is not installed" in skips
    assert "exit status 3" in text  # the tests passed; targets were missed
    assert "| loss | 4x8192x32000 |  | fwd_bwd_ms | 2 | 6 |" in text
    assert (tmp_path / "summary.md").read_text() == text
    assert (tmp_path / "phases.csv").read_text().splitlines()[1].startswith("tests-cuda,ok,3.0,10")
    assert (tmp_path / "targets" / "targets.png").stat().st_size > 0


def test_dry_run_rehearses_the_whole_plan(tmp_path):
    """The CI rehearsal of `make gpu-check`: every phase's command found and imported, the
    CUDA test plan collected, the target table parsed and run with the CPU standing in, a
    summary written, the planned time per phase printed."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    start = time.monotonic()
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for phase in ("build", "check-registration", "tests-cuda", "targets", "bench:bench_early_exit"):
        assert f"  {phase} " in out
    assert "TORCH_CUDA_ARCH_LIST" in out and "dry run ok" in out and "planned time per phase" in out
    assert "target table: 9 targets in 4 shapes" in out
    assert "tests in" in out and "files, one process per file" in out  # the collect pass of the CUDA tests
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# gpu-check DRY RUN") and summary.count("dry run: CPU stand-in") >= 3
    assert (tmp_path / "targets" / "targets.csv").exists()
    print(f"dry run took {time.monotonic() - start:.1f} s")


def test_registration_check_says_loudly_when_triton_is_missing():
    """Without Triton the CUDA loss ops would run the pure-torch reference and their CUDA
    tests would pass on it: the check fails and says so (simulated: triton hidden)."""
    scripts = os.path.join(ROOT, "scripts")
    code = (f"sys.path.insert(0, {scripts!r})\n"
            "import gpu_check\nsys.exit(gpu_check.main(['--check-registration']))\n")
    done = run_python_with_packages_hidden(code, {"triton"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: TRITON IS NOT INSTALLED" in done.stdout and "pure-torch reference" in done.stdout


def test_without_a_gpu_the_real_run_refuses_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run would start")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_find_cuda_home(tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("binary")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    find = gpu_check.find_cuda_home
    assert find({"CUDA_HOME": "/opt/x"}, lambda _: None) == "/opt/x"  # the environment wins
    assert find({}, lambda _: str(wrapper)) == str(toolkit)  # through the wrapper script
    assert find({}, lambda _: str(toolkit / "bin" / "nvcc")) == str(toolkit)
    link = tmp_path / "nvcc-link"
    link.symlink_to(toolkit / "bin" / "nvcc")
    assert find({}, lambda _: str(link)) == str(toolkit)  # through a symlink
    if not os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert find({}, lambda _: None) is None
