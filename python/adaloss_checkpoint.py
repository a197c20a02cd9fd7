"""AnytimeLoss with AdaLoss in a plain training loop: checkpoint halfway, resume, and check
that the resumed run continues *identically* (bit for bit) to an uninterrupted one.

``AnytimeLoss(K, weighting="adaloss")`` is a drop-in for ``nn.CrossEntropyLoss`` over the K
exit logits; AdaLoss weights exit k by the inverse of its running-average loss. All of its
state (running averages, step counter, weights) lives in buffers, so the loss module's
``state_dict`` goes into the checkpoint next to the model's and the optimiser's. A
checkpoint here is: model, loss, optimiser, the step, and the torch RNG state.

Checks (printed as ``CHECK ... ok``): after resuming in freshly built objects, the model,
the loss state (AdaLoss running averages and weights) and the per-step losses equal those
of the uninterrupted run exactly.

    python python/adaloss_checkpoint.py [--smoke] [--steps N] [--out DIR]

``--smoke`` (or ANN_EXAMPLES_SMOKE=1): a few seconds, for CI.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from ann_kernels import AnytimeLoss
from ann_kernels.nn import resann
from ann_kernels.train import load_splits


def load_data(limit_train: int):
    """Fashion-MNIST if its files are installed, else the synthetic stand-in."""
    try:
        return "fashion-mnist", load_splits("fashion-mnist", limit_train=limit_train, limit_eval=100)
    except FileNotFoundError:
        return "synthetic", load_splits("synthetic", limit_train=limit_train, limit_eval=100)


def build(width: int):
    """Model, loss and optimiser, built the same way for the first run and for the resume."""
    torch.manual_seed(0)
    model = resann(num_exits=4, width=width)
    loss_fn = AnytimeLoss(model.num_exits, weighting="adaloss")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, loss_fn, optimizer


def batch(data, step: int, batch_size: int):
    """The step's batch: a fixed shuffle per pass over the data, so it depends on the step only."""
    n = len(data)
    per_pass = n // batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step // per_pass))
    idx = order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size]
    return data[idx]


def train(model, loss_fn, optimizer, data, start: int, stop: int, batch_size: int, log: bool) -> list[float]:
    losses = []
    model.train()
    for step in range(start, stop):
        x, y = batch(data, step, batch_size)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and step % max(1, stop // 6) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  AdaLoss weights "
                  + " ".join(f"{w:.3f}" for w in loss_fn.weights.tolist()))
    return losses


def save(path: Path, model, loss_fn, optimizer, step: int) -> None:
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": torch.get_rng_state()}, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300, smoke 30)")
    p.add_argument("--out", type=Path, default=None, help="where the checkpoint goes (default: a temp dir)")
    args = p.parse_args(argv)
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE") == "1"
    steps = args.steps or (30 if smoke else 300)
    width, batch_size = (8, 32) if smoke else (16, 64)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name, data = load_data(limit_train=2000 if smoke else 20000)
    print(f"data: {name}; {steps} steps, checkpoint at step {steps // 2}")

    # 1. The uninterrupted run.
    model, loss_fn, optimizer = build(width)
    straight = train(model, loss_fn, optimizer, data.train, 0, steps, batch_size, log=True)
    final_model, final_loss = model.state_dict(), loss_fn.state_dict()

    # 2. The same run, stopped halfway and checkpointed ...
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.out or Path(tmp)) / "adaloss_checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        model, loss_fn, optimizer = build(width)
        first_half = train(model, loss_fn, optimizer, data.train, 0, steps // 2, batch_size, log=False)
        save(path, model, loss_fn, optimizer, steps // 2)
        del model, loss_fn, optimizer
        # ... then resumed in fresh objects (as a new process would).
        torch.manual_seed(1234)  # whatever the RNG holds now, the checkpoint restores it
        model, loss_fn, optimizer = build(width)
        ckpt = torch.load(path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {path.name} at step {ckpt['step']}; AdaLoss weights "
              + " ".join(f"{w:.3f}" for w in loss_fn.weights.tolist()))
        second_half = train(model, loss_fn, optimizer, data.train, ckpt["step"], steps, batch_size, log=False)

    assert first_half + second_half == straight, "per-step losses differ after resuming"
    print(f"CHECK per-step losses of the resumed run equal the uninterrupted run's ({steps} steps) ok")
    for key, value in model.state_dict().items():
        assert torch.equal(value, final_model[key]), key
    print("CHECK model parameters and buffers equal bit for bit ok")
    for key, value in loss_fn.state_dict().items():
        torch.testing.assert_close(value, final_loss[key], rtol=0, atol=0, equal_nan=True, msg=key)
    print("CHECK AdaLoss state (running averages, weights, step) equal bit for bit ok")
    print("final AdaLoss weights " + " ".join(f"{w:.3f}" for w in loss_fn.weights.tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
