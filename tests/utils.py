"""Shared test helpers (import from here; do not copy per file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ann_kernels

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# Device parametrisation for every test that can run on CUDA: ``@pytest.mark.parametrize(
# "device", DEVICES)`` or the ``device`` fixture (tests/conftest.py). The CUDA case carries
# the ``cuda`` marker, so ``pytest -m cuda`` is the GPU subset (scripts/gpu_check.sh), and
# skips with the reason "no CUDA device" where there is none (visible with ``-ra``).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda], id="cuda")]

requires_ext = pytest.mark.skipif(
    not ann_kernels.HAS_CPP_EXT,
    reason="the C++ extension ann_kernels._C is not built (pip install --no-build-isolation -e .)",
)


def require_ext_or_skip() -> None:
    """In CI (ANN_KERNELS_REQUIRE_EXT=1) the import itself fails; elsewhere skip with a reason."""
    if not ann_kernels.HAS_CPP_EXT:
        pytest.skip("the C++ extension ann_kernels._C is not built")


def make_logits(num_exits: int, n: int, c: int, dtype=torch.float32, *, scale: float = 3.0, seed: int = 0,
                requires_grad: bool = True) -> list[torch.Tensor]:
    """K leaf logits tensors [N, C] with entries ~ scale * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(n, c, generator=gen)).to(dtype).requires_grad_(requires_grad)
        for _ in range(num_exits)
    ]


def make_target(n: int, c: int, *, seed: int = 1, ignore_frac: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=gen)
    if ignore_frac > 0:
        target[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return target


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def low_precision_bound(kernel_out: torch.Tensor, torch_out: torch.Tensor, truth: torch.Tensor,
                        *, floor: float = 1e-6) -> tuple[float, float]:
    """flash-attention's rule: the kernel's error against an fp32 truth must be at most twice
    torch's own error at the same dtype (plus a tiny absolute floor for exact cases)."""
    kernel_err = max_abs_err(kernel_out, truth)
    torch_err = max_abs_err(torch_out, truth)
    return kernel_err, 2 * torch_err + floor


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def tiny_mlp_exit_net(*, in_features: int, hidden: int, num_exits: int, num_classes: int,
                      batch_norm: bool = False, flatten: bool = False):
    """A tiny ``MultiExitNetwork`` of Linear (+ BatchNorm1d) + Tanh stages with Linear heads
    (smooth, so finite differences and second-order gradients behave)."""
    from torch import nn

    from ann_kernels.nn import MultiExitNetwork

    def stage(n_in):
        layers = [nn.Flatten()] if flatten and n_in == in_features else []
        layers.append(nn.Linear(n_in, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    stages = [stage(in_features)] + [stage(hidden) for _ in range(num_exits - 1)]
    heads = [nn.Linear(hidden, num_classes) for _ in range(num_exits)]
    return MultiExitNetwork(stages, heads, num_classes=num_classes)


def tiny_cli_args(*, hidden: int = 16, limit_train: int = 80, limit_eval: int = 40, batch_size: int = 40,
                  epochs: int | None = 1) -> list[str]:
    """``ann-kernels train`` arguments for a tiny run: a 3-exit MLP on the synthetic dataset, no
    progress bars (seconds on one CPU thread)."""
    args = ["--dataset", "synthetic", "--model", "mlp", "--num-exits", "3", "--model-arg", f"hidden={hidden}",
            "--limit-train", str(limit_train), "--limit-eval", str(limit_eval),
            "--batch-size", str(batch_size), "--no-progress"]
    return args + (["--epochs", str(epochs)] if epochs is not None else [])


def subprocess_env(*first_on_path: str, **variables: str) -> dict[str, str]:
    """The environment for running the package in a fresh interpreter: this checkout first on
    PYTHONPATH (after ``first_on_path``), then the caller's PYTHONPATH; ``variables`` set on top."""
    root = str(Path(__file__).resolve().parents[1])
    path = [*first_on_path, root, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **variables}


def tiny_causal_lm(vocab_size: int = 40, *, dim: int = 32, layers: int = 4, heads: int = 2, max_len: int = 48,
                   exit_layers=None, head_scale: float = 8.0, seed: int = 0, dtype=torch.float64):
    """A tiny random ``CausalExitLM`` (eval mode) for generation tests: an exit after every
    layer by default; the shared head's weight scaled by ``head_scale`` so the exits'
    confidences spread over (0, 1) instead of sitting near 1 / V; float64 by default so greedy
    comparisons with the cache-free oracle are not at the mercy of near-ties."""
    from ann_kernels.nn.causal_lm import causal_exit_lm

    torch.manual_seed(seed)
    model = causal_exit_lm(vocab_size, dim=dim, layers=layers, heads=heads, max_len=max_len,
                           exit_layers=exit_layers, tie_embeddings=False)
    with torch.no_grad():
        model.lm_heads[0].weight.mul_(head_scale)
    return model.to(dtype).eval()


def ragged_prompts(batch: int, vocab_size: int, *, min_len: int = 1, max_len: int = 9, seed: int = 0) -> list[list[int]]:
    """``batch`` random prompts of lengths in [min_len, max_len] (the first two: both ends)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    lengths[:2] = [min_len, max_len][:batch]
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for a server started in another process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float = 60.0):
    """(status, headers dict (lower-case names), raw body) of one HTTP request to 127.0.0.1:port."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def write_mlp_checkpoint(directory, *, num_exits: int = 3, hidden: int = 32, seed: int = 0):
    """``directory/last.pt`` in the trainer's checkpoint format: a small untrained MLP ANN on
    synthetic 1x28x28 data (10 classes); returns the path."""
    from pathlib import Path

    from ann_kernels.train.runs import build_model, make_spec
    from ann_kernels.train.trainer import CHECKPOINT_FORMAT

    spec = make_spec(dataset="synthetic", model="mlp", limit_train=64, limit_eval=300,
                     model_kwargs={"num_exits": num_exits, "hidden": hidden})
    spec.update(num_classes=10, input_shape=[1, 28, 28])
    torch.manual_seed(seed)
    model = build_model("mlp", 10, (1, 28, 28), **spec["model_kwargs"])
    path = Path(directory) / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec, "model": model.state_dict(), "epoch": 0}, path)
    return path


# Prepended to the code of a fresh interpreter (run_python_with_packages_hidden): the top-level
# packages named in $HIDDEN_PACKAGES are never found, as on a machine without them: ``import``
# raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None.
HIDE_PACKAGES_PRELUDE = r'''
import importlib.util
import os
import sys

HIDDEN = set(filter(None, os.environ["HIDDEN_PACKAGES"].split(",")))


class Hiding:
    """Wraps a meta-path finder: the hidden top-level packages are never found."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
for name in HIDDEN:  # the hiding itself works (else a test built on it would prove nothing)
    assert importlib.util.find_spec(name) is None, name
'''


def run_python_with_packages_hidden(code: str, hidden, *, timeout: float = 300, extra_env=None):
    """Runs ``code`` in a fresh interpreter (cwd = the repository root, on PYTHONPATH) with the
    top-level packages ``hidden`` made unfindable; pytest plugins are not auto-loaded (a
    hidden package's plugin would fail to load). Returns the CompletedProcess (text output)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HIDDEN_PACKAGES": ",".join(sorted(hidden)), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])), **(extra_env or {})}
    return subprocess.run([sys.executable, "-c", HIDE_PACKAGES_PRELUDE + code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def profiled_ops(fn, *, profile_memory: bool = False):
    """Run ``fn()`` under torch.profiler (CPU activity, shapes recorded) and return its
    kineto events (``.name()``, ``.dtypes()``, ``.shapes()``, ``.nbytes()``, ``.start_ns()``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=profile_memory) as prof:
        fn()
    return list(prof.profiler.kineto_results.events())


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``fn()`` runs, from the
    allocator's own records (torch.profiler memory events: every allocation and free of
    torch's CPU/CUDA allocators, in time order), not from wall-clock or RSS."""
    events = [e for e in profiled_ops(fn, profile_memory=True) if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
