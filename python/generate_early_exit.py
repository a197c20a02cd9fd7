"""Batched early-exit generation with ``ann_kernels.generate``: the four modes on one batch of
ragged prompts, each checked against an independent answer.

    python python/generate_early_exit.py [--checkpoint runs/bench_lm/last.pt] [--smoke]

Without ``--checkpoint`` the model is a small random ``causal_exit_lm`` (the checks hold for
any weights; only the speed-ups and acceptance rates need a trained model such as the one
``scripts/train_bench_lm.py`` writes). Checks (printed as ``CHECK ... ok``):
- ``full`` at batch 8 with ragged prompts equals each prompt generated alone, and equals the
  cache-free reference (the whole model re-run on the whole row for every token);
- ``static`` exit k equals exit k's argmax of that reference;
- greedy ``self_speculative`` (drafting from an early exit, verifying with the rest, per-row
  acceptance) equals ``full`` token for token;
- ``confidence`` with a threshold above 1 equals ``full``, with threshold 0 equals ``static`` 0;
  with a threshold in between each token comes from the first exit confident enough on the
  exact states (``kv_policy="recompute"``);
- sampling with a seeded ``torch.Generator`` repeats.
"""

from __future__ import annotations

import argparse
import os

import torch

import ann_kernels
from ann_kernels.generation.reference import generate_reference
from ann_kernels.nn.causal_lm import causal_exit_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="an LM checkpoint (ann-kernels train --dataset text)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args()
    smoke = args.smoke or bool(os.environ.get("ANN_EXAMPLES_SMOKE"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.checkpoint:
        from ann_kernels.generation.checkpoint import load_lm_checkpoint

        model = load_lm_checkpoint(args.checkpoint).model
    else:
        torch.manual_seed(0)
        model = causal_exit_lm(64, dim=32 if smoke else 64, layers=4, heads=2, max_len=64, tie_embeddings=False)
        with torch.no_grad():  # sharper exits, so confidences spread over (0, 1)
            model.lm_heads[0].weight.mul_(30.0)
        model.eval()
    new = 6 if smoke else args.new_tokens
    vocab = model.num_classes
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 5, 9, 3, 7, 2, 8, 4)]
    k_exits = model.num_exits
    print(f"model: {k_exits} exits after layers {model.exit_layers}; 8 prompts of lengths "
          f"{[len(p) for p in prompts]}; {new} new tokens each")

    full = ann_kernels.generate(model, prompts, max_new_tokens=new)
    alone = [ann_kernels.generate(model, [p], max_new_tokens=new).tokens[0] for p in prompts]
    assert full.tokens == alone
    print("CHECK full at batch 8 (ragged prompts) equals each prompt alone ok")
    reference = [generate_reference(model, p, new)[0] for p in prompts]
    assert full.tokens == reference
    print("CHECK full equals the cache-free reference ok")

    k = k_exits // 2 - 1 if k_exits > 1 else 0
    static = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="static", exit_index=k)
    assert static.tokens == [generate_reference(model, p, new, mode="static", exit_index=k)[0] for p in prompts]
    print(f"CHECK static exit {k} equals exit {k}'s argmax of the reference ok")

    if k_exits > 1:
        for exit_index in range(k_exits - 1):
            spec = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="self_speculative",
                                        exit_index=exit_index, draft_len=4)
            assert spec.tokens == full.tokens
            s = spec.stats
            print(f"  self_speculative from exit {exit_index}: acceptance {s['acceptance_rate']:.2f}, "
                  f"{s['tokens_per_verify']:.2f} tokens per verify, layer FLOPs {100 * s['layer_fraction']:.0f}%")
        print("CHECK greedy self_speculative equals full token for token, from every exit ok")

    above = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="confidence", threshold=1.5)
    zero = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="confidence", threshold=0.0)
    first = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="static", exit_index=0)
    assert above.tokens == full.tokens and zero.tokens == first.tokens
    print("CHECK confidence: threshold 1.5 equals full, threshold 0 equals static exit 0 ok")
    conf = ann_kernels.generate(model, prompts, max_new_tokens=new, mode="confidence", threshold=0.8)
    for p, toks, exits in zip(prompts, conf.tokens, conf.exit_index):
        assert (toks, exits) == generate_reference(model, p, new, mode="confidence", threshold=0.8)
    s = conf.stats
    print(f"  confidence 0.8: mean exit {s['mean_exit']:.2f}, tokens per exit {s['exit_counts']}, layer FLOPs "
          f"{100 * s['layer_fraction']:.0f}% (recompute runs the skipped layers later)")
    print("CHECK confidence (recompute) takes the first exit confident enough on the exact states ok")

    kw = dict(max_new_tokens=new, do_sample=True, temperature=0.8, top_p=0.9)
    a = ann_kernels.generate(model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = ann_kernels.generate(model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert a.tokens == b.tokens
    print("CHECK sampling with a seeded generator repeats ok")
    st = full.stats
    print(f"full: {st['decode_tokens_per_s']:.0f} decode tokens/s, prefill {st['prefill_tokens']} tokens in "
          f"{1e3 * st['prefill_s']:.1f} ms (this machine, one run)")


if __name__ == "__main__":
    main()
