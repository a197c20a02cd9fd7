"""Loading of the compiled extension ``ann_kernels._C`` and the fallback policy.

``HAS_CPP_EXT`` tells whether the extension loaded. Without it every op runs through its
pure-torch reference, and the first such call warns once. With
``ANN_KERNELS_REQUIRE_EXT=1`` (set in CI) a missing extension is an ImportError instead.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

HAS_CPP_EXT = False
EXT_IMPORT_ERROR: BaseException | None = None

import torch  # noqa: E402,F401  (first: loads libc10 / libtorch, which _C links against)

from ann_kernels import _compat  # noqa: E402,F401  (warns once on a torch older than supported)

try:
    from ann_kernels import _C  # noqa: F401  (registers the torch.ops.ann_kernels.* ops)

    HAS_CPP_EXT = True
except ImportError as error:  # pragma: no cover - depends on the build
    EXT_IMPORT_ERROR = error
    if os.environ.get("ANN_KERNELS_REQUIRE_EXT", "0") not in ("", "0"):
        raise ImportError(
            "ANN_KERNELS_REQUIRE_EXT=1 but the C++ extension ann_kernels._C failed to load "
            f"({error}); build it with `pip install --no-build-isolation -e .`"
        ) from error

# Found, not imported: importing triton here would fix its mode before a test sets
# TRITON_INTERPRET=1 (the interpreter is chosen when triton's modules load).
HAS_TRITON = importlib.util.find_spec("triton") is not None

_warned: set[str] = set()


def warn_fallback(op_name: str, reason: str) -> None:
    """Warn once per (op, reason) that ``op_name`` runs through its pure-torch reference."""
    key = f"{op_name}:{reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"ann_kernels.{op_name}: {reason}; using the pure-torch reference implementation "
            "(correct but slower).",
            RuntimeWarning,
            stacklevel=3,
        )
