"""LayerSkip's early-exit loss options: per-exit loss scales and the rotational / gradual
curricula, exactly as LayerSkip's training recipe defines them.

Sources (read for this implementation):

- ``pytorch/torchtune``, ``torchtune/modules/early_exit_loss.py`` (the LayerSkip authors'
  recipe, upstreamed from LayerSkip's torchtune fork): ``uniform_loss_scale``,
  ``linear_l_loss_scale``, ``sum_l_loss_scale``, ``sqrt_l_loss_scale``, ``inv_l_loss_scale``,
  ``inv_sqrt_l_loss_scale``, ``early_exit_loss``, ``EarlyExitCurriculum``,
  ``RotationalEarlyExitCurriculum``, ``GradualEarlyExitCurriculum``.
- ``facebookresearch/LayerSkip``, ``train.py`` ``LayerSkipModel.forward`` and
  ``integrations/huggingface/train.py`` ``LayerSkipSFTTrainer.compute_loss`` (one early exit
  per step, rotating over layers 1..L-1, combined as (loss_L + s * loss_e) / (1 + s)).

Definitions (layer ids l are 0-based layer indices, L layers, e_scale a factor on every
exit before the last layer):

    uniform: 1      linear: l + 1      sum: cumsum(l + 1) over the active exits
    sqrt: sqrt(l + 1)      inv: 1 / (l + 1)      inv_sqrt: 1 / sqrt(l + 1)
    scale_l *= e_scale if l < L - 1 ;  scales /= sum(scales)

computed over the exits active at that step (``early_exit_loss`` only sees the hidden
states the curriculum enabled). The curricula act on a boolean mask over *all* L layers
(``do_output_hidden_states``), initialised to "the layer has an exit":

- rotational: ``step()`` rolls the mask one position to the right (``np.roll(mask, 1)``);
- gradual: the mask starts all False; ``step()`` sets layer i on when
  ``step / max_steps >= fraction_scale * (L - i) / L`` (and it was on initially), then
  ``step += 1``; fraction_scale defaults to 0.5;
- ``get()`` returns the mask with the last layer forced on when ``train_last_layer``.

Deviation (documented): LayerSkip's model can exit after every layer; here exits sit after
chosen layers, so a layer the mask enables but which has no exit contributes nothing (with
an exit after every layer the schedules are identical).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ann_kernels.losses.schemes import Weighting, register_weighting

__all__ = ["LAYERSKIP_SCALES", "layerskip_loss_scales", "LayerSkipCurriculum", "LayerSkipWeighting"]

# Our names (the issue's) -> torchtune's LossScaleType values; both are accepted.
LAYERSKIP_SCALES = {
    "uniform": "one", "one": "one", "linear": "l", "l": "l", "sum": "sum_l", "sum_l": "sum_l",
    "sqrt": "sqrt_l", "sqrt_l": "sqrt_l", "inverse": "inv_l", "inv": "inv_l", "inv_l": "inv_l",
    "inv_sqrt": "inv_sqrt_l", "inv_sqrt_l": "inv_sqrt_l",
}


def layerskip_loss_scales(layer_ids: Sequence[int], num_layers: int, scale: str = "uniform",
                          e_scale: float = 1.0) -> list[float]:
    """The normalised loss scales of the exits at 0-based ``layer_ids`` (ascending), as
    torchtune's ``*_loss_scale`` functions compute them (sum 1)."""
    if scale not in LAYERSKIP_SCALES:
        raise ValueError(f"scale: expected one of {sorted(LAYERSKIP_SCALES)}, got {scale!r}")
    kind = LAYERSKIP_SCALES[scale]
    ids = [int(i) for i in layer_ids]
    if not ids:
        return []
    if kind == "one":
        raw = [1.0] * len(ids)
    elif kind == "l":
        raw = [i + 1.0 for i in ids]
    elif kind == "sum_l":
        raw, acc = [], 0.0
        for i in ids:
            acc += i + 1.0
            raw.append(acc)
    elif kind == "sqrt_l":
        raw = [math.sqrt(i + 1.0) for i in ids]
    elif kind == "inv_l":
        raw = [1.0 / (i + 1.0) for i in ids]
    else:
        raw = [1.0 / math.sqrt(i + 1.0) for i in ids]
    raw = [r * (e_scale if i < num_layers - 1 else 1.0) for r, i in zip(raw, ids)]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"e_scale: the scales sum to {total}; expected a positive e_scale, got {e_scale}")
    return [r / total for r in raw]


class LayerSkipCurriculum(torch.nn.Module):
    """torchtune's ``EarlyExitCurriculum`` family over a mask of ``num_layers`` layers
    (``kind``: ``none``, ``rot`` / ``rotational``, ``gradual``); state in buffers."""

    def __init__(self, initial_mask: Sequence[bool], kind: str = "none", *, max_steps: int | None = None,
                 train_last_layer: bool = True, fraction_scale: float = 0.5, last_step: int | None = None):
        super().__init__()
        kind = {"rotational": "rot"}.get(kind, kind)
        if kind not in ("none", "rot", "gradual"):
            raise ValueError(f"curriculum: expected 'none', 'rot' (rotational) or 'gradual', got {kind!r}")
        if kind == "gradual" and (max_steps is None or max_steps < 1):
            raise ValueError(f"max_steps: the gradual curriculum needs a positive max_steps, got {max_steps!r}")
        self.kind, self.max_steps = kind, max_steps
        self.train_last_layer, self.fraction_scale = train_last_layer, float(fraction_scale)
        mask = torch.tensor([bool(m) for m in initial_mask], dtype=torch.bool)
        self.register_buffer("final_mask", mask.clone())
        # GradualEarlyExitCurriculum.__init__ resets _step to 0 and the mask to all False.
        self.register_buffer("mask", torch.zeros_like(mask) if kind == "gradual" else mask.clone())
        start = 0 if (kind == "gradual" or last_step is None) else int(last_step)
        self.register_buffer("step_count", torch.tensor(start, dtype=torch.int64))

    def get(self) -> list[bool]:
        """``EarlyExitCurriculum.get``: the mask, last layer forced on if train_last_layer."""
        mask = self.mask.tolist()
        if self.train_last_layer:
            mask[-1] = True
        return mask

    def step(self) -> None:
        if self.kind == "rot":
            self.mask.copy_(torch.roll(self.mask, 1))
            self.step_count += 1
        elif self.kind == "gradual":
            fraction = int(self.step_count) / self.max_steps
            n = self.mask.numel()
            on = torch.tensor([fraction >= self.fraction_scale * (n - i) / n for i in range(n)])
            self.mask.copy_(on & self.final_mask)
            self.step_count += 1


class LayerSkipWeighting(Weighting):
    """Exit weights = LayerSkip's normalised loss scales over the exits the curriculum
    enables this step (0 elsewhere, so the fused linear loss skips those exits).

    Args:
        num_exits: K.
        exit_layers: the 0-based layer index of each exit, ascending (the last exit is
            normally the last layer, ``num_layers - 1``); default: exit k after layer k
            with ``num_layers = K`` (LayerSkip's setting, an exit after every layer).
        num_layers: L, the model's layer count.
        scale: ``uniform`` (torchtune's default), ``linear``, ``sum``, ``sqrt``, ``inverse``,
            ``inv_sqrt`` (or torchtune's names ``one``, ``l``, ``sum_l``, ...).
        e_scale: factor on every exit before the last layer (torchtune default 1.0).
        curriculum: ``none``, ``rot``/``rotational``, ``gradual``; max_steps,
            train_last_layer, fraction_scale as torchtune's curricula.
        curriculum_layers: the layers the curriculum's mask starts with (torchtune's
            ``do_output_hidden_states``); default: every layer with an exit.
    """

    def __init__(self, num_exits: int, exit_layers: Sequence[int] | None = None, num_layers: int | None = None, *,
                 scale: str = "uniform", e_scale: float = 1.0, curriculum: str = "none",
                 max_steps: int | None = None, train_last_layer: bool = True, fraction_scale: float = 0.5,
                 curriculum_layers: Sequence[int] | None = None):
        super().__init__(num_exits)
        if exit_layers is None:
            exit_layers = list(range(num_exits))
        exit_layers = [int(i) for i in exit_layers]
        if len(exit_layers) != num_exits or sorted(set(exit_layers)) != exit_layers:
            raise ValueError(f"exit_layers: expected {num_exits} increasing layer indices, got {exit_layers}")
        num_layers = exit_layers[-1] + 1 if num_layers is None else int(num_layers)
        if exit_layers[0] < 0 or exit_layers[-1] >= num_layers:
            raise ValueError(f"exit_layers: expected indices in [0, {num_layers}), got {exit_layers}")
        if scale not in LAYERSKIP_SCALES:
            raise ValueError(f"scale: expected one of {sorted(LAYERSKIP_SCALES)}, got {scale!r}")
        self.exit_layers, self.num_layers, self.scale, self.e_scale = exit_layers, num_layers, scale, float(e_scale)
        # torchtune's do_output_hidden_states: the layers enabled at the start (default: every
        # layer with an exit; a subset makes the rotational curriculum rotate).
        start = exit_layers if curriculum_layers is None else [int(i) for i in curriculum_layers]
        initial = [i in start for i in range(num_layers)]
        self.curriculum = LayerSkipCurriculum(initial, curriculum, max_steps=max_steps,
                                              train_last_layer=train_last_layer, fraction_scale=fraction_scale)

    def active_exits(self) -> list[int]:
        mask = self.curriculum.get()
        return [k for k, layer in enumerate(self.exit_layers) if mask[layer]]

    def weights_for_step(self) -> torch.Tensor:
        active = self.active_exits()
        scales = layerskip_loss_scales([self.exit_layers[k] for k in active], self.num_layers, self.scale,
                                       self.e_scale)
        w = torch.zeros(self.num_exits)
        for k, s in zip(active, scales):
            w[k] = s
        return w

    def after_step(self, out) -> None:
        self.curriculum.step()

    def extra_repr(self) -> str:
        return (f"exit_layers={self.exit_layers}, num_layers={self.num_layers}, scale={self.scale!r}, "
                f"e_scale={self.e_scale}, curriculum={self.curriculum.kind!r}")


register_weighting("layerskip", LayerSkipWeighting)
