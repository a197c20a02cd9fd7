"""Train a tiny early-exit language model with the fused linear + multi-exit loss (< 1 min).

An exit after every layer of a 3-layer causal transformer; all exits share one LM head
(tied to the embedding) after one final norm; LayerSkip's "sum" loss scales with the
rotational curriculum (starting from layer 1; the last layer always trains); the K x tokens x vocabulary logits are never materialised. Text:
the `json` package of the CPython standard library, split by file; byte-level BPE.

    python python/train_early_exit_lm.py [--steps 60] [--out runs/example-lm] [--smoke]

Checks (printed as ``CHECK ... ok``): the fused loss equals F.linear + F.cross_entropy per
exit with the same weights; the rotational curriculum moves the active exit; the loss goes
down.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import tokenizers  # noqa: F401
except ImportError:
    print("SKIP Hugging Face tokenizers is not installed (pip install tokenizers)")
    raise SystemExit(0) from None

import ann_kernels
from ann_kernels.nn.causal_lm import causal_exit_lm
from ann_kernels.train.lm import evaluate_lm
from ann_kernels.train.text import load_text_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/example-lm")
    parser.add_argument("--smoke", action="store_true", help="a few steps in a temporary directory (CI)")
    args = parser.parse_args()
    if args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE"):
        args.steps, args.out = min(args.steps, 24), tempfile.mkdtemp(prefix="example-lm-")
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    data = load_text_data(args.out, text_glob=text_glob, vocab_size=512, seq_len=32, progress=False)
    model = causal_exit_lm(data.vocab_size, dim=48, layers=3, heads=4, max_len=32)
    loss_fn = ann_kernels.AnytimeLinearLoss(model.lm_heads[0], model.num_exits, "layerskip", scale="sum",
                                            curriculum="rot", exit_layers=model.exit_layers,
                                            num_layers=model.num_layers, curriculum_layers=[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(data.train, batch_size=16, shuffle=True)
    step, losses, seen = 0, [], set()
    while step < args.steps:
        for x, y in loader:
            weights = loss_fn.weighting.weights_for_step().tolist()  # this step's exit weights
            hidden = model.forward_hidden(x)
            loss = loss_fn(hidden, y)  # K hidden states [B, S, H] -> one scalar
            if step == 0:
                head = model.lm_heads[0]
                want = sum(w * F.cross_entropy(head(h).flatten(0, 1), y.flatten()) for w, h in zip(weights, hidden))
                assert torch.allclose(loss, want, rtol=1e-5, atol=1e-5), (loss, want)
                print(f"CHECK fused loss {loss.item():.5f} == eager F.linear + F.cross_entropy {want.item():.5f} ok")
            seen.add(tuple(k for k, w in enumerate(weights) if w > 0))
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 20 < 3:  # the rotational curriculum moves the active exit every step
                print(f"step {step:3d}  loss {loss.item():.3f}  exit weights {loss_fn.weights.tolist()}")
            step += 1
            if step == args.steps:
                break
    assert len(seen) == model.num_exits, seen
    print(f"CHECK the rotational curriculum trained exit sets {sorted(seen)} ok")
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, (first, last)
    print(f"CHECK loss went down ({first:.3f} -> {last:.3f}) ok")
    r = evaluate_lm(model, data.test)
    flops = model.per_token_exit_flops(32).tolist()
    for k, (f, p, a) in enumerate(zip(flops, r["ppl"], r["acc"])):
        print(f"exit {k + 1} (after layer {model.exit_layers[k] + 1}): {f / 1e3:.0f} kFLOPs/token  "
              f"test ppl {p:.1f}  next-token acc {100 * a:.1f}%")


if __name__ == "__main__":
    main()
