"""CLI command ``generate`` (registered in :mod:`ann_kernels.cli`).

``ann-kernels generate --checkpoint runs/lm/last.pt --prompt "def main(" [--prompt ...] |
--prompts-file F [--mode full|static|confidence|self_speculative] [--exit-index K]
[--draft-len D] [--threshold T ... | --budget B] [--kv-policy recompute|propagate]
[--max-new-tokens N] [--do-sample --temperature T --top-k K --top-p P --seed S] [--json]``

Text out: each completion, the exit of each new token and the run's statistics; ``--json``
prints one JSON object (prompts, completions, token ids, exits, stats) for scripts.
``--budget`` (confidence mode): thresholds calibrated on the run's validation split for that
mean cost per token (a fraction <= 1 of the full model's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

__all__ = ["add_parser", "cmd_generate"]


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file: {path} does not exist")
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("--prompt / --prompts-file: give at least one prompt")
    return prompts


def cmd_generate(args) -> int:
    from ann_kernels.generation.api import generate
    from ann_kernels.generation.calibration import calibrate_generation
    from ann_kernels.generation.checkpoint import held_out_blocks, load_lm_checkpoint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load_lm_checkpoint(args.checkpoint)
    texts = _read_prompts(args)
    prompts = [lm.encode(t) for t in texts]
    for text, ids in zip(texts, prompts):
        if not ids:
            raise ValueError(f"--prompt: {text!r} encodes to no tokens")
    threshold = args.threshold
    if threshold is not None and len(threshold) == 1:
        threshold = threshold[0]
    calibration = None
    if args.mode == "confidence" and args.budget is not None:
        if args.threshold is not None:
            raise ValueError("--budget: give --threshold or --budget, not both")
        held = held_out_blocks(lm.run_dir, "val", min(64, lm.model.max_len), args.calibration_blocks)
        calibration = calibrate_generation(lm.model, held, args.budget, criterion=args.criterion)
        threshold = calibration
    eos = lm.eos_token_id if args.eos_token_id is None else args.eos_token_id
    if args.eos_token_id == -1:
        eos = None
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    kw = {"exit_index": args.exit_index} if args.mode in ("static", "self_speculative") else {}
    out = generate(lm.model, prompts, max_new_tokens=args.max_new_tokens, mode=args.mode, draft_len=args.draft_len,
                   threshold=threshold, criterion=args.criterion, kv_policy=args.kv_policy, eos_token_id=eos,
                   do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=generator, **kw)
    completions = [lm.decode(t) for t in out.tokens]
    if args.json:
        payload = {"checkpoint": str(args.checkpoint), "mode": args.mode, "exit_layers": lm.model.exit_layers,
                   "prompts": texts, "completions": completions, "tokens": out.tokens,
                   "exit_index": out.exit_index, "stats": out.stats}
        if calibration is not None:
            payload["thresholds"] = calibration.thresholds.tolist()
        json.dump(payload, sys.stdout)
        print()
        return 0
    k = lm.model.num_exits
    for i, (text, completion) in enumerate(zip(texts, completions)):
        exits = out.exit_index[i]
        hist = " ".join(f"{e}:{exits.count(e)}" for e in range(k))
        print(f"--- prompt {i + 1}: {text!r}")
        print(text + completion)
        print(f"    {len(exits)} new tokens; exit (0-based, layer {lm.model.exit_layers}) of each: "
              f"{' '.join(map(str, exits))}")
        print(f"    tokens per exit: {hist}")
    s = out.stats
    line = (f"mode {s['mode']}: {s['new_tokens']} tokens in {s['decode_s']:.3f} s "
            f"({s['decode_tokens_per_s']:.1f} tokens/s decode; prefill {s['prefill_tokens']} tokens in "
            f"{s['prefill_s']:.3f} s); mean exit {s['mean_exit']:.2f}; layer FLOPs run {100 * s['layer_fraction']:.0f}%")
    if "acceptance_rate" in s:
        line += f"; acceptance {100 * s['acceptance_rate']:.0f}%, {s['tokens_per_verify']:.2f} tokens per verify"
    if calibration is not None:
        line += f"; thresholds {[round(float(t), 4) for t in calibration.thresholds]}"
    print(line)
    return 0


def add_parser(subparsers) -> None:
    """Register ``generate`` on ``subparsers``."""
    p = subparsers.add_parser(
        "generate", help="generate text from an early-exit LM checkpoint (per-token exits)",
        description="Batched early-exit generation (ann_kernels.generate) from a text checkpoint; the tokenizer "
                    "is read from the checkpoint's run directory.")
    p.add_argument("--checkpoint", required=True, help="a last.pt written by ann-kernels train --dataset text")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (\\n inside a line = newline)")
    p.add_argument("--mode", choices=("full", "static", "confidence", "self_speculative"), default="full")
    p.add_argument("--exit-index", type=int, default=0, help="static / self_speculative: the exit (0-based)")
    p.add_argument("--draft-len", type=int, default=4, help="self_speculative: tokens drafted per verify")
    p.add_argument("--threshold", type=float, nargs="+", default=None,
                   help="confidence: one threshold, or one per exit")
    p.add_argument("--budget", type=float, default=None,
                   help="confidence: calibrate thresholds on the validation split for this mean cost per token "
                        "(a fraction <= 1 of the full model's)")
    p.add_argument("--calibration-blocks", type=int, default=32, help="validation blocks of 64 tokens for --budget")
    p.add_argument("--criterion", choices=("max_prob", "margin", "entropy"), default="max_prob")
    p.add_argument("--kv-policy", choices=("recompute", "propagate"), default="recompute")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eos-token-id", type=int, default=None,
                   help="stop token (default: the tokenizer's <|endoftext|>; -1: none)")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)
