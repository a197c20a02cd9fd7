"""Fine-tune a Hugging Face ``LlamaForCausalLM`` with LayerSkip's early-exit recipe (< 1 min).

A tiny random Llama (4 layers; built from a config, no download) trains on the CPython
standard library's ``json`` package (byte-level BPE, split by file) with
``HFLlamaEarlyExitLoss``: exits after layers 1 and 3 (and the last one), each through the
model's own final norm and ``lm_head``; LayerSkip's ``sum`` loss scales, the rotational
curriculum and layer dropout rising with depth. The same code fine-tunes a real
LayerSkip checkpoint (``LlamaForCausalLM.from_pretrained(...)``).

    python python/finetune_hf_llama.py [--steps 80] [--smoke]

Checks (``CHECK ... ok``): the fused loss equals the eager per-exit cross-entropy on the
model's own hidden states; every exit's held-out loss falls; the model's own forward (what
``generate`` runs) is untouched.
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
    import transformers
    import tokenizers  # noqa: F401
except ImportError:
    print("SKIP transformers / tokenizers are not installed (pip install 'ann_kernels[hf]')")
    raise SystemExit(0) from None

from ann_kernels.losses.hf_llama import HFLlamaEarlyExitLoss
from ann_kernels.train.text import load_text_data


def held_out_exit_losses(loss_fn, model, x: torch.Tensor) -> list[float]:
    """Each exit's next-token cross-entropy on ``x`` (eval mode, materialised logits)."""
    model.eval()
    with torch.no_grad():
        hidden = loss_fn.exit_hidden_states(x)
        out = [F.cross_entropy(model.lm_head(h[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item() for h in hidden]
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--smoke", action="store_true", help="a few steps (CI)")
    args = parser.parse_args()
    if args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE"):
        args.steps = min(args.steps, 12)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    with tempfile.TemporaryDirectory(prefix="hf-llama-") as run_dir:
        data = load_text_data(run_dir, text_glob=text_glob, vocab_size=512, seq_len=32, progress=False)
    config = transformers.LlamaConfig(vocab_size=data.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    loss_fn = HFLlamaEarlyExitLoss(model, exit_layers=[1, 3], weighting="layerskip", scale="sum",
                                   curriculum="rot", curriculum_layers=[1, 3], layer_dropout=0.1)
    print(f"Llama: {config.num_hidden_layers} layers, width {config.hidden_size}, vocabulary {data.vocab_size}; "
          f"exits after layers {loss_fn.exit_layers}")

    # 1. the fused loss == eager cross-entropy per exit on Hugging Face's own hidden states
    x = torch.stack([data.train[i][0] for i in range(4)])
    weights = loss_fn.loss_fn.weighting.weights_for_step()
    model.eval()  # no layer dropout for the comparison
    fused = loss_fn(x)
    out = model(x, output_hidden_states=True)
    eager = 0.0
    for w, layer in zip(weights.tolist(), loss_fn.exit_layers):
        h = out.hidden_states[-1] if layer == 3 else model.model.norm(out.hidden_states[layer + 1])
        eager += w * F.cross_entropy(model.lm_head(h)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert torch.allclose(fused, eager, rtol=1e-5, atol=1e-5), (fused, eager)
    print(f"CHECK fused loss {fused.item():.4f} == eager per-exit cross-entropy {eager.item():.4f} ok")
    model.train()

    # 2. train; every exit's held-out loss falls
    held_out = torch.stack([data.val[i][0] for i in range(min(16, len(data.val)))])
    before = held_out_exit_losses(loss_fn, model, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(data.train, batch_size=16, shuffle=True)
    step = 0
    while step < args.steps:
        for x, _ in loader:
            loss = loss_fn(x)  # labels = input_ids, shifted inside
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % max(1, args.steps // 4) == 0:
                print(f"step {step:3d}  loss {loss.item():.3f}  exit weights "
                      + " ".join(f"{w:.2f}" for w in loss_fn.weights.tolist()))
            if step == args.steps:
                break
    after = held_out_exit_losses(loss_fn, model, held_out)
    for layer, b, a in zip(loss_fn.exit_layers, before, after):
        print(f"exit after layer {layer}: held-out loss {b:.3f} -> {a:.3f}")
    assert all(a < b for a, b in zip(after, before)), (before, after)
    print("CHECK every exit's held-out loss fell ok")

    # 3. the hooks act only inside the loss: the model's own forward is plain Llama
    model.eval()
    with torch.no_grad():
        logits = model(held_out).logits
        assert torch.allclose(logits, model.lm_head(loss_fn.exit_hidden_states(held_out)[-1]), atol=1e-5)
    print("CHECK the model's own forward equals the last exit ok")


if __name__ == "__main__":
    main()
