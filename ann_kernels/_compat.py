"""The one guarded spot for differences between the torch releases ann_kernels supports
(2.11 through 2.13 at run time; CI pins 2.13, ``make gpu-check`` exercises a GPU machine's
own, older torch; the CUDA build check builds against 2.14).

What the package uses beyond torch's long-stable public API, and how each is guarded:

- ``torch._C._dispatch_has_kernel_for_dispatch_key`` (private; has the compiled op a kernel
  for a dispatch key): :func:`has_kernel_for`, which answers False instead of raising when
  the op is not registered at all, and survives a rename by falling back to
  ``torch._C._dispatch_dump`` text;
- ``torch.compiler.is_compiling`` (``torch._dynamo.is_compiling`` before 2.3, deprecated
  after): :func:`is_compiling`;
- ``torch.library.register_fake`` / ``get_ctx().new_dynamic_size()`` (2.4+; the older
  ``impl_abstract`` / ``create_unbacked_symint``): :func:`register_fake`,
  :func:`new_dynamic_size`;
- ``torch._prims_common.suggest_memory_format`` (private; the Python twin of C++'s
  ``Tensor::suggest_memory_format``): :func:`suggest_memory_format`, with a stride-order
  fallback;
- the C++ standard of the extension: torch <= 2.13's headers need C++17, 2.14's need C++20;
  setup.py passes no ``-std`` so torch's BuildExtension chooses (not a run-time matter).

:data:`TORCH_VERSION` is the running torch's (major, minor); :data:`MIN_TORCH` the oldest
supported. An older torch gets one warning at import, not an error: most of the package may
still work. Add any new version-dependent call here, never as a scattered ``hasattr``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch

MIN_TORCH = (2, 11)


def _parse_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"torch.__version__: cannot parse {version!r}")
    return int(match.group(1)), int(match.group(2))


TORCH_VERSION = _parse_version(torch.__version__)

if TORCH_VERSION < MIN_TORCH:  # pragma: no cover - depends on the installed torch
    warnings.warn(
        f"ann_kernels supports torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}; found {torch.__version__}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel_for(op_name: str, dispatch_key: str) -> bool:
    """True when ``op_name`` ("namespace::name") has a kernel registered for
    ``dispatch_key`` ("CPU", "CUDA"); False when it has none or is not registered at all."""
    query = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if query is not None:
        try:
            return bool(query(op_name, dispatch_key))
        except RuntimeError:  # the op itself is not registered (the extension did not load)
            return False
    try:  # pragma: no cover - only if the private query is renamed
        dump = torch._C._dispatch_dump(op_name)
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False
    return re.search(rf"^{re.escape(dispatch_key)}\s*:", dump, re.M) is not None  # pragma: no cover


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the calling code."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())  # pragma: no cover - torch < 2.3


def register_fake(op_name: str) -> Callable[[Callable], Callable]:
    """``torch.library.register_fake(op_name)`` (``impl_abstract`` on torch < 2.4)."""
    library = torch.library
    if hasattr(library, "register_fake"):
        return library.register_fake(op_name)
    return library.impl_abstract(op_name)  # pragma: no cover - torch < 2.4


def new_dynamic_size() -> torch.SymInt:
    """A new data-dependent size inside a fake kernel (``get_ctx().new_dynamic_size()``)."""
    ctx = torch.library.get_ctx()
    if hasattr(ctx, "new_dynamic_size"):
        return ctx.new_dynamic_size()
    return ctx.create_unbacked_symint()  # pragma: no cover - torch < 2.4


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format C++'s ``Tensor::suggest_memory_format`` picks for ``t``:
    channels_last(_3d) when its strides order like one, else contiguous_format."""
    try:
        from torch._prims_common import suggest_memory_format as suggest
    except ImportError:  # pragma: no cover - only if the private helper moves
        suggest = None
    if suggest is not None:
        return suggest(t)
    if t.dim() in (4, 5) and t.stride(1) == 1 and t.shape[1] > 1:  # pragma: no cover
        return torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format  # pragma: no cover
