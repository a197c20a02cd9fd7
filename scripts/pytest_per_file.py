"""Run pytest one test file per process, so that one broken process cannot fail other tests
(the CUDA test phase of ``make gpu-check``, scripts/gpu_check.py; issue 22).

On CUDA a device-side assert (or an illegal address) leaves the process's CUDA context
broken: every later CUDA call in that process fails. Run in one pytest process, one such test
fails every test after it. Here:

1. a collect pass (one process) lists the selected tests per file;
2. each file runs in its own pytest process (``--workers`` at a time), with this module
   loaded as a pytest plugin (``-p pytest_per_file``) that appends one JSON line per test
   start and result to an events file, flushed at once: a process killed at the deadline
   or by a crash leaves every result it reached;
3. a test whose failure names a context-breaking CUDA error (``CONTEXT_BREAKING``) makes the
   plugin end its process right after recording it; the file is then restarted without the
   tests already done (forked-style isolation, only where it is needed). A process that dies
   (signal, abort) is handled alike: the test it was running gets an error naming the
   signal, and the file restarts after it;
4. the merged JUnit XML (``--junitxml``) is rewritten after every file, on SIGTERM and at the
   end: tests that never ran (deadline) are listed as skipped with that reason, so a
   timed-out phase still has its counts.

    python scripts/pytest_per_file.py --junitxml out.xml --deadline-s 150 -m cuda -- tests/
    python scripts/pytest_per_file.py --collect-only -m cuda -- tests/   # the plan only

Exit status: 0 when every selected test passed or skipped, 1 when one failed or errored,
124 when the deadline or SIGTERM cut the run. Only the standard library is imported here (the
module is also the plugin inside each pytest process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from concurrent.futures import ThreadPoolExecutor

# A failure whose text matches leaves the CUDA context unusable for the rest of the process.
CONTEXT_BREAKING = re.compile(
    r"device-side assert|illegal memory access|illegal instruction|misaligned address|"
    r"unspecified launch failure|hardware stack error|cudaErrorAssert|cudaErrorIllegalAddress|"
    r"CUDA_ERROR_(ASSERT|ILLEGAL_ADDRESS|LAUNCH_FAILED)")
RESTART_EXIT = 87  # the plugin's exit code after a context-breaking failure
MAX_RESTARTS = 8  # per file; the last attempt runs the rest of the file without restarts
EVENTS_ENV, SKIP_ENV, SLOW_KEEP_ENV = "PYTEST_PER_FILE_EVENTS", "PYTEST_PER_FILE_SKIP", "PYTEST_PER_FILE_SLOW_KEEP"
NO_RESTART_ENV = "PYTEST_PER_FILE_NO_RESTART"  # set on a file's last attempt
PLUGIN = os.path.splitext(os.path.basename(__file__))[0]


# ---------------------------------------------------------------------------------------
# The plugin (inside each pytest process).


def _emit(event: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def keep_slow_test(nodeid: str, keep_one_in: int) -> bool:
    """Deterministic sample of the slow tests: about one in ``keep_one_in`` (by a CRC of the
    node id, so reruns pick the same ones); everything when ``keep_one_in`` <= 1."""
    return keep_one_in <= 1 or zlib.crc32(nodeid.encode()) % keep_one_in == 0


def pytest_collection_modifyitems(config, items):
    skip_path = os.environ.get(SKIP_ENV)
    done = set()
    if skip_path and os.path.exists(skip_path):
        with open(skip_path, encoding="utf-8") as handle:
            done = {line.rstrip("\n") for line in handle if line.strip()}
    keep_one_in = int(os.environ.get(SLOW_KEEP_ENV, "1") or 1)
    first_slow_per_file: set[str] = set()
    kept, dropped = [], []
    for item in items:
        is_slow = item.get_closest_marker("slow") is not None
        file_key = item.nodeid.split("::", 1)[0]
        keep_sample = not is_slow or keep_slow_test(item.nodeid, keep_one_in)
        if is_slow and file_key not in first_slow_per_file:  # at least one slow test per file
            first_slow_per_file.add(file_key)
            keep_sample = True
        if item.nodeid in done or not keep_sample:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_collection_finish(session):
    _emit({"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_collectreport(report):
    if report.failed:
        _emit({"event": "result", "nodeid": report.nodeid, "outcome": "error",
               "message": "collection failed: " + str(report.longrepr)[-2000:], "seconds": 0.0})


def pytest_runtest_logstart(nodeid, location):
    _emit({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    outcome = None
    if report.when == "call":
        outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
    elif report.failed:
        outcome = "error"  # setup / teardown
    elif report.skipped:
        outcome = "skipped"
    if outcome is None:
        return
    message = ""
    if report.failed:
        message = report.longreprtext[-4000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    _emit({"event": "result", "nodeid": report.nodeid, "outcome": outcome, "message": message,
           "seconds": round(report.duration, 3)})
    if report.failed and CONTEXT_BREAKING.search(message) and not os.environ.get(NO_RESTART_ENV):
        _emit({"event": "restart", "nodeid": report.nodeid})
        sys.stdout.flush()
        os._exit(RESTART_EXIT)  # the rest of this file runs in a fresh process


# ---------------------------------------------------------------------------------------
# The runner.

WORSE = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def read_events(path: str) -> list[dict]:
    """The events of one process (a torn last line of a killed process is ignored)."""
    events = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return events


class FileRun:
    """One test file: its selected node ids and the result of each (nodeid -> record)."""

    def __init__(self, path: str, nodeids: list[str]):
        self.path, self.nodeids = path, list(nodeids)
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []

    def record(self, nodeid: str, outcome: str, message: str = "", seconds: float = 0.0) -> None:
        before = self.results.get(nodeid)
        if before is None or WORSE[outcome] >= WORSE[before["outcome"]]:
            self.results[nodeid] = {"outcome": outcome, "message": message,
                                    "seconds": seconds + (before["seconds"] if before else 0.0)}


class Runner:
    def __init__(self, *, pytest_args: list[str], cwd: str, out_xml: str, work_dir: str, deadline: float,
                 workers: int, slow_keep: int, max_restarts: int = MAX_RESTARTS, python: str = sys.executable,
                 env: dict | None = None):
        self.pytest_args, self.cwd, self.out_xml, self.work_dir = pytest_args, cwd, out_xml, work_dir
        self.deadline, self.workers, self.python, self.max_restarts = deadline, workers, python, max_restarts
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.runs: list[FileRun] = []
        self.procs: set[subprocess.Popen] = set()
        plugin_dir = os.path.dirname(os.path.abspath(__file__))
        base = dict(os.environ if env is None else env)
        self.env = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [plugin_dir, base.get("PYTHONPATH")])),
                    SLOW_KEEP_ENV: str(slow_keep)}
        os.makedirs(work_dir, exist_ok=True)

    def _pytest(self, extra: list[str], events: str, skip: str | None, log, last: bool = False) -> subprocess.Popen:
        env = {**self.env, EVENTS_ENV: events, SKIP_ENV: skip or "", NO_RESTART_ENV: "1" if last else ""}
        command = [self.python, "-m", "pytest", "-q", "-p", PLUGIN, "-p", "no:cacheprovider", *self.pytest_args,
                   *extra]
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with self.lock:
            self.procs.add(proc)
        return proc

    def _wait(self, proc: subprocess.Popen) -> int | None:
        """The exit code, or None when the deadline or a stop cut the process (then killed)."""
        try:
            while proc.poll() is None:
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    kill_group(proc)
                    return None
                time.sleep(0.1)
            return None if self.stop.is_set() else proc.returncode  # terminate() killed it
        finally:
            with self.lock:
                self.procs.discard(proc)

    def collect(self, paths: list[str]) -> dict[str, list[str]]:
        """file -> selected node ids (files whose collection failed get their error as a result)."""
        events = os.path.join(self.work_dir, "collect.jsonl")
        if os.path.exists(events):
            os.remove(events)
        with open(os.path.join(self.work_dir, "collect.log"), "w", encoding="utf-8") as log:
            code = self._wait(self._pytest(["--collect-only", *paths], events, None, log))
        by_file: dict[str, list[str]] = {}
        for event in read_events(events):
            if event["event"] == "collected":
                for nodeid in event["nodeids"]:
                    by_file.setdefault(nodeid.split("::", 1)[0], []).append(nodeid)
            elif event["event"] == "result":  # a collection error: that file runs alone to show it
                by_file.setdefault(event["nodeid"].split("::", 1)[0], [])
        if code is None:
            raise TimeoutError("the collect pass did not finish before the deadline")
        return by_file

    def run_file(self, run: FileRun) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", run.path)
        skip_path = os.path.join(self.work_dir, name + ".done")
        open(skip_path, "w").close()
        with open(os.path.join(self.work_dir, name + ".log"), "w", encoding="utf-8") as log:
            for attempt in range(self.max_restarts + 1):
                events_path = os.path.join(self.work_dir, f"{name}.{attempt}.jsonl")
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    break
                code = self._wait(self._pytest([run.path], events_path, skip_path if attempt else None, log,
                                               last=attempt == self.max_restarts))
                started, finished, restart_after = [], set(), None
                for event in read_events(events_path):
                    if event["event"] == "start":
                        started.append(event["nodeid"])
                    elif event["event"] == "result":
                        finished.add(event["nodeid"])
                        run.record(event["nodeid"], event["outcome"], event["message"], event["seconds"])
                    elif event["event"] == "restart":
                        restart_after = event["nodeid"]
                running = [n for n in started if n not in finished]
                if code is None:
                    why = "by SIGTERM (the phase's time limit)" if self.stop.is_set() else "at the phase deadline"
                    for nodeid in running:
                        run.record(nodeid, "error", f"killed {why} while running")
                    run.notes.append(f"cut {why}")
                    break
                if code == RESTART_EXIT and restart_after and attempt < self.max_restarts:
                    run.notes.append(f"restarted after a context-breaking CUDA error in {restart_after}")
                elif code < 0 or code > 5:  # died: a signal, an abort, os._exit
                    how = f"exit code {code}" if code > 0 else f"signal {signal_name(-code)}"
                    for nodeid in running:
                        run.record(nodeid, "error", f"the test process died ({how}) during this test")
                    if not running and not finished:
                        run.record(run.path, "error", f"the test process died ({how}) before any test ran")
                        break
                    run.notes.append(f"restarted after the process died ({how})")
                    if attempt == self.max_restarts:
                        break
                else:
                    break
                with open(skip_path, "w", encoding="utf-8") as handle:
                    handle.write("".join(n + "\n" for n in run.results))
        for nodeid in run.nodeids:
            if nodeid not in run.results:
                run.record(nodeid, "skipped", "not run: " + ("; ".join(run.notes) or "cut at the phase deadline"))
        self.write_xml()

    def run(self, paths: list[str]) -> int:
        try:
            by_file = self.collect(paths)
        except TimeoutError as error:
            run = FileRun("collect", [])
            run.record("collect", "error", str(error))
            self.runs = [run]
            self.write_xml()
            return 124
        self.runs = [FileRun(path, nodeids) for path, nodeids in by_file.items()]
        # The biggest files first: the workers then finish at about the same time.
        self.runs.sort(key=lambda r: -len(r.nodeids))
        self.write_xml()
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            futures = [pool.submit(self.run_file, run) for run in self.runs]
            for future in futures:
                while not future.done():
                    time.sleep(0.1)  # the main thread stays free for SIGTERM
                future.result()
        self.write_xml()
        if self.stop.is_set() or time.monotonic() > self.deadline:
            return 124
        bad = any(r["outcome"] in ("failed", "error") for run in self.runs for r in run.results.values())
        return int(bad)

    def terminate(self) -> None:
        """SIGTERM: kill the running files, keep what they recorded, write the XML."""
        self.stop.set()
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            kill_group(proc)

    def write_xml(self) -> None:
        with self.lock:
            write_junit(self.out_xml, self.runs)


def short_message(text: str) -> str:
    """The line that says what went wrong: pytest's first ``E   `` line, else the last line."""
    lines = text.strip().splitlines() or [""]
    error_lines = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (error_lines[0] if error_lines else lines[-1])[:300]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def write_junit(path: str, runs: list[FileRun]) -> None:
    """One <testsuite> per file; counts as pytest's --junitxml writes them. Written to a
    temporary name and renamed, so a reader never sees half a file."""
    root = ET.Element("testsuites")
    for run in runs:
        results = dict(run.results)
        counts = {k: sum(1 for r in results.values() if r["outcome"] == v)
                  for k, v in (("failures", "failed"), ("errors", "error"), ("skipped", "skipped"))}
        suite = ET.SubElement(root, "testsuite", name=run.path, tests=str(len(results)),
                              time=f"{sum(r['seconds'] for r in results.values()):.2f}",
                              **{k: str(v) for k, v in counts.items()})
        if run.notes:
            ET.SubElement(suite, "system-out").text = "\n".join(run.notes)
        for nodeid, r in results.items():
            file_part, _, test_name = nodeid.partition("::")
            case = ET.SubElement(suite, "testcase", classname=file_part.replace("/", ".").removesuffix(".py"),
                                 name=test_name or file_part, time=f"{r['seconds']:.3f}")
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}.get(r["outcome"])
            if tag:
                ET.SubElement(case, tag, message=short_message(r["message"])).text = r["message"]
    tmp = path + ".tmp"
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junitxml", help="the merged JUnit XML (rewritten after every file)")
    parser.add_argument("--deadline-s", type=float, default=3600.0, help="seconds from now; files left are cut")
    parser.add_argument("--workers", type=int, default=1, help="test files run at the same time")
    parser.add_argument("--slow-keep", type=int, default=1,
                        help="run about one in N tests marked slow (at least one per file); 1 = all")
    parser.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                        help="restarts per file after a context-breaking error or a crash")
    parser.add_argument("--work-dir", help="per-file logs and events (default: beside --junitxml)")
    parser.add_argument("--collect-only", action="store_true", help="print the plan: files and test counts")
    parser.add_argument("-m", dest="markexpr", help="pytest -m expression")
    parser.add_argument("paths", nargs="+", help="test files or folders (after --), and --ignore=... options")
    args = parser.parse_args(argv)
    pytest_args = ["-m", args.markexpr] if args.markexpr else []
    pytest_args += [p for p in args.paths if p.startswith("-")]
    paths = [p for p in args.paths if not p.startswith("-")]
    # Without --junitxml everything goes to a fresh temporary folder (never into the tree).
    out_xml = os.path.abspath(args.junitxml or os.path.join(tempfile.mkdtemp(prefix="pytest_per_file_"), "out.xml"))
    runner = Runner(pytest_args=pytest_args, cwd=os.getcwd(), out_xml=out_xml,
                    work_dir=os.path.abspath(args.work_dir or os.path.splitext(out_xml)[0]),
                    deadline=time.monotonic() + args.deadline_s, workers=args.workers, slow_keep=args.slow_keep,
                    max_restarts=args.max_restarts)
    if args.collect_only:
        by_file = runner.collect(paths)
        for path, nodeids in sorted(by_file.items()):
            print(f"{len(nodeids):5d}  {path}")
        print(f"{sum(map(len, by_file.values()))} tests in {len(by_file)} files, one process per file, "
              f"{args.workers} at a time")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: runner.terminate())
    code = runner.run(paths)
    totals = {o: sum(1 for run in runner.runs for r in run.results.values() if r["outcome"] == o) for o in WORSE}
    print(f"pytest_per_file: {len(runner.runs)} files: " + ", ".join(f"{v} {k}" for k, v in totals.items()) +
          f" -> {out_xml}")
    for run in runner.runs:
        for nodeid, r in run.results.items():
            if r["outcome"] in ("failed", "error"):
                print(f"{r['outcome'].upper()} {nodeid}: {short_message(r['message'])[:200]}")
        for note in run.notes:
            print(f"NOTE {run.path}: {note}")
    return code


if __name__ == "__main__":
    sys.exit(main())
