"""Tables and the plot of docs/results.md's AdaLoss section from scripts/reproduce_results.sh.

Reads OUT/width16/summary.json (CONST, AdaLoss, OPT on the width-16 ResANN) and
OUT/width8/summary.json (CONST, AdaLoss on the width-8 one), prints markdown tables
(test accuracy mean ± std over seeds, paired per-seed differences, OPT's final exit, the
small-vs-large comparison, the final exit's validation accuracy over the last epochs) and
writes OUT/results_tables.md and a two-panel PNG.

    python scripts/plot_results.py runs/results [--png docs/adaloss_vs_const.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ann_kernels.train.metrics import read_jsonl  # noqa: E402


def _ms(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def _cell(values, scale=100.0):
    m, s = _ms(values)
    return f"{m * scale:.2f} ± {s * scale:.2f}"


def _acc(summary, weighting, split="test"):
    """{seed: [K accuracies]}"""
    return {int(s): r[f"{split}_acc"] for s, r in summary["runs"][weighting].items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="default: OUT/adaloss_vs_const.png")
    args = ap.parse_args(argv)
    big = json.loads((args.out / "width16" / "summary.json").read_text())
    small = json.loads((args.out / "width8" / "summary.json").read_text())
    lines = []
    f16, f8 = big["exit_flops"], small["exit_flops"]
    k = len(f16)

    # 1. width 16: CONST vs AdaLoss per exit, paired differences, OPT at the final exit.
    const, ada = _acc(big, "const"), _acc(big, "adaloss")
    seeds = sorted(const)
    lines += ["| exit | MFLOPs | const acc % | adaloss acc % | adaloss - const (paired, mean ± std) |",
              "|---:|---:|---:|---:|---:|"]
    for i in range(k):
        diffs = [ada[s][i] - const[s][i] for s in seeds]
        lines.append(f"| {i + 1} | {f16[i] / 1e6:.2f} | {_cell([const[s][i] for s in seeds])} | "
                     f"{_cell([ada[s][i] for s in seeds])} | {100 * _ms(diffs)[0]:+.2f} ± {100 * _ms(diffs)[1]:.2f} |")
    if "opt" in big["runs"]:
        opt = _acc(big, "opt")
        finals = [opt[s][-1] for s in sorted(opt)]
        lines += ["", f"OPT (trained at the final exit only): final-exit test acc {_cell(finals)} % "
                      f"({len(finals)} seeds). Final exit minus OPT (paired): "
                      + ", ".join(f"{w} {100 * _ms([_acc(big, w)[s][-1] - opt[s][-1] for s in sorted(opt)])[0]:+.2f}"
                                  f" ± {100 * _ms([_acc(big, w)[s][-1] - opt[s][-1] for s in sorted(opt)])[1]:.2f}"
                                  for w in ("const", "adaloss"))]

    # 2. small vs large: every exit of the four networks, by cost.
    rows = []
    for name, summ, flops in (("width 8", small, f8), ("width 16", big, f16)):
        for w in ("const", "adaloss"):
            acc = _acc(summ, w)
            for i in range(k):
                rows.append((flops[i], f"{name} {w}", i + 1, [acc[s][i] for s in sorted(acc)]))
    rows.sort()
    lines += ["", "| MFLOPs | network | exit | test acc % |", "|---:|---|---:|---:|"]
    lines += [f"| {f / 1e6:.2f} | {n} | {e} | {_cell(a)} |" for f, n, e, a in rows]

    # 3. saturation: the final exit's validation accuracy over the last epochs (width 16).
    lines += ["", "Final-exit validation accuracy (mean over seeds) over the last epochs, width 16:", ""]
    for w in big["runs"]:
        curves = [[r["val_acc"][-1] for r in read_jsonl(Path(run["dir"]) / "metrics.jsonl")]
                  for run in big["runs"][w].values()]
        epochs = len(curves[0])
        tail = range(max(0, epochs - 4), epochs)
        lines.append(f"- {w}: " + ", ".join(f"epoch {e + 1}: {100 * statistics.fmean(c[e] for c in curves):.2f}"
                                            for e in tail))
    cpu = args.out / "cpu_time.txt"
    if cpu.is_file():
        lines += ["", f"Time: {cpu.read_text().strip()}"]
    text = "\n".join(lines)
    (args.out / "results_tables.md").write_text(text + "\n")
    print(text)

    # the plot
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, runs in ((ax1, [("width 16", big, f16)]), (ax2, [("width 8", small, f8), ("width 16", big, f16)])):
        for name, summ, flops in runs:
            for w, style in (("const", "-"), ("adaloss", "--")):
                acc = _acc(summ, w)
                stats = [_ms([acc[s][i] for s in acc]) for i in range(k)]
                x = [f / 1e6 for f in flops]
                label = f"{w}" if ax is ax1 else f"{name} {w}"
                line, = ax.plot(x, [100 * m for m, _ in stats], style, marker="o", ms=4, label=label)
                ax.fill_between(x, [100 * (m - s) for m, s in stats], [100 * (m + s) for m, s in stats],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("cumulative MFLOPs per image (stages + heads to the exit; 2 x MACs)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if "opt" in big["runs"]:
        finals = [r["test_acc"][-1] for r in big["runs"]["opt"].values()]
        m, s = _ms(finals)
        ax1.errorbar([f16[-1] / 1e6], [100 * m], yerr=[100 * s], fmt="*", ms=12, color="black",
                     label="OPT (final exit only)")
    n_seeds = len(big["runs"]["const"])
    ax1.set_title(f"ResANN width 16: CONST vs AdaLoss (mean ± std, {n_seeds} seeds)")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_title("small (width 8) vs large (width 16) networks")
    ax1.legend()
    ax2.legend(fontsize=8)
    png = args.png or args.out / "adaloss_vs_const.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png} and {args.out / 'results_tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
