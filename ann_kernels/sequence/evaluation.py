"""Evaluate an EANN against its own members.

Definitions (per-sample FLOPs; accuracies on the evaluation split):

- member m alone: exit k costs ``c_m[k]`` (its ``exit_flops``) and scores ``a_m[k]``; its
  anytime accuracy at budget B is that of its latest exit with c_m[k] <= B.
- the EANN: sequence exit g costs ``C[g]`` (``EANN.exit_flops``: earlier members' full costs
  added) and scores ``A[g]`` (= a_j[k] of the member exit it is); A(B) = A[latest g with C[g] <= B].
- envelope E(B): the best single member at budget B, max over m of member m's anytime accuracy.
- B*(a) = the smallest budget with E(B) >= a = min{c_m[k] : a_m[k] >= a}.
- cost inflation at B = B / B*(A(B)) >= 1, over budgets B in [C[0], C[G-1]]. A(B) is a step
  function, so the maximum is the supremum max_g C[g+1] / B*(A[g]) (approached just before
  exit g+1 finishes; the last exit contributes C[G-1] / B*(A[G-1])), and the mean is exact
  for B log-uniform on [C[0], C[G-1]]: sum_g (C[g+1] - C[g]) / B*(A[g]) / ln(C[G-1] / C[0]).
- extra-cost fraction = (C[G-1] - max_m c_m[-1]) / max_m c_m[-1].

:func:`evaluate_eann` also compares budgeted early exit over the sequence (thresholds
calibrated on the validation split, then really executed by :class:`EANNEngine` on the
evaluation split) with budgeted early exit of every member alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ann_kernels.inference.calibration import calibrate_for_budget, simulate_thresholds
from ann_kernels.ops.early_exit import exit_confidence
from ann_kernels.sequence.engine import EANNEngine
from ann_kernels.sequence.model import EANN

__all__ = [
    "EANNEvaluation",
    "MemberOutputs",
    "anytime_accuracy",
    "cost_inflation",
    "envelope_accuracy",
    "evaluate_eann",
    "markdown_report",
    "member_outputs",
    "min_budget_for",
    "plot_eann",
    "prune_exits",
]


@dataclass
class MemberOutputs:
    """Every exit of one member on a dataset: ``confidence`` [K, N] float32 (max softmax
    probability, the early-exit kernel's numbers), ``correct`` [K, N] bool."""

    confidence: torch.Tensor
    correct: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """[K] float64."""
        return self.correct.double().mean(dim=1)


@torch.inference_mode()
def member_outputs(eann: EANN, data: Dataset, *, batch_size: int = 500, desc: str = "eval",
                   progress: bool = True) -> list[MemberOutputs]:
    """Run every member (all of its exits) over ``data`` of (x, y) pairs, one pass each."""
    eann.eval()
    out = []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for j, member in enumerate(eann.members):
        conf, corr = [], []
        for x, y in tqdm(loader, desc=f"[eann] {desc} member {j}", leave=False, dynamic_ncols=True,
                         disable=not progress):
            pairs = [exit_confidence(z) for z in member(x)]
            conf.append(torch.stack([c for c, _ in pairs]))
            corr.append(torch.stack([p == y for _, p in pairs]))
        out.append(MemberOutputs(torch.cat(conf, 1), torch.cat(corr, 1)))
    return out


def anytime_accuracy(costs, accuracies, budgets) -> torch.Tensor:
    """Accuracy of the latest exit with cost <= B for each budget B ([B] float64; NaN where no
    exit has finished). ``costs`` [K] increasing, ``accuracies`` [K]."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    acc = torch.as_tensor(accuracies, dtype=torch.float64)
    budgets = torch.as_tensor(budgets, dtype=torch.float64)
    index = torch.searchsorted(costs, budgets * (1 + 1e-12), right=True) - 1
    return torch.where(index >= 0, acc[index.clamp(min=0)], torch.full_like(budgets, math.nan))


def envelope_accuracy(member_curves, budgets) -> list[float]:
    """E(B) for each budget: the best member's anytime accuracy (NaN if no member fits)."""
    out = []
    for b in budgets:
        values = [anytime_accuracy(c, a, [b])[0].item() for c, a in member_curves]
        values = [v for v in values if not math.isnan(v)]
        out.append(max(values) if values else math.nan)
    return out


def min_budget_for(member_curves, accuracy: float) -> float:
    """B*(a): the smallest cost of any member exit with accuracy >= a (inf if none)."""
    best = math.inf
    for costs, accs in member_curves:
        for c, a in zip(costs, accs):
            if a >= accuracy - 1e-12:
                best = min(best, float(c))
    return best


def cost_inflation(seq_costs, seq_accs, member_curves) -> dict:
    """Cost inflation of the sequence against the best single member (module docstring).

    Returns ``{"max", "mean", "argmax_budget", "at_exits" [G], "sup_before_next" [G]}``:
    ``at_exits[g]`` = C[g] / B*(A[g]); ``sup_before_next[g]`` = C[g+1] / B*(A[g]) (the last one
    = at_exits[G-1])."""
    costs = [float(c) for c in seq_costs]
    accs = [float(a) for a in seq_accs]
    best = [min_budget_for(member_curves, a) for a in accs]
    at_exits = [c / b for c, b in zip(costs, best)]
    sup = [costs[g + 1] / best[g] for g in range(len(costs) - 1)] + [at_exits[-1]]
    g_max = max(range(len(sup)), key=sup.__getitem__)
    if len(costs) > 1 and costs[-1] > costs[0]:
        integral = sum((costs[g + 1] - costs[g]) / best[g] for g in range(len(costs) - 1))
        mean = integral / math.log(costs[-1] / costs[0])
    else:
        mean = at_exits[0]
    budget = costs[min(g_max + 1, len(costs) - 1)]
    return {"max": sup[g_max], "mean": mean, "argmax_budget": budget, "at_exits": at_exits,
            "sup_before_next": sup, "best_single_budget": best}


@dataclass
class EANNEvaluation:
    """Everything :func:`evaluate_eann` measured (JSON-able through :meth:`to_dict`)."""

    split: str
    num_samples: int
    member_flops: list[float]
    cost_ratios: list[float]
    extra_cost_fraction: float
    member_curves: list[tuple[list[float], list[float]]]   # per member: (exit FLOPs, accuracy)
    exit_map: list[tuple[int, int]]                        # sequence exit -> (member, exit)
    sequence_flops: list[float]
    sequence_accuracy: list[float]
    envelope_at_exits: list[float]                         # E(C[g])
    envelope_budgets: list[float]                          # every member exit cost (sorted)
    envelope_accuracy: list[float]                         # E(B) there (a step function, 'post')
    inflation: dict
    pruned: dict | None = None      # the same for the val-pruned sequence (see prune_exits)
    early_exit: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _budget_grid(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [high]
    return [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (count - 1)) for i in range(count)]


def evaluate_eann(eann: EANN, eval_set: Dataset, calib_set: Dataset | None = None, *, split: str = "test",
                  budgets=None, num_budgets: int = 6, batch_size: int = 500, progress: bool = True) -> EANNEvaluation:
    """Anytime curves, envelope, cost inflation and extra cost of ``eann`` on ``eval_set``.

    With ``calib_set`` (a held-out split such as validation; never the evaluation split) also:
    the same numbers for the val-pruned sequence (:func:`prune_exits`) in ``result.pruned``,
    and budgeted early exit at ``budgets`` (default: ``num_budgets`` log-spaced between the
    cheapest sequence exit and the whole sequence), calibrated on ``calib_set``."""
    eann.eval()
    example = eval_set[0][0].unsqueeze(0)
    outputs = member_outputs(eann, eval_set, batch_size=batch_size, desc=split, progress=progress)
    member_costs = [eann.members[j].exit_flops(example) for j in range(eann.num_members)]
    curves = [(c.tolist(), o.accuracy.tolist()) for c, o in zip(member_costs, outputs)]
    seq_costs = eann.exit_flops(example).tolist()
    seq_acc = [curves[j][1][k] for j, k in eann.exit_map]
    envelope_budgets = sorted({float(c) for costs, _ in curves for c in costs})
    envelope = envelope_accuracy(curves, seq_costs)
    result = EANNEvaluation(
        split=split, num_samples=len(eval_set), member_flops=eann.member_flops(example).tolist(),
        cost_ratios=eann.cost_ratios(example).tolist(), extra_cost_fraction=eann.extra_cost_fraction(example),
        member_curves=curves, exit_map=[list(p) for p in eann.exit_map], sequence_flops=seq_costs,
        sequence_accuracy=seq_acc, envelope_at_exits=envelope, envelope_budgets=envelope_budgets,
        envelope_accuracy=envelope_accuracy(curves, envelope_budgets),
        inflation=cost_inflation(seq_costs, seq_acc, curves))
    if calib_set is not None:
        calib_members = member_outputs(eann, calib_set, batch_size=batch_size, desc="calibration", progress=progress)
        kept = prune_exits(eann, calib_members)
        members = [j for j, used in enumerate(kept) if used]
        pruned = EANN([eann.members[j] for j in members], [kept[j] for j in members])
        p_costs = pruned.exit_flops(example).tolist()
        p_map = [[members[j], k] for j, k in pruned.exit_map]
        p_acc = [curves[j][1][k] for j, k in p_map]
        result.pruned = {"exits": [list(e) for e in kept], "exit_map": p_map, "sequence_flops": p_costs,
                         "sequence_accuracy": p_acc, "extra_cost_fraction": pruned.extra_cost_fraction(example),
                         "inflation": cost_inflation(p_costs, p_acc, curves)}
        if budgets is None:
            budgets = _budget_grid(seq_costs[0], seq_costs[-1], num_budgets)
        result.early_exit = _early_exit_rows(eann, outputs, calib_members, member_costs, eval_set, calib_set,
                                             budgets, batch_size, progress,
                                             pruned=(pruned, [outputs[j] for j in members]))
    return result


def prune_exits(eann: EANN, calib_outputs: list[MemberOutputs]) -> list[list[int]]:
    """Per member, the used exits that raise the held-out accuracy of the sequence: walking
    the sequence exits in order, exit g is kept iff its held-out accuracy beats every kept
    exit before it (exit 0 is always kept). Returning "the latest finished exit" of the kept
    ones never trades a finished, better prediction for a worse one (as measured on the
    held-out split). A member may keep no exit (it is then skipped: ``EANN`` needs the
    non-empty ones only). ``calib_outputs`` come from :func:`member_outputs` on held-out data."""
    kept: list[list[int]] = [[] for _ in range(eann.num_members)]
    best = -math.inf
    for g, (j, k) in enumerate(eann.exit_map):
        acc = float(calib_outputs[j].accuracy[k])
        if g == 0 or acc > best:
            kept[j].append(k)
            best = acc
    return kept


def _sequence_arrays(eann: EANN, outputs: list[MemberOutputs]) -> tuple[torch.Tensor, torch.Tensor]:
    conf = torch.stack([outputs[j].confidence[k] for j, k in eann.exit_map])
    corr = torch.stack([outputs[j].correct[k] for j, k in eann.exit_map])
    return conf, corr


def _sequence_budget_row(engine: EANNEngine, seq_conf, seq_corr, x_eval, y_eval, budget: float, batch_size: int,
                         prefix: str) -> dict:
    """Calibrate ``engine`` for ``budget`` (on its held-out split), simulate the thresholds on
    the evaluation arrays [G, N], and really run them: ``{prefix}{val_accuracy, val_flops,
    accuracy, flops, run_accuracy, run_flops, run_seconds}``."""
    seq_flops = engine.calibration.exit_flops
    cal = engine.calibrate_budget(budget)
    sim_acc, sim_cost, _ = simulate_thresholds(seq_conf, seq_corr, seq_flops, cal.thresholds)
    predictions, exits, seconds = [], [], 0.0
    for start in range(0, x_eval.shape[0], batch_size):
        res = engine.predict(x_eval[start:start + batch_size], thresholds=cal.thresholds)
        predictions.append(res.prediction)
        exits.append(res.exit_index)
        seconds += res.stats.total_seconds
    run_acc = float((torch.cat(predictions) == y_eval).double().mean())
    run_cost = float(seq_flops[torch.cat(exits)].mean())
    values = dict(val_accuracy=cal.accuracy, val_flops=cal.mean_flops, accuracy=float(sim_acc),
                  flops=float(sim_cost), run_accuracy=run_acc, run_flops=run_cost, run_seconds=seconds)
    return {prefix + k: v for k, v in values.items()}


def _early_exit_rows(eann, outputs, calib_members, member_costs, eval_set, calib_set, budgets, batch_size,
                     progress, pruned=None) -> list[dict]:
    """Per budget: budgeted early exit of the sequence (``eann_*``), of the val-pruned
    sequence (``pruned_*``; ``pruned`` = (EANN, its members' outputs)) and of every member
    alone (``member{j}_*``), all calibrated on ``calib_set``. ``best_member*``: the member
    with the best *calibration-split* accuracy at this budget (chosen without looking at
    the evaluation split), with its evaluation accuracy and cost."""
    loader = DataLoader(calib_set, batch_size=batch_size, shuffle=False)
    engines = [("eann_", EANNEngine(eann), _sequence_arrays(eann, outputs))]
    if pruned is not None:
        engines.append(("pruned_", EANNEngine(pruned[0]), _sequence_arrays(pruned[0], pruned[1])))
    for _, engine, _ in engines:
        engine.calibrate(loader)
    x_eval = torch.stack([eval_set[i][0] for i in range(len(eval_set))]) if not hasattr(eval_set, "tensors") \
        else eval_set.tensors[0]
    y_eval = torch.stack([torch.as_tensor(eval_set[i][1]) for i in range(len(eval_set))]) \
        if not hasattr(eval_set, "tensors") else eval_set.tensors[1]
    rows = []
    for budget in tqdm(budgets, desc="[eann] early exit", leave=False, dynamic_ncols=True, disable=not progress):
        budget = float(budget)
        row = {"budget": budget}
        for prefix, engine, (seq_conf, seq_corr) in engines:
            seq_flops = engine.calibration.exit_flops
            if float(seq_flops[0]) * (1 - 1e-12) <= budget <= float(seq_flops[-1]) * (1 + 1e-9):
                row.update(_sequence_budget_row(engine, seq_conf, seq_corr, x_eval, y_eval, budget, batch_size,
                                                prefix))
        best = None
        for j, (costs, out, cal_out) in enumerate(zip(member_costs, outputs, calib_members)):
            if budget < float(costs[0]) * (1 - 1e-12):
                continue  # the member cannot run within this budget
            if budget >= float(costs[-1]):
                acc, cost = float(out.accuracy[-1]), float(costs[-1])
                val_acc = float(cal_out.accuracy[-1])
            else:
                cal = calibrate_for_budget(cal_out.confidence, cal_out.correct, costs, budget)
                acc_t, cost_t, _ = simulate_thresholds(out.confidence, out.correct, costs, cal.thresholds)
                acc, cost, val_acc = float(acc_t), float(cost_t), float(cal.accuracy)
            row[f"member{j}_accuracy"], row[f"member{j}_flops"] = acc, cost
            row[f"member{j}_val_accuracy"] = val_acc
            # the baseline a user could pick without seeing the evaluation split: the member
            # best on the calibration split (ties: the cheaper, earlier member)
            if best is None or val_acc > best[3]:
                best = (j, acc, cost, val_acc)
        if best is not None:
            (row["best_member"], row["best_member_accuracy"], row["best_member_flops"],
             row["best_member_val_accuracy"]) = best
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- reports


def _log_x(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_eann(result: EANNEvaluation, path: str | os.PathLike, *, title: str = "EANN") -> Path:
    """Three panels (PNG): anytime accuracy vs cumulative FLOPs (members, EANN, envelope),
    cost inflation vs budget, and budgeted early exit (if measured)."""
    from matplotlib.figure import Figure

    panels = 3 if result.early_exit else 2
    fig = Figure(figsize=(5.2 * panels, 4.4), dpi=120)
    axes = fig.subplots(1, panels)
    ax = axes[0]
    for j, (costs, accs) in enumerate(result.member_curves):
        ax.plot([c / 1e6 for c in costs], [100 * a for a in accs], marker="o", ms=3, lw=1, alpha=0.7,
                label=f"member {j} alone")
    c_seq, a_seq = [c / 1e6 for c in result.sequence_flops], [100 * a for a in result.sequence_accuracy]
    ax.step(c_seq, a_seq, where="post", color="black", lw=2, label="EANN (latest finished exit)")
    ax.plot(c_seq, a_seq, "k.", ms=5)
    if result.pruned:
        ax.step([c / 1e6 for c in result.pruned["sequence_flops"]],
                [100 * a for a in result.pruned["sequence_accuracy"]], where="post", color="tab:blue", lw=1.5,
                ls="-.", label="EANN, exits pruned on val")
    env_x = [b / 1e6 for b in result.envelope_budgets] + [c_seq[-1]]
    env_y = [100 * e for e in result.envelope_accuracy] + [100 * result.envelope_accuracy[-1]]
    ax.step(env_x, env_y, where="post", color="tab:red", ls="--", lw=1.2, label="best single member (envelope)")
    _log_x(ax)
    ax.set_xlabel("budget: cumulative MFLOPs per sample")
    ax.set_ylabel(f"{result.split} accuracy (%)")
    ax.set_title(f"{title}: anytime accuracy")
    ax.set_ylim(max(0.0, min(a_seq) - 8), None)  # (untrained weight-0 exits of members may fall below)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")

    ax = axes[1]
    infl = result.inflation
    xs, ys = [], []
    for g in range(len(c_seq) - 1):  # B / B*(A[g]) rises linearly in B until exit g + 1 finishes
        lo, hi, best = c_seq[g], c_seq[g + 1], infl["best_single_budget"][g] / 1e6
        pts = [lo * (hi / lo) ** (i / 16) for i in range(17)]
        xs += pts + [math.nan]
        ys += [p / best for p in pts] + [math.nan]
    ax.plot(xs, ys, color="tab:purple", lw=1.5, label="B / B*(A(B))")
    if result.pruned:
        pc, pi = [c / 1e6 for c in result.pruned["sequence_flops"]], result.pruned["inflation"]
        xs, ys = [], []
        for g in range(len(pc) - 1):
            best = pi["best_single_budget"][g] / 1e6
            pts = [pc[g] * (pc[g + 1] / pc[g]) ** (i / 16) for i in range(17)]
            xs += pts + [math.nan]
            ys += [p / best for p in pts] + [math.nan]
        ax.plot(xs, ys, color="tab:blue", lw=1.2, ls="-.",
                label=f"val-pruned (max {pi['max']:.2f}, log-mean {pi['mean']:.2f})")
    ax.plot(c_seq, infl["at_exits"], "o", color="tab:purple", ms=4, label="at exit costs")
    ax.axhline(infl["max"], color="gray", ls=":", lw=1, label=f"max {infl['max']:.2f}")
    ax.axhline(infl["mean"], color="gray", ls="--", lw=1, label=f"log-mean {infl['mean']:.2f}")
    _log_x(ax)
    ax.set_xlabel("budget B (MFLOPs per sample)")
    ax.set_ylabel("cost inflation B / B*(A(B))")
    ax.set_title(f"max {infl['max']:.2f}, log-mean {infl['mean']:.2f}, "
                 f"extra cost {100 * result.extra_cost_fraction:.0f}%")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")

    if result.early_exit:
        ax = axes[2]
        rows = [r for r in result.early_exit if "eann_flops" in r]
        ax.plot([r["eann_run_flops"] / 1e6 for r in rows], [100 * r["eann_run_accuracy"] for r in rows], "k-o",
                label="EANN early exit (run)")
        rows = [r for r in result.early_exit if "pruned_run_flops" in r]
        if rows:
            ax.plot([r["pruned_run_flops"] / 1e6 for r in rows], [100 * r["pruned_run_accuracy"] for r in rows],
                    color="tab:blue", ls="-.", marker="D", ms=4, label="val-pruned EANN early exit (run)")
        for j in range(len(result.member_curves)):
            pts = [(r[f"member{j}_flops"], r[f"member{j}_accuracy"]) for r in result.early_exit
                   if f"member{j}_flops" in r]
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [100 * p[1] for p in pts], marker="s", ms=3, lw=1, alpha=0.7,
                        label=f"member {j} early exit")
        _log_x(ax)
        ax.set_xlabel("mean MFLOPs per sample")
        ax.set_ylabel(f"{result.split} accuracy (%)")
        ax.set_title("budgeted early exit (val-calibrated)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def markdown_report(result: EANNEvaluation, manifest: dict | None = None) -> str:
    """Markdown tables: members, the sequence's anytime curve with the envelope and the
    inflation at every exit, the summary numbers and the early-exit comparison."""
    lines = []
    lines.append("| member | " + (f"{manifest['scale']} | " if manifest else "") + "exits used | MFLOPs | "
                 f"cost ratio to previous | final-exit {result.split} acc % |")
    lines.append("|---:|" + ("---:|" if manifest else "") + "---|---:|---:|---:|")
    for j, flops in enumerate(result.member_flops):
        ratio = f"{result.cost_ratios[j - 1]:.3f}" if j else "-"
        used = sorted({k for m, k in result.exit_map if m == j})
        k_total = len(result.member_curves[j][0])
        used_text = f"{used[0] + 1}-{used[-1] + 1} of {k_total}" if used == list(range(used[0], used[-1] + 1)) \
            else ",".join(str(k + 1) for k in used)
        value = f"{manifest['values'][j]} | " if manifest else ""
        lines.append(f"| {j} | {value}{used_text} | {flops / 1e6:.3f} | {ratio} | "
                     f"{100 * result.member_curves[j][1][-1]:.2f} |")
    lines.append("")
    lines.append("| seq. exit | member.exit | cumulative MFLOPs | EANN acc % | best single member acc % "
                 "| B* MFLOPs | inflation at exit | sup before next exit |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    infl = result.inflation
    for g, (j, k) in enumerate(result.exit_map):
        lines.append(f"| {g + 1} | {j}.{k + 1} | {result.sequence_flops[g] / 1e6:.3f} | "
                     f"{100 * result.sequence_accuracy[g]:.2f} | {100 * result.envelope_at_exits[g]:.2f} | "
                     f"{infl['best_single_budget'][g] / 1e6:.3f} | {infl['at_exits'][g]:.2f} | "
                     f"{infl['sup_before_next'][g]:.2f} |")
    lines.append("")
    lines.append(f"- cost inflation over budgets in [{result.sequence_flops[0] / 1e6:.3f}, "
                 f"{result.sequence_flops[-1] / 1e6:.3f}] MFLOPs: **max {infl['max']:.2f}** (supremum, "
                 f"approached just below {infl['argmax_budget'] / 1e6:.3f} MFLOPs), "
                 f"**mean {infl['mean']:.2f}** (budgets log-uniform)")
    lines.append(f"- extra-cost fraction of the whole sequence over its largest member: "
                 f"**{100 * result.extra_cost_fraction:.1f}%** ({result.sequence_flops[-1] / 1e6:.3f} vs "
                 f"{max(result.member_flops) / 1e6:.3f} MFLOPs)")
    lines.append("- measured member cost ratios: " + ", ".join(f"{r:.3f}" for r in result.cost_ratios))
    if result.pruned:
        p, pi = result.pruned, result.pruned["inflation"]
        lines.append("")
        lines.append("Val-pruned sequence (an exit is kept only if its validation accuracy beats every kept exit "
                     "before it; members run only up to their last kept exit):")
        lines.append("")
        lines.append("| seq. exit | member.exit | cumulative MFLOPs | EANN acc % | B* MFLOPs | inflation at exit "
                     "| sup before next exit |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|")
        for g, (j, k) in enumerate(p["exit_map"]):
            lines.append(f"| {g + 1} | {j}.{k + 1} | {p['sequence_flops'][g] / 1e6:.3f} | "
                         f"{100 * p['sequence_accuracy'][g]:.2f} | {pi['best_single_budget'][g] / 1e6:.3f} | "
                         f"{pi['at_exits'][g]:.2f} | {pi['sup_before_next'][g]:.2f} |")
        lines.append("")
        lines.append(f"- val-pruned: cost inflation **max {pi['max']:.2f}**, **mean {pi['mean']:.2f}** (budgets "
                     f"log-uniform on [{p['sequence_flops'][0] / 1e6:.3f}, {p['sequence_flops'][-1] / 1e6:.3f}] "
                     f"MFLOPs); extra-cost fraction **{100 * p['extra_cost_fraction']:.1f}%**")
    if result.early_exit:
        lines.append("")
        lines.append("Budgeted early exit (thresholds calibrated on the validation split for each budget, then "
                     "run on the evaluation split):")
        lines.append("")
        lines.append("| budget MFLOPs | EANN early exit acc % (run) | EANN mean MFLOPs (run) | EANN val acc % "
                     "| val-pruned EANN acc % (run) | its mean MFLOPs | best member (on val) early exit acc % "
                     "| its mean MFLOPs |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in result.early_exit:
            eann_cols = (f"{100 * r['eann_run_accuracy']:.2f} | {r['eann_run_flops'] / 1e6:.3f} | "
                         f"{100 * r['eann_val_accuracy']:.2f}") if "eann_run_accuracy" in r else "- | - | -"
            eann_cols += (f" | {100 * r['pruned_run_accuracy']:.2f} | {r['pruned_run_flops'] / 1e6:.3f}"
                          if "pruned_run_accuracy" in r else " | - | -")
            best = (f"{100 * r['best_member_accuracy']:.2f} (member {r['best_member']}) | "
                    f"{r['best_member_flops'] / 1e6:.3f}") if "best_member" in r else "- | -"
            lines.append(f"| {r['budget'] / 1e6:.3f} | {eann_cols} | {best} |")
    return "\n".join(lines)
