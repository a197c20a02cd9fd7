"""Two local processes (DDP, gloo): every rank ends with the same AdaLoss weights and the
same parameters, although each rank trains on a different shard of the data."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from ann_kernels.train.distributed import all_equal, launch


def _worker(rank: int, world_size: int, out_path: str) -> None:
    from ann_kernels.losses import AnytimeLoss
    from ann_kernels.nn import mlp_ann
    from ann_kernels.train import TrainConfig, Trainer, load_splits, seed_everything

    data = load_splits("synthetic", limit_train=320, limit_eval=40, seed=0)
    # Different initial parameters per rank: DDP must broadcast rank 0's.
    seed_everything(rank)
    model = mlp_ann(in_features=784, hidden=16, num_exits=3)
    loss = AnytimeLoss(3, weighting="adaloss", update_every=2)  # an update within the 4 steps (default 100)
    trainer = Trainer(model, loss, data.train, val_set=data.val, config=TrainConfig(
        epochs=1, batch_size=40, seed=0, progress=False, lr=0.05))
    assert trainer.distributed and trainer.world_size == world_size
    seen = []
    orig_forward = loss.forward

    def recording_forward(logits, target):
        out = orig_forward(logits, target)
        seen.append(loss.last_per_exit.clone())  # this rank's own per-exit losses
        return out

    loss.forward = recording_forward
    trainer.fit()
    per_rank_losses = torch.stack(seen)
    report = {
        "steps": trainer.step,
        "params_equal": all(all_equal(p) for p in model.parameters()),
        "ema_equal": all_equal(loss.weighting.ema),
        "weights_equal": all_equal(torch.as_tensor(loss.weights, dtype=torch.float32)),
        "losses_equal": all_equal(per_rank_losses),
        "weights": [float(w) for w in loss.weights],
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_ddp_ranks_stay_identical(tmp_path):
    out = tmp_path / "report.json"
    launch(_worker, 2, str(out))
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for r in reports:
        assert r["steps"] == 4  # 320 images / 2 ranks / batch 40
        assert r["params_equal"], "parameters diverged between ranks"
        assert r["ema_equal"], "AdaLoss running averages differ between ranks"
        assert r["weights_equal"], "AdaLoss weights differ between ranks"
        # The ranks saw different data (so the synchronisation above is doing the work).
        assert not r["losses_equal"]
    assert reports[0]["weights"] == reports[1]["weights"]
    assert max(reports[0]["weights"]) != min(reports[0]["weights"])
