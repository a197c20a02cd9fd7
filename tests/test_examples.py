"""Run every example in python/ (discovered automatically; python/README.md states the convention)
as a user would, in a subprocess: with ``--smoke`` and ``ANN_EXAMPLES_SMOKE=1`` (what CI can afford
for every example) and, for the examples whose full run takes under 15 s, also in full mode, so a
failure of the full run cannot hide behind ``--smoke`` (issue 25).

Each run must exit 0, print no traceback, and print exactly the ``CHECK <what> ok`` lines that
``EXAMPLES`` lists for it, in order. The numbers a CHECK line reports are then compared with the
other answers the API gave in the same run (``facts``): e.g. the exit a budget selects against the
exits' printed costs, the cost the engine reports against its samples per exit, the request count
``/stats`` reports against the answers received. An example that cannot run here (a missing
optional dependency) prints ``SKIP <reason>`` and exits 0; its test is then skipped with that
reason. A new example without an entry here fails ``test_every_example_has_an_entry``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.utils import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DISCOVERED = sorted(p for p in (ROOT / "python").glob("*.py") if not p.name.startswith("_"))
NUMBER = r"[-+]?\d+(?:\.\d+)?"


@dataclass
class Example:
    checks: list[str]  # a regular expression per CHECK line, in the order printed (full match)
    lines: list[str] = field(default_factory=list)  # other lines it must print (re.search, multiline)
    facts: Callable[[str, bool], None] | None = None  # (stdout, smoke): the printed numbers agree
    full_in_ci: bool = False  # the full run takes < 15 s (measured): CI runs it too


def _floats(text: str) -> list[float]:
    return [float(v) for v in re.findall(NUMBER, text)]


def _one(pattern: str, out: str) -> re.Match:
    found = list(re.finditer(pattern, out, flags=re.M))
    assert len(found) == 1, f"expected one line matching {pattern!r}, found {len(found)}:\n{out[-3000:]}"
    return found[0]


def _loss_went_down(out: str) -> None:
    first, last = map(float, _one(rf"^CHECK loss went down \(({NUMBER}) -> ({NUMBER})\) ok$", out).groups())
    assert last < first, (first, last)


def _fused_loss_amp_facts(out: str, smoke: bool) -> None:
    fused, ref = map(float, _one(rf"^CHECK fused loss ({NUMBER}) == reference ({NUMBER}) ok$", out).groups())
    assert abs(fused - ref) <= 1e-4 * abs(ref) + 2e-5, (fused, ref)  # the example's bound + print rounding
    dtype, scaler = _one(r"autocast dtype: torch\.(\w+); GradScaler enabled: (\w+)", out).groups()
    assert _one(r"^CHECK logits are torch\.(\w+) under autocast ok$", out).group(1) == dtype
    assert (scaler == "True") == (dtype == "float16"), (dtype, scaler)  # loss scaling exactly for fp16
    _loss_went_down(out)


def _adaloss_checkpoint_facts(out: str, smoke: bool) -> None:
    steps, half = map(int, _one(r"^data: .*; (\d+) steps, checkpoint at step (\d+)$", out).groups())
    assert steps == (30 if smoke else 300) and half == steps // 2
    resumed = _one(r"^resumed from adaloss_checkpoint\.pt at step (\d+); AdaLoss weights (.*)$", out)
    assert int(resumed.group(1)) == half
    logged = re.search(rf"^step +{half}  loss {NUMBER}  AdaLoss weights (.*)$", out, flags=re.M)
    if logged:  # the uninterrupted run used the weights the checkpoint restored
        assert logged.group(1) == resumed.group(2), (logged.group(1), resumed.group(2))
    assert int(_one(r"^CHECK per-step losses .* \((\d+) steps\) ok$", out).group(1)) == steps


def _early_exit_budget_facts(out: str, smoke: bool) -> None:
    n_test = int(_one(r"^data: .*, (\d+) test images$", out).group(1))
    costs = _floats(_one(r"^cost to reach each exit \(MFLOPs per image; FLOPs = 2 x MACs\): (.*)$",
                         out).group(1))
    row = rf"^ +({NUMBER}) +({NUMBER})% +({NUMBER}) +({NUMBER})% +({NUMBER})  \[(.*)\]$"
    rows = re.findall(row, out, flags=re.M)
    assert [float(r[0]) for r in rows] == [0.3, 0.5, 0.7, 1.0], rows
    for fraction, _, val_cost, test_acc, test_cost, per_exit in rows:
        counts = [int(c) for c in per_exit.split(",")]
        assert len(counts) == len(costs) and sum(counts) == n_test, (counts, n_test)
        # The engine's reported mean cost is the mean of the exits' own costs over the samples.
        mean = sum(c * f for c, f in zip(counts, costs)) / n_test / costs[-1]
        assert abs(mean - float(test_cost)) <= 0.006, (mean, test_cost)  # 2-decimal prints
        assert float(val_cost) <= max(float(fraction), costs[0] / costs[-1]) + 0.006, (val_cost, fraction)
        assert 0 <= float(test_acc) <= 100


def _eann_facts(out: str, smoke: bool) -> None:
    costs = _floats(_one(r"^cumulative MFLOPs per image of the sequence exits .*: (.*)$", out).group(1))
    chosen = re.findall(rf"^budget +({NUMBER}) MFLOPs -> exit (\d+) \(member \d+, exit \d+\)", out,
                        flags=re.M)
    assert [int(g) for _, g in chosen] == list(range(len(costs))), chosen
    for budget, g in chosen:  # the latest exit whose (printed, rounded) cost fits the budget
        assert int(g) == max(j for j, c in enumerate(costs) if c <= float(budget)), (budget, g, costs)
    assert int(_one(r"^deadline 60 s: all (\d+) exits finished", out).group(1)) == len(costs)


def _early_exit_server_facts(out: str, smoke: bool) -> None:
    per_thread = 20 if smoke else 200
    answered = int(_one(r"^CHECK (\d+) requests from 8 threads \+ asyncio equal predict\(\) on their "
                        r"rows ok$", out).group(1))
    assert answered == 8 * per_thread + 1 + 20, answered  # 8 threads, the asyncio one, the 20 late ones
    stats = _one(r"^requests (\d+), rows per exit \[(.*)\], mean cost", out)
    # stats() was read after the urgent request's answer, before the 20 late ones were all answered.
    first = 8 * per_thread + 2
    assert first <= int(stats.group(1)) <= first + 20, (stats.group(1), answered)
    mean_rows = _floats(_one(r"mean rows per stage run \[(.*)\]\) ok$", out).group(1))
    assert len(mean_rows) == len(stats.group(2).split(",")) == 4 and max(mean_rows) > 8
    near = _one(r"^(\d+) of the (\d+) distinct requested rows lie within 1e-6 of a threshold; (\d+) "
                r"answered rows exited one stage apart", out)
    # rows may exit a stage apart from predict only where they sit on a threshold (issue 25)
    assert int(near.group(1)) <= int(near.group(2)) and (int(near.group(1)) > 0 or near.group(3) == "0")


def _http_client_facts(out: str, smoke: bool) -> None:
    answers = int(_one(r"^CHECK (\d+) HTTP answers equal EarlyExitEngine\.predict ok", out).group(1))
    assert answers == (5 if smoke else 50)
    counted, rows = _one(r"^CHECK /stats counts (\d+) requests, rows per exit \[(.*)\] ok$", out).groups()
    assert int(counted) == answers
    assert sum(int(r) for r in rows.split(",")) == sum(1 + i % 8 for i in range(answers))  # rows sent


def _train_early_exit_lm_facts(out: str, smoke: bool) -> None:
    fused, eager = map(float, _one(rf"^CHECK fused loss ({NUMBER}) == eager F\.linear \+ F\.cross_entropy "
                                   rf"({NUMBER}) ok$", out).groups())
    assert abs(fused - eager) <= 1e-5 * abs(eager) + 2e-5, (fused, eager)
    trained = _one(r"^CHECK the rotational curriculum trained exit sets \[(.*)\] ok$", out).group(1)
    sets = re.findall(r"\(([\d, ]*)\)", trained)
    exits = re.findall(r"^exit (\d+) \(after layer \d+\)", out, flags=re.M)
    assert len(sets) == len(exits) >= 2, (sets, exits)
    _loss_went_down(out)


def _finetune_hf_llama_facts(out: str, smoke: bool) -> None:
    fused, eager = map(float, _one(rf"^CHECK fused loss ({NUMBER}) == eager per-exit cross-entropy ({NUMBER}) ok$",
                                   out).groups())
    assert abs(fused - eager) <= 1e-4, (fused, eager)
    falls = re.findall(rf"^exit after layer (\d+): held-out loss ({NUMBER}) -> ({NUMBER})$", out, flags=re.M)
    assert [int(f[0]) for f in falls] == [1, 3], falls  # every exit reported, and each fell
    assert all(float(b) < float(a) for _, a, b in falls), falls


def _fsdp2_early_exit_lm_facts(out: str, smoke: bool) -> None:
    step1, ref = map(float, _one(rf"^CHECK step 1: loss ({NUMBER}) and every gradient equal one process on the "
                                 rf"global batch \(({NUMBER})\) ok$", out).groups())
    assert abs(step1 - ref) <= 1e-4, (step1, ref)
    first = float(_one(rf"^step +1  loss ({NUMBER}) ", out).group(1))
    assert abs(first - step1) <= 1e-3, (first, step1)
    _loss_went_down(out)


def _generate_early_exit_facts(out: str, smoke: bool) -> None:
    header = _one(r"^model: (\d+) exits after layers \[.*\]; 8 prompts of lengths \[(.*)\]; (\d+) new tokens "
                  r"each$", out)
    exits, new = int(header.group(1)), int(header.group(3))
    lengths = [int(v) for v in header.group(2).split(",")]
    assert new == (6 if smoke else 24) and len(lengths) == 8
    static = _one(r"^CHECK static exit (\d+) equals exit \d+'s argmax of the reference ok$", out)
    assert int(static.group(1)) == max(exits // 2 - 1, 0)
    drafts = re.findall(rf"^  self_speculative from exit (\d+): acceptance ({NUMBER}),", out, flags=re.M)
    assert [int(e) for e, _ in drafts] == list(range(exits - 1))  # a draft from every exit but the last
    assert all(0 <= float(a) <= 1 for _, a in drafts), drafts
    conf = _one(rf"^  confidence 0\.8: mean exit ({NUMBER}), tokens per exit \[(.*)\],", out)
    counts = [int(c) for c in conf.group(2).split(",")]
    assert len(counts) == exits and sum(counts) == 8 * new, counts  # every generated token, once
    mean_exit = sum(j * c for j, c in enumerate(counts)) / sum(counts)
    assert abs(mean_exit - float(conf.group(1))) <= 0.006, (mean_exit, conf.group(1))
    assert int(_one(r"^full: .*, prefill (\d+) tokens in", out).group(1)) == sum(lengths)


# full_in_ci: the full run's CPU time (user + sys, one thread, synthetic data; measured with
# /usr/bin/time while the machine was loaded, load average ~15): fused_loss_amp 13.9 s, early_exit_server
# 4.5 s, http_client 5.6 s, train_early_exit_lm 5.6 s, generate_early_exit 3.7 s; not in CI: eann 19.4 s,
# adaloss_checkpoint 26.6 s, early_exit_budget 30.6 s (finetune_hf_llama, fsdp2_early_exit_lm: their
# owner's entries; smoke runs 6.5 s and 11.3 s).
EXAMPLES: dict[str, Example] = {
    "fused_loss_amp.py": Example(
        checks=[r"CHECK logits are torch\.(bfloat16|float16) under autocast ok",
                rf"CHECK fused loss {NUMBER} == reference {NUMBER} ok",
                rf"CHECK loss went down \({NUMBER} -> {NUMBER}\) ok"],
        lines=[r"autocast dtype: torch\.(bfloat16|float16); GradScaler enabled: (False|True)"],
        facts=_fused_loss_amp_facts, full_in_ci=True),
    "adaloss_checkpoint.py": Example(
        checks=[r"CHECK per-step losses of the resumed run equal the uninterrupted run's \(\d+ steps\) ok",
                r"CHECK model parameters and buffers equal bit for bit ok",
                r"CHECK AdaLoss state \(running averages, weights, step\) equal bit for bit ok"],
        lines=[r"resumed from adaloss_checkpoint\.pt at step \d+"],
        facts=_adaloss_checkpoint_facts),
    "early_exit_budget.py": Example(
        checks=[r"CHECK every plan's validation cost is within its budget ok",
                r"CHECK each test prediction is the network's prediction at the exit taken ok",
                r"CHECK the reported mean cost is the mean cost of the exits taken ok"],
        lines=[r"^\s+1\.00\s+[\d.]+%"],  # the table's full-budget row
        facts=_early_exit_budget_facts),
    "eann.py": Example(
        checks=[r"CHECK member cost ratios are ~2 ok",
                r"CHECK each budget returns the latest exit that fits, with that exit's prediction ok",
                r"CHECK a generous deadline reaches the last exit ok"],
        lines=[r"budget .* -> exit 0 \(member 0, exit 0\)"],
        facts=_eann_facts),
    "early_exit_server.py": Example(
        checks=[r"CHECK close\(\) answered every submitted request \(no exception\) ok",
                r"CHECK \d+ requests from 8 threads \+ asyncio equal predict\(\) on their rows ok",
                rf"CHECK rows of several requests ran together \(mean rows per stage run \[.*\]\) ok",
                r"CHECK an immediate deadline returns exit-0 answers ok"],
        facts=_early_exit_server_facts, full_in_ci=True),
    "http_client.py": Example(
        checks=[r"CHECK \d+ HTTP answers equal EarlyExitEngine\.predict ok \(last: .*\)",
                r"CHECK malformed body -> 400 \(.*\.\.\.\), oversized -> 413 ok",
                r"CHECK /stats counts \d+ requests, rows per exit \[.*\] ok"],
        facts=_http_client_facts, full_in_ci=True),
    "finetune_hf_llama.py": Example(
        checks=[rf"CHECK fused loss {NUMBER} == eager per-exit cross-entropy {NUMBER} ok",
                r"CHECK every exit's held-out loss fell ok",
                r"CHECK the model's own forward equals the last exit ok"],
        facts=_finetune_hf_llama_facts),
    "fsdp2_early_exit_lm.py": Example(
        checks=[r"CHECK reading the sharded head outside the objective raises a clear error ok",
                rf"CHECK step 1: loss {NUMBER} and every gradient equal one process on the global batch "
                rf"\({NUMBER}\) ok",
                rf"CHECK loss went down \({NUMBER} -> {NUMBER}\) ok",
                r"CHECK the ranks' gathered parameters are identical ok"],
        facts=_fsdp2_early_exit_lm_facts),
    "train_early_exit_lm.py": Example(
        checks=[rf"CHECK fused loss {NUMBER} == eager F\.linear \+ F\.cross_entropy {NUMBER} ok",
                r"CHECK the rotational curriculum trained exit sets \[.*\] ok",
                rf"CHECK loss went down \({NUMBER} -> {NUMBER}\) ok"],
        facts=_train_early_exit_lm_facts, full_in_ci=True),
    "generate_early_exit.py": Example(
        checks=[r"CHECK full at batch 8 \(ragged prompts\) equals each prompt alone ok",
                r"CHECK full equals the cache-free reference ok",
                r"CHECK static exit \d+ equals exit \d+'s argmax of the reference ok",
                r"CHECK greedy self_speculative equals full token for token, from every exit ok",
                r"CHECK confidence: threshold 1\.5 equals full, threshold 0 equals static exit 0 ok",
                r"CHECK confidence \(recompute\) takes the first exit confident enough on the exact states "
                r"ok",
                r"CHECK sampling with a seeded generator repeats ok"],
        facts=_generate_early_exit_facts, full_in_ci=True),
}


FULL_IN_CI = [p for p in DISCOVERED if p.name in EXAMPLES and EXAMPLES[p.name].full_in_ci]


def test_every_example_has_an_entry():
    names = {p.name for p in DISCOVERED}
    missing = sorted(names - set(EXAMPLES))
    assert not missing, (f"python/{missing[0]} has no entry in EXAMPLES (tests/test_examples.py): list the "
                         f"CHECK lines it prints (regular expressions, in order) and, where its CHECKs "
                         f"report "
                         f"numbers, a facts function comparing them with the API's other answers; missing: "
                         f"{missing}")
    stale = sorted(set(EXAMPLES) - names)
    assert not stale, f"EXAMPLES lists examples that python/ no longer has: {stale}"


def run_example(script: Path, example: Example | None, *, smoke: bool = True, cwd: Path = ROOT,
                extra_path: str | None = None) -> str:
    """Run ``script`` (``--smoke`` and ANN_EXAMPLES_SMOKE=1 when ``smoke``) and check it against
    ``example``; fail (AssertionError) or skip per the convention. Returns its stdout."""
    env = subprocess_env(*([extra_path] if extra_path else []), OMP_NUM_THREADS="1")
    env.pop("ANN_EXAMPLES_SMOKE", None)
    if smoke:
        env["ANN_EXAMPLES_SMOKE"] = "1"
    proc = subprocess.run([sys.executable, str(script)] + (["--smoke"] if smoke else []), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    skipped = re.search(r"^SKIP (.+)$", proc.stdout, flags=re.M)
    if skipped:  # an optional dependency (e.g. the [serve] extra) is not installed
        pytest.skip(f"{script.name}: {skipped.group(1)}")
    checks = re.findall(r"^CHECK .*$", proc.stdout, flags=re.M)
    assert checks, (f"{script.name} printed no 'CHECK <what> ok' line (python/README.md):\n"
                    f"{proc.stdout[-2000:]}")
    if example is None:
        return proc.stdout
    assert len(checks) == len(example.checks) and all(
        re.fullmatch(p, c) for p, c in zip(example.checks, checks)), (
        f"{script.name}: the CHECK lines differ from EXAMPLES' entry (tests/test_examples.py).\n"
        f"printed:\n  " + "\n  ".join(checks) + "\nexpected:\n  " + "\n  ".join(example.checks))
    for pattern in example.lines:
        assert re.search(pattern, proc.stdout, flags=re.M), (f"{script.name}: no line matching {pattern!r}:\n"
                                                             f"{proc.stdout[-3000:]}")
    if example.facts is not None:
        example.facts(proc.stdout, smoke)
    return proc.stdout


@pytest.mark.parametrize("script", DISCOVERED, ids=lambda p: p.name)
def test_example_smoke_run(script: Path):
    run_example(script, EXAMPLES.get(script.name))


@pytest.mark.slow
@pytest.mark.parametrize("script", FULL_IN_CI,
                         ids=lambda p: p.name)
def test_example_full_run(script: Path, tmp_path):
    """The full run a user gets from ``python python/<example>.py`` (outputs in a temp dir)."""
    run_example(script, EXAMPLES[script.name], smoke=False, cwd=tmp_path)


# ------------------------------------------------------------------ the checks reject what they are for


@pytest.mark.parametrize("body,match", [
    ("print('trained, looks fine')", "printed no 'CHECK <what> ok' line"),
    ("print('CHECK something ok'); raise SystemExit(3)", "exited 3"),
    ("import sys; print('CHECK a ok'); sys.stderr.write('Traceback (most recent call last):')", "Traceback"),
    ("print('CHECK a ok')", "the CHECK lines differ"),  # one of the two listed is missing
    ("print('CHECK a ok'); print('CHECK b ok'); print('CHECK c ok')", "the CHECK lines differ"),  # unlisted
    ("print('CHECK b ok'); print('CHECK a ok')", "the CHECK lines differ"),  # out of order
    ("print('CHECK a ok'); print('CHECK b ok')", "no line matching 'total: \\\\d+'"),
    ("print('CHECK a ok'); print('CHECK b ok'); print('total: 3')", "facts disagree"),
])
def test_the_check_rejects_a_bad_example(tmp_path, body, match):
    bad = tmp_path / "bad_example.py"
    bad.write_text(body + "\n")

    def facts(out, smoke):
        assert int(re.search(r"total: (\d+)", out).group(1)) == 4, "facts disagree"

    example = Example(checks=[r"CHECK a ok", r"CHECK b ok"], lines=[r"total: \d+"], facts=facts)
    with pytest.raises(AssertionError, match=re.escape(match)):
        run_example(bad, example)


def test_the_check_skips_an_example_that_says_skip(tmp_path):
    script = tmp_path / "needs_extra.py"
    script.write_text("print('SKIP fastapi is not installed')\n")
    with pytest.raises(pytest.skip.Exception, match="fastapi is not installed"):
        run_example(script, None)


def test_http_client_says_skip_without_fastapi(tmp_path):
    """Without the [serve] extra the HTTP example must SKIP (with the install hint), not claim a CHECK."""
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text(
        "raise ImportError('hidden by the test', name='fastapi')\n")
    hint = r"pip install 'ann_kernels\[serve\]' \(missing: fastapi\)"
    with pytest.raises(pytest.skip.Exception, match=hint):
        run_example(ROOT / "python" / "http_client.py", EXAMPLES["http_client.py"], extra_path=str(tmp_path))
