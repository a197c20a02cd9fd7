"""EANN: a sequence of anytime networks of growing cost (each ~``growth`` times the previous,
each restarting from the input). Build one, train its members briefly, and ask it for an
anytime prediction under per-sample FLOP budgets and a wall-clock deadline.

``eann(resann, M, growth=2.0, example_input=x, **kwargs)`` grows the builder's scale (for
ResANN: the number of exits, i.e. depth) until the measured member costs grow by ~2;
``seq.anytime_predict(x, budget=B)`` returns the prediction of the latest sequence exit whose
cumulative cost (every earlier member in full, then this member up to the exit) is <= B.

Checks (printed as ``CHECK ... ok``): the measured cost ratios are close to ``growth``; each
budget returns the latest exit that fits it, with that exit's own prediction; a generous
deadline reaches the last exit.

    python python/eann.py [--smoke] [--epochs N]

``--smoke`` (or ANN_EXAMPLES_SMOKE=1): a few seconds, for CI.
"""

from __future__ import annotations

import argparse
import os

import torch

from ann_kernels import AnytimeLoss, eann
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
    p.add_argument("--epochs", type=int, default=None, help="epochs per member (default 1)")
    args = p.parse_args(argv)
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE") == "1"
    epochs = args.epochs or 1
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name, data = load_data(limit_train=1000 if smoke else 10000, limit_eval=300 if smoke else 2000)
    x_test, y_test = data.test.tensors

    # 1. Build: 3 members, each ~2x the cost of the previous (measured with FlopCounterMode).
    seed_everything(0)
    seq = eann(resann, 3, growth=2.0, example_input=x_test[:1], width=4 if smoke else 8, num_exits=2)
    ratios = seq.cost_ratios(x_test[:1]).tolist()
    print(f"data: {name}; members' {seq.build_info.scale}: {list(seq.build_info.values)}; "
          f"cost ratios {[round(r, 2) for r in ratios]}")
    assert all(1.5 <= r <= 2.7 for r in ratios), ratios
    print("CHECK member cost ratios are ~2 ok")

    # 2. Train each member (any weighting; CONST here, the EANN paper's SIEVE is "sieve").
    for j, member in enumerate(seq.members):
        trainer = Trainer(member, AnytimeLoss(member.num_exits, weighting="const"), data.train,
                          config=TrainConfig(epochs=epochs, batch_size=64, lr=0.1, seed=j, progress=not smoke))
        trainer.fit()
    seq.eval()

    # 3. Anytime prediction under budgets: the latest sequence exit that fits.
    costs = seq.exit_flops(x_test[:1])
    print("cumulative MFLOPs per image of the sequence exits (FLOPs = 2 x MACs): "
          + " ".join(f"{c / 1e6:.2f}" for c in costs.tolist()))
    for g in range(seq.num_exits):
        budget = float(costs[g]) if g == seq.num_exits - 1 else 0.5 * float(costs[g] + costs[g + 1])
        result = seq.anytime_predict(x_test, budget=budget)
        assert result.exit_index == g, (g, result.exit_index)
        with torch.inference_mode():
            own = seq.forward_exit(g, x_test).argmax(1)
        assert torch.equal(result.prediction, own)
        acc = (result.prediction == y_test).double().mean().item()
        print(f"budget {budget / 1e6:6.2f} MFLOPs -> exit {g} (member {result.member}, exit {result.member_exit}): "
              f"test accuracy {100 * acc:.1f}%")
    print("CHECK each budget returns the latest exit that fits, with that exit's prediction ok")
    result = seq.anytime_predict(x_test[:64], deadline_s=60.0)
    assert result.exit_index == seq.num_exits - 1 and result.deadline_met, result
    print(f"deadline 60 s: all {result.exits_finished} exits finished in {result.seconds * 1e3:.1f} ms")
    print("CHECK a generous deadline reaches the last exit ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
