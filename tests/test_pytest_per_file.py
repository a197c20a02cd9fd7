"""scripts/pytest_per_file.py, the CUDA test phase of `make gpu-check`: one device assert cannot
fail other tests, a crash or a deadline loses nothing already run, and the JUnit XML is there
whatever happens. No GPU here: a CUDA context broken by a device-side assert is simulated by a
process-wide flag that makes every later test of the same process fail, as a broken context
does, raised with the error text CUDA gives; an abort stands for a process killed by a fault."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "scripts", "pytest_per_file.py")
_spec = importlib.util.spec_from_file_location("pytest_per_file", RUNNER)
pytest_per_file = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pytest_per_file)

BROKEN_CHECK = '''
import sys


def context_ok():
    assert not getattr(sys, "cuda_context_broken", False), "CUDA error: the context was broken by an earlier test"
'''
FILES = {
    "test_a_asserts.py": BROKEN_CHECK + '''

def test_before():
    context_ok()


def test_device_assert():
    context_ok()
    sys.cuda_context_broken = True
    raise RuntimeError("CUDA error: device-side assert triggered")


def test_after():
    context_ok()
''',
    "test_b_fine.py": BROKEN_CHECK + '''
import pytest


@pytest.mark.parametrize("i", range(3))
def test_fine(i):
    context_ok()
''',
    "test_c_crashes.py": BROKEN_CHECK + '''
import os


def test_first():
    context_ok()


def test_aborts():
    os.abort()


def test_last():
    context_ok()
''',
}
HANGS = '''
import time


def test_quick():
    pass


def test_hangs():
    time.sleep(120)


def test_never_reached():
    pass
'''


def env():
    # The fake files need no plugins; skipping their discovery keeps each process fast.
    return {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def write(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)


def outcomes(xml_path) -> dict[str, str]:
    """nodeid -> passed / failure: msg / error: msg / skipped: msg, from the merged XML."""
    result = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        nodeid = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        children = list(case)
        result[nodeid] = f"{children[0].tag}: {children[0].get('message')}" if children else "passed"
    return result


def run_runner(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, RUNNER, f"--junitxml={tmp_path / 'out.xml'}", *args, "--", "."],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=timeout)


def test_one_process_for_all_files_cascades(tmp_path):
    """Why the runner exists: in one pytest process the simulated device assert fails every
    later test, in its own file and in the others."""
    write(tmp_path, {k: v for k, v in FILES.items() if "crash" not in k})
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."], cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert "5 failed, 1 passed" in done.stdout, done.stdout  # only test_before ran before the assert
    assert "FAILED test_a_asserts.py::test_after" in done.stdout
    assert "FAILED test_b_fine.py::test_fine[2]" in done.stdout


def test_a_device_assert_or_a_crash_fails_only_its_own_test(tmp_path):
    write(tmp_path, FILES)
    done = run_runner(tmp_path, "--workers=2")
    assert done.returncode == 1, done.stdout + done.stderr  # a test failed; the run was not cut
    results = outcomes(tmp_path / "out.xml")
    assert results == {
        "test_a_asserts.py::test_before": "passed",
        "test_a_asserts.py::test_device_assert": "failure: RuntimeError: CUDA error: device-side assert triggered",
        "test_a_asserts.py::test_after": "passed",  # restarted in a fresh process
        "test_b_fine.py::test_fine[0]": "passed",
        "test_b_fine.py::test_fine[1]": "passed",
        "test_b_fine.py::test_fine[2]": "passed",
        "test_c_crashes.py::test_first": "passed",
        "test_c_crashes.py::test_aborts": "error: the test process died (signal SIGABRT) during this test",
        "test_c_crashes.py::test_last": "passed",
    }
    root = ET.parse(tmp_path / "out.xml").getroot()
    counts = {k: sum(int(s.get(k)) for s in root) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 9, "failures": 1, "errors": 1, "skipped": 0}
    assert "restarted after a context-breaking CUDA error in test_a_asserts.py::test_device_assert" in done.stdout


def test_the_deadline_keeps_every_result_reached(tmp_path):
    write(tmp_path, {"test_a_hangs.py": HANGS, "test_b_fine.py": FILES["test_b_fine.py"]})
    start = time.monotonic()
    done = run_runner(tmp_path, "--workers=2", "--deadline-s=8")
    assert done.returncode == 124 and time.monotonic() - start < 60, done.stdout + done.stderr
    results = outcomes(tmp_path / "out.xml")
    assert results["test_a_hangs.py::test_quick"] == "passed"
    assert results["test_a_hangs.py::test_hangs"] == "error: killed at the phase deadline while running"
    assert results["test_a_hangs.py::test_never_reached"].startswith("skipped: not run: cut at the phase deadline")
    assert all(results[f"test_b_fine.py::test_fine[{i}]"] == "passed" for i in range(3))


def test_sigterm_writes_the_xml_of_what_ran(tmp_path):
    """The phase's own time limit ends the runner with SIGTERM (scripts/gpu_check.py)."""
    write(tmp_path, {"test_a_hangs.py": HANGS})
    proc = subprocess.Popen([sys.executable, RUNNER, f"--junitxml={tmp_path / 'out.xml'}", "--", "."],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = tmp_path / "out" / "test_a_hangs.py.0.jsonl"
    deadline = time.monotonic() + 60
    started = '{"event": "start", "nodeid": "test_a_hangs.py::test_hangs"}'
    while time.monotonic() < deadline and started not in (events.read_text() if events.exists() else ""):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 124, output
    results = outcomes(tmp_path / "out.xml")
    assert results["test_a_hangs.py::test_quick"] == "passed"
    assert results["test_a_hangs.py::test_hangs"] == "error: killed by SIGTERM (the phase's time limit) while running"
    assert results["test_a_hangs.py::test_never_reached"].startswith("skipped: not run")


SLOW_FILE = '''
import pytest


@pytest.mark.slow
@pytest.mark.parametrize("i", range(40))
def test_slow(i):
    pass


def test_quick():
    pass
'''


def test_slow_tests_are_sampled_unless_full(tmp_path):
    write(tmp_path, {"test_slow.py": SLOW_FILE, "pytest.ini": "[pytest]\nmarkers =\n    slow: slow\n"})
    kept = [i for i in range(40) if pytest_per_file.keep_slow_test(f"test_slow.py::test_slow[{i}]", 4)]
    assert 4 <= len(kept) <= 20  # about one in four, by a CRC of the node id
    done = run_runner(tmp_path, "--slow-keep=4")
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {f"test_slow.py::test_slow[{i}]" for i in [0, *kept]} | {"test_slow.py::test_quick"}
    assert set(outcomes(tmp_path / "out.xml")) == expected  # and at least the first slow test of each file
    assert run_runner(tmp_path, "--slow-keep=1").returncode == 0
    assert len(outcomes(tmp_path / "out.xml")) == 41  # --full: every slow test


def test_after_the_last_restart_the_rest_of_the_file_still_runs(tmp_path):
    write(tmp_path, {"test_asserts_often.py": '''
import pytest


@pytest.mark.parametrize("i", range(5))
def test_asserts(i):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
'''})
    done = run_runner(tmp_path, "--max-restarts=2")
    assert done.returncode == 1, done.stdout + done.stderr
    results = outcomes(tmp_path / "out.xml")
    assert len(results) == 5
    assert all(r.startswith("failure: RuntimeError: CUDA error: an illegal") for r in results.values())
    assert done.stdout.count("NOTE test_asserts_often.py: restarted after a context-breaking") == 2
