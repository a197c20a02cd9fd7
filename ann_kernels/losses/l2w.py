"""L2W-DEN (Han et al., "Learning to Weight Samples for Dynamic Early-exiting Networks",
ECCV 2022, arXiv 2209.08310): a small meta-learned network weights every sample's loss at
every exit, so that training matches how inputs actually leave the network at test time.

Reference: LeapLabTHU/L2W-DEN, ``tools/main_cifar_DDP.py`` ``train()`` (the loop, the meta
loss), ``tools/meta.py`` ``MetaSGD.meta_step`` (the look-ahead), ``models/weight_predict.py``
``MLP_tanh`` (the weight network), ``tools/utils.py`` ``adjust_meta_learning_rate`` /
``calc_target_probs``, ``tools/args_msdnet.py`` and README.md (the recipe's arguments).

Shapes: K exits, N samples, C classes. Internally sample weights are laid out like the
fused op's ``per_sample`` losses, ``W`` [K, N] float32 (the paper's W [N, K] transposed).

One training iteration on a batch (``main_cifar_DDP.py`` ``train()``; :meth:`L2W.phases`):
the batch is cut in two halves, A = the first ceil(N/2) samples, B = the rest
(``images.chunk(2)``), and two phases run in order, "part 1" A->B then "part 2" B->A; each
phase is (every ``meta_interval`` iterations) one meta update of the weight network with
the phase's first half as the look-ahead data and its second half as the meta data, then
one real model update on the first half only. Two model updates per batch, both at the
batch's learning rate.

Weights (the real model update, :func:`sample_weighted_cross_entropy`):
  1. a forward-only pass of the fused op (under ``no_grad``: no gradient work) gives the
     detached per-sample losses l [K, N] and confidences [K, N];
  2. the weight network (MLP F -> 500 -> K, ReLU, tanh; F = K for ``inputs="loss"`` or
     ``"confidence"``, 2K for ``"both"``) maps each sample's detached features to g [N, K];
  3. W = 1 + eps (g - mean(g)), the mean taken over the whole matrix (``mean_over="all"``,
     the original's ``constraint_dimension mat``), per exit over the batch (``"exit"``,
     ``row``) or per sample over its K exits (``"sample"``, ``col``); that mean of W is
     exactly 1. g is in (-1, 1), so W is in (1 - 2 eps, 1 + 2 eps): eps <= 0.5 keeps every
     weight positive, eps in (0.5, 1] (0.8, the paper's CIFAR value) allows negative ones,
     as the original does;
  4. loss = sum_{k,i} W_ik l_ik / N_valid (the original's ``sum(mean(weight * losses, 0))``)
     by the fused op itself with ``sample_weights=W``: one pass, its gradient folded into
     the op's fp32 row scale (exact for any grad_out and dtype).

Meta update (:meth:`L2W.pre_step`, with the look-ahead half T and the meta half M):
  1. per-sample losses of the model on T (pure torch, differentiated twice: the look-ahead
     differentiates the loss's gradient again; the fused op's composite double backward
     would do it too, at no gain for these tiny heads) and
     W(phi) from the weight network;
  2. theta' = one step of the real optimiser on sum W l / N_valid, reusing its learning
     rate, momentum buffers, dampening, Nesterov flag and weight decay (``MetaSGD``, which
     loads the real optimiser's state; torch.optim.SGD's exact update), built with
     ``create_graph=True`` so theta' is differentiable in phi;
  3. the model with theta' (``torch.func.functional_call``, buffers cloned so batch-norm
     running statistics are untouched; the original's ``pseudo_net`` copy) on M; mimic
     early exiting: for j = 1..K-1 exit j takes the floor(n q_j) most confident samples
     not yet taken (n = |M|, q_k proportional to ``exit_ratio`` ** k, k = 1..K, summing to 1;
     the original's ``target_p_index 15`` is 15/20 = 0.75), the last exit takes the rest;
  4. the meta loss is the SUM over exits of the MEAN cross-entropy of each exit's own
     group (an empty group adds nothing), as ``meta_loss += F.cross_entropy(
     meta_outputs[j][selected_index], ..., reduction='mean')``;
  5. d meta / d phi (second order through theta'), all-reduced under torch.distributed
     (the original's DDP-wrapped meta net), and one Adam step on the weight network at
     ``meta_lr`` times the main optimiser's current schedule factor (lr / initial_lr: the
     cosine of ``adjust_meta_learning_rate``, which uses the main schedule's formula).

Defaults (the original's recipe; its argparse leaves eps and the constraint unset):
eps 0.8 (the paper's CIFAR setting; README's ImageNet command: 0.3), ``mean_over="all"``
(README: ``--constraint_dimension mat``), ``inputs="loss"``, hidden 500, one hidden layer,
``meta_lr`` 1e-4 and ``meta_weight_decay`` 1e-4 (README), ``meta_interval`` 1 (argparse;
README's ImageNet command: 100), ``exit_ratio`` 0.75. The model's optimiser in the original
recipe: SGD momentum 0.9 without Nesterov, weight decay 1e-4, cosine LR per batch
(:data:`L2W_RECIPE`; ``scripts/reproduce_l2w.sh`` trains with it).

Deviations (none changes the method): rows with ``ignore_index`` are dropped from the meta
half before the assignment (the original has no ignored labels); ties in confidence go to
the lower index (the original's ``sort`` is unstable); q is computed in float64 (the
original: float32, so a floor(n q_j) at an exact integer may differ by one); each parameter
uses its own param group's hyper-parameters (the original: group 0's for all). Called with
one batch and no ``meta`` (a user's own loop), :meth:`L2W.pre_step` runs the first phase's
meta update only (T = A, M = B).

Optimisers: only ``torch.optim.SGD`` is reproduced by the look-ahead (AdamW's would need
its second-moment state differentiated through; it raises a clear error instead).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ann_kernels.losses.schemes import Weighting, register_weighting
from ann_kernels.ops.multi_exit_ce import ExitLoss, multi_exit_cross_entropy

__all__ = [
    "L2W", "L2W_RECIPE", "WeightNet", "center_weights", "early_exit_assignment", "early_exit_fractions",
    "early_exit_meta_loss", "per_sample_cross_entropy", "sample_weighted_cross_entropy", "sgd_lookahead",
    "split_halves",
]

INPUTS = ("loss", "confidence", "both")
MEAN_OVER = ("sample", "exit", "all")

# The model optimiser of the original recipe (tools/args_msdnet.py defaults: SGD, momentum
# 0.9, weight decay 1e-4; torch's SGD default nesterov=False; tools/utils.py
# adjust_learning_rate: cosine per batch from lr 0.1, batch 64): TrainConfig fields.
L2W_RECIPE = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
              "batch_size": 64}


# --- 1. the sample-weighted fused loss ---------------------------------------------------

def per_sample_cross_entropy(heads: Sequence[Tensor], target: Tensor, *, ignore_index: int = -100,
                             label_smoothing: float = 0.0) -> Tensor:
    """Pure-torch l_ik [K, N] (0 on ignored rows), differentiable to any order; float32
    (float64 for float64 logits)."""
    return torch.stack([F.cross_entropy(_upcast(z), target, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, reduction="none") for z in heads])


def _upcast(z: Tensor) -> Tensor:
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def sample_weighted_cross_entropy(
    heads: Sequence[Tensor],
    target: Tensor,
    weights: Tensor | Callable[[Tensor, Tensor, Tensor], Tensor],
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[ExitLoss, Tensor]:
    """Per-sample weighted multi-exit cross-entropy through the fused op's native
    ``sample_weights`` (:func:`ann_kernels.multi_exit_cross_entropy`).

    Args:
        heads: K logits [N, C] (fp32/bf16/fp16). target: [N] int64.
        weights: W [K, N] float32, or a function ``(per_sample [K, N], confidence [K, N],
            valid [N] bool) -> W [K, N]`` called on the fused op's detached outputs (so W
            may depend on the very losses it weights). W may require grad and may be
            negative (eps > 0.5).

    Returns:
        ``(ExitLoss, W)``: ``loss`` = sum_{k,i} W_ik l_ik / N_valid (differentiable w.r.t.
        the heads and W), ``per_exit`` the unweighted L_k, the rest as the fused op's.

    Cost: one fused pass when W is given; when W is a function of the losses, a
    forward-only pass first (no gradient work: it runs under ``no_grad``) to compute them.
    """
    heads = list(heads)
    num_exits, n = len(heads), (len(target) if isinstance(target, Tensor) else 0)
    if callable(weights):
        with torch.no_grad():
            probe = multi_exit_cross_entropy([z.detach() for z in heads], target, None, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing)
        weights = weights(probe.per_sample, probe.confidence, target != ignore_index)
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (num_exits, n):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights: expected sample weights of shape {(num_exits, n)} [K, N], got {got}")
    w = weights.to(torch.float32)
    out = multi_exit_cross_entropy(heads, target, None, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   sample_weights=w)
    return out, w


class WeightNet(nn.Module):
    """g = tanh(fc2(relu(fc1(f)))): features f [N, F] -> g [N, K] in (-1, 1)
    (``models/weight_predict.py`` ``MLP_tanh`` with ``num_layers=1``)."""

    def __init__(self, in_features: int, num_exits: int, hidden: int = 500):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_exits)

    def forward(self, f: Tensor) -> Tensor:
        return torch.tanh(self.fc2(torch.relu(self.fc1(f))))


def center_weights(g: Tensor, eps: float, mean_over: str, valid: Tensor | None = None) -> Tensor:
    """W = 1 + eps (g - mean(g)) for g [K, N]; ``mean_over``: ``"sample"`` (each column's
    mean over the K exits), ``"exit"`` (each row's mean over the valid samples) or
    ``"all"`` (the mean over every valid entry); the original's ``constraint_dimension``
    ``col`` / ``row`` / ``mat``. The same mean of W is exactly 1."""
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over: expected one of {MEAN_OVER}, got {mean_over!r}")
    if mean_over == "sample":
        mean = g.mean(dim=0, keepdim=True)
    else:
        m = torch.ones(g.shape[1], dtype=g.dtype, device=g.device) if valid is None else valid.to(g.dtype)
        count = m.sum().clamp(min=1)
        if mean_over == "exit":
            mean = (g * m).sum(dim=1, keepdim=True) / count
        else:
            mean = (g * m).sum() / (count * g.shape[0])
    return 1.0 + eps * (g - mean)


# --- 3. early-exit mimicking assignment ---------------------------------------------------

def early_exit_fractions(num_exits: int, ratio: float = 0.75) -> Tensor:
    """q [K] float64, q_k proportional to ratio^k (k = 1..K), summing to 1."""
    return torch.softmax(math.log(ratio) * torch.arange(1, num_exits + 1, dtype=torch.float64), dim=0)


def early_exit_assignment(confidence: Tensor, fractions: Tensor) -> Tensor:
    """Exit index [N] int64 of each sample under simulated early exiting.

    For j = 0..K-2 in order, the floor(n q_j) most confident samples at exit j
    (``confidence`` [K, N]) among those not yet assigned go to exit j (ties: lower index
    first); the last exit takes every sample left."""
    num_exits, n = confidence.shape
    exit_of = torch.full((n,), num_exits - 1, dtype=torch.int64, device=confidence.device)
    taken = torch.zeros(n, dtype=torch.bool, device=confidence.device)
    counts = torch.floor(n * fractions.double().cpu() + 1e-9).to(torch.int64).tolist()
    for j in range(num_exits - 1):
        want = min(counts[j], int((~taken).sum()))
        if want <= 0:
            continue
        key = confidence[j].detach().double().masked_fill(taken, -math.inf)
        chosen = torch.sort(key, descending=True, stable=True).indices[:want]
        exit_of[chosen] = j
        taken[chosen] = True
    return exit_of


def early_exit_meta_loss(logits: Tensor, target: Tensor, exit_of: Tensor, *,
                         label_smoothing: float = 0.0) -> Tensor:
    """sum_j mean_{i in group j} CE(logits[j, i], target[i]): logits [K, n, C], target [n],
    exit_of [n] (from :func:`early_exit_assignment`); an empty group adds nothing. Each
    exit's group counts once whatever its size (``main_cifar_DDP.py`` ``train()``:
    ``meta_loss += F.cross_entropy(meta_outputs[j][selected_index], ..., reduction='mean')``)."""
    loss = logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    for j in range(logits.shape[0]):
        chosen = (exit_of == j).nonzero().squeeze(1)
        if chosen.numel() > 0:
            loss = loss + F.cross_entropy(_upcast(logits[j, chosen]), target[chosen],
                                          label_smoothing=label_smoothing)
    return loss


def split_halves(x: Tensor, y: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_A, y_A), (x_B, y_B))``: A the first ceil(N/2) samples, B the rest
    (``images.chunk(2, dim=0)`` in the original); N >= 2."""
    n = x.shape[0]
    if n < 2 or y.shape[0] != n:
        raise ValueError(f"x: L2W's meta step splits the batch in two halves, needs >= 2 samples "
                         f"(and as many targets), got {n} inputs and {y.shape[0]} targets")
    half = (n + 1) // 2
    return (x[:half], y[:half]), (x[half:], y[half:])


# --- 4. the optimiser's look-ahead step --------------------------------------------------

def _check_sgd(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"optimizer: L2W's look-ahead reproduces torch.optim.SGD (momentum, dampening, Nesterov, weight "
            f"decay) only, got {type(optimizer).__name__}; train with --optimizer sgd")
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("optimizer: L2W's look-ahead does not support SGD(maximize=True)")


def sgd_lookahead(params: dict[str, Tensor], grads: Sequence[Tensor | None], optimizer) -> dict[str, Tensor]:
    """theta' = the step ``optimizer`` (torch.optim.SGD) would take from ``params`` with
    ``grads``, as a differentiable function of the grads (no state is written):
    d = g + wd theta; b = mu b_old + (1 - damp) d (b = d without a momentum buffer);
    d = d + mu b (Nesterov) or b; theta' = theta - lr d. Params with no grad stay put.
    (``tools/meta.py`` ``MetaSGD.meta_step`` after ``load_state_dict(optimizer.state_dict())``.)"""
    _check_sgd(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    new = {}
    for (name, p), g in zip(params.items(), grads):
        group = group_of.get(id(p))
        if g is None or group is None:
            new[name] = p
            continue
        lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
        d = g + wd * p if wd != 0 else g
        if mu != 0:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d if buf is None else mu * buf + (1 - group["dampening"]) * d
            d = d + mu * buf if group["nesterov"] else buf
        new[name] = p - lr * d
    return new


# --- 5. the weighting scheme --------------------------------------------------------------

META_LR_SCHEDULES = ("follow", "constant")


class L2W(Weighting):
    """``AnytimeLoss(K, weighting="l2w", ...)``: meta-learned per-sample weights.

    Options (defaults: the original's recipe, module docstring): ``eps`` (0, 1] (W in
    (1 - 2 eps, 1 + 2 eps)); ``inputs`` in ``loss`` / ``confidence`` / ``both``;
    ``mean_over`` in ``all`` / ``exit`` / ``sample``; ``hidden`` (500); ``meta_lr`` /
    ``meta_weight_decay`` (Adam on the weight network); ``meta_lr_schedule``: ``follow``
    (meta_lr times the main optimiser's lr / initial_lr at every meta update, the original's
    cosine) or ``constant``; ``meta_interval`` (meta updates on every n-th batch);
    ``exit_ratio`` (q_k proportional to ratio^k).

    The Trainer cuts each batch with :meth:`phases` and, per phase, calls :meth:`pre_step`
    (the meta update) then the real update (``compute``) on the phase's first half. The
    weight network, the counters (buffers) and Adam's state (``get_extra_state``) are all in
    ``state_dict``, so checkpoints resume exactly.
    """

    num_phases = 2

    def __init__(self, num_exits: int, *, eps: float = 0.8, inputs: str = "loss", mean_over: str = "all",
                 hidden: int = 500, meta_lr: float = 1e-4, meta_weight_decay: float = 1e-4,
                 meta_lr_schedule: str = "follow", meta_interval: int = 1, exit_ratio: float = 0.75):
        super().__init__(num_exits)
        self.needs_pre_step = True
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ValueError(f"eps: expected a value in (0, 1] (W in (1 - 2 eps, 1 + 2 eps); the paper uses "
                             f"0.8 on CIFAR), got {eps!r}")
        if inputs not in INPUTS:
            raise ValueError(f"inputs: expected one of {INPUTS}, got {inputs!r}")
        if mean_over not in MEAN_OVER:
            raise ValueError(f"mean_over: expected one of {MEAN_OVER}, got {mean_over!r}")
        if meta_lr_schedule not in META_LR_SCHEDULES:
            raise ValueError(f"meta_lr_schedule: expected one of {META_LR_SCHEDULES}, got {meta_lr_schedule!r}")
        for name, value in (("hidden", hidden), ("meta_interval", meta_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(meta_lr, (int, float)) or not meta_lr > 0:
            raise ValueError(f"meta_lr: expected a positive learning rate, got {meta_lr!r}")
        if not isinstance(meta_weight_decay, (int, float)) or meta_weight_decay < 0:
            raise ValueError(f"meta_weight_decay: expected >= 0, got {meta_weight_decay!r}")
        if not isinstance(exit_ratio, (int, float)) or not (exit_ratio > 0 and math.isfinite(exit_ratio)):
            raise ValueError(f"exit_ratio: expected a finite positive number, got {exit_ratio!r}")
        self.eps, self.inputs, self.mean_over = float(eps), inputs, mean_over
        self.meta_interval, self.exit_ratio = meta_interval, float(exit_ratio)
        self.meta_lr, self.meta_weight_decay = float(meta_lr), float(meta_weight_decay)
        self.meta_lr_schedule = meta_lr_schedule
        features = 2 * num_exits if inputs == "both" else num_exits
        self.net = WeightNet(features, num_exits, hidden)
        self.meta_optimizer = torch.optim.Adam(self.net.parameters(), lr=self.meta_lr,
                                               weight_decay=self.meta_weight_decay)
        # batches_seen: iterations begun (by phases(), or by a pre_step called without meta);
        # meta_steps_seen: meta updates done.
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("meta_steps_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_meta_loss", torch.full((), float("nan")))
        self.last_sample_weights: Tensor | None = None

    # ---- weights
    def features(self, per_sample: Tensor, confidence: Tensor) -> Tensor:
        """[K, N] losses / confidences -> the weight network's input [N, F] in its dtype."""
        parts = {"loss": [per_sample], "confidence": [confidence],
                 "both": [per_sample, confidence]}[self.inputs]
        return torch.cat([p.detach().t() for p in parts], dim=1).to(self.net.fc1.weight.dtype)

    def sample_weights(self, per_sample: Tensor, confidence: Tensor, valid: Tensor | None = None) -> Tensor:
        """W [K, N] (in the weight network's dtype; differentiable w.r.t. its parameters)."""
        g = self.net(self.features(per_sample, confidence)).t()
        return center_weights(g, self.eps, self.mean_over, valid)

    def weights_for_step(self) -> Tensor:  # exit weights before any step: all ones
        return torch.ones(self.num_exits)

    def compute(self, heads, target, *, ignore_index, label_smoothing, sample_weights=None):
        # A caller's own sample_weights ([N] or [K, N]) multiply the predicted W.
        def weight_fn(per_sample, confidence, valid):
            with torch.no_grad():
                w = self.sample_weights(per_sample, confidence, valid)
                return w if sample_weights is None else w * sample_weights.to(w.device, torch.float32)

        out, w = sample_weighted_cross_entropy(heads, target, weight_fn, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing)
        valid = (target != ignore_index).to(w.dtype)
        self.last_sample_weights = w
        return out, (w * valid).sum(dim=1) / valid.sum().clamp(min=1)  # effective exit weights [K]

    # ---- the two phases of an iteration
    def phases(self, x: Tensor, y: Tensor) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Begin an iteration on the batch (x [N, ...], y [N]): ``[(A, B), (B, A)]``, each
        ``(train half, meta half)`` as ``(x, y)`` pairs, in the order they run (the
        original's "part 1: images_p1 as train, images_p2 as meta", then "part 2"). Per
        phase: ``pre_step(model, opt, *train, meta=meta)``, then the real update on train."""
        a, b = split_halves(x, y)
        self.batches_seen += 1
        return [(a, b), (b, a)]

    def meta_due(self) -> bool:
        """Whether the current iteration (the latest :meth:`phases`) has meta updates: the
        original's ``i % meta_interval == 0`` with i = the iteration's index."""
        return (int(self.batches_seen) - 1) % self.meta_interval == 0

    # ---- meta step
    def meta_loss(self, model: nn.Module, optimizer, x: Tensor, y: Tensor, *,
                  meta: tuple[Tensor, Tensor] | None = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0) -> Tensor:
        """Steps 1-4 of the meta update (module docstring) with the look-ahead half (x, y)
        and the meta half ``meta`` = (x_m, y_m) (None: (x, y) is a whole batch, split by
        :func:`split_halves`); a scalar differentiable w.r.t. the weight network."""
        _check_sgd(optimizer)
        if meta is None:
            (x, y), meta = split_halves(x, y)
        xa, ya = x, y
        xb, yb = meta
        if xa.shape[0] < 1 or xb.shape[0] < 1:
            raise ValueError(f"x / meta: L2W's meta step needs >= 1 look-ahead and >= 1 meta sample, got "
                             f"{xa.shape[0]} and {xb.shape[0]}")
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        # 1. weighted per-sample loss of the current model on the look-ahead half
        logits_a = list(functional_call(model, (params, buffers), (xa,)))
        per_sample = per_sample_cross_entropy(logits_a, ya, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing)
        valid_a = ya != ignore_index
        with torch.no_grad():
            conf_a = torch.stack([_upcast(z).softmax(-1).amax(-1) for z in logits_a])
        w = self.sample_weights(per_sample.detach(), conf_a, valid_a)
        inner = (w.to(per_sample.dtype) * per_sample).sum() / valid_a.sum().clamp(min=1)
        # 2. theta' by the real optimiser's rule, differentiable in phi
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
        new_params = sgd_lookahead(params, grads, optimizer)
        # 3. the looked-ahead model on the meta half; each exit's group
        logits_b = torch.stack(list(functional_call(model, (new_params, buffers), (xb,))))  # [K, n_b, C]
        valid_b = yb != ignore_index
        logits_b, yb = logits_b[:, valid_b], yb[valid_b]
        if yb.numel() == 0:
            return (w * 0).sum()
        with torch.no_grad():
            conf_b = _upcast(logits_b).softmax(-1).amax(-1)
        exit_of = early_exit_assignment(conf_b, early_exit_fractions(self.num_exits, self.exit_ratio))
        # 4. the sum over exits of each group's mean cross-entropy
        return early_exit_meta_loss(logits_b, yb, exit_of, label_smoothing=label_smoothing)

    def current_meta_lr(self, optimizer) -> float:
        """The Adam learning rate of a meta update now: ``meta_lr`` times the main
        optimiser's schedule factor lr / initial_lr (1 without a scheduler) when
        ``meta_lr_schedule="follow"``."""
        if self.meta_lr_schedule == "constant":
            return self.meta_lr
        group = optimizer.param_groups[0]
        return self.meta_lr * float(group["lr"]) / float(group.get("initial_lr", group["lr"]))

    def pre_step(self, model: nn.Module, optimizer, x: Tensor, y: Tensor, *,
                 meta: tuple[Tensor, Tensor] | None = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0) -> Tensor | None:
        """The meta update of a phase (step 5 on :meth:`meta_loss`), on iterations where
        :meth:`meta_due`. With ``meta`` (from :meth:`phases`): (x, y) is the phase's train
        half. Without: (x, y) is a whole batch, a new iteration begins and the first
        phase's meta update runs (T = A, M = B). Returns the meta loss (detached) or None
        when this iteration has none."""
        if meta is None:
            self.batches_seen += 1
        if not self.meta_due():
            return None
        loss = self.meta_loss(model, optimizer, x, y, meta=meta, ignore_index=ignore_index,
                              label_smoothing=label_smoothing)
        # 5. second-order gradient w.r.t. phi, averaged over ranks, one Adam step
        params = list(self.net.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        distributed = dist.is_available() and dist.is_initialized()
        for p, g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            if distributed:
                dist.all_reduce(g)
                g /= dist.get_world_size()
            p.grad = g
        lr = self.current_meta_lr(optimizer)
        for group in self.meta_optimizer.param_groups:
            group["lr"] = lr
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_steps_seen += 1
        self.last_meta_loss.fill_(float(loss.detach()))
        return loss.detach()

    # ---- checkpoints: Adam's state rides along in state_dict
    def get_extra_state(self):
        return {"meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict())}

    def set_extra_state(self, state) -> None:
        # Adam's load_state_dict keeps same-device tensors as they are: copy, so that this
        # scheme and the dict it was loaded from never share (and mutate) one buffer.
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, eps={self.eps}, inputs={self.inputs!r}, "
                f"mean_over={self.mean_over!r}, meta_lr={self.meta_lr}, "
                f"meta_lr_schedule={self.meta_lr_schedule!r}, meta_interval={self.meta_interval}, "
                f"exit_ratio={self.exit_ratio}")


register_weighting("l2w", L2W)
