"""Argument validation shared by the model builders."""

from __future__ import annotations


def check_positive_ints(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
