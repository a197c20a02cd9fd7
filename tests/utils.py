"""Shared test helpers (import from here; do not copy per file)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings

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


# ---------------------------------------------------------------------------------------
# The logits op (multi_exit_cross_entropy) on every backend: shared checks, run by
# tests/test_multi_exit_ce_training.py on the C++ kernel (CPU) and CUDA, and by
# tests/test_triton_multi_exit_ce_op.py on the Triton kernels through the interpreter
# (triton_behind_cpu_ops), so that every backend answers the same questions.

BF16_UNIT = 2.0 ** -8  # bf16's unit roundoff u (8 significant bits); two roundings: 2u + u^2 (docs/low_precision.md)
FP16_UNIT = 2.0 ** -11  # fp16's (11 significant bits)


@contextlib.contextmanager
def _cpu_ops_routed_to(launchers, kernel, impls: dict):
    """Register ``impls`` (op name -> Triton launcher) as the ann_kernels ops' CPU kernels while
    the block runs, then restore the C++ kernels. Skips unless ``launchers`` was imported under
    TRITON_INTERPRET=1 (``kernel``, one of its kernels, is then not a compiled JITFunction)."""
    import triton

    if isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip(f"{launchers.__name__} was imported without TRITON_INTERPRET=1")
    lib = torch.library.Library("ann_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
        for name, launcher in impls.items():
            lib.impl(name, launcher, "CPU")
    try:
        yield
    finally:
        lib._destroy()  # the C++ CPU kernels are back


def triton_behind_cpu_ops():
    """Route the logits op's CPU backend ops (``_multi_exit_ce_forward`` / ``_backward`` /
    ``_scale_``) to the Triton launchers while the block runs, so the public function (its
    C++ argument check, autograd and grad-mode choice) drives the Triton kernels on CPU
    tensors under the interpreter. Needs TRITON_INTERPRET=1 set before
    ``ann_kernels.triton.multi_exit_ce`` was imported (tests/test_triton_multi_exit_ce_op.py)."""
    from ann_kernels.triton import multi_exit_ce as launchers

    return _cpu_ops_routed_to(launchers, launchers._multi_exit_ce_kernel, {
        "_multi_exit_ce_forward": launchers.multi_exit_ce_forward_triton,
        "_multi_exit_ce_backward": launchers.multi_exit_ce_backward_triton,
        "_multi_exit_ce_scale_": launchers.scale_grads_triton,
    })


def fp64_truth_grads(heads, target, weights, grad_out, *, label_smoothing=0.0):
    """float64 gradients of grad_out * sum_k w_k CE(z_k, y) (mean over non-ignored rows), on CPU."""
    leaves = [z.detach().cpu().double().requires_grad_() for z in heads]
    target = target.cpu()
    w = [1.0] * len(heads) if weights is None else weights.cpu().tolist()
    loss = sum(wk * torch.nn.functional.cross_entropy(z, target, label_smoothing=label_smoothing)
               for wk, z in zip(w, leaves))
    return [g for g in torch.autograd.grad(loss * grad_out, leaves)]


def torch_own_grads(heads, target, weights, grad_out, *, label_smoothing=0.0):
    """torch's own gradients at the logits' dtype (F.cross_entropy on the low-precision
    tensors, eager, on CPU), times grad_out in float64 afterwards (fp16 itself would overflow
    at 2^16): the error torch makes at this dtype."""
    leaves = [z.detach().cpu().clone().requires_grad_() for z in heads]
    target = target.cpu()
    w = [1.0] * len(heads) if weights is None else weights.cpu().tolist()
    loss = sum(wk * torch.nn.functional.cross_entropy(z, target, label_smoothing=label_smoothing)
               for wk, z in zip(w, leaves))
    return [g.double() * grad_out for g in torch.autograd.grad(loss, leaves)]


def check_grad_out_within_twice_torch(device, dtype, grad_out, *, num_classes=300, n=48, interpreter=False):
    """Issue 20: the op's gradients for grad_out (1, 2^16, 1/8, -3) against a float64 truth,
    within 2x torch's own error at the dtype (per exit, max over entries); bf16 and fp16
    (gradient buffers, scaled in place) also within the two-rounding bound entry by entry
    (fp16 plus 2^-23 for its subnormal spacing), also for a retained graph's second backward
    (the buffer recomputed); bf16 exactly grad_out times the grad_out = 1 gradient when
    grad_out is a power of two.

    ``interpreter=True`` (Triton's interpreter): its fp32 -> bf16 cast truncates (the GPU and
    the C++ kernel round to nearest even), so a bf16 rounding there costs up to 2^-7, not
    2^-8: bf16 is held to the two-rounding bound at that unit instead of torch's error."""
    gen = torch.Generator().manual_seed(int(abs(grad_out) * 8) + num_classes)
    heads = [(3 * torch.randn(n, num_classes, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
             for _ in range(3)]
    target = torch.randint(0, num_classes, (n,), generator=gen)
    target[::7] = -100
    target = target.to(device)
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    out = ann_kernels.multi_exit_cross_entropy(heads, target, weights, label_smoothing=0.05)
    ours = torch.autograd.grad(out.loss, heads, torch.tensor(grad_out, device=device), retain_graph=True)
    truth = fp64_truth_grads(heads, target, weights, grad_out, label_smoothing=0.05)
    theirs = torch_own_grads(heads, target, weights, grad_out, label_smoothing=0.05)
    truncates = interpreter and dtype == torch.bfloat16
    for g, t, r in zip(ours, theirs, truth):
        assert g.dtype == dtype and torch.isfinite(g).all()
        if not truncates:
            err, bound = low_precision_bound(g.cpu(), t, r, floor=abs(grad_out) * 1e-9)
            assert err <= bound, (err, bound)
    if dtype == torch.float32:
        return
    unit = 2 * BF16_UNIT if truncates else BF16_UNIT if dtype == torch.bfloat16 else FP16_UNIT
    floor = 2.0 ** -23 if dtype == torch.float16 else 0.0
    n_valid = int((target != -100).sum())
    unit_grads = torch.autograd.grad(out.loss, heads)  # grad_out = 1, the buffer recomputed
    for go, grads in ((grad_out, ours), (1.0, unit_grads)):
        for k, (g, r) in enumerate(zip(grads, truth)):
            # stored once (rounding 1), scaled in fp32 and rounded again (rounding 2): relative
            # error <= 2u + u^2 per entry, plus the fp32 arithmetic (exp, sums: ~1e-6 relative,
            # and ~2^-22 of the row scale absolute at the target's p - 1)
            row_scale = abs(go) * weights[k].item() / n_valid
            r = r * (go / grad_out)
            limit = (2 * unit + unit ** 2 + 4e-6) * r.abs() + row_scale * 2.0 ** -22 + floor
            excess = (g.cpu().double() - r).abs() / limit
            assert bool((excess <= 1).all()), float(excess.max())
    mantissa, _ = math.frexp(grad_out)
    if dtype == torch.bfloat16 and abs(mantissa) == 0.5:  # a power of two (times a sign): no rounding
        for g, u in zip(ours, unit_grads):
            assert torch.equal(g, u * grad_out)


def grad_scaler_loop(dtype, device, *, steps=12, n=64, growth_interval=3):
    """Issue 10 / 24: the same small model trained with torch.amp.GradScaler twice, on the
    fused loss and on sum_k F.cross_entropy(z_k.float(), y) (autocast-style low-precision
    logits). Returns {name: (scale trajectory, final parameters)}; with no step skipped the
    scale ends at 2^16 * 2^(steps // growth_interval)."""
    num_exits, features, classes = 3, 16, 50
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps, n, features, generator=gen).to(device)
    y = torch.randint(0, classes, (steps, n), generator=gen).to(device)
    runs = {}
    for name in ("fused", "torch"):
        torch.manual_seed(1)
        model = torch.nn.ModuleList([torch.nn.Linear(features, classes) for _ in range(num_exits)]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 16,
                                      growth_interval=growth_interval)
        scales = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            logits = [head(x[step]).to(dtype) for head in model]
            if name == "fused":
                loss = ann_kernels.multi_exit_cross_entropy(logits, y[step]).loss
            else:
                loss = sum(torch.nn.functional.cross_entropy(z.float(), y[step]) for z in logits)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        runs[name] = (scales, [p.detach().cpu().clone() for p in model.parameters()])
    return runs


def check_ema_two_steps_and_non_finite_rows(device, dtype):
    """Issue 24 item 1: two AdaLoss steps against the hand formula (NaN = unset takes the
    first L_k; then m * ema + (1 - m) * L_k, with L_k = the mean of F.cross_entropy in
    float64), and a step whose exit 1 has a non-finite logit row (NaN in one row, +inf in
    another exit's row): that exit's per-exit loss is NaN, its EMA entry untouched, the
    other entries move by the formula."""
    m = 0.75
    gen = torch.Generator().manual_seed(5)
    steps = [[(2 * torch.randn(12, 9, generator=gen)).to(dtype) for _ in range(3)] for _ in range(3)]
    target = torch.randint(0, 9, (12,), generator=gen)
    target[3] = -100
    steps[2][1][4, 2] = float("nan")
    steps[2][2][6, 0] = float("inf")
    ema = torch.tensor([float("nan"), 2.0, float("nan")], device=device)
    hand = [float("nan"), 2.0, float("nan")]
    for t, heads in enumerate(steps):
        out = ann_kernels.multi_exit_cross_entropy([z.to(device).requires_grad_() for z in heads], target.to(device),
                                                   ema=ema, momentum=m)
        losses = losses_of(heads, target)
        for k, lk in enumerate(losses):
            if math.isfinite(lk):
                hand[k] = lk if math.isnan(hand[k]) else m * hand[k] + (1 - m) * lk
        per_exit = out.per_exit.cpu().double()
        if t < 2:
            torch.testing.assert_close(per_exit, torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        else:
            assert math.isnan(per_exit[1]) and not math.isfinite(per_exit[2]) and math.isfinite(per_exit[0])
            assert math.isnan(out.loss.item())
            assert out.per_sample[1, 4].isnan() and not out.per_sample[2, 6].isfinite()
        torch.testing.assert_close(ema.cpu().double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert ema[1].item() == pytest.approx(m * (m * 2.0 + (1 - m) * losses_of(steps[0], target)[1])
                                          + (1 - m) * losses_of(steps[1], target)[1], rel=1e-5)


def losses_of(heads, target):
    """[F.cross_entropy(z_k, y) in float64 for each exit] (mean over non-ignored rows)."""
    return [torch.nn.functional.cross_entropy(z.double(), target).item() for z in heads]


def assert_same_grad_scaler_runs(runs, dtype, *, growths=4, interpreter=False):
    """The fused loop of :func:`grad_scaler_loop` follows torch's step for step: the same
    scale trajectory (grown ``growths`` times: no step skipped for inf/NaN gradients) and
    the same parameters (to the dtype's gradient rounding; ``interpreter``: Triton's
    interpreter truncates fp32 -> bf16, a biased error of up to 2^-7 per entry)."""
    (fused_scales, fused_params), (torch_scales, torch_params) = runs["fused"], runs["torch"]
    assert fused_scales == torch_scales
    assert fused_scales[-1] == 2.0 ** (16 + growths)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    if interpreter and dtype == torch.bfloat16:
        tol = dict(rtol=1e-2, atol=1e-3)
    for p, q in zip(fused_params, torch_params):
        torch.testing.assert_close(p, q, **tol)

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


class CharTokenizer:
    """A character tokenizer for the tiny LMs of the serving tests: id 0 is the end-of-text
    token (decoded as nothing), ids 1.. the characters of ``alphabet``; ``encode(text)`` ->
    ids, ``decode(ids)`` -> text (the interface ``GenerationServer`` accepts)."""

    def __init__(self, alphabet: str = "abcdefghijklmnopqrstuvwxyz .,;:!?'-()0\n"):
        self.alphabet = alphabet
        self.vocab_size = len(alphabet) + 1
        self.index = {c: i + 1 for i, c in enumerate(alphabet)}

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(text) - set(self.index))
        if bad:
            raise ValueError(f"text: characters {bad} are not in the tokenizer's alphabet")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))


class WorkerGate:
    """Holds a ``GenerationServer``'s worker inside a forward (the model's embedding) until
    :meth:`release`, so a test knows what the worker is doing without timing. After
    :meth:`hold` (``skip`` = forwards let through first), the next forward blocks;
    :attr:`entered` is set once it does."""

    def __init__(self, server):
        import threading

        self.armed, self.skip = False, 0
        self.open, self.entered = threading.Event(), threading.Event()
        embed = server.adapter.embed

        def gated(tokens, positions):
            if self.armed:
                if self.skip > 0:
                    self.skip -= 1
                else:
                    self.entered.set()
                    assert self.open.wait(60), "WorkerGate: never released"
            return embed(tokens, positions)

        server.adapter.embed = gated

    def hold(self, skip: int = 0) -> None:
        self.open.clear()
        self.entered.clear()
        self.skip = skip
        self.armed = True

    def release(self) -> None:
        self.armed = False
        self.open.set()


def write_lm_checkpoint(directory, *, layers: int = 3, dim: int = 32, max_len: int = 64, seed: int = 0):
    """``directory/last.pt``: a tiny random ``CausalExitLM`` in the LM trainer's format, with a
    real byte-level BPE ``tokenizer.json`` (300 tokens, trained on the standard library's
    ``json`` package sources) and ``tokens.pt`` beside it; returns the path. Needs ``tokenizers``."""
    import sysconfig
    from pathlib import Path

    from ann_kernels.nn.causal_lm import causal_exit_lm
    from ann_kernels.train.lm import LM_FORMAT
    from ann_kernels.train.text import load_text_data

    directory = Path(directory)
    text_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    data = load_text_data(directory, text_glob=text_glob, vocab_size=300, seq_len=16, progress=False)
    torch.manual_seed(seed)
    kwargs = {"dim": dim, "layers": layers, "heads": 2}
    model = causal_exit_lm(data.vocab_size, max_len=max_len, **kwargs)
    torch.save({"format": LM_FORMAT, "spec": {"seq_len": max_len, "model_kwargs": kwargs}, "epoch": 1,
                "model": model.state_dict(), "vocab_size": data.vocab_size}, directory / "last.pt")
    return directory / "last.pt"


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


def linear_ce_triton_behind_cpu_op():
    """Route the fused linear loss's CPU op (``multi_exit_linear_ce_fwd``) to the Triton
    launcher while the block runs, so the public function (its C++ argument check and
    autograd, grad_out folding included) drives the Triton path on CPU tensors under the
    interpreter (tests/test_triton_multi_exit_linear_ce.py sets TRITON_INTERPRET=1 first)."""
    from ann_kernels.triton import multi_exit_linear_ce as launcher

    return _cpu_ops_routed_to(launcher, launcher._linear_ce_row_kernel,
                              {"multi_exit_linear_ce_fwd": launcher.multi_exit_linear_ce_fwd_triton})
