"""Train the benchmark early-exit LM that generation benchmarks load (issue 17, item 5).

An early-exit causal transformer (8 layers, width 192, an exit after every layer, one LM
head tied to the embedding, LayerSkip's recipe: layer dropout rising with depth to 0.1 and
the early-exit loss with ``sum`` scales and the ``gradual`` curriculum) trained on the
CPython standard library's source (byte-level BPE, 2048 tokens, split by file): 1600 steps,
an estimated 10-15 minutes on 2 idle CPU cores (0.37 s per step measured idle in the first
epoch), about 50 minutes on a machine shared with four other jobs. Its exits differ usefully
(test perplexity 80 at the first exit, 40 at the last; numbers in ``docs/lm_training.md``);
``--epochs`` / ``--limit-train`` train longer (a larger budget is
a different run: it goes to another ``--out`` or needs ``--force``).

    python scripts/train_bench_lm.py                 # train (or reuse) runs/bench_lm/
    python scripts/train_bench_lm.py --short         # a tiny, fast run for development / CI
    python scripts/train_bench_lm.py --force         # retrain even if the cache is complete

Output in ``--out`` (default ``runs/bench_lm/``): ``last.pt`` (the LM checkpoint format of
:mod:`ann_kernels.train.lm`, so ``ann-kernels eval --checkpoint runs/bench_lm/last.pt`` and
the generation engine load it), ``tokenizer.json``, ``metrics.jsonl``, ``anytime.png`` and
``exits.json`` / ``exits.png``: per-exit perplexity and next-token accuracy on the
held-out validation and test files. A complete run with the same settings is reused
(``--force`` retrains); an interrupted one resumes from its last epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ann_kernels.nn.causal_lm import causal_exit_lm
from ann_kernels.train.lm import LM_FORMAT, evaluate_lm, load_text_data, plot_lm, train_lm

# 4 epochs x 400 steps x 16 sequences x 128 tokens = 3.3 M training tokens: the budget at which
# the exits separate (first exit's perplexity 2x the last's) within ~15 minutes on 2 idle cores.
BENCH = {"vocab_size": 2048, "seq_len": 128, "batch_size": 16, "epochs": 4, "limit_train": 6400, "limit_eval": 100,
         "lr": 3e-3, "warmup_steps": 60,
         "model": {"dim": 192, "layers": 8, "heads": 4, "layer_dropout": 0.1, "layer_dropout_scale": "exp"},
         "weighting_kwargs": {"scale": "sum", "curriculum": "gradual"}}
SHORT = {"vocab_size": 512, "seq_len": 32, "batch_size": 8, "epochs": 1, "limit_train": 64, "limit_eval": 16,
         "lr": 3e-3, "warmup_steps": 2,
         "model": {"dim": 32, "layers": 3, "heads": 2, "layer_dropout": 0.1, "layer_dropout_scale": "exp"},
         "weighting_kwargs": {"scale": "sum", "curriculum": "gradual"}}


def bench_spec(out: str, cfg: dict, *, text_glob: str | None, seed: int, progress: bool) -> dict:
    """The ``train_lm`` spec of the benchmark model (``cfg``: :data:`BENCH` or :data:`SHORT`)."""
    return {"out": out, "text_glob": text_glob, "vocab_size": cfg["vocab_size"], "seq_len": cfg["seq_len"],
            "limit_train": cfg["limit_train"], "limit_eval": cfg["limit_eval"], "model_kwargs": dict(cfg["model"]),
            "weighting": "layerskip", "weighting_kwargs": dict(cfg["weighting_kwargs"]), "z_loss": 1e-4,
            "label_smoothing": 0.0, "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "optimizer": "adamw",
            "lr": cfg["lr"], "weight_decay": None, "warmup_steps": cfg["warmup_steps"], "bf16": False, "seed": seed,
            "progress": progress}


def _same_settings(new: dict, cached: dict) -> bool:
    return all(new[k] == cached.get(k) for k in new if k not in ("progress", "out"))


def evaluate_checkpoint(path: Path) -> dict:
    """Per-exit ``{"val": {...}, "test": {...}}`` (loss, ppl, acc) of a bench checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = dict(ckpt["spec"], progress=False)
    data = load_text_data(spec["out"], text_glob=spec["text_glob"], vocab_size=spec["vocab_size"],
                          seq_len=spec["seq_len"], limit_train=spec["limit_train"], limit_eval=spec["limit_eval"],
                          progress=False)
    model = causal_exit_lm(data.vocab_size, max_len=spec["seq_len"], **spec["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    results = {name: evaluate_lm(model, ds) for name, ds in (("val", data.val), ("test", data.test))}
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "step": ckpt["step"], "exit_layers": model.exit_layers,
            "exit_flops_per_token": ckpt["exit_flops_per_token"], "tokens": {"val": len(data.val) * spec["seq_len"],
                                                                             "test": len(data.test) * spec["seq_len"]},
            **results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="run directory (default runs/bench_lm, or runs/bench_lm_short)")
    p.add_argument("--short", action="store_true", help="a tiny configuration that trains in seconds")
    p.add_argument("--force", action="store_true", help="retrain even if OUT holds a complete run")
    p.add_argument("--text-glob", default=None, help="other text files (default: the CPython stdlib)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {BENCH['epochs']}")
    p.add_argument("--limit-train", type=int, default=None,
                   help=f"training sequences per epoch (default {BENCH['limit_train']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    cfg = dict(SHORT if args.short else BENCH)
    for key in ("epochs", "limit_train"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                raise SystemExit(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(args, key)}")
            cfg[key] = getattr(args, key)
    out = Path(args.out or ("runs/bench_lm_short" if args.short else "runs/bench_lm"))
    spec = bench_spec(str(out), cfg, text_glob=args.text_glob, seed=args.seed, progress=args.progress)
    ckpt_path = out / "last.pt"
    t0 = time.perf_counter()
    cached = None
    if ckpt_path.is_file() and not args.force:
        cached = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if cached.get("format") != LM_FORMAT or not _same_settings(spec, cached["spec"]):
            raise SystemExit(f"{ckpt_path} holds a run with other settings; pass --force to retrain "
                             f"or --out elsewhere")
    if cached is not None and cached["epoch"] >= spec["epochs"]:
        print(f"reusing the complete run in {out}/ (trained {cached['epoch']} epochs; --force retrains)")
    else:
        print(f"training the benchmark LM into {out}/: {spec['model_kwargs']}, vocabulary {spec['vocab_size']}, "
              f"{spec['epochs']} epochs x {spec['limit_train']} sequences of {spec['seq_len']} tokens "
              f"(layerskip {spec['weighting_kwargs']})", flush=True)
        train_lm(spec, resume=cached is not None and not args.force)
    train_s = time.perf_counter() - t0
    report = evaluate_checkpoint(ckpt_path)
    report["wall_s"] = train_s
    flops = report["exit_flops_per_token"]
    plot_lm(flops, {split: report[split] for split in ("val", "test")}, out / "exits.png")
    (out / "exits.json").write_text(json.dumps(report, indent=1))
    print(f"{'exit':>4}  {'layer':>5}  {'MFLOPs/tok':>10}  {'val ppl':>8}  {'test ppl':>8}  {'test acc %':>10}")
    for k, layer in enumerate(report["exit_layers"]):
        print(f"{k:>4}  {layer:>5}  {flops[k] / 1e6:>10.2f}  {report['val']['ppl'][k]:>8.2f}  "
              f"{report['test']['ppl'][k]:>8.2f}  {100 * report['test']['acc'][k]:>10.2f}")
    ppl = report["test"]["ppl"]
    print(f"test perplexity first exit / last exit: {ppl[0]:.1f} / {ppl[-1]:.1f} "
          f"(ratio {ppl[0] / ppl[-1]:.2f}); {report['tokens']['test']} test tokens")
    print(f"wrote {out}/last.pt, tokenizer.json, exits.json, exits.png in {train_s:.0f} s")
    return 0 if all(math.isfinite(v) for v in ppl) else 1


if __name__ == "__main__":
    raise SystemExit(main())
