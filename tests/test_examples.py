"""Smoke-run every runnable example in python/ (discovered automatically; python/README.md
states the convention): each runs with ``--smoke`` and ``ANN_EXAMPLES_SMOKE=1`` in a
subprocess, must exit 0, print no traceback and at least one ``CHECK <what> ok`` line (the
example's own asserts), plus, for the examples listed in ``EXPECTED``, the specific checks
they exist to show. An example that cannot run here (a missing optional dependency) prints
``SKIP <reason>`` and exits 0; its test is then skipped with that reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "python").glob("*.py") if not p.name.startswith("_"))

# Lines (regular expressions) a known example must print; new examples need only follow
# the convention (at least one CHECK line), but may add themselves here.
EXPECTED = {
    "fused_loss_amp.py": [r"CHECK logits are torch\.(bfloat16|float16) under autocast ok",
                          r"CHECK fused loss [\d.]+ == reference [\d.]+ ok",
                          r"CHECK loss went down \([\d.]+ -> [\d.]+\) ok",
                          r"autocast dtype: torch\.(bfloat16|float16); GradScaler enabled: (False|True)"],
    "adaloss_checkpoint.py": [r"resumed from adaloss_checkpoint\.pt at step \d+",
                              r"CHECK per-step losses of the resumed run equal the uninterrupted run's",
                              r"CHECK model parameters and buffers equal bit for bit ok",
                              r"CHECK AdaLoss state .* equal bit for bit ok"],
    "early_exit_budget.py": [r"CHECK every plan's validation cost is within its budget ok",
                             r"CHECK each test prediction is the network's prediction at the exit taken ok",
                             r"^\s+1\.00\s+[\d.]+%"],  # the table's full-budget row
    "finetune_hf_llama.py": [r"CHECK fused loss [\d.]+ == eager per-exit cross-entropy [\d.]+ ok",
                             r"CHECK every exit's held-out loss fell ok"],
    "fsdp2_early_exit_lm.py": [r"CHECK step 1: loss [\d.]+ and every gradient equal one process",
                               r"CHECK reading the sharded head outside the objective raises a clear error ok"],
    "eann.py": [r"CHECK member cost ratios are ~2 ok",
                r"budget .* -> exit 0 \(member 0, exit 0\)",
                r"CHECK each budget returns the latest exit that fits, with that exit's prediction ok",
                r"CHECK a generous deadline reaches the last exit ok"],
}


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert set(EXPECTED) <= names, f"missing examples: {sorted(set(EXPECTED) - names)}"


def _check_example(script: Path) -> str:
    """Run ``script --smoke`` as CI does; fail (AssertionError) or skip per the convention.
    Returns its stdout."""
    env = {**os.environ, "ANN_EXAMPLES_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    skipped = re.search(r"^SKIP (.+)$", proc.stdout, flags=re.M)
    if skipped:  # an optional dependency (e.g. the [serve] extra) is not installed
        pytest.skip(f"{script.name}: {skipped.group(1)}")
    checks = re.findall(r"^CHECK .* ok$", proc.stdout, flags=re.M)
    assert checks, f"{script.name} printed no 'CHECK <what> ok' line (python/README.md):\n{proc.stdout[-2000:]}"
    for pattern in EXPECTED.get(script.name, []):
        assert re.search(pattern, proc.stdout, flags=re.M), f"{script.name}: no line matching {pattern!r}:\n" \
                                                             f"{proc.stdout[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_smoke_run(script: Path):
    _check_example(script)


@pytest.mark.parametrize("body,match", [
    ("print('trained, looks fine')", "printed no 'CHECK <what> ok' line"),
    ("print('CHECK something ok'); raise SystemExit(3)", "exited 3"),
    ("import sys; print('CHECK a ok'); sys.stderr.write('Traceback (most recent call last):')", "Traceback"),
])
def test_the_check_rejects_a_bad_example(tmp_path, body, match):
    bad = tmp_path / "bad_example.py"
    bad.write_text(body + "\n")
    with pytest.raises(AssertionError, match=re.escape(match)):
        _check_example(bad)


def test_the_check_skips_an_example_that_says_skip(tmp_path):
    script = tmp_path / "needs_extra.py"
    script.write_text("print('SKIP fastapi is not installed')\n")
    with pytest.raises(pytest.skip.Exception, match="fastapi is not installed"):
        _check_example(script)
