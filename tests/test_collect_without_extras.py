"""Every test module collects on a machine that has only torch, triton, numpy, pytest,
hypothesis and tqdm (the GPU machine of `make gpu-check`, /work/shared/DESIGN.md "GPU"; issue
22, item 4). The optional packages (every other package pyproject.toml names, plus the
web-stack packages they bring, STACK_EXTRAS) are hidden in a fresh interpreter by wrapping the
import finders, so ``import fastapi`` raises ModuleNotFoundError and
``importlib.util.find_spec("fastapi")`` is None there, as on a machine without it.

The pattern a test module that needs an optional package must follow (at module top, before
importing anything that imports the package):

    fastapi = pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install .[serve])")

This test reads pyproject.toml, so a new extra is hidden without editing it here.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.utils import run_python_with_packages_hidden

tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib (pyproject.toml is read with it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_MACHINE_PACKAGES = {"torch", "triton", "numpy", "pytest", "hypothesis", "tqdm"}
BUILD_ONLY = {"setuptools", "wheel", "ninja", "pybind11"}  # not imported by tests or the package
# Import names that differ from their distribution's name, and what the extras pull in that a
# test might import directly.
IMPORT_NAMES = {"ray": "ray", "tritonclient": "tritonclient", "prometheus-client": "prometheus_client"}
STACK_EXTRAS = {"starlette", "httpx", "anyio", "uvicorn", "huggingface_hub", "safetensors", "aiohttp", "grpc",
                "liger_kernel"}

COLLECT = r'''
try:
    import fastapi  # noqa: F401
except ModuleNotFoundError:
    print("HIDING WORKS")
import pytest

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"]))
'''


def hidden_packages() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    requirements = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        requirements += group
    names = set()
    for requirement in requirements:
        dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return (names | STACK_EXTRAS) - GPU_MACHINE_PACKAGES - BUILD_ONLY


def test_hidden_set_covers_the_extras():
    hidden = hidden_packages()
    for name in ("fastapi", "transformers", "openai", "tritonclient", "ray", "prometheus_client", "matplotlib",
                 "tokenizers", "uvicorn"):
        assert name in hidden
    assert not hidden & GPU_MACHINE_PACKAGES


def test_every_test_module_collects_with_the_extras_hidden():
    done = run_python_with_packages_hidden(COLLECT, hidden_packages())
    output = done.stdout + done.stderr
    assert "HIDING WORKS" in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("ERROR ")]
    assert done.returncode == 0 and not errors, (
        "test modules that do not collect without the optional packages (use pytest.importorskip at module "
        f"top): {errors}\n" + output[-3000:])
    assert re.search(r"\d+ tests collected", output), output[-2000:]
