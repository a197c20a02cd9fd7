"""Argument checks and input adapters shared by the inference and sequence engines and the
server: every error names the argument and the bad value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["as_float_list", "check_positive_int", "check_seconds", "labelled_batches"]


def as_float_list(values, name: str) -> list[float]:
    """Floats of a list / tuple / 1-D tensor (a fast path: predict() runs this per call)."""
    if isinstance(values, (list, tuple)):
        try:
            return list(map(float, values))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}: expected numbers, got {list(values)!r}") from error
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(values.shape)}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name}: expected a sequence of numbers or a 1-D tensor, got {type(values).__name__}"
        )
    return as_float_list(list(values), name)


def labelled_batches(data, targets, batch_size: int):
    """(x, y) batches from a tensor + targets, a Dataset of pairs, or an iterable of pairs."""
    if isinstance(data, torch.Tensor):
        if targets is None:
            raise ValueError("targets: required when data is a tensor of inputs")
        targets = torch.as_tensor(targets)
        if targets.shape != (data.shape[0],):
            raise ValueError(
                f"targets: expected shape [{data.shape[0]}] (one label per input), got {tuple(targets.shape)}"
            )
        return (
            (data[i : i + batch_size], targets[i : i + batch_size])
            for i in range(0, data.shape[0], batch_size)
        )
    if targets is not None:
        raise ValueError("targets: only with a tensor of inputs; datasets and loaders carry their labels")
    if isinstance(data, Dataset):
        return iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(
        f"data: expected a tensor, a Dataset or an iterable of (x, y) batches, got {type(data).__name__}"
    )


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (bool excluded), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_seconds(value, name: str, *, allow_none: bool) -> float | None:
    """Finite seconds >= 0 as a float (None passes when ``allow_none``), else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name}: expected finite seconds >= 0{' or None' if allow_none else ''}, got {value!r}")
    return float(value)
