"""Exit-weighting schemes: the static vectors of the original ANN code, the oscillating
scheme, the :class:`Weighting` interface every scheme implements, and the name registry
behind ``AnytimeLoss(weighting="...")``.

Exact definitions (``shared/DESIGN.md``, "Weighting schemes"; K exits, k = 1..K here,
0-based positions in code):

- CONST: w_k = 1.
- OPT(j): one-hot at exit j (0-based ``index`` here; default the last exit).
- HALF_END: w_k = 1/(K-1) for k < K, w_K = 1.
- LINEAR: w_k = 0.25 + 0.75 (k-1)/(K-1), scaled so that sum w = log2 K.
- SIEVE: for each stride s = 1, 2, 4, ... (s < K) every 0-based position K-1-j*s (j >= 0)
  gets +1; then w_K is set to the sum of all the others; scaled so that w_K = 1 (sum 2),
  as the original's default pipeline (``normalize="last"``; ``"log"``: sum w = log2(K+1)).
- EANN-SIEVE: SIEVE scaled to sum log2(K+1) with its first floor(K/2) weights set to 0
  (the original's ``eann_sieve`` does not go through the normalisation step).
- Oscillating: step 1 uses B + (sum B)/2 * e_K, every later step draws s ~ Cat(B / sum B)
  and uses B + (sum B)/2 * e_s (B: base weights, default SIEVE with w_K = 1; a fresh draw
  each step, nothing accumulates).

Sources (EchoWho/AnytimeNeuralNetwork_public): ``tensorpack/utils/anytime_loss.py``
(``sieve_loss_weights``, ``_normalize_weights``, ``loss_weights``: func_type 5 = SIEVE,
normalised by ``--normalize_weights`` whose default in ``anytime_models/models/
anytime_network.py`` ``parser_add_common_arguments`` is ``last``: w /= w[-1]);
oscillating = the default ``--samloss 6``: ``online_learn.py`` ``FixedDistributionCPU``
with the static weights as distribution, ``AnytimeNetwork._build_graph`` adding
``weights_sum / sum_rand_ratio`` (``--sum_rand_ratio 2``) to the drawn exit, whose first
value is ``init_select_idx`` = the last exit (``_get_select_idx``).

With K = 1 every scheme is [1] (LINEAR's and SIEVE's normalisers would be 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ann_kernels.ops.multi_exit_ce import ExitLoss, multi_exit_cross_entropy

__all__ = [
    "Weighting", "StaticWeighting", "Oscillating", "WEIGHTINGS", "register_weighting", "make_weighting",
    "const_weights", "opt_weights", "half_end_weights", "linear_weights", "sieve_weights", "eann_sieve_weights",
    "SIEVE_NORMALIZE",
    "static_weights", "weighting_options",
]


def _check_num_exits(num_exits) -> int:
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits: expected a positive integer, got {num_exits!r}")
    return num_exits


# --- 1. static weight vectors (float32 [K]) -------------------------------------------------

def const_weights(num_exits: int) -> torch.Tensor:
    """CONST: [1, ..., 1]."""
    return torch.ones(_check_num_exits(num_exits))


def opt_weights(num_exits: int, index: int | None = None) -> torch.Tensor:
    """OPT(j): one-hot at the 0-based exit ``index`` (default: the last exit)."""
    k = _check_num_exits(num_exits)
    j = k - 1 if index is None else index
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < k:
        raise ValueError(f"index: expected an exit in 0..{k - 1}, got {index!r}")
    w = torch.zeros(k)
    w[j] = 1.0
    return w


def half_end_weights(num_exits: int) -> torch.Tensor:
    """HALF_END: 1/(K-1) for every exit but the last, 1 for the last."""
    k = _check_num_exits(num_exits)
    if k == 1:
        return torch.ones(1)
    w = torch.full((k,), 1.0 / (k - 1), dtype=torch.float64)
    w[-1] = 1.0
    return w.float()


def linear_weights(num_exits: int) -> torch.Tensor:
    """LINEAR: 0.25 + 0.75 (k-1)/(K-1), scaled to sum log2 K."""
    k = _check_num_exits(num_exits)
    if k == 1:
        return torch.ones(1)
    w = 0.25 + 0.75 * torch.arange(k, dtype=torch.float64) / (k - 1)
    return (w * (math.log2(k) / w.sum())).float()


def _sieve_raw(k: int) -> torch.Tensor:
    # 1. every stride s = 1, 2, 4, ... below K marks the positions K-1, K-1-s, K-1-2s, ...
    w = torch.zeros(k, dtype=torch.float64)
    s = 1
    while s < k:
        w[torch.arange(k - 1, -1, -s)] += 1.0
        s *= 2
    # 2. the final exit weighs as much as all the others together.
    w[-1] = w[:-1].sum()
    return w


SIEVE_NORMALIZE = ("last", "log")


def sieve_weights(num_exits: int, normalize: str = "last") -> torch.Tensor:
    """SIEVE. ``normalize="last"`` (the original default pipeline): w_K = 1, the others sum
    to 1; ``"log"``: sum w = log2(K+1). K=8: [.091 .182 .091 .273 .091 .182 .091 1]."""
    k = _check_num_exits(num_exits)
    if normalize not in SIEVE_NORMALIZE:
        raise ValueError(f"normalize: expected one of {SIEVE_NORMALIZE}, got {normalize!r}")
    if k == 1:
        return torch.ones(1)
    w = _sieve_raw(k)
    if normalize == "last":
        return (w / w[-1]).float()
    return (w * (math.log2(k + 1) / w.sum())).float()


def eann_sieve_weights(num_exits: int) -> torch.Tensor:
    """EANN-SIEVE: SIEVE scaled to sum log2(K+1) (``anytime_loss.py`` ``eann_sieve`` calls
    ``sieve_loss_weights`` directly, without ``_normalize_weights``) with the first floor(K/2)
    entries set to 0 (in an EANN those exits cost about what the previous member's final
    exit costs)."""
    w = sieve_weights(num_exits, normalize="log")
    w[: num_exits // 2] = 0.0
    return w


_STATIC: dict[str, Callable[..., torch.Tensor]] = {
    "const": const_weights, "opt": opt_weights, "half_end": half_end_weights,
    "linear": linear_weights, "sieve": sieve_weights, "eann_sieve": eann_sieve_weights,
}


def static_weights(name: str, num_exits: int, **kwargs) -> torch.Tensor:
    """The float32 [K] vector of a static scheme by name (``const``, ``opt``, ``half_end``,
    ``linear``, ``sieve``, ``eann_sieve``)."""
    if name not in _STATIC:
        raise ValueError(f"weighting: expected one of {sorted(_STATIC)}, got {name!r}")
    return _STATIC[name](num_exits, **kwargs)


def _base_vector(base, num_exits: int) -> torch.Tensor:
    """``base`` given as None (CONST), a static scheme name or a sequence/tensor of K weights."""
    if base is None:
        return const_weights(num_exits)
    if isinstance(base, str):
        return static_weights(base, num_exits)
    w = torch.as_tensor(base, dtype=torch.float32).detach().clone().cpu()
    if w.shape != (num_exits,):
        raise ValueError(f"base: expected {num_exits} weights (one per exit), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"base: expected finite non-negative weights with a positive sum, got {w.tolist()}")
    return w


# --- 2. the interface ---------------------------------------------------------------------

class Weighting(nn.Module):
    """One exit-weighting scheme; state (if any) in buffers so ``state_dict`` round-trips.

    A scheme supplies the weights of the next step (:meth:`weights_for_step`, float32 [K],
    no grad) and may carry the AdaLoss running averages (:meth:`ema_state`), which the
    fused op updates in place. :meth:`compute` is the whole step; schemes that weight
    samples or add terms (L2W, distillation) override it. :meth:`after_step` does the
    per-step bookkeeping; :meth:`synchronize_` makes the state identical on every
    ``torch.distributed`` rank; :meth:`set_epoch` feeds epoch-dependent schedules.
    """

    momentum: float = 0.99
    # Schemes that must see the model before each step (L2W's meta step) set this and
    # implement :meth:`pre_step`; the Trainer calls it only for them.
    needs_pre_step: bool = False
    # Schemes that train with IMTA's gradient equilibrium (``ge``) set this; the Trainer
    # then enables :func:`ann_kernels.nn.enable_gradient_equilibrium` on the model.
    gradient_equilibrium: bool = False

    def __init__(self, num_exits: int):
        super().__init__()
        self.num_exits = _check_num_exits(num_exits)

    def weights_for_step(self) -> torch.Tensor:
        raise NotImplementedError

    def ema_state(self) -> torch.Tensor | None:
        return None

    def compute(self, heads: list[torch.Tensor], target: torch.Tensor, *, ignore_index: int,
                label_smoothing: float, sample_weights: torch.Tensor | None = None) -> tuple[ExitLoss, torch.Tensor]:
        """``(ExitLoss of the fused op, the weights [K] it used)``; ``sample_weights`` ([N]
        or [K, N] float32, optional) multiply each sample's loss inside the fused op."""
        weights = self.weights_for_step()
        if weights.device != heads[0].device:
            weights = weights.to(heads[0].device)
        out = multi_exit_cross_entropy(heads, target, weights, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, ema=self.ema_state(),
                                       momentum=self.momentum, sample_weights=sample_weights)
        return out, weights

    def pre_step(self, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, *, ignore_index: int,
                 label_smoothing: float):
        """Called before the forward of each training step when ``needs_pre_step``."""
        return None

    def after_step(self, out: ExitLoss) -> None:
        pass

    def synchronize_(self) -> None:
        pass

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        pass

    def decay_weights(self) -> torch.Tensor:
        """float32 [K]: the static exit weights that scale each head's FC weight decay under
        ``TrainConfig(weight_decay_mode="reference")`` (the original's ``cost_weight *
        wd_w * l2_loss(W)``): ``base`` when the scheme has one, else ones."""
        base = getattr(self, "base", None)
        return base.detach().clone().float() if isinstance(base, torch.Tensor) else torch.ones(self.num_exits)


class StaticWeighting(Weighting):
    """A fixed weight vector (CONST, LINEAR, SIEVE, ... or any non-negative [K])."""

    def __init__(self, num_exits: int, weights, name: str = "custom"):
        super().__init__(num_exits)
        self.name = name
        self.register_buffer("base", _base_vector(weights, self.num_exits))

    def weights_for_step(self) -> torch.Tensor:
        return self.base

    def extra_repr(self) -> str:
        return f"{self.name}, weights={[round(v, 4) for v in self.base.tolist()]}"


class Oscillating(Weighting):
    """The original's default ``--samloss 6`` (module docstring): the first step adds
    (sum B)/2 to the last exit, every later step to one exit drawn from Cat(B / sum B);
    B defaults to SIEVE (w_K = 1). The draw uses torch's global RNG (saved and restored by
    the Trainer's checkpoints); the weights of the latest step are ``AnytimeLoss.weights``."""

    def __init__(self, num_exits: int, base="sieve"):
        super().__init__(num_exits)
        self.register_buffer("base", _base_vector(base, self.num_exits))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def weights_for_step(self) -> torch.Tensor:
        drawn = torch.multinomial(self.base, 1)
        s = torch.where(self.steps == 0, torch.full_like(drawn, self.num_exits - 1), drawn)
        w = self.base.clone()
        w.index_add_(0, s, (self.base.sum() / 2).reshape(1))
        return w

    def after_step(self, out: ExitLoss) -> None:
        self.steps += 1


# --- 3. registry --------------------------------------------------------------------------

WEIGHTINGS: dict[str, Callable[..., Weighting]] = {}


def register_weighting(name: str, factory: Callable[..., Weighting]) -> None:
    """Make ``AnytimeLoss(weighting=name, **kwargs)`` build ``factory(num_exits, **kwargs)``."""
    WEIGHTINGS[name] = factory


for _name in _STATIC:
    register_weighting(_name, lambda num_exits, _n=_name, **kw: StaticWeighting(
        num_exits, static_weights(_n, num_exits, **kw), name=_n))
register_weighting("oscillating", Oscillating)


def weighting_options(name: str) -> frozenset[str] | None:
    """The option names the registered scheme ``name`` accepts (``None``: any, the factory
    takes ``**kwargs``). ``compare`` uses it to give ``--weighting-arg`` only to the schemes
    that take it."""
    import inspect

    key = name.lower().replace("-", "_")
    if key not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {sorted(WEIGHTINGS)}, got {name!r}")
    factory = _STATIC.get(key, WEIGHTINGS[key])
    params = list(inspect.signature(factory).parameters.values())[1:]  # drop num_exits
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def make_weighting(weighting: str | Weighting | Sequence[float] | torch.Tensor, num_exits: int,
                   **kwargs) -> Weighting:
    """A :class:`Weighting` from a registered name (``const``, ``linear``, ``half_end``,
    ``opt``, ``sieve``, ``eann_sieve``, ``oscillating``, ``adaloss``, ...), a scheme object
    (returned as is; its ``num_exits`` must match) or an explicit weight vector [K]."""
    num_exits = _check_num_exits(num_exits)
    if isinstance(weighting, Weighting):
        if kwargs:
            raise ValueError(f"weighting: options {sorted(kwargs)} need a scheme name, not a scheme object")
        if weighting.num_exits != num_exits:
            raise ValueError(f"weighting: the scheme has {weighting.num_exits} exits but num_exits={num_exits}")
        return weighting
    if isinstance(weighting, str):
        key = weighting.lower().replace("-", "_")
        if key not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {sorted(WEIGHTINGS)}, got {weighting!r}")
        try:
            return WEIGHTINGS[key](num_exits, **kwargs)
        except TypeError as e:  # an unknown option: name the scheme
            raise ValueError(f"weighting {weighting!r}: {e}") from None
    if isinstance(weighting, (torch.Tensor, Sequence)):
        if kwargs:
            raise ValueError(f"weighting: options {sorted(kwargs)} need a scheme name, not a weight vector")
        return StaticWeighting(num_exits, weighting)
    raise TypeError(f"weighting: expected a scheme name, a Weighting or {num_exits} weights, got {type(weighting)}")
