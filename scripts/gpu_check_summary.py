"""The verdict part of `make gpu-check` (scripts/gpu_check.py): what the GPU machine must have,
the exit status, and ``summary.md`` (the GPU target verdicts first, then the CUDA test counts
and failures, then what was skipped and why, then the run itself); docs/gpu.md."""

from __future__ import annotations

import csv
import datetime as dt
import glob
import importlib.util
import os
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The GPU machine must have these (imported at module level by the package, its tests or this
# run: ann_kernels/train/*.py import tqdm and numpy; the build needs setuptools and ninja).
REQUIRED_MODULES = ("torch", "triton", "numpy", "pytest", "hypothesis", "tqdm", "setuptools", "ninja")


def junit_counts(path: str) -> dict[str, int]:
    """tests / failures / errors / skipped summed over a pytest --junitxml file ({} if absent)."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def junit_problems(path: str, limit: int = 10) -> list[str]:
    """'FAILED file::test: message' for the first ``limit`` failed or errored test cases."""
    if not os.path.exists(path):
        return []
    lines = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for case in suite.iter("testcase"):
            for tag, label in (("failure", "FAILED"), ("error", "ERROR")):
                element = case.find(tag)
                if element is not None:
                    nodeid = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
                    lines.append(f"{label} {nodeid}: {(element.get('message') or '').strip()[:160]}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def missing_modules(names=REQUIRED_MODULES) -> list[str]:
    return [m for m in names if importlib.util.find_spec(m) is None]


def exit_status(results: list, verdicts=(), missing=()) -> int:
    """1 when a required package is missing or a phase that counts failed or timed out; else
    3 when a GPU target was missed (a verdict, not a note); else 0. ``results``: one
    gpu_check.Result per phase; ``verdicts``: bench/targets.py Verdicts."""
    if missing or any(r.status in ("failed", "timeout") and r.phase.fails_run for r in results):
        return 1
    if any(v.status == "missed" and "dry run" not in v.reason for v in verdicts):
        return 3
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
    providers = list(dict.fromkeys(r["provider"] for r in rows))
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


def targets_module():
    """bench/targets.py (the target table, the runner and the judge)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench import targets

    return targets


def target_verdicts(out_dir: str) -> list:
    """One verdict per GPU target from ``out_dir``/targets/targets.csv (every target "not
    measured" when the phase wrote nothing)."""
    targets = targets_module()
    return targets.judge(targets.read_rows(os.path.join(out_dir, "targets", targets.CSV_NAME)))


def write_outputs(out_dir: str, results: list, budget_s: float, total_s: float, *,
                  missing: list[str] = (), title: str = "gpu-check") -> str:
    """phases.csv, phases.png, targets/targets.png and summary.md: the target verdicts first,
    then the test counts and failures, then what was skipped and why."""
    with open(os.path.join(out_dir, "phases.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "status", "seconds", "limit_s", "detail"])
        for r in results:
            writer.writerow([r.phase.name, r.status, f"{r.seconds:.1f}", f"{r.limit_s:.0f}", r.detail])
    plot_phases(out_dir, results, budget_s, total_s)
    verdicts = target_verdicts(out_dir)
    os.makedirs(os.path.join(out_dir, "targets"), exist_ok=True)
    targets_module().plot_verdicts(verdicts, os.path.join(out_dir, "targets", "targets.png"))
    code = exit_status(results, verdicts, missing)
    counts = {v.status: sum(1 for w in verdicts if w.status == v.status) for v in verdicts}
    lines = [f"# {title} {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    if missing:
        lines += [f"**REQUIRED PACKAGES MISSING: {', '.join(missing)}** (the GPU machine must have "
                  f"{', '.join(REQUIRED_MODULES)}); the counts below are not to be trusted.", ""]
    lines += [f"## GPU targets ({counts.get('met', 0)} met, {counts.get('missed', 0)} missed, "
              f"{counts.get('not measured', 0)} not measured; bench/README.md)"]
    lines += [f"- {v.line()}" for v in verdicts]
    lines += ["", "## CUDA tests"]
    registration_log = os.path.join(out_dir, "check-registration.log")
    if os.path.exists(registration_log):  # e.g. no Triton: the loss tests would test the reference
        with open(registration_log, encoding="utf-8") as handle:
            lines += [f"- **{line.strip()}**" for line in handle if line.startswith("FAIL:")]
    tests = next((r for r in results if r.phase.name == "tests-cuda"), None)
    xml_path = os.path.join(out_dir, "tests-cuda.xml")
    test_counts = junit_counts(xml_path)
    if test_counts:
        lines.append(f"- {test_counts['tests']} tests: {test_counts['failures']} failed, {test_counts['errors']} "
                     f"errors, {test_counts['skipped']} skipped ({tests.phase.note if tests else ''})")
        lines += [f"- {line}" for line in junit_problems(xml_path)]
    else:
        lines.append(f"- no results: the phase {tests.status if tests else 'did not run'} "
                     f"({tests.detail if tests else ''}); see tests-cuda.log")
    skipped = []
    if importlib.util.find_spec("liger_kernel") is None:
        skipped.append("Liger-Kernel is not installed: its targets and rows are not measured")
    for r in results:
        if r.status == "skipped":
            skipped.append(f"phase {r.phase.name}: {r.detail or r.phase.note}")
        elif r.status == "timeout":
            skipped.append(f"phase {r.phase.name} timed out ({r.detail}); what it wrote is above")
    lines += ["", "## Skipped, and why"] + [f"- {line}" for line in skipped or ["nothing"]]
    lines += ["", "## Run"] + [f"- {line}" for line in environment_lines()]
    lines += [f"- total {total_s:.0f} s (budget {budget_s:.0f} s); exit status {code} "
              "(0 all good, 1 a check failed, 3 a target missed)", "",
              "| phase | status | s | limit | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r.detail or r.phase.note
        lines.append(f"| {r.phase.name} | {r.status} | {r.seconds:.0f} | {r.limit_s:.0f} | {detail} |")
    for csv_path in sorted(glob.glob(os.path.join(out_dir, "bench_*", "*.csv"))):
        table = bench_table(csv_path, max_rows=4)
        if table:
            lines += ["", f"**{os.path.relpath(csv_path, out_dir)}** (p50, quick shapes)"] + table
    lines += ["", "Target rows: `targets/targets.csv` (plot `targets/targets.png`); logs: `<phase>.log`; "
              "per-file test logs: `tests-cuda/`."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def plot_phases(out_dir: str, results: list, budget_s: float, total_s: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(results) + 1.2))
    names = [r.phase.name for r in results]
    colors = {"ok": "tab:green", "failed": "tab:red", "timeout": "tab:orange"}
    ax.barh(names, [r.limit_s for r in results], color="none", edgecolor="black", label="limit")
    ax.barh(names, [r.seconds for r in results], color=[colors.get(r.status, "tab:gray") for r in results],
            label="used")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"gpu-check: {total_s:.0f} s of a {budget_s:.0f} s budget")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "phases.png"), dpi=100)
    plt.close(fig)
