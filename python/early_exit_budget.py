"""Budgeted early exit: train an anytime network briefly, calibrate per-exit confidence
thresholds on a held-out split for a target mean cost, then run per-sample early exit on
the test split.

``EarlyExitEngine(model).calibrate(val)`` records every exit's confidence and correctness on
held-out data (never the test split); ``engine.predict(x, budget=B)`` then picks MSDNet-style
thresholds whose held-out mean cost is <= B FLOPs per sample, and runs the network stage by
stage on the still-active samples only: a sample leaves at the first exit whose confidence
clears that exit's threshold.

Checks (printed as ``CHECK ... ok``): every calibrated plan's held-out mean cost is within
its budget; each test prediction is the full network's prediction at the exit the sample
took; the reported mean cost is the mean of the exits' costs over the samples.

    python python/early_exit_budget.py [--smoke] [--epochs N]

``--smoke`` (or ANN_EXAMPLES_SMOKE=1): a few seconds, for CI.
"""

from __future__ import annotations

import argparse
import os

import torch

from ann_kernels import AnytimeLoss, EarlyExitEngine
from ann_kernels.nn import resann
from ann_kernels.train import TrainConfig, Trainer, load_splits, seed_everything


def load_data(limit_train: int, limit_eval: int):
    """Fashion-MNIST if its files are installed, else the synthetic stand-in."""
    try:
        return "fashion-mnist", load_splits("fashion-mnist", limit_train=limit_train, limit_eval=limit_eval)
    except FileNotFoundError:
        return "synthetic", load_splits("synthetic", limit_train=limit_train, limit_eval=limit_eval)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 2, smoke 1)")
    args = p.parse_args(argv)
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE") == "1"
    epochs = args.epochs or (1 if smoke else 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name, data = load_data(limit_train=1500 if smoke else 10000, limit_eval=500 if smoke else 5000)
    print(f"data: {name}: {len(data.train)} train, {len(data.val)} validation (calibration), "
          f"{len(data.test)} test images")

    # 1. Train (any weighting scheme; CONST here).
    seed_everything(0)
    model = resann(num_exits=5, width=8 if smoke else 16)
    trainer = Trainer(model, AnytimeLoss(model.num_exits, weighting="const"), data.train, test_set=data.test,
                      config=TrainConfig(epochs=epochs, batch_size=64, lr=0.1, progress=not smoke))
    history = trainer.fit()
    print("test accuracy per exit: " + " ".join(f"{100 * a:.1f}%" for a in history[-1]["test_acc"]))

    # 2. Calibrate on the validation split.
    engine = EarlyExitEngine(model)  # criterion: max softmax probability
    x_test, y_test = data.test.tensors
    engine.calibrate(data.val)
    flops = engine.exit_flops(x_test[:1])
    full = float(flops[-1])
    print("cost to reach each exit (MFLOPs per image; FLOPs = 2 x MACs): "
          + " ".join(f"{f / 1e6:.2f}" for f in flops.tolist()))

    # 3. Budgeted early exit on the test split.
    with torch.inference_mode():
        all_logits = model(x_test)  # for the consistency check only
    print(f"{'budget':>8} {'val acc':>8} {'val cost':>9} {'test acc':>9} {'test cost':>10}  samples per exit")
    for fraction in (0.3, 0.5, 0.7, 1.0):
        budget = max(fraction * full, float(flops[0]))
        plan = engine.calibrate_budget(budget)
        assert plan.mean_flops <= budget * (1 + 1e-9), (plan.mean_flops, budget)
        result = engine.predict(x_test, budget=budget)
        acc = (result.prediction == y_test).double().mean().item()
        at_exit = torch.stack(all_logits).argmax(-1)[result.exit_index, torch.arange(len(y_test))]
        agree = (at_exit == result.prediction).double().mean().item()
        assert agree >= 0.999, agree  # a one-in-a-thousand near-tie may round differently on a sub-batch
        mean_cost = flops[result.exit_index].mean().item()
        assert abs(mean_cost - result.stats.mean_flops) <= 1e-6 * full, (mean_cost, result.stats.mean_flops)
        print(f"{fraction:8.2f} {100 * plan.accuracy:7.2f}% {plan.mean_flops / full:9.2f} {100 * acc:8.2f}% "
              f"{result.stats.mean_flops / full:10.2f}  {list(result.stats.samples_per_exit)}")
    print("CHECK every plan's validation cost is within its budget ok")
    print("CHECK each test prediction is the network's prediction at the exit taken ok")
    print("CHECK the reported mean cost is the mean cost of the exits taken ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
