"""scripts/gpu_check.py (`make gpu-check`) without a GPU: the arch list, the time-limit logic,
the phase plan, the exit status, the summary writer, and the dry run end to end."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)
Phase, Result = gpu_check.Phase, gpu_check.Result


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


def test_default_plan_fits_the_budget_and_covers_every_bench(tmp_path):
    plan = gpu_check.plan(str(tmp_path), jobs=16, arch="9.0")
    names = [p.name for p in plan]
    assert names[:3] == ["build", "check-registration", "tests-cuda"]
    benches = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "bench"))
                     if f.startswith("bench_") and f.endswith(".py"))
    assert [n.split(":", 1)[1] for n in names if n.startswith("bench:")] == benches
    build = plan[0]
    assert dict(build.env)["TORCH_CUDA_ARCH_LIST"] == "9.0" and dict(build.env)["ANN_KERNELS_MAX_JOBS"] == "16"
    assert sum(p.minimum_s for p in plan) <= gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.DEFAULT_BUDGET_S < 8 * 60  # the bound, with room for the summary
    tests = next(p for p in plan if p.name == "tests-cuda")
    assert "-m" in tests.command and tests.command[tests.command.index("-m", 3) + 1] == "cuda"
    for p in plan:
        if p.name.startswith("bench:") and p.command:
            assert p.command[-5:-1] == ("--device", "cuda", "--quick", "--out")
            assert not p.fails_run  # a slow benchmark is a note, not a failed check


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


def test_exit_status_counts_failures_of_counting_phases_only():
    counting, note = Phase("tests-cuda", 1, 0, ("x",)), Phase("bench:x", 1, 0, ("x",), fails_run=False)
    assert gpu_check.exit_status([Result(counting, "ok", 1, 1), Result(note, "timeout", 1, 1)]) == 0
    assert gpu_check.exit_status([Result(counting, "failed", 1, 1)]) == 1
    assert gpu_check.exit_status([Result(counting, "timeout", 1, 1)]) == 1
    assert gpu_check.exit_status([Result(counting, "skipped", 0, 0)]) == 0


def test_summary_reads_junit_and_bench_csv(tmp_path):
    (tmp_path / "tests-cuda.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    bench_dir = tmp_path / "bench_demo"
    bench_dir.mkdir()
    (bench_dir / "demo.csv").write_text(
        "op,provider,shape,metric,p20,p50,p80\n"
        "loss,ours,4x8192x32000,fwd_bwd_ms,1,2,3\nloss,eager,4x8192x32000,fwd_bwd_ms,5,6,7\n")
    results = [Result(Phase("tests-cuda", 1, 0, ("x",)), "failed", 3.0, 10.0, "exit 1")]
    text = gpu_check.write_outputs(str(tmp_path), results, 450, 3.0)
    assert "5 tests: 1 failed, 0 errors, 2 skipped" in text
    assert "| loss | 4x8192x32000 |  | fwd_bwd_ms | 2 | 6 |" in text
    assert (tmp_path / "summary.md").read_text() == text
    assert (tmp_path / "phases.csv").read_text().splitlines()[1].startswith("tests-cuda,failed,3.0,10")
    assert len(text.splitlines()) < 60  # one screen


def test_dry_run_lists_phases_and_checks_syntax_and_imports(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path)}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for phase in ("build", "check-registration", "tests-cuda", "bench:bench_early_exit"):
        assert phase in done.stdout
    assert "TORCH_CUDA_ARCH_LIST" in done.stdout and "dry run ok" in done.stdout


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
