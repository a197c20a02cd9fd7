"""`make gpu-check`: everything CUDA-specific of ann_kernels in one short run on a CUDA machine
(called by scripts/gpu_check.sh; design: /work/shared/DESIGN.md "GPU", issue 14).

On a fresh machine with its own preinstalled torch (>= 2.11), no network and no downloads:

1. ``build``           the extension in place with CUDA, for the present GPU's arch only
                       (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability()), then a
                       check that the CUDA kernels registered;
2. ``tests-cuda``      ``pytest -m cuda``: the CUDA case of every device-parametrised test and
                       the CUDA-only tests (tests/utils.py DEVICES): the C++/CUDA early-exit
                       kernel and the Triton loss kernels on real CUDA tensors (e.g.
                       tests/test_losses_on_device.py). The interpreter-only Triton files
                       (they set TRITON_INTERPRET=1 at import, CPU tensors; their sm_80 /
                       sm_90 compile tests run in CI) are left out: they would switch the
                       whole process to the interpreter;
3. ``bench:<name>``    every bench/bench_*.py with ``--device cuda --quick --out DIR``.

Each phase runs in its own process group under its own time limit (a hang cannot eat the
rest); the limits shrink so that the whole run fits ``--budget`` seconds (default 450: under
8 minutes with the summary). Writes ``phases.csv``, ``phases.png``, the benchmarks' CSV and
PNG files, logs and a one-screen ``summary.md`` into GPU_CHECK_OUT (default ``gpu-check/``).
Exit status: non-zero when the build failed, any CUDA test failed or errored, or a phase
timed out; 0 otherwise. ``--dry-run`` lists the phases and checks syntax and imports without
a GPU (used by tests/test_gpu_check.py in CI).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 450.0
# Needed for the run (the listed preinstalled packages); the others only enrich it.
REQUIRED_MODULES = ("torch", "pytest", "hypothesis", "ninja", "setuptools", "numpy")
OPTIONAL_MODULES = ("triton", "tqdm", "matplotlib", "pybind11", "liger_kernel")
BENCH_CONVENTION = ("--device", "--quick", "--out")


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
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""
    fails_run: bool = True  # a failure / timeout of this phase makes the exit status non-zero


def phase_limit(phases: list[Phase], index: int, elapsed_s: float, budget_s: float) -> float:
    """Time limit of ``phases[index]`` started ``elapsed_s`` into a run of ``budget_s``:
    its nominal limit, cut so that every later phase can still get its minimum. 0 means
    "do not start" (less than the phase's own minimum is left)."""
    reserved = sum(p.minimum_s for p in phases[index + 1:])
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


def plan(out_dir: str, *, jobs: int, arch: str, python: str = sys.executable,
         cuda_home: str | None = None) -> list[Phase]:
    """The phases of a run (nothing started)."""
    tests = os.path.join(ROOT, "tests")
    interp = sorted(p for p in glob.glob(os.path.join(tests, "test_*.py")) if interpreter_only(p))
    pytest_common = (python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider")
    phases = [
        Phase("build", 170, 60,
              (python, "setup.py", "build_ext", "--inplace"),
              (("TORCH_CUDA_ARCH_LIST", arch), ("ANN_KERNELS_MAX_JOBS", str(jobs)), ("MAX_JOBS", str(jobs)),
               *((("CUDA_HOME", cuda_home),) if cuda_home else ())),
              note=f"TORCH_CUDA_ARCH_LIST={arch}, {jobs} jobs, CUDA_HOME={cuda_home or 'not found: CPU-only build'}"),
        Phase("check-registration", 30, 10,
              (python, os.path.abspath(__file__), "--check-registration")),
        Phase("tests-cuda", 210, 60,
              pytest_common + ("-m", "cuda", f"--junitxml={os.path.join(out_dir, 'tests-cuda.xml')}",
                               *[f"--ignore={p}" for p in interp], tests),
              (("ANN_KERNELS_REQUIRE_EXT", "1"), ("OMP_NUM_THREADS", "4")),
              note="pytest -m cuda"),
    ]
    for script in sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))):
        name = os.path.splitext(os.path.basename(script))[0]
        if not follows_bench_convention(script):
            phases.append(Phase(f"bench:{name}", 0, 0, note="skipped: no --device/--quick/--out"))
            continue
        phases.append(Phase(f"bench:{name}", 60, 15,
                            (python, script, "--device", "cuda", "--quick", "--out", os.path.join(out_dir, name)),
                            note="--device cuda --quick", fails_run=False))
    return phases


@dataclasses.dataclass
class Result:
    phase: Phase
    status: str  # ok, failed, timeout, skipped
    seconds: float
    limit_s: float
    detail: str = ""


def junit_counts(path: str) -> dict[str, int]:
    """tests / failures / errors / skipped summed over a pytest --junitxml file ({} if absent)."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def exit_status(results: list[Result]) -> int:
    """1 when a phase that counts failed or timed out, else 0."""
    return int(any(r.status in ("failed", "timeout") and r.phase.fails_run for r in results))


# ---------------------------------------------------------------------------------------
# Running.


def run_phase(phase: Phase, limit_s: float, log_path: str) -> Result:
    if not phase.command or phase.nominal_s == 0:
        return Result(phase, "skipped", 0.0, 0.0, phase.note)
    if limit_s <= 0:
        return Result(phase, "skipped", 0.0, 0.0, "no time left in the budget")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           **dict(phase.env)}
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(phase.command) + "\n")
        log.flush()
        proc = subprocess.Popen(phase.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
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


def check_registration() -> int:
    """After the build: the extension loads and the CUDA kernels are registered."""
    import torch

    import ann_kernels
    from ann_kernels import _compat

    if not ann_kernels.HAS_CPP_EXT:
        print("FAIL: ann_kernels._C did not load:", ann_kernels._ext.EXT_IMPORT_ERROR)
        return 1
    missing = [op for op in ("ann_kernels::early_exit_step",) if not _compat.has_kernel_for(op, "CUDA")]
    for key in ("CPU", "CUDA", "Autograd"):
        ops = sorted(n for n in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                     if n.startswith("ann_kernels::"))
        print(f"ann_kernels ops with a {key} kernel: {ops}")
    if missing:
        print("FAIL: no CUDA kernel for", missing, "(was nvcc found? CUDA_HOME =",
              __import__("torch.utils.cpp_extension", fromlist=["CUDA_HOME"]).CUDA_HOME, ")")
        return 1
    print("ok")
    return 0


def environment_lines() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for module in ("triton", "pytest", "hypothesis", "liger_kernel"):
        if importlib.util.find_spec(module) is not None:
            try:
                lines.append(f"{module} {__import__(module).__version__}")
            except Exception as error:  # noqa: BLE001  (a broken optional package is a note)
                lines.append(f"{module}: {type(error).__name__}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.insert(0, f"GPU {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                        f"{torch.cuda.device_count()} device(s), {os.cpu_count()} CPU cores")
    return lines


def bench_table(csv_path: str, max_rows: int = 6) -> list[str]:
    """A few lines of a long-format bench CSV: p50 per provider (in the CSV's unit) for the
    first shapes."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("p50") not in (None, "")]
    if not rows:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in rows))[:5]
    keys = list(dict.fromkeys((r["op"], r["shape"], r.get("dtype", ""), r["metric"]) for r in rows))
    lines = ["| op | shape | dtype | metric | " + " | ".join(providers) + " |",
             "|" + "---|" * (4 + len(providers))]
    table = {(r["op"], r["shape"], r.get("dtype", ""), r["metric"], r["provider"]): r["p50"] for r in rows}
    for key in keys[:max_rows]:
        cells = [table.get((*key, provider), "") for provider in providers]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(f"{float(c):.4g}" if c else "" for c in cells) + " |")
    if len(keys) > max_rows:
        lines.append(f"({len(keys) - max_rows} more rows in {os.path.basename(csv_path)})")
    return lines


def write_outputs(out_dir: str, results: list[Result], budget_s: float, total_s: float) -> str:
    with open(os.path.join(out_dir, "phases.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "status", "seconds", "limit_s", "detail"])
        for r in results:
            writer.writerow([r.phase.name, r.status, f"{r.seconds:.1f}", f"{r.limit_s:.0f}", r.detail])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.4 * len(results) + 1.2))
        names = [r.phase.name for r in results]
        colors = {"ok": "tab:green", "failed": "tab:red", "timeout": "tab:orange", "skipped": "tab:gray"}
        ax.barh(names, [r.limit_s for r in results], color="none", edgecolor="black", label="limit")
        ax.barh(names, [r.seconds for r in results], color=[colors[r.status] for r in results], label="used")
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"gpu-check: {total_s:.0f} s of a {budget_s:.0f} s budget")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "phases.png"), dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    lines = [f"# gpu-check {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    lines += [f"- {line}" for line in environment_lines()]
    lines += [f"- total {total_s:.0f} s (budget {budget_s:.0f} s); exit status {exit_status(results)}", "",
              "| phase | status | s | limit | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r.detail or r.phase.note
        counts = junit_counts(os.path.join(out_dir, f"{r.phase.name}.xml"))
        if counts:
            detail = (f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped")
        lines.append(f"| {r.phase.name} | {r.status} | {r.seconds:.0f} | {r.limit_s:.0f} | {detail} |")
    for csv_path in sorted(glob.glob(os.path.join(out_dir, "bench_*", "*.csv"))):
        table = bench_table(csv_path)
        if table:
            lines += ["", f"**{os.path.relpath(csv_path, out_dir)}** (p50; judge with bench/README.md, GPU targets)"]
            lines += table
    lines += ["", "Logs: `<phase>.log`; failing tests: `grep -E 'FAILED|ERROR' tests-cuda.log`."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def dry_run(out_dir: str) -> int:
    """Lists the phases (with a placeholder arch), checks the syntax of this script, the
    shell wrapper, the test files and the bench scripts, and the imports the run needs."""
    problems = []
    wrapper = os.path.join(ROOT, "scripts", "gpu_check.sh")
    done = subprocess.run(["bash", "-n", wrapper], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        problems.append(f"bash -n {wrapper}: {done.stderr.strip()}")
    for path in [__file__, *glob.glob(os.path.join(ROOT, "bench", "*.py")),
                 *glob.glob(os.path.join(ROOT, "tests", "*.py"))]:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        try:
            compile(source, path, "exec")  # syntax only: nothing written, nothing run
        except SyntaxError as error:
            problems.append(f"{path}: {error}")
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            problems.append(f"required module {module} is not installed")
    optional = [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None]
    import torch  # noqa: F401  (the run needs it; it must import here too)

    import ann_kernels  # noqa: F401

    print(f"gpu-check dry run: out={out_dir}, budget {DEFAULT_BUDGET_S:.0f} s")
    phases = plan(out_dir, jobs=os.cpu_count() or 1, arch="<from torch.cuda.get_device_capability()>",
                  cuda_home=find_cuda_home())
    elapsed = 0.0
    for i, phase in enumerate(phases):
        limit = phase_limit(phases, i, elapsed, DEFAULT_BUDGET_S) if phase.command else 0.0
        elapsed += limit
        command = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in phase.command)
        print(f"  {phase.name:<32} limit {phase.nominal_s:>4.0f} s (>= {limit:.0f} s if every earlier phase "
              f"used its whole limit)  {phase.note or ''}")
        if command:
            print(f"      $ {command}")
    if optional:
        print("  optional modules missing (their parts are skipped):", ", ".join(optional))
    for problem in problems:
        print("PROBLEM:", problem)
    print("dry run ok" if not problems else f"dry run found {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the phases, check syntax and imports")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                        help="seconds for the whole run (phase limits shrink to fit)")
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
        return dry_run(out_dir)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    phases = plan(out_dir, jobs=os.cpu_count() or 1, arch=arch_list(caps), cuda_home=find_cuda_home())
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
    print(write_outputs(out_dir, results, args.budget, time.monotonic() - start))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
