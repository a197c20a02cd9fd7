"""The anytime-network trainer: one model, one ``AnytimeLoss`` (any weighting scheme).

Per step: ``logits = model(x)`` (K tensors [B, C]; bf16 autocast optional), ``loss =
loss_fn(logits, y)`` (the fused multi-exit cross-entropy with the scheme's weights),
backward, optimiser step, per-step cosine learning rate. Under ``torch.distributed`` the
model is wrapped in DDP and, after every step, ``loss_fn.weighting.synchronize_()``
all-reduces the AdaLoss running averages so that every rank uses the same weights.

Per epoch: every exit's accuracy and loss on the validation and test sets, one line in
``metrics.jsonl`` and the checkpoint ``last.pt`` (everything needed to continue
bit-for-bit: model, loss state, optimiser, scheduler, epoch, step, torch / numpy / python
RNG states, the DataLoader's generator). At the end of :meth:`Trainer.fit`: two PNGs
(``anytime.png``, ``weights.png``).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ann_kernels.train.metrics import append_jsonl, evaluate_exits, format_flops, read_jsonl, truncate_jsonl
from ann_kernels.train.plots import plot_anytime, plot_weights
from ann_kernels.train.weight_decay import WEIGHT_DECAY_MODES, weight_decay_groups

CHECKPOINT_FORMAT = 1
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Hyper-parameters. ``lr`` / ``weight_decay`` default per optimiser (SGD: 0.05 / 5e-4;
    AdamW: 2e-3 / 0.05). ``batch_size`` is per process under DDP. ``channels_last``: NHWC
    activations (about 20% faster convolutions on CPU). ``progress_position``: tqdm row,
    for several runs side by side."""

    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    # "all": every parameter; "reference": the original AdaLoss code's groups (conv + FC
    # weights, FC decay times the exit's static weight, no BN): ann_kernels.train.weight_decay
    weight_decay_mode: str = "all"
    warmup_steps: int = 0
    grad_clip: float | None = None
    bf16: bool = False
    channels_last: bool = False
    gradient_equilibrium: bool = False  # IMTA's GE on the model (ann_kernels.nn.gradient_equilibrium)
    seed: int = 0
    eval_batch_size: int = 500
    num_workers: int = 0
    progress: bool = True
    progress_position: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = 0.05 if self.optimizer == "sgd" else 2e-3
        if self.weight_decay is None:
            self.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.05
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode: expected one of {WEIGHT_DECAY_MODES}, "
                             f"got {self.weight_decay_mode!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a value in [0, 1), got {self.momentum}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("warmup_steps / num_workers: expected >= 0, got "
                             f"{self.warmup_steps} / {self.num_workers}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_lambda(total_steps: int, warmup_steps: int = 0):
    """Per-step LR factor: linear warm-up to 1, then cosine from 1 to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return f


def _fmt_weights(w) -> str:
    return " ".join(f"{v:.2f}" for v in w)


class Trainer:
    """Train ``model`` (``forward(x [B, ...]) -> K logits [B, C]``) with ``loss_fn`` (an
    ``ann_kernels.AnytimeLoss``) on ``train_set`` of ``(x, y)`` pairs.

    ``out_dir``: where ``last.pt``, ``metrics.jsonl`` and the PNGs go (None: nothing is
    written). ``spec``: JSON-able description stored in the checkpoint so that
    ``ann-kernels eval`` can rebuild the model (name, builder kwargs, dataset, weighting).
    ``resume``: continue from ``out_dir/last.pt`` if it exists.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        train_set: Dataset,
        *,
        val_set: Dataset | None = None,
        test_set: Dataset | None = None,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        spec: dict | None = None,
        resume: bool = False,
        label: str | None = None,
    ):
        self.config = cfg = config or TrainConfig()
        self.model = model
        self.loss_fn = loss_fn
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.spec = dict(spec or {})
        self.label = label or str(self.spec.get("weighting", "run"))
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if len(train_set) < cfg.batch_size * self.world_size:
            raise ValueError(
                f"batch_size: {cfg.batch_size} (x {self.world_size} processes) is larger than the training "
                f"set ({len(train_set)} samples); lower --batch-size or use more data"
            )

        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = (
            DistributedSampler(train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                               seed=cfg.seed, drop_last=True)
            if self.distributed else None
        )
        self.loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            drop_last=True, num_workers=cfg.num_workers, generator=self.generator,
        )
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.gradient_equilibrium or getattr(self.weighting, "gradient_equilibrium", False):
            from ann_kernels.nn.gradient_equilibrium import enable_gradient_equilibrium

            enable_gradient_equilibrium(model)
        self.ddp_model = (
            torch.nn.parallel.DistributedDataParallel(model) if self.distributed else model
        )
        decay_weights = getattr(self.weighting, "decay_weights", None)
        groups = weight_decay_groups(model, cfg.weight_decay, cfg.weight_decay_mode,
                                     decay_weights() if decay_weights is not None else None)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                             nesterov=cfg.nesterov and cfg.momentum > 0)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(self.total_steps, cfg.warmup_steps)
        )
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.exit_flops = self._measure_flops()
        if resume and self.out_dir is not None and (self.out_dir / "last.pt").is_file():
            self.load_checkpoint(self.out_dir / "last.pt")
        elif self.out_dir is not None and self.is_main:
            truncate_jsonl(self.out_dir / "metrics.jsonl", 0)  # a fresh run: forget old metrics

    # ------------------------------------------------------------------ helpers

    def _measure_flops(self) -> list[float] | None:
        if not hasattr(self.model, "exit_flops"):
            return None
        example = self.train_set[0][0].unsqueeze(0)
        was_training = self.model.training
        self.model.eval()
        try:
            return [float(f) for f in self.model.exit_flops(example)]
        finally:
            self.model.train(was_training)

    @property
    def weighting(self):
        return getattr(self.loss_fn, "weighting", None)

    def _current_weights(self) -> list[float]:
        w = getattr(self.loss_fn, "weights", None)
        return [float(v) for v in w] if w is not None else []

    # ------------------------------------------------------------------ training

    def train_epoch(self) -> dict:
        """One pass over the training set; returns the epoch's training statistics."""
        cfg = self.config
        model, loss_fn = self.ddp_model, self.loss_fn
        model.train()
        loss_fn.train()
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        set_epoch = getattr(self.weighting, "set_epoch", None)
        if set_epoch is not None:  # epoch-dependent schedules (SDN)
            set_epoch(self.epoch, cfg.epochs)
        # Schemes that look at the model before each step (L2W's meta step).
        pre_step = loss_fn.pre_step if getattr(self.weighting, "needs_pre_step", False) else None
        phases = getattr(self.weighting, "phases", None) if pre_step is not None else None
        sync = getattr(self.weighting, "synchronize_", None) if self.distributed else None
        total, per_exit_sum, weight_sum, n = 0.0, None, None, 0
        trace_steps, trace_w = [], []
        n_steps = self.steps_per_epoch * (getattr(self.weighting, "num_phases", 1) if phases is not None else 1)
        bar = tqdm(_optimizer_steps(self.loader, phases), total=n_steps,
                   desc=f"[{self.label}] epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.is_main), leave=False, dynamic_ncols=True,
                   position=cfg.progress_position)
        for x, y, meta, batch_done in bar:
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if pre_step is not None:
                pre_step(self.model, self.optimizer, x, y, **({} if meta is None else {"meta": meta}))
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            loss = loss_fn(list(logits), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {self.step} (epoch {self.epoch + 1}); "
                    f"lower --lr (now {self.scheduler.get_last_lr()[0]:.3g}) or disable --bf16"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if batch_done:  # one LR step per batch (L2W-DEN: after both phases, as the original)
                self.scheduler.step()
            if sync is not None:
                sync()
            weights = self._current_weights()
            per_exit = getattr(loss_fn, "last_per_exit", None)
            total += loss.item()
            if per_exit is not None:
                pe = per_exit.detach().double()
                per_exit_sum = pe if per_exit_sum is None else per_exit_sum + pe
            if weights:
                wt = torch.tensor(weights, dtype=torch.float64)
                weight_sum = wt if weight_sum is None else weight_sum + wt
            n += 1
            if self.step % cfg.log_every == 0:
                trace_steps.append(self.step)
                trace_w.append(weights)
                bar.set_postfix_str(f"loss {loss.item():.3f}  w [{_fmt_weights(weights)}]", refresh=False)
            self.step += 1
        bar.close()
        return {
            "train_loss": total / max(n, 1),
            "train_exit_loss": (per_exit_sum / n).tolist() if per_exit_sum is not None else None,
            "weights": (weight_sum / n).tolist() if weight_sum is not None else None,
            "weights_last": self._current_weights(),
            "weights_trace": {"step": trace_steps, "weights": trace_w},
        }

    def evaluate(self, dataset: Dataset) -> dict[str, list[float]]:
        """``{"acc": [K], "loss": [K]}`` of every exit on ``dataset``."""
        return evaluate_exits(self.model, dataset, batch_size=self.config.eval_batch_size, bf16=self.config.bf16)

    def fit(self, until_epoch: int | None = None) -> list[dict]:
        """Train from the current epoch up to ``until_epoch`` (default: ``config.epochs``;
        a smaller value stops early, as an interrupted run would). Returns the history."""
        cfg = self.config
        stop = cfg.epochs if until_epoch is None else until_epoch
        if not 0 <= stop <= cfg.epochs:
            raise ValueError(f"until_epoch: expected 0..{cfg.epochs}, got {until_epoch}")
        while self.epoch < stop:
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1, "label": self.label}
            record.update(self.train_epoch())
            self.epoch += 1
            record["step"] = self.step
            record["lr"] = self.scheduler.get_last_lr()[0]
            record["train_time_s"] = time.perf_counter() - t0
            if self.is_main:
                for name, ds in (("val", self.val_set), ("test", self.test_set)):
                    if ds is not None:
                        res = self.evaluate(ds)
                        record[f"{name}_acc"], record[f"{name}_loss"] = res["acc"], res["loss"]
            record["exit_flops"] = self.exit_flops
            record["time_s"] = time.perf_counter() - t0
            self.history.append(record)
            if self.is_main:
                self._report(record)
                if self.out_dir is not None:
                    append_jsonl(self.out_dir / "metrics.jsonl", record)
                    self.save_checkpoint(self.out_dir / "last.pt")
        if self.is_main and self.out_dir is not None:
            self.write_plots()
        return self.history

    def _report(self, r: dict) -> None:
        if not self.config.progress:
            return
        parts = [f"[{self.label}] epoch {r['epoch']}/{self.config.epochs}", f"loss {r['train_loss']:.4f}"]
        for name in ("val", "test"):
            if f"{name}_acc" in r:
                parts.append(f"{name} acc/exit " + " ".join(f"{100 * a:.1f}" for a in r[f"{name}_acc"]))
        parts.append(f"{r['time_s']:.0f}s")
        tqdm.write("  ".join(parts))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit (see module docstring)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "spec": self.spec,
            "label": self.label,
            "config": asdict(self.config),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "exit_flops": self.exit_flops,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "loader": self.generator.get_state(),
            },
        }

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (same model / loss / config)."""
        ckpt = load_checkpoint_file(path)
        saved = TrainConfig.from_dict(ckpt["config"])
        for name in ("epochs", "batch_size", "optimizer", "seed"):
            if getattr(saved, name) != getattr(self.config, name):
                raise ValueError(
                    f"{path}: was trained with {name}={getattr(saved, name)!r} but this run has "
                    f"{name}={getattr(self.config, name)!r}; resuming needs the same settings"
                )
        self.model.load_state_dict(ckpt["model"])
        self.loss_fn.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["loader"])
        if self.out_dir is not None and (self.out_dir / "metrics.jsonl").is_file():
            truncate_jsonl(self.out_dir / "metrics.jsonl", self.epoch)
            self.history = read_jsonl(self.out_dir / "metrics.jsonl")
        if self.is_main and self.config.progress:
            tqdm.write(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    # ------------------------------------------------------------------ plots

    def write_plots(self) -> list[Path]:
        """``anytime.png`` (this run's per-exit accuracy vs FLOPs) and ``weights.png``."""
        out = []
        last = self.history[-1] if self.history else None
        if last is None or self.out_dir is None:
            return out
        acc_key = "test_acc" if "test_acc" in last else "val_acc" if "val_acc" in last else None
        if acc_key and self.exit_flops:
            split = acc_key.split("_")[0]
            out.append(plot_anytime({self.label: (self.exit_flops, last[acc_key])}, self.out_dir / "anytime.png",
                                    ylabel=f"{split} accuracy (%)",
                                    title=f"Anytime prediction, epoch {last['epoch']} "
                                          f"(final exit {format_flops(self.exit_flops[-1])}FLOPs)"))
        steps, weights = [], []
        for r in self.history:
            tr = r.get("weights_trace") or {}
            steps += tr.get("step", [])
            weights += tr.get("weights", [])
        if steps and weights[0]:
            out.append(plot_weights(steps, weights, self.out_dir / "weights.png",
                                    title=f"Loss weights over training ({self.label})"))
        return out


def _optimizer_steps(loader, phases=None):
    """``(x, y, meta, batch_done)`` per optimiser step: one per batch of ``loader``, or with
    ``phases`` (L2W-DEN's :meth:`~ann_kernels.losses.L2W.phases`) one per phase of each batch,
    ``(x, y)`` the phase's train half and ``meta`` its meta half (LeapLabTHU/L2W-DEN,
    ``tools/main_cifar_DDP.py`` ``train()``: part 1 A->B, then part 2 B->A)."""
    for x, y in loader:
        parts = [((x, y), None)] if phases is None else phases(x, y)
        for i, ((xs, ys), meta) in enumerate(parts):
            yield xs, ys, meta, i == len(parts) - 1


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Read a ``last.pt``; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist (train first: ann-kernels train --out DIR)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {path} is not an ann_kernels training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt
