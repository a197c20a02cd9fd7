"""The fused multi-exit cross-entropy in a plain PyTorch training loop, with mixed precision.

``ann_kernels.multi_exit_cross_entropy(logits, target, weights)`` takes the K exit logits
(fp32 / bf16 / fp16) and returns an ``ExitLoss``: ``loss`` = sum_k w_k CE_k (fp32,
differentiable), ``per_exit`` [K], per-sample losses, confidences and predictions, all from
one pass over the logits. This script trains a 4-exit ResANN with it:

- on CUDA: float16 autocast + ``torch.amp.GradScaler`` (loss scaling);
- on CPU (this project's CI): **bfloat16** autocast. bf16 has float32's exponent range, so
  it needs no loss scaling: the GradScaler is created with ``enabled=False`` and passes
  everything through, and the very same loop runs on both devices.

Checks (printed as ``CHECK ... ok``): the logits really are low precision under autocast;
the fused loss equals the pure-torch reference on the same logits; the loss goes down.

    python python/fused_loss_amp.py [--smoke] [--device cpu|cuda] [--steps N]

``--smoke`` (or ANN_EXAMPLES_SMOKE=1): a few seconds, for CI.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader

import ann_kernels
from ann_kernels.nn import resann
from ann_kernels.train import load_splits


def load_data(limit_train: int, limit_eval: int):
    """Fashion-MNIST if its files are installed, else the synthetic stand-in."""
    try:
        return "fashion-mnist", load_splits("fashion-mnist", limit_train=limit_train, limit_eval=limit_eval)
    except FileNotFoundError:
        return "synthetic", load_splits("synthetic", limit_train=limit_train, limit_eval=limit_eval)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300, smoke 40)")
    args = p.parse_args(argv)
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE") == "1"
    steps = args.steps or (40 if smoke else 300)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    name, data = load_data(limit_train=steps * 64, limit_eval=500 if smoke else 2000)
    model = resann(num_exits=4, width=8 if smoke else 16).to(device)
    weights = torch.ones(model.num_exits, device=device)  # CONST; any non-negative [K] works
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    print(f"data: {name}; device: {device.type}; autocast dtype: {amp_dtype}; "
          f"GradScaler enabled: {scaler.is_enabled()}"
          + ("" if scaler.is_enabled() else " (bf16 on CPU: no loss scaling needed)"))

    loader = DataLoader(data.train, batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    losses, t0 = [], time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype):
            logits = model(x)  # K tensors [64, 10] in amp_dtype
            out = ann_kernels.multi_exit_cross_entropy(logits, y, weights)
        if step == 0:
            assert all(z.dtype == amp_dtype for z in logits), [z.dtype for z in logits]
            print(f"CHECK logits are {amp_dtype} under autocast ok")
            ref = ann_kernels.multi_exit_cross_entropy_reference([z.detach() for z in logits], y, weights)
            err = (out.loss.detach() - ref.loss).abs().item()
            assert err <= 1e-4 * ref.loss.abs().item() + 1e-5, (out.loss.item(), ref.loss.item())
            print(f"CHECK fused loss {out.loss.item():.5f} == reference {ref.loss.item():.5f} ok")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(out.loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {out.loss.item():.4f}  per exit "
                  + " ".join(f"{v:.3f}" for v in out.per_exit.tolist()))
    elapsed = time.perf_counter() - t0

    model.eval()
    x_test, y_test = data.test.tensors
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype):
        acc = [(z.argmax(1).cpu() == y_test).float().mean().item() for z in model(x_test.to(device))]
    print(f"{len(losses)} steps in {elapsed:.1f} s; test accuracy per exit: "
          + " ".join(f"{100 * a:.1f}%" for a in acc))
    window = max(1, len(losses) // 5)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < first, (first, last)
    print(f"CHECK loss went down ({first:.3f} -> {last:.3f}) ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
