"""Build a training run from a JSON-able *spec* and rebuild its model from a checkpoint.

A spec says everything about a run except the optimiser settings (``TrainConfig``)::

    {"dataset": "fashion-mnist", "data_dir": None, "limit_train": 20000, "limit_eval": None,
     "val_size": 5000, "model": "resann", "model_kwargs": {"num_exits": 6},
     "weighting": "adaloss", "weighting_kwargs": {}, "label_smoothing": 0.0, "seed": 0}

It is stored in every checkpoint, so ``ann-kernels eval --checkpoint`` needs nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ann_kernels.train.data import DEFAULT_VAL_SIZE, DataSplits, load_splits
from ann_kernels.train.trainer import TrainConfig, Trainer, load_checkpoint_file, seed_everything

MODELS = ("resann", "msdnet", "transformer", "mlp")
DATASET_CHOICES = ("fashion-mnist", "mnist", "synthetic")


def make_spec(
    *,
    dataset: str = "fashion-mnist",
    model: str = "resann",
    weighting: str = "adaloss",
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    val_size: int = DEFAULT_VAL_SIZE,
    model_kwargs: dict | None = None,
    weighting_kwargs: dict | None = None,
    label_smoothing: float = 0.0,
) -> dict:
    """A validated run spec (see the module docstring)."""
    if dataset not in DATASET_CHOICES:
        raise ValueError(f"dataset: expected one of {DATASET_CHOICES}, got {dataset!r}")
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    return {
        "dataset": dataset, "data_dir": str(data_dir) if data_dir is not None else None,
        "limit_train": limit_train, "limit_eval": limit_eval, "val_size": val_size,
        "model": model, "model_kwargs": dict(model_kwargs or {}),
        "weighting": weighting, "weighting_kwargs": dict(weighting_kwargs or {}),
        "label_smoothing": label_smoothing, "seed": seed,
    }


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> torch.nn.Module:
    """A ``MultiExitNetwork`` from :mod:`ann_kernels.nn` for inputs ``[N, *input_shape]``
    (``input_shape = (C, H, W)``); ``kwargs`` go to the builder (e.g. ``num_exits``, ``width``)."""
    from ann_kernels import nn as ann_nn

    c, h, _ = input_shape
    if name == "resann":
        return ann_nn.resann(num_classes=num_classes, in_channels=c, image_size=h, **kwargs)
    if name == "msdnet":
        return ann_nn.msdnet(num_classes=num_classes, in_channels=c, image_size=h, **kwargs)
    if name == "transformer":
        return ann_nn.exit_transformer(num_classes=num_classes, in_channels=c, image_size=h, **kwargs)
    if name == "mlp":
        n_in = 1
        for d in input_shape:
            n_in *= d
        return ann_nn.mlp_ann(in_features=n_in, num_classes=num_classes, **kwargs)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")


def build_loss(spec: dict, num_exits: int) -> torch.nn.Module:
    """``AnytimeLoss(num_exits, weighting=spec["weighting"], ...)``."""
    from ann_kernels.losses import AnytimeLoss

    return AnytimeLoss(num_exits, weighting=spec["weighting"], label_smoothing=spec.get("label_smoothing", 0.0),
                       **spec.get("weighting_kwargs", {}))


def load_data(spec: dict, *, data_dir: str | os.PathLike | None = None, limit_eval: int | None = None) -> DataSplits:
    """The splits a run spec describes; ``data_dir`` / ``limit_eval`` (when not None) override
    the spec's, as ``eval`` and ``calibrate`` allow on the command line."""
    return load_splits(spec["dataset"], data_dir if data_dir is not None else spec.get("data_dir"),
                       val_size=spec.get("val_size", DEFAULT_VAL_SIZE), limit_train=spec.get("limit_train"),
                       limit_eval=limit_eval if limit_eval is not None else spec.get("limit_eval"),
                       seed=spec.get("seed", 0))


def build_trainer(
    spec: dict,
    config: TrainConfig,
    out_dir: str | os.PathLike | None,
    *,
    resume: bool = False,
    data: DataSplits | None = None,
    label: str | None = None,
) -> Trainer:
    """Seed everything with ``config.seed``, load the data, build model + loss, return a
    :class:`Trainer` (resumed from ``out_dir/last.pt`` when ``resume`` and it exists)."""
    data = data if data is not None else load_data(spec)
    seed_everything(config.seed)
    model = build_model(spec["model"], data.num_classes, data.input_shape, **spec["model_kwargs"])
    loss_fn = build_loss(spec, model.num_exits)
    spec = {**spec, "num_classes": data.num_classes, "input_shape": list(data.input_shape)}
    return Trainer(model, loss_fn, data.train, val_set=data.val, test_set=data.test, config=config,
                   out_dir=out_dir, spec=spec, resume=resume, label=label or spec["weighting"])


def load_trained(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict, dict]:
    """``(model in eval mode, spec, checkpoint dict)`` from a ``last.pt``."""
    ckpt = load_checkpoint_file(checkpoint)
    spec = ckpt["spec"]
    for key in ("model", "num_classes", "input_shape"):
        if key not in spec:
            raise ValueError(f"checkpoint: {checkpoint} has no {key!r} in its spec; it was not written by "
                             "ann-kernels train")
    model = build_model(spec["model"], spec["num_classes"], tuple(spec["input_shape"]), **spec["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, spec, ckpt


# TrainConfig fields that do not change what is trained (display and evaluation only).
_NON_TRAINING_FIELDS = frozenset({"progress", "progress_position", "log_every", "eval_batch_size", "num_workers"})
# Spec keys added by build_trainer (derived from the data).
_DERIVED_SPEC_KEYS = frozenset({"num_classes", "input_shape"})


def _training_settings(config: dict) -> dict:
    return {k: v for k, v in TrainConfig.from_dict(config).__dict__.items() if k not in _NON_TRAINING_FIELDS}


def run_dir_complete(out_dir: str | os.PathLike, config: TrainConfig, spec: dict | None = None) -> bool:
    """True iff ``out_dir/last.pt`` exists, finished ``config.epochs`` epochs and was trained
    with the same settings: every ``TrainConfig`` field that affects training (all but
    progress / logging / evaluation batch size / workers) and, when ``spec`` is given, the
    same run spec (dataset, model, weighting and their options, seed, ...). A run with the
    same epoch count but another learning rate, weighting option or model is *not* reused."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig (the epoch count alone cannot tell whether a run "
                        f"can be reused), got {type(config).__name__}")
    path = Path(out_dir) / "last.pt"
    if not path.is_file():
        return False
    ckpt = load_checkpoint_file(path)
    if ckpt["epoch"] != config.epochs or _training_settings(ckpt["config"]) != _training_settings(config.__dict__):
        return False
    if spec is not None:
        saved = {k: v for k, v in (ckpt.get("spec") or {}).items() if k not in _DERIVED_SPEC_KEYS}
        if saved != {k: v for k, v in spec.items() if k not in _DERIVED_SPEC_KEYS}:
            return False
    return True
