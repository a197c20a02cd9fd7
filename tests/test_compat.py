"""ann_kernels/_compat.py: the version-dependent shims work on the installed torch, and the
guarded fallbacks answer sensibly (an op that is not registered, a missing private query)."""

from __future__ import annotations

import pytest
import torch

import ann_kernels
from ann_kernels import _compat


def test_version_parse_and_minimum():
    assert _compat._parse_version("2.11.0+cu130") == (2, 11)
    assert _compat._parse_version("2.13.0a0+git1234") == (2, 13)
    with pytest.raises(ValueError, match="torch.__version__"):
        _compat._parse_version("nightly")
    assert _compat.TORCH_VERSION >= _compat.MIN_TORCH


def test_has_kernel_for():
    assert _compat.has_kernel_for("aten::add.Tensor", "CPU")
    assert not _compat.has_kernel_for("ann_kernels::no_such_op", "CPU")  # not registered: False, no raise
    if ann_kernels.HAS_CPP_EXT:
        assert _compat.has_kernel_for("ann_kernels::early_exit_step", "CPU")


def test_is_compiling_inside_and_outside_torch_compile():
    assert _compat.is_compiling() is False
    seen = []

    def probe(x):
        seen.append(_compat.is_compiling())
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.ones(2))
    assert seen and seen[0] is True


def test_register_fake_and_new_dynamic_size(tmp_path):
    lib = torch.library.Library("ann_kernels_compat_test", "FRAGMENT")  # noqa: TOR901
    lib.define("nonzero_rows(Tensor x) -> Tensor")
    lib.impl("nonzero_rows", lambda x: x.nonzero()[:, 0], "CPU")

    @_compat.register_fake("ann_kernels_compat_test::nonzero_rows")
    def _fake(x):
        return x.new_empty(_compat.new_dynamic_size(), dtype=torch.int64)

    x = torch.tensor([0.0, 1.0, 0.0, 2.0])
    assert torch.ops.ann_kernels_compat_test.nonzero_rows(x).tolist() == [1, 3]
    torch.library.opcheck(torch.ops.ann_kernels_compat_test.nonzero_rows.default, (x,))


def test_version_dependent_apis_only_through_compat():
    """The one guarded spot: no module but _compat calls the APIs that differ across torch
    2.11-2.13 directly (a direct call is how a version break would slip back in)."""
    import pathlib

    package = pathlib.Path(ann_kernels.__file__).parent
    guarded = ("torch.compiler.is_compiling(", "torch.library.register_fake(", "torch._dynamo.is_compiling(",
               "torch.library.impl_abstract(", "get_ctx().new_dynamic_size(", "get_ctx().create_unbacked_symint(")
    offenders = [f"{path.relative_to(package)}: {api}" for path in sorted(package.rglob("*.py"))
                 if path.name != "_compat.py" for api in guarded if api in path.read_text()]
    assert not offenders, offenders
