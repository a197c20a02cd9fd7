"""``MultiExitNetwork``: an anytime network as K stages and K exit heads.

Exit k (0-based) is reached by running stages 0..k in order and evaluated by head k::

    h_0 = stage_0(x);  h_k = stage_k(h_{k-1});  logits_k = head_k(h_k)

A hidden state ``h_k`` is a Tensor or a tuple/list of Tensors (e.g. one feature map per
scale in MSDNet), every Tensor with the batch as dim 0. The early-exit engine relies on
this: it keeps the still-active samples by indexing dim 0 of every Tensor in the state.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ann_kernels.nn.flops import count_flops

__all__ = ["MultiExitNetwork", "HiddenState"]

HiddenState = Union[Tensor, tuple[Tensor, ...], list[Tensor]]


def _check_modules(name: str, modules: Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList):
        raise TypeError(f"{name} must be a sequence of nn.Module, got a single {type(modules).__name__}")
    modules = list(modules)
    if not modules:
        raise ValueError(f"{name} must contain at least one module, got an empty sequence")
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}[{index}] must be an nn.Module, got {type(module).__name__}")
    return modules


class MultiExitNetwork(nn.Module):
    """An anytime network: K stages and K exit heads, exit k after stage k.

    Args:
        stages: K modules. ``stages[0]`` takes the network input x; ``stages[k]`` takes the
            hidden state returned by ``stages[k - 1]``. Hidden states are Tensors or
            tuples/lists of Tensors with the batch as dim 0.
        heads: K modules; ``heads[k]`` maps the hidden state after stage k to logits [N, C].
            The same module object may appear several times (a shared head): it is
            registered once for ``parameters()`` and counted once per exit for FLOPs.
        num_classes: C. If None, it is taken from the last exit's logits on the first
            ``forward`` or FLOP measurement.

    ``forward(x)`` returns the K exit logits, each [N, C] in the model's dtype.
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 num_classes: int | None = None) -> None:
        super().__init__()
        stage_list = _check_modules("stages", stages)
        head_list = _check_modules("heads", heads)
        if len(stage_list) != len(head_list):
            raise ValueError(
                f"heads must have one module per stage: got {len(stage_list)} stages and "
                f"{len(head_list)} heads"
            )
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.stages = nn.ModuleList(stage_list)
        self.heads = nn.ModuleList(head_list)
        self._num_classes = num_classes
        # tuple(input.shape[1:]) -> (stage FLOPs [K], head FLOPs [K]) per sample, float64.
        self._flop_cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ structure
    @property
    def num_exits(self) -> int:
        """K, the number of exits (= stages = heads)."""
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        """C, the number of classes of every exit's logits."""
        if self._num_classes is None:
            raise RuntimeError(
                "num_classes is not known yet: pass num_classes= to MultiExitNetwork or run "
                "forward() / exit_flops() once so it is read from the last exit's logits"
            )
        return self._num_classes

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, num_classes={self._num_classes}"

    # ------------------------------------------------------------------ compute
    # forward_stage / forward_head run once per stage on the early-exit hot path, so they
    # look modules up in the ModuleLists' dicts directly: ``ModuleList.__getitem__`` and
    # ``nn.Module.__getattr__`` cost several microseconds per call, these lookups ~0.2 us.
    def forward_stage(self, k: int, h: HiddenState) -> HiddenState:
        """Run stage k (0 <= k < K) on hidden state h (the input x for k = 0)."""
        return self._modules["stages"]._modules[str(k)](h)

    def forward_head(self, k: int, h: HiddenState) -> Tensor:
        """Logits [N, C] of exit k (0 <= k < K) from the hidden state after stage k."""
        return self._modules["heads"]._modules[str(k)](h)

    def forward(self, x: Tensor) -> list[Tensor]:
        """All K exit logits, each [N, C], for input x [N, ...]."""
        logits = []
        h = x
        for k in range(len(self.stages)):
            h = self.forward_stage(k, h)
            logits.append(self.forward_head(k, h))
        if self._num_classes is None:
            self._num_classes = int(logits[-1].shape[-1])
        return logits

    # ------------------------------------------------------------------ cost
    def stage_flops(self, example_input: Tensor) -> Tensor:
        """Per-sample FLOPs of each stage, float64 [K] (matmul/conv/attention only, 2 * MACs)."""
        return self._measured_flops(example_input)[0].clone()

    def head_flops(self, example_input: Tensor) -> Tensor:
        """Per-sample FLOPs of each exit head, float64 [K] (matmul/conv/attention only, 2 * MACs)."""
        return self._measured_flops(example_input)[1].clone()

    def exit_flops(self, example_input: Tensor) -> Tensor:
        """Per-sample cost of reaching and evaluating each exit, float64 [K] on CPU, in FLOPs
        (= 2 x multiply-accumulates; the MSDNet / AdaLoss / IMTA papers report MACs, i.e.
        half these numbers).

        ``exit_flops[k] = sum_{j <= k} (stage_flops[j] + head_flops[j])``: an anytime or
        early-exit run evaluates every head on its way to exit k, so all of them count, as in
        MSDNet's counter (kalviny/MSDNet-PyTorch ``op_counter.py``: ``measure_layer`` keeps one
        running ``count_ops`` over blocks and classifiers alike and records it at each
        classifier's Linear, ``cls_ops.append(count_ops)``). Every user of the cost (calibration, budgets, EANN costs, plots) reads it
        from here. Measured with ``torch.utils.flop_counter.FlopCounterMode`` on
        ``example_input`` [N, ...] (any N >= 1; totals are divided by N). That counter counts
        matrix products only: convolutions, linear layers / matmuls and attention, as
        2 * multiply-accumulates; normalisation, activations, pooling and biases count 0.

        The measurement runs once per input shape (``example_input.shape[1:]``); later
        calls with that shape are served from a cache (rebuild the network, or call
        ``clear_flop_cache()``, after changing its modules). It runs in eval mode under
        ``no_grad`` and restores every module's training flag afterwards.
        """
        stage, head = self._measured_flops(example_input)
        return torch.cumsum(stage + head, 0)

    def clear_flop_cache(self) -> None:
        """Forget measured FLOPs (needed only if modules change shape after measuring)."""
        self._flop_cache.clear()

    def _measured_flops(self, example_input: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a Tensor, got {type(example_input).__name__}")
        if example_input.dim() == 0 or example_input.shape[0] == 0:
            raise ValueError(
                f"example_input must have a non-empty batch dim 0, got shape {tuple(example_input.shape)}"
            )
        key = tuple(example_input.shape[1:])
        cached = self._flop_cache.get(key)
        if cached is None:
            cached = self._measure_flops(example_input)
            self._flop_cache[key] = cached
        return cached

    def _measure_flops(self, example_input: Tensor) -> tuple[Tensor, Tensor]:
        batch = example_input.shape[0]
        training_flags = [(module, module.training) for module in self.modules()]
        self.eval()
        stage_totals, head_totals = [], []
        try:
            with torch.no_grad():
                h: HiddenState = example_input
                logits = None
                for k in range(self.num_exits):
                    flops, h = count_flops(self.forward_stage, k, h)
                    stage_totals.append(flops)
                    flops, logits = count_flops(self.forward_head, k, h)
                    head_totals.append(flops)
        finally:
            for module, was_training in training_flags:
                module.training = was_training
        if self._num_classes is None:
            self._num_classes = int(logits.shape[-1])
        stage = torch.tensor(stage_totals, dtype=torch.float64) / batch
        head = torch.tensor(head_totals, dtype=torch.float64) / batch
        return stage, head

