"""Train an EANN: every member with ``AnytimeLoss`` and the training package's ``Trainer``,
one ordinary run directory (``last.pt``, ``metrics.jsonl``, PNGs) per member, plus a
manifest ``eann.json`` that :func:`load_eann` reads back.

Layout of a run directory ``OUT``::

    OUT/eann.json          manifest: format, growth, scale, values, member FLOPs / ratios,
                           used exits, each member's spec and weighting, train times
    OUT/member0/last.pt    member 0's checkpoint (``ann-kernels eval --checkpoint`` works on it)
    OUT/member1/...

Weighting: with ``eann_sieve`` (the default) member j >= 1 uses EANN-SIEVE (SIEVE with its
first floor(K/2) exits weighted 0: they cost about what the previous member's final exit
costs, and are dominated by it), while member 0, which has no predecessor, uses plain SIEVE.
Any other scheme (e.g. ``adaloss``) is used for every member. Exits with a static weight of
exactly 0 are left out of the sequence (``EANN.exits``): their heads were never trained.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ann_kernels.sequence.builder import default_scale, eann
from ann_kernels.sequence.model import EANN, BuildInfo

__all__ = ["MANIFEST", "load_eann", "member_weighting", "plan_members", "train_eann", "used_exits"]

MANIFEST = "eann.json"
MANIFEST_FORMAT = 1
_BUILDER_NAMES = {"resann": "resann", "msdnet": "msdnet", "transformer": "exit_transformer", "mlp": "mlp_ann"}


def member_weighting(weighting: str, j: int) -> str:
    """The weighting scheme of member j: ``eann_sieve`` becomes ``sieve`` for member 0."""
    return "sieve" if weighting == "eann_sieve" and j == 0 else weighting


def used_exits(loss_fn, num_exits: int) -> list[int]:
    """Exits whose initial loss weight is not exactly 0 (all of them if the loss has no
    ``weights`` or every weight is 0)."""
    weights = getattr(loss_fn, "weights", None)
    if weights is None:
        return list(range(num_exits))
    values = [float(w) for w in torch.as_tensor(weights).flatten().tolist()]
    used = [k for k, w in enumerate(values) if w != 0.0]
    return used if len(values) == num_exits and used else list(range(num_exits))


def _underlying_builder(model: str):
    from ann_kernels import nn as ann_nn

    if model not in _BUILDER_NAMES:
        raise ValueError(f"model: expected one of {sorted(_BUILDER_NAMES)}, got {model!r}")
    return getattr(ann_nn, _BUILDER_NAMES[model])


def plan_members(spec: dict, num_classes: int, input_shape: tuple[int, ...], *, num_members: int,
                 growth: float, scale: str | None = None, start: int | None = None) -> EANN:
    """The (untrained) EANN that :func:`train_eann` trains: ``ann_kernels.eann`` over the
    spec's model builder, with its ``model_kwargs`` fixed and ``scale`` grown."""
    from ann_kernels.train.runs import build_model

    underlying = _underlying_builder(spec["model"])
    if scale is None:
        scale = default_scale(underlying)
    kwargs = dict(spec.get("model_kwargs", {}))
    if start is None and scale not in kwargs:
        from ann_kernels.sequence.builder import _start_value

        start = _start_value(underlying, scale, kwargs, None)

    def builder(**kw):
        return build_model(spec["model"], num_classes, tuple(input_shape), **kw)

    example = torch.zeros((1, *input_shape))
    return eann(builder, num_members, growth, example_input=example, scale=scale, start=start, **kwargs)


def train_eann(spec: dict, config, out_dir: str | os.PathLike, *, num_members: int = 3, growth: float = 2.0,
               scale: str | None = None, start: int | None = None, resume: bool = False, data=None) -> EANN:
    """Train every member of an EANN in order and write ``OUT/eann.json``; return the trained
    EANN (eval mode), loaded back from the member checkpoints.

    Args:
        spec: a run spec from :func:`ann_kernels.train.make_spec` (dataset, model, model_kwargs,
            weighting, ...); ``model_kwargs`` are member 0's, except ``scale`` which is grown.
        config: :class:`ann_kernels.train.TrainConfig`, shared by every member.
        num_members, growth, scale, start: see :func:`ann_kernels.eann`.
        resume: skip members whose run already finished ``config.epochs`` epochs and continue
            a member that was interrupted (from its ``last.pt``).
        data: preloaded :class:`~ann_kernels.train.DataSplits` (default: loaded from spec).
    """
    from ann_kernels.train.runs import build_loss, build_trainer, load_data, run_dir_complete

    out = Path(out_dir)
    data = data if data is not None else load_data(spec)
    plan = plan_members(spec, data.num_classes, data.input_shape, num_members=num_members, growth=growth,
                        scale=scale, start=start)
    info = plan.build_info
    old = _read_manifest(out) if resume and (out / MANIFEST).is_file() else None
    if old is not None and list(old["values"]) != list(info.values):
        raise ValueError(f"resume: {out / MANIFEST} was planned with {old['scale']}={old['values']}, this run "
                         f"plans {info.scale}={list(info.values)}; use another --out or drop --resume")
    members, train_seconds = [], list(old.get("train_seconds", [None] * num_members)) if old else [None] * num_members
    for j in range(num_members):
        member_spec = {**spec, "model_kwargs": dict(info.member_kwargs[j]),
                       "weighting": member_weighting(spec["weighting"], j)}
        member_dir = out / f"member{j}"
        loss = build_loss(member_spec, plan.members[j].num_exits)
        exits = used_exits(loss, plan.members[j].num_exits)
        members.append({"dir": member_dir.name, "spec": member_spec, "exits": exits,
                        "weighting": member_spec["weighting"], "flops": info.member_flops[j]})
        if resume and run_dir_complete(member_dir, config, member_spec):
            tqdm.write(f"[eann] member {j}: {member_dir}/last.pt is complete, not retrained")
            continue
        tqdm.write(f"[eann] member {j}/{num_members - 1}: {spec['model']} {info.scale}={info.values[j]} "
                   f"({info.member_flops[j] / 1e6:.3g} MFLOPs), weighting {member_spec['weighting']}, "
                   f"sequence uses exits {exits}")
        t0 = time.perf_counter()
        trainer = build_trainer(member_spec, replace(config), member_dir, resume=resume, data=data,
                                label=f"member{j}")
        trainer.fit()
        train_seconds[j] = time.perf_counter() - t0
    manifest = {
        "format": MANIFEST_FORMAT, "growth": info.growth, "scale": info.scale, "values": list(info.values),
        "member_flops": list(info.member_flops), "cost_ratios": list(info.cost_ratios),
        "input_shape": list(data.input_shape), "num_classes": data.num_classes, "epochs": config.epochs,
        "weighting": spec["weighting"], "members": members, "train_seconds": train_seconds,
    }
    _write_manifest(out, manifest)
    return load_eann(out)[0]


def _write_manifest(out: Path, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)


def _read_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"run: {path} does not exist (train first: ann-kernels eann train --out {run_dir})")
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"run: {path} is not an EANN manifest (format {MANIFEST_FORMAT})")
    return manifest


def load_eann(run_dir: str | os.PathLike) -> tuple[EANN, dict]:
    """``(EANN in eval mode, manifest)`` from a directory written by :func:`train_eann`."""
    from ann_kernels.train.runs import load_trained

    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    models = [load_trained(run_dir / m["dir"] / "last.pt")[0] for m in manifest["members"]]
    info = BuildInfo(scale=manifest["scale"], values=tuple(manifest["values"]), growth=float(manifest["growth"]),
                     member_kwargs=tuple(m["spec"]["model_kwargs"] for m in manifest["members"]),
                     member_flops=tuple(manifest["member_flops"]), cost_ratios=tuple(manifest["cost_ratios"]))
    result = EANN(models, [m["exits"] for m in manifest["members"]], build_info=info).eval()
    result.member_flops(torch.zeros((1, *manifest["input_shape"])))
    return result, manifest
