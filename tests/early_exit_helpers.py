"""Shared helpers of the early-exit engine, stream, server and HTTP tests: small multi-exit
networks (an MLP, a tuple-hidden-state net, sleeping stages), inputs, the full-network
simulation oracle, thresholds that sit in gaps between confidences, and a checkpoint
fixture in the trainer's format, and the Open Inference Protocol front over the small MLP
that the tritonclient and KServe client tests share."""

from __future__ import annotations

import contextlib
import itertools
import math
import time

import pytest
import torch
from torch import nn

from ann_kernels.nn import MultiExitNetwork, mlp_ann
from ann_kernels.ops.early_exit import exit_confidence_reference

INF = math.inf
K = 4


def small_mlp(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return mlp_ann(in_features=16, hidden=32, num_exits=K, num_classes=5)


class TwoScale(nn.Module):
    """A stage with a tuple hidden state (two tensors of different trailing shapes)."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first
        self.a = nn.Linear(16 if first else 8, 8)
        self.b = nn.Conv2d(1 if first else 2, 2, 3, padding=1)

    def forward(self, h):
        if self.first:
            return torch.relu(self.a(h)), torch.relu(self.b(h[:, :9].reshape(-1, 1, 3, 3)))
        a, b = h
        return torch.relu(self.a(a)), torch.relu(self.b(b))


class TwoScaleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8 + 18, 5)

    def forward(self, h):
        a, b = h
        return self.linear(torch.cat([a, b.flatten(1)], dim=1))


def tuple_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return MultiExitNetwork(
        [TwoScale(k == 0) for k in range(3)], [TwoScaleHead() for _ in range(3)], num_classes=5
    )


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def simulate(model, x, thresholds, criterion="max_prob"):
    """Oracle: run the whole network, then take for each sample the first exit whose
    (reference) confidence reaches its threshold; the last exit always accepts."""
    with torch.no_grad():
        logits = model(x)
    conf = torch.stack([exit_confidence_reference(z, criterion)[0] for z in logits])
    passes = conf >= torch.tensor(thresholds, dtype=torch.float32).unsqueeze(1)
    passes[-1] = True
    exit_at = passes.to(torch.int8).argmax(dim=0)
    preds = torch.stack([z.argmax(dim=1) for z in logits])
    rows = torch.arange(x.shape[0])
    return preds[exit_at, rows], exit_at, conf[exit_at, rows], conf


def safe_thresholds(conf: torch.Tensor, quantile: float, gap: float = 1e-4) -> list[float]:
    """Per exit, a threshold near the quantile lying in a gap between observed confidences."""
    out = []
    for row in conf:
        values = torch.unique(row.double()).tolist()
        mids = [(a + b) / 2 for a, b in itertools.pairwise(values) if b - a > gap] or [values[-1] + gap]
        target = float(torch.quantile(row.double(), quantile))
        out.append(min(mids, key=lambda t: abs(t - target)))
    return out


class SlowStage(nn.Module):
    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, h):
        time.sleep(self.seconds)
        return self.inner(h)


class CountingSleep(nn.Module):
    """A stage that sleeps ``seconds`` and counts its calls."""

    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds, self.calls = inner, seconds, 0

    def forward(self, h):
        self.calls += 1
        time.sleep(self.seconds)
        return self.inner(h)


def sleepy_model(stage: int, seconds: float, seed: int = 7) -> tuple[MultiExitNetwork, CountingSleep]:
    base = small_mlp(seed=seed)
    stages = list(base.stages)
    slow = stages[stage] = CountingSleep(stages[stage], seconds)
    return MultiExitNetwork(stages, list(base.heads), num_classes=5), slow


@pytest.fixture
def mlp_checkpoint(tmp_path):
    """A checkpoint in the trainer's format: a small (untrained) MLP ANN on synthetic data."""
    from ann_kernels.train.runs import build_model, make_spec
    from ann_kernels.train.trainer import CHECKPOINT_FORMAT

    spec = make_spec(
        dataset="synthetic",
        model="mlp",
        limit_train=64,
        limit_eval=300,
        model_kwargs={"num_exits": 3, "hidden": 32},
    )
    spec.update(num_classes=10, input_shape=[1, 28, 28])
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28), **spec["model_kwargs"])
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec, "model": model.state_dict(), "epoch": 0}, path)
    return path


@contextlib.contextmanager
def mlp_http_front(thresholds, model_name: str, **http_kwargs):
    """The small MLP (``small_mlp(seed=31)``, samples of shape (16,)) behind an
    ``EarlyExitServer`` (``thresholds``, batches of <= 64 rows, 1 ms wait) and its HTTP front
    (``start_http(server, model_name=..., **http_kwargs)``) on one torch thread; yields
    ``(http_front, engine, server)`` and closes both after."""
    from ann_kernels import EarlyExitEngine
    from ann_kernels.inference import EarlyExitServer
    from ann_kernels.serve import start_http

    torch.set_num_threads(1)
    engine = EarlyExitEngine(small_mlp(seed=31))
    server = EarlyExitServer(engine, thresholds=thresholds, max_batch_size=64, max_wait_s=0.001,
                             sample_shape=(16,)).start()
    try:
        http_front = start_http(server, model_name=model_name, **http_kwargs)
        try:
            yield http_front, engine, server
        finally:
            http_front.close()
    finally:
        server.close()
