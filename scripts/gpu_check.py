"""`make gpu-check`: everything CUDA-specific of ann_kernels in one short run on a CUDA machine,
ending in a verdict on the GPU targets (called by scripts/gpu_check.sh; docs/gpu.md; issue 22).

On a fresh machine with its own preinstalled torch (>= 2.11), no network and no downloads
(it needs torch, triton, numpy, pytest, hypothesis, tqdm; ninja and setuptools to build):

1. ``build``              the extension in place with CUDA for the present GPU's arch only,
                          ninja on PATH (the interpreter's bin directory first), jobs = cores;
2. ``check-registration`` every op with a CPU kernel has a CUDA kernel, Triton imports and is
                          not in interpreter mode, and a tiny CUDA call of each loss op runs
                          its kernel (no fallback to the pure-torch reference);
3. ``tests-cuda``         ``pytest -m cuda`` through scripts/pytest_per_file.py: one process
                          per test file, restarted after a context-breaking CUDA error, so one
                          device assert cannot fail other tests; the JUnit XML is rewritten
                          after every file (a timed-out phase keeps its counts). Tests marked
                          slow are sampled (about 1 in 4, at least one per file) unless
                          ``--full``. Interpreter-only Triton files are left out (they would
                          switch the process to the interpreter; CI runs them);
4. ``targets``            bench/targets.py: the loss ops at the target shapes and dtypes of
                          bench/README.md, one torch.compile per shape, rows written as each
                          finishes, peak memory from the CUDA allocator in process;
5. ``bench:<name>``       then every bench/bench_*.py with ``--device cuda --quick`` while
                          time remains (these phases reserve no time).

Each phase runs in its own process group under its own time limit; the limits shrink so that
the whole run fits ``--budget`` seconds (default 540: the device machine's 10-minute command
limit, with room for start-up and the summary). Writes ``summary.md`` (the target verdicts
first), ``phases.csv``/``.png``, ``targets/``, the benchmarks' CSV and PNG, and logs into
GPU_CHECK_OUT (default ``gpu-check/``). Exit status: 1 when a required package is missing,
the build, the registration check or a CUDA test failed, or a counting phase timed out; 3 when
all of that passed but a GPU target was missed; 0 otherwise. ``--dry-run`` rehearses the whole
plan on a CPU-only machine (tests/test_gpu_check.py runs it in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_summary import (  # noqa: E402  (the verdict half of this script)
    exit_status,
    missing_modules,
    target_verdicts,
    targets_module,
    write_outputs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 540.0
OPTIONAL_MODULES = ("matplotlib", "liger_kernel")  # plots; the Liger baselines
BENCH_CONVENTION = ("--device", "--quick", "--out")
SLOW_KEEP = 4  # without --full: about one in SLOW_KEEP slow CUDA tests (at least one per file)


# ---------------------------------------------------------------------------------------
# Pure logic (unit-tested in tests/test_gpu_check.py).


def arch_list(capabilities: list[tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for the present GPUs: each distinct (major, minor) once, sorted,
    as "8.0;9.0". sm_90a-style arch-specific features are not used by our kernels, so the
    plain arch suffices. Raises ValueError without any GPU."""
    if not capabilities:
        raise ValueError("no CUDA device: cannot choose TORCH_CUDA_ARCH_LIST")
    distinct = sorted({(int(major), int(minor)) for major, minor in capabilities})
    return ";".join(f"{major}.{minor}" for major, minor in distinct)


def find_cuda_home(environ=os.environ, which=shutil.which) -> str | None:
    """The CUDA toolkit root for the build: CUDA_HOME / CUDA_PATH when set, else the toolkit
    of the nvcc on PATH, seen through symlinks and ``exec .../nvcc "$@"`` wrapper scripts (a
    wrapper in /usr/local/bin would make torch guess CUDA_HOME=/usr/local and miss the
    headers), else /usr/local/cuda. None without a toolkit (the build is then CPU-only and
    the check-registration phase fails)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return environ[name]
    candidates = []
    nvcc = which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as handle:
                head = handle.read(4096)
        except OSError:
            head = b""
        if head.startswith(b"#!"):
            match = re.search(rb"exec\s+['\"]?(/\S+?/bin/nvcc)\b", head)
            if match:
                real = os.path.realpath(match.group(1).decode())
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return root
    return None


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    nominal_s: float  # the limit of this phase when time is plentiful
    minimum_s: float  # below this the phase is not started (skipped: "no time left")
    command: tuple[str, ...] = ()  # "{deadline_s}" in an argument becomes the limit less 10 s
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""
    fails_run: bool = True  # a failure / timeout of this phase makes the exit status non-zero
    reserved: bool = True  # earlier phases leave this phase its minimum (False: "if time remains")


def phase_limit(phases: list[Phase], index: int, elapsed_s: float, budget_s: float) -> float:
    """Time limit of ``phases[index]`` started ``elapsed_s`` into a run of ``budget_s``:
    its nominal limit, cut so that every later reserved phase can still get its minimum. 0
    means "do not start" (less than the phase's own minimum is left)."""
    reserved = sum(p.minimum_s for p in phases[index + 1:] if p.reserved)
    left = budget_s - elapsed_s - reserved
    limit = min(phases[index].nominal_s, left)
    return limit if limit >= phases[index].minimum_s else 0.0


def interpreter_only(path: str) -> bool:
    """True for a test file that forces Triton's interpreter at import (left out of the CUDA
    run: it would switch that whole process to the interpreter; CI runs it on CPU)."""
    with open(path, encoding="utf-8") as handle:
        return re.search(r'^os\.environ\["TRITON_INTERPRET"\]\s*=\s*"1"', handle.read(), re.M) is not None


def follows_bench_convention(path: str) -> bool:
    """A bench script takes ``--device``, ``--quick`` and ``--out`` (COMMON.md convention)."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    return all(f'"{flag}"' in source or f"'{flag}'" in source for flag in BENCH_CONVENTION)


def build_path(python: str, environ=os.environ) -> str:
    """PATH for the build: the interpreter's bin directory first (a venv's or conda's ninja is
    there; without ninja on PATH torch's build falls back to one serial compile)."""
    return os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(python)), environ.get("PATH")]))


def plan(out_dir: str, *, jobs: int, arch: str, python: str = sys.executable,
         cuda_home: str | None = None, full: bool = False) -> list[Phase]:
    """The phases of a run (nothing started)."""
    tests = os.path.join(ROOT, "tests")
    interp = sorted(p for p in glob.glob(os.path.join(tests, "test_*.py")) if interpreter_only(p))
    workers = max(1, min(4, jobs // 4))
    phases = [
        Phase("build", 150, 60,
              (python, "setup.py", "build_ext", "--inplace"),
              (("TORCH_CUDA_ARCH_LIST", arch), ("ANN_KERNELS_MAX_JOBS", str(jobs)), ("MAX_JOBS", str(jobs)),
               ("PATH", build_path(python)), *((("CUDA_HOME", cuda_home),) if cuda_home else ())),
              note=f"TORCH_CUDA_ARCH_LIST={arch}, {jobs} jobs, ninja "
                   f"{'found' if shutil.which('ninja', path=build_path(python)) else 'NOT FOUND: serial build'}, "
                   f"CUDA_HOME={cuda_home or 'not found: CPU-only build'}"),
        Phase("check-registration", 25, 10, (python, os.path.abspath(__file__), "--check-registration")),
        Phase("tests-cuda", 150, 60,
              (python, os.path.join(ROOT, "scripts", "pytest_per_file.py"),
               f"--junitxml={os.path.join(out_dir, 'tests-cuda.xml')}", "--deadline-s={deadline_s}",
               f"--workers={workers}", f"--slow-keep={1 if full else SLOW_KEEP}", "-m", "cuda", "--",
               *[f"--ignore={p}" for p in interp], tests),
              (("ANN_KERNELS_REQUIRE_EXT", "1"), ("OMP_NUM_THREADS", str(max(1, jobs // workers)))),
              note=f"pytest -m cuda, one process per file, {workers} at a time, "
                   + ("every slow test (--full)" if full else f"slow tests sampled 1 in {SLOW_KEEP} (--full: all)")),
        Phase("targets", 240, 90,
              (python, os.path.join(ROOT, "bench", "targets.py"), "--device", "cuda",
               "--out", os.path.join(out_dir, "targets"), "--deadline-s={deadline_s}"),
              note="bench/targets.py: the GPU targets of bench/README.md"),
    ]
    for script in sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))):
        name = os.path.splitext(os.path.basename(script))[0]
        if not follows_bench_convention(script):
            phases.append(Phase(f"bench:{name}", 0, 0, note="skipped: no --device/--quick/--out"))
            continue
        phases.append(Phase(f"bench:{name}", 60, 20,
                            (python, script, "--device", "cuda", "--quick", "--out", os.path.join(out_dir, name)),
                            note="--device cuda --quick, if time remains", fails_run=False, reserved=False))
    return phases


@dataclasses.dataclass
class Result:
    phase: Phase
    status: str  # ok, failed, timeout, skipped
    seconds: float
    limit_s: float
    detail: str = ""


# ---------------------------------------------------------------------------------------
# Running.


def run_phase(phase: Phase, limit_s: float, log_path: str) -> Result:
    if not phase.command or phase.nominal_s == 0:
        return Result(phase, "skipped", 0.0, 0.0, phase.note)
    if limit_s <= 0:
        return Result(phase, "skipped", 0.0, 0.0, "no time left in the budget")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           **dict(phase.env)}
    # A phase with its own deadline ends itself (and writes what it has) before being killed.
    command = [c.replace("{deadline_s}", f"{max(limit_s - 10, 0.8 * limit_s):.0f}") for c in phase.command]
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: a timeout kills it all
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return Result(phase, "timeout", time.monotonic() - start, limit_s, f"killed after {limit_s:.0f} s")
    seconds = time.monotonic() - start
    return Result(phase, "ok" if code == 0 else "failed", seconds, limit_s, "" if code == 0 else f"exit {code}")


def registered_ops(dispatch_key: str) -> list[str]:
    import torch

    return sorted(n for n in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
                  if n.startswith("ann_kernels::"))


def check_registration(*, expect_cuda: bool = True) -> int:
    """After the build: the extension loads; every op with a CPU kernel has a CUDA kernel
    (the early-exit CUDA kernel, the Triton loss kernels); Triton imports and is not in
    interpreter mode; on a GPU, one tiny call of each loss op runs its kernel, not the
    pure-torch reference. ``expect_cuda=False`` (dry run): report, do not fail on CUDA."""
    import warnings

    import torch

    import ann_kernels
    from ann_kernels import _ext

    problems = []
    if not ann_kernels.HAS_CPP_EXT:
        problems.append(f"ann_kernels._C did not load: {_ext.EXT_IMPORT_ERROR}")
    for key in ("CPU", "CUDA", "Autograd"):
        print(f"ann_kernels ops with a {key} kernel: {registered_ops(key)}")
    no_cuda = sorted(set(registered_ops("CPU")) - set(registered_ops("CUDA")))
    if no_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        problems.append(f"no CUDA kernel for {no_cuda} (was nvcc found? CUDA_HOME = {CUDA_HOME})")
    if not ann_kernels.HAS_TRITON:
        problems.append("TRITON IS NOT INSTALLED: on CUDA tensors the loss ops would run the pure-torch reference, "
                        "and the CUDA loss tests would pass on it without testing a single kernel")
    else:
        try:
            import triton

            import ann_kernels.triton.multi_exit_ce  # noqa: F401
            import ann_kernels.triton.multi_exit_linear_ce  # noqa: F401

            print(f"triton {triton.__version__}: the Triton loss kernels import")
        except Exception as error:  # noqa: BLE001  (any import failure is the finding)
            problems.append(f"the Triton loss kernels do not import: {type(error).__name__}: {error}")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            problems.append("TRITON_INTERPRET is set: the Triton kernels would run in the interpreter")
    if expect_cuda and torch.cuda.is_available() and not problems:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits = torch.randn(2, 8, 16, device="cuda", requires_grad=True)
            target = torch.randint(0, 16, (8,), device="cuda")
            ann_kernels.multi_exit_cross_entropy(logits, target).loss.backward()
            hidden = torch.randn(2, 8, 4, device="cuda", requires_grad=True)
            weight = torch.randn(16, 4, device="cuda", requires_grad=True)
            ann_kernels.multi_exit_linear_cross_entropy(hidden, weight, target).loss.backward()
            torch.cuda.synchronize()
        fallbacks = [str(w.message) for w in caught if "pure-torch reference" in str(w.message)]
        if fallbacks:
            problems.append(f"a loss op ran its pure-torch reference on CUDA: {fallbacks}")
        else:
            print("a tiny CUDA call of each loss op ran its kernel (no fallback)")
    for problem in problems:
        print(("FAIL: " if expect_cuda else "on this machine: ") + problem)
    if not problems:
        print("ok")
    return 1 if problems and expect_cuda else 0


def import_by_path(path: str):
    """Imports a script as a module (its ``if __name__ == "__main__"`` part does not run)."""
    name = "gpu_check_dry_" + re.sub(r"\W", "_", os.path.relpath(path, ROOT))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dry_run(out_dir: str, budget_s: float = DEFAULT_BUDGET_S, full: bool = False) -> int:
    """The whole plan on a CPU-only machine: syntax of every script and test file, the
    required packages, every phase's program and script (each script imported), ninja on the
    build's PATH, the registration check (reported, not judged), the CUDA test plan (the
    runner's collect pass), the target table and the target runner with the CPU standing in
    (miniature shapes, compile stubbed), the summary from those rows, and the planned time
    per phase. Exit status 1 on any problem."""
    import torch

    torch.set_num_threads(1)  # miniature shapes: a second thread only adds hand-off cost here
    problems = []
    wrapper = os.path.join(ROOT, "scripts", "gpu_check.sh")
    done = subprocess.run(["bash", "-n", wrapper], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        problems.append(f"bash -n {wrapper}: {done.stderr.strip()}")
    for path in [__file__, *glob.glob(os.path.join(ROOT, "bench", "*.py")),
                 *glob.glob(os.path.join(ROOT, "scripts", "*.py")), *glob.glob(os.path.join(ROOT, "tests", "*.py"))]:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        try:
            compile(source, path, "exec")  # syntax only: nothing written, nothing run
        except SyntaxError as error:
            problems.append(f"{path}: {error}")
    missing = missing_modules()
    problems += [f"required package {m} is not installed (the GPU machine must have it too)" for m in missing]
    optional = [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None]
    phases = plan(out_dir, jobs=os.cpu_count() or 1, arch="<from torch.cuda.get_device_capability()>",
                  cuda_home=find_cuda_home(), full=full)
    # The CUDA test plan runs in the background while the rest is checked.
    tests = next(p for p in phases if p.name == "tests-cuda")
    collect_cmd = [c for c in tests.command if not c.startswith(("--junitxml", "--deadline-s"))]
    collect_cmd.insert(2, "--collect-only")
    collect_cmd.insert(3, f"--junitxml={os.path.join(out_dir, 'dry-collect.xml')}")
    collect = subprocess.Popen(collect_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
    print(f"gpu-check dry run: out={out_dir}, budget {budget_s:.0f} s; the CPU stands in for the GPU")
    for phase in phases:
        if not phase.command:
            continue
        program = phase.command[0]
        if not (os.path.isfile(program) or shutil.which(program)):
            problems.append(f"{phase.name}: program {program} not found")
        script = phase.command[1] if len(phase.command) > 1 else ""
        if script.endswith(".py"):
            path = script if os.path.isabs(script) else os.path.join(ROOT, script)
            if not os.path.isfile(path):
                problems.append(f"{phase.name}: script {script} not found")
            elif os.path.basename(path) not in ("setup.py", os.path.basename(__file__)):
                try:
                    import_by_path(path)
                except Exception as error:  # noqa: BLE001  (any import failure is the finding)
                    problems.append(f"{phase.name}: {os.path.relpath(path, ROOT)} does not import: "
                                    f"{type(error).__name__}: {error}")
    try:
        import torch.utils.cpp_extension  # noqa: F401  (what setup.py builds with)
    except ImportError as error:
        problems.append(f"build: torch.utils.cpp_extension does not import: {error}")
    if not shutil.which("ninja", path=dict(phases[0].env)["PATH"]):
        problems.append("build: ninja is not on the build's PATH (the build would be serial)")
    print("check-registration (reported only: this machine has no CUDA build):")
    check_registration(expect_cuda=False)
    targets = targets_module()
    try:
        units = targets.validate_targets()
        print(f"target table: {len(targets.TARGETS)} targets in {len(units)} shapes")
        targets.run_targets(os.path.join(out_dir, "targets"), torch.device("cpu"), deadline_s=120, dry_run=True)
    except Exception as error:  # noqa: BLE001
        problems.append(f"targets: {type(error).__name__}: {error}")
    collect_out, _ = collect.communicate(timeout=300)
    print("CUDA test plan (" + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                                        for c in collect_cmd[1:4]) + "):")
    print("\n".join("  " + line for line in collect_out.strip().splitlines()[-14:]))
    if collect.returncode != 0:
        problems.append(f"tests-cuda: the collect pass exited {collect.returncode}")
    print("planned time per phase (limits; the optional benchmarks run only if time remains):")
    elapsed, results = 0.0, []
    for i, phase in enumerate(phases):
        limit = phase_limit(phases, i, elapsed, budget_s) if phase.command else 0.0
        elapsed += limit
        command = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in phase.command)
        print(f"  {phase.name:<32} {limit:>4.0f} s (nominal {phase.nominal_s:.0f}, at least {phase.minimum_s:.0f})"
              f"  {phase.note}")
        if command:
            print(f"      $ {command[:300]}")
        detail = "" if limit else (phase.note or "no time left in the budget")
        if phase.name == "tests-cuda":
            detail = "dry run: " + (collect_out.strip().splitlines() or ["collect pass printed nothing"])[-1]
        results.append(Result(phase, "planned" if limit else "skipped", 0.0, limit, detail))
    if optional:
        print("  optional packages missing (their parts are skipped):", ", ".join(optional))
    summary = write_outputs(out_dir, results, budget_s, elapsed, missing=missing, title="gpu-check DRY RUN")
    print("summary.md (dry run; CPU stand-in numbers are not verdicts):")
    print("\n".join("  " + line for line in summary.splitlines()[:16]))
    for problem in problems:
        print("PROBLEM:", problem)
    print("dry run ok" if not problems else f"dry run found {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse the whole plan here, the CPU standing in")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                        help="seconds for the whole run (phase limits shrink to fit)")
    parser.add_argument("--full", action="store_true", help="every slow CUDA test (default: sampled)")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", os.path.join(ROOT, "gpu-check")))
    parser.add_argument("--check-registration", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # this checkout's ann_kernels, not an installed one
    if args.check_registration:
        return check_registration()
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    if args.dry_run:
        return dry_run(out_dir, args.budget, args.full)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    missing = missing_modules()
    if missing:  # go on: the rest of the run is still worth having; the exit status says 1
        print(f"gpu-check: REQUIRED PACKAGES MISSING: {', '.join(missing)}", flush=True)
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    phases = plan(out_dir, jobs=os.cpu_count() or 1, arch=arch_list(caps), cuda_home=find_cuda_home(),
                  full=args.full)
    start = time.monotonic()
    results = []
    for i, phase in enumerate(phases):
        limit = phase_limit(phases, i, time.monotonic() - start, args.budget)
        print(f"[{time.monotonic() - start:5.0f} s] {phase.name} (limit {limit:.0f} s) ...", flush=True)
        result = run_phase(phase, limit, os.path.join(out_dir, f"{phase.name.replace(':', '_')}.log"))
        print(f"        {result.status} in {result.seconds:.0f} s {result.detail}", flush=True)
        results.append(result)
        if phase.name == "build" and result.status != "ok":
            print("build failed: the tests would only run the previous build; see build.log", flush=True)
    text = write_outputs(out_dir, results, args.budget, time.monotonic() - start, missing=missing)
    print(text)
    return exit_status(results, target_verdicts(out_dir), missing)


if __name__ == "__main__":
    sys.exit(main())
