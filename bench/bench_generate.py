"""Benchmark of batched early-exit generation (``ann_kernels.generate``).

Model: the benchmark LM ``runs/bench_lm/last.pt`` (``scripts/train_bench_lm.py``: LayerSkip
recipe on the stdlib corpus), ``--checkpoint`` to override; without it a random model of the
same size is used (speeds stay meaningful; acceptance, exits and quality do not: the script
says so). Prompts: blocks of the held-out test split (``--prompt-len`` tokens each). Every
row generates exactly ``--new-tokens`` tokens (no EOS), greedy.

Per batch size (1, 8, 32), interleaved rounds over every provider (``bench/common.py``):
- ``full`` (every layer, the same cache code) - the baseline of every ratio;
- ``static_k``: every token from exit k;
- ``self_speculative_k``: LayerSkip drafting from exit k (``--draft-len``), acceptance rate,
  tokens per verify, and whether its output equals ``full``'s (it must);
  ``self_speculative_k_c<p>`` the same with ``draft_confidence=p`` (``--draft-confidence``),
  ``self_speculative_k_k<K>`` with ``draft_candidates=K`` (``--draft-candidates``);
- ``confidence_<policy>_b<budget>``: thresholds calibrated on the validation split for a mean
  cost per token of ``budget`` x full (MSDNet), kv_policy recompute and propagate; mean exit,
  fraction of layer FLOPs run (their overhead included), exact-match rate of the greedy
  sequences against ``full`` and the full model's NLL of the generated text (its rise over
  ``full``'s own output);
- Hugging Face peers (``--no-hf`` skips): a ``LlamaForCausalLM`` of the model's size (random
  weights), ``generate`` against ours ``full`` on the same weights at batch 1 and 8 (whole-call
  wall time, prefill included on both sides), and ``assistant_early_exit`` at batch 1;
- engine overhead at batch 8: a ``full`` decode step against the same layer calls on the same
  shapes with nothing else (no cache writes, masks, sampling or bookkeeping), interleaved rep by
  rep with the engine steps; on CPU with ``--threads 1`` both timed in this thread's CPU time
  (``time.thread_time``), so other processes' load on a shared machine does not count.

Decode tokens/s come from ``out.stats`` (prefill apart); medians over rounds.
Usage: ``python bench/bench_generate.py [--quick] [--checkpoint P] [--batch-sizes 1 8 32]
[--new-tokens 32] [--rounds 3] [--threads N] [--draft-confidence P ...] [--draft-candidates K ...] [--out DIR]``. Writes ``generate.csv`` (long
format, appended) and ``generate.png`` (speed-up vs NLL rise per mode and batch size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ann_kernels  # noqa: E402
from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter  # noqa: E402
from ann_kernels.generation.calibration import calibrate_generation  # noqa: E402
from ann_kernels.generation.checkpoint import held_out_blocks, load_lm_checkpoint  # noqa: E402
from bench.common import RESULTS_DIR, CsvWriter  # noqa: E402

DEFAULT_CHECKPOINT = "runs/bench_lm/last.pt"


def load_model(path: str):
    if os.path.isfile(path):
        lm = load_lm_checkpoint(path)
        print(f"model: {path} (epoch {lm.epoch}, exits after layers {lm.model.exit_layers})")
        return lm.model, lm.run_dir, True
    from ann_kernels.nn.causal_lm import causal_exit_lm

    print(f"model: {path} not found (train it with scripts/train_bench_lm.py); using a RANDOM model of the "
          "benchmark size (dim 128, 6 layers, vocabulary 4096): speeds are meaningful, acceptance rates, exits "
          "and quality are not")
    torch.manual_seed(0)
    return causal_exit_lm(4096, dim=128, layers=6, heads=4, max_len=128).eval(), None, False


@torch.inference_mode()
def full_model_nll(model, prompts, generated) -> float:
    """Mean NLL (nats/token) of the generated tokens under the full model, teacher-forced."""
    total, count = 0.0, 0
    for p, g in zip(prompts, generated):
        tokens = torch.tensor([p + g])
        logp = torch.log_softmax(model(tokens)[-1][0, len(p) - 1:-1].double(), -1)
        total -= float(logp.gather(1, torch.tensor(g).unsqueeze(1)).sum())
        count += len(g)
    return total / max(count, 1)


def run_modes(model, prompts, new_tokens, providers, rounds):
    """Interleaved rounds: provider -> list of GenerationOutput (one per round)."""
    outs = {name: [] for name in providers}
    for name, kw in providers.items():  # warm-up
        ann_kernels.generate(model, prompts[:2], max_new_tokens=2, **kw)
    for _ in range(rounds):
        for name, kw in providers.items():
            outs[name].append(ann_kernels.generate(model, prompts, max_new_tokens=new_tokens, **kw))
    return outs


def median_stat(outs, key):
    return statistics.median(o.stats[key] for o in outs)


@torch.inference_mode()
def engine_overhead(model, prompts, new_tokens, reps):
    """(engine step s, bare layer-calls s) medians of full decode steps at this batch. The two
    are interleaved rep by rep (one bare pass at the state's current window, then one engine
    step), so load swings on a shared machine hit both alike; on CPU with one thread the clock
    is this thread's CPU time (time spent descheduled by other processes is not counted)."""
    ad = as_adapter(model)
    # one CPU thread: its CPU time; else (intra-op threads, a GPU) wall time
    clock = time.thread_time if ad.device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    b = len(prompts)
    st = DecodeState(ad, ModeConfig("full"), max_batch_size=b, max_positions=max(map(len, prompts)) + new_tokens + reps)
    st.add_rows(prompts, [RowParams(new_tokens + reps)] * b, list(range(b)))
    x = torch.randint(0, ad.vocab_size, (b, 1))
    steps, bare = [], []
    for _ in range(reps):
        window = int(st.length[:b].max())
        pos = torch.full((b, 1), window - 1)
        t0 = clock()
        h = ad.embed(x, pos)
        for i in range(ad.num_layers):
            q, k, v = ad.qkv(i, h, None)
            keys, values = st.cache.keys[i][:b, :, :window], st.cache.values[i][:b, :, :window]
            a = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            h = ad.finish_layer(i, h, a.transpose(1, 2).reshape(b, 1, -1))
        ad.exit_logits(h[:, 0], ad.num_exits - 1).argmax(-1).tolist()
        bare.append(clock() - t0)
        t0 = clock()
        st.step()
        steps.append(clock() - t0)
    return statistics.median(steps), statistics.median(bare)


def hf_peers(model, prompts, new_tokens, rounds, batch_sizes, csv, spec_exit_layer):
    try:
        import transformers
    except ImportError:
        print("hf peers: transformers is not installed (extra [hf]); skipped")
        return {}
    ad = as_adapter(model)
    cfg = transformers.LlamaConfig(vocab_size=ad.vocab_size, hidden_size=ad.hidden_size,
                                   intermediate_size=4 * ad.hidden_size, num_hidden_layers=ad.num_layers,
                                   num_attention_heads=ad.num_heads, num_key_value_heads=ad.num_heads,
                                   max_position_embeddings=ad.max_len, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=0)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    exit_layers = sorted(set(model.exit_layers))
    results = {}
    for bs in [b for b in batch_sizes if b in (1, 8)]:
        ids = torch.tensor(prompts[:bs])
        mask = torch.ones_like(ids)
        calls = {
            "hf_generate": lambda: llama.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                                  min_new_tokens=new_tokens, pad_token_id=0),
            "ours_full_llama": lambda: ann_kernels.generate(llama, prompts[:bs], max_new_tokens=new_tokens,
                                                            exit_layers=exit_layers),
        }
        if bs == 1:
            calls["hf_assistant_early_exit"] = lambda: llama.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=0, assistant_early_exit=spec_exit_layer + 1)
        times = {k: [] for k in calls}
        with torch.inference_mode():
            for fn in calls.values():
                fn()
            for _ in range(rounds):
                for k, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            tps = bs * new_tokens / statistics.median(v)
            results[(bs, k)] = tps
            csv.add("generate", k, f"b{bs}", "tokens_per_s_wall", value=tps, notes="random Llama weights")
        print(f"  HF peers b={bs}: " + "  ".join(f"{k} {results[(bs, k)]:.0f} tok/s" for k in calls)
              + f"   ours/HF = {results[(bs, 'ours_full_llama')] / results[(bs, 'hf_generate')]:.2f}")
    return results


def plot(points, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)
    markers = {1: "o", 8: "s", 32: "^"}
    for (bs, name), (speedup, nll_rise, tps) in points.items():
        ax1.scatter(100 * nll_rise, speedup, marker=markers.get(bs, "x"), label=f"{name} b{bs}")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("full model's NLL of the output, rise over full (%)")
    ax1.set_ylabel("decode tokens/s / full's")
    ax1.set_title("speed-up vs quality")
    ax1.legend(fontsize=6, ncol=2)
    names = sorted({n for _, n in points})
    sizes = sorted({b for b, _ in points})
    width = 0.8 / max(len(sizes), 1)
    for j, bs in enumerate(sizes):
        ax2.bar([i + j * width for i in range(len(names))],
                [points.get((bs, n), (0, 0, 0))[2] for n in names], width, label=f"batch {bs}")
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
    ax2.set_ylabel("decode tokens/s")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--draft-confidence", type=float, nargs="*", default=[],
                    help="also run self_speculative with these draft_confidence values (a row stops drafting "
                         "after a draft token below it)")
    ap.add_argument("--draft-candidates", type=int, nargs="*", default=[],
                    help="also run self_speculative with these draft_candidates values (greedy drafts over a "
                         "cached candidate set)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8])
    ap.add_argument("--exits", type=int, nargs="+", default=None,
                    help="exits (0-based) for static / self_speculative (default: about 1/3 and 1/2 of the depth)")
    ap.add_argument("--confidence-exits", type=int, nargs="+", default=None,
                    help="exits confidence mode may leave at (default: all; the others' heads are skipped)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, 16 new tokens, 2 rounds")
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.new_tokens, args.rounds = [b for b in args.batch_sizes if b <= 8], 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, run_dir, trained = load_model(args.checkpoint)
    model = model.to(args.device)
    k_exits = model.num_exits
    n_prompts = max(args.batch_sizes)
    if run_dir is not None:
        blocks = held_out_blocks(run_dir, "test", args.prompt_len, n_prompts)
        held = held_out_blocks(run_dir, "val", 64, 32)
    else:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(1, model.num_classes, (n_prompts, args.prompt_len), generator=g)
        held = torch.randint(1, model.num_classes, (32, 64), generator=g)
    prompts = blocks.tolist()
    while len(prompts) < n_prompts:
        prompts += prompts[: n_prompts - len(prompts)]
    spec_exits = args.exits or sorted({max(0, (k_exits - 1) // 3), max(0, (k_exits - 1) // 2)})
    if not all(0 <= k < k_exits - 1 for k in spec_exits):
        raise SystemExit(f"--exits: expected exits in [0, {k_exits - 2}], got {spec_exits}")
    providers = {"full": {}}
    for k in spec_exits:
        providers[f"static_{k}"] = {"mode": "static", "exit_index": k}
        providers[f"self_speculative_{k}"] = {"mode": "self_speculative", "exit_index": k, "draft_len": args.draft_len}
        for c in args.draft_candidates:
            providers[f"self_speculative_{k}_k{c}"] = {"mode": "self_speculative", "exit_index": k,
                                                       "draft_len": args.draft_len, "draft_candidates": c}
        for c in args.draft_confidence:
            providers[f"self_speculative_{k}_c{c:g}"] = {"mode": "self_speculative", "exit_index": k,
                                                         "draft_len": args.draft_len, "draft_confidence": c}
    for budget in args.budgets:
        calib = calibrate_generation(model, held.to(args.device), budget, exits=args.confidence_exits)
        for policy in ("recompute", "propagate"):
            providers[f"confidence_{policy}_b{budget:g}"] = {"mode": "confidence", "threshold": calib,
                                                            "kv_policy": policy}
        print(f"calibration b={budget:g}: thresholds {[round(float(t), 3) for t in calib.thresholds]}, held-out "
              f"agreement with full {calib.accuracy:.3f}")
    csv = CsvWriter("generate", args.out)
    load = os.getloadavg()[0]
    print(f"load average {load:.1f}; threads {torch.get_num_threads()}; trained model: {trained}")
    points = {}
    for bs in args.batch_sizes:
        batch = prompts[:bs]
        outs = run_modes(model, batch, args.new_tokens, providers, args.rounds)
        full_tps = median_stat(outs["full"], "decode_tokens_per_s")
        full_tokens = outs["full"][0].tokens
        full_nll = full_model_nll(model, batch, full_tokens)
        print(f"batch {bs}: full {full_tps:.0f} decode tok/s, prefill {median_stat(outs['full'], 'prefill_tokens_per_s'):.0f} "
              f"tok/s, full NLL of its own output {full_nll:.3f}")
        for name, o in outs.items():
            tps = median_stat(o, "decode_tokens_per_s")
            last = o[-1]
            exact = sum(a == b for a, b in zip(last.tokens, full_tokens)) / bs
            nll = full_model_nll(model, batch, last.tokens)
            rise = nll / full_nll - 1 if full_nll > 0 else float("nan")
            points[(bs, name)] = (tps / full_tps, rise, tps)
            shape = f"b{bs}"
            for metric, value in (("decode_tokens_per_s", tps), ("speedup_vs_full", tps / full_tps),
                                  ("prefill_tokens_per_s", median_stat(o, "prefill_tokens_per_s")),
                                  ("mean_exit", last.stats["mean_exit"]),
                                  ("layer_fraction", last.stats["layer_fraction"]),
                                  ("exact_match_vs_full", exact), ("full_nll", nll), ("nll_rise", rise),
                                  ("acceptance_rate", last.stats.get("acceptance_rate", float("nan"))),
                                  ("tokens_per_verify", last.stats.get("tokens_per_verify", float("nan")))):
                csv.add("generate", name, shape, metric, value=value, notes=f"load {load:.1f}")
            extra = ""
            if "acceptance_rate" in last.stats:
                extra = (f" acceptance {last.stats['acceptance_rate']:.2f}, {last.stats['tokens_per_verify']:.2f} "
                         f"tok/verify")
            print(f"  {name:32s} {tps:8.0f} tok/s  x{tps / full_tps:5.2f}  mean exit {last.stats['mean_exit']:.2f}  "
                  f"layers {100 * last.stats['layer_fraction']:5.1f}%  exact {exact:.2f}  NLL rise {100 * rise:+6.2f}%"
                  + extra)
        if bs == 8:
            step, bare = engine_overhead(model, batch, args.new_tokens, reps=max(10, args.new_tokens))
            csv.add("generate", "engine_overhead", shape, "overhead_fraction", value=1 - bare / step,
                    notes=f"step {step * 1e3:.2f} ms, bare layer calls {bare * 1e3:.2f} ms")
            print(f"  engine overhead at batch 8: step {step * 1e3:.2f} ms vs bare layer calls {bare * 1e3:.2f} ms "
                  f"-> {100 * (1 - bare / step):.1f}% of a step (target <= 10%)")
    if not args.no_hf:
        hf_peers(model, prompts, args.new_tokens, args.rounds, args.batch_sizes, csv, model.exit_layers[spec_exits[0]])
    path = csv.write()
    png = os.path.join(args.out, "generate.png")
    plot(points, png)
    print(f"wrote {path} and {png}; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
