"""Train an early-exit LM with FSDP2 (``fully_shard``) and the fused ``AnytimeLinearLoss``:
2 processes, gloo on CPU (< 1 min).

``AnytimeLinearLoss`` reads the LM head's weight itself, outside the head's own forward;
under FSDP2 that weight is a sharded DTensor there. ``EarlyExitLMObjective`` (model + loss
as one module) is the fix: ``fully_shard`` it as the root, and its forward runs with the
root group unsharded and gathers a separately sharded head with ``head.unshard()``
(FSDP2 reduce-scatters that head's gradient at the end of backward).

Here the head is tied to the token embedding, so both sit in one FSDP group
(``fully_shard([stage 0, head])``); every other stage is its own group.

    python python/fsdp2_early_exit_lm.py [--steps 20] [--smoke]

Checks (``CHECK ... ok``): the first step's loss and gradients equal one process's on the
same global batch; a sharded head read outside the objective raises a clear error; the
loss goes down; the ranks' parameters stay identical.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ann_kernels.losses.linear_loss import AnytimeLinearLoss
from ann_kernels.losses.lm_objective import EarlyExitLMObjective
from ann_kernels.nn.causal_lm import causal_exit_lm
from ann_kernels.train.distributed import launch

VOCAB, SEQ, GLOBAL_BATCH = 256, 32, 16


def build():
    torch.manual_seed(0)
    model = causal_exit_lm(VOCAB, dim=32, layers=3, heads=2, max_len=SEQ)  # an exit per layer, tied head
    loss_fn = AnytimeLinearLoss(model.lm_heads[0], model.num_exits, "layerskip", scale="sum",
                                exit_layers=model.exit_layers, num_layers=model.num_layers)
    return model, EarlyExitLMObjective(model, loss_fn)


def batches(steps: int):
    """A learnable token stream (each token = previous + 1 mod V, with noise)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        x = (start + torch.arange(SEQ + 1)) % VOCAB
        noise = torch.rand(x.shape, generator=g) < 0.1
        x = torch.where(noise, torch.randint(0, VOCAB, x.shape, generator=g), x)
        yield x[:, :-1], x[:, 1:]


def worker(rank: int, world: int, steps: int) -> None:
    from torch.distributed.fsdp import fully_shard

    # One process on the global batch: the reference for step 1.
    ref_model, ref_objective = build()
    x0, y0 = next(batches(1))
    ref_loss = ref_objective(x0, y0)
    ref_loss.backward()

    model, objective = build()
    fully_shard([model.stages[0], model.lm_heads[0]])  # the tied embedding + head: one group
    for stage in model.stages[1:]:
        fully_shard(stage)
    fully_shard(objective)  # the root: its forward runs the whole early-exit loss
    try:
        objective.loss_fn([torch.zeros(1, 32)] * model.num_exits, torch.zeros(1, dtype=torch.long))
        raise AssertionError("a sharded head outside the objective should raise")
    except RuntimeError as e:
        assert "DTensor" in str(e), e
    if rank == 0:
        print("CHECK reading the sharded head outside the objective raises a clear error ok")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, (x, y) in enumerate(batches(steps)):
        loss = objective(x.chunk(world)[rank], y.chunk(world)[rank])  # this rank's half
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= world
        if step == 0:
            assert torch.allclose(mean, ref_loss, atol=1e-5), (mean, ref_loss)
            for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
                assert torch.allclose(p.grad.full_tensor(), ref_p.grad, atol=1e-5), name
            if rank == 0:
                print(f"CHECK step 1: loss {mean.item():.4f} and every gradient equal one process on the global "
                      f"batch ({ref_loss.item():.4f}) ok")
        opt.step()
        losses.append(mean.item())
        if rank == 0 and (step + 1) % max(1, steps // 4) == 0:
            print(f"step {step + 1:3d}  loss {mean.item():.3f}  exit losses (rank 0) "
                  + " ".join(f"{v:.2f}" for v in objective.loss_fn.last_per_exit.tolist()))
    assert losses[-1] < losses[0], losses
    full = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
    same = full.clone()
    dist.broadcast(same, 0)
    assert torch.equal(full, same)
    if rank == 0:
        print(f"CHECK loss went down ({losses[0]:.3f} -> {losses[-1]:.3f}) ok")
        print("CHECK the ranks' gathered parameters are identical ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a few steps (CI)")
    args = parser.parse_args()
    if args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE"):
        args.steps = min(args.steps, 6)
    print(f"FSDP2: 2 gloo processes, global batch {GLOBAL_BATCH} x {SEQ} tokens split between them")
    launch(worker, 2, args.steps)


if __name__ == "__main__":
    main()
