"""A model as data: :class:`ModelState` (CPU tensors, the JSON-able state, the fingerprint),
what :mod:`core.persist` writes and :mod:`core.loading` reads, and its conversion to and from
:class:`ModelParts`, what a :class:`core.model.Model` is made of. ``b`` and ``g_a`` are never in
a state: decoding anchors the accounting on the stored weights, with ``r0_a`` the stored budget
used."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from core.accountant import anchored
from core.data import Dataset
from core.epoch import NoiseEpoch
from core.labels import LabelCoding
from core.problem import Hyper, Problem, make_problem, resolve_device
from core.rowview import row_view, view_of


@dataclass(frozen=True)
class ModelState:
    """Everything a snapshot stores of a model (:meth:`core.stored.StoredModel.to_state`): CPU
    ``tensors`` (``weights`` float64 (d, K), ``alive`` uint8 (n,), ``omega`` uint8 (n, K) when
    subsampled), the JSON-able ``state`` (``state.json``; :mod:`core.persist` adds ``format``,
    ``saved_at``, ``dataset_sha256`` and ``dataset_file``) and the training data's
    ``fingerprint``."""

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    fingerprint: str


@dataclass(frozen=True)
class ModelParts:
    """What a model is made of: the fixed problem, label coding and options, the current noise
    epoch, and the counters that outlive epochs."""

    problem: Problem
    coding: LabelCoding
    hyper: Hyper
    epoch: NoiseEpoch
    budget_total: float
    version: int
    safety_retrains: int
    save_seq: int
    extra: dict[str, Any]


def encode(parts: ModelParts, fingerprint: str) -> ModelState:
    """The :class:`ModelState` of ``parts`` (training data fingerprint ``fingerprint``)."""
    p, e, h = parts.problem, parts.epoch, parts.hyper
    tensors = {
        "weights": e.W.detach().cpu().contiguous(),
        "alive": e.alive.detach().cpu().to(torch.uint8).contiguous(),
    }
    if h.subsample_ratio is not None:
        tensors["omega"] = p.omega.detach().cpu().to(torch.uint8).contiguous()
    state = {
        "seq": parts.save_seq,
        "version": parts.version,
        "hyper": dataclasses.asdict(h),
        "extractor_removed": e.extractor_removed,
        "classes": list(parts.coding.classes),
        "binary": parts.coding.binary,
        "budget_total": parts.budget_total,
        # the anchor of the next start-up: an upper bound on ||U|| of the stored weights
        "budget_used": e.acct.used,
        "removed_in_epoch": e.removed_in_epoch,
        "max_removals_resolved": e.max_removals,
        # (rows, value) of the last "auto" estimate: b-independent (shadow runs), kept so that a
        # restart scales it instead of running the shadow runs again
        "auto_basis": list(e.auto_basis) if e.auto_basis is not None else None,
        # the accounting its shadow runs charged (states without it: the exact residual, also
        # under "bound", where that is far too lax; decode drops such a basis)
        "auto_basis_accounting": h.accounting,
        "safety_retrains": parts.safety_retrains,
        "certified": e.certified,
        "x_norm2": p.x_norm2,
        "n_rows": e.alive.numel(),
        "n_alive": int(e.alive.sum()),
        "extra": parts.extra,
    }
    return ModelState(tensors=tensors, state=state, fingerprint=fingerprint)


def decode(state: ModelState, dataset: Dataset, device: str | torch.device | None) -> ModelParts:
    """The parts a (verified, :mod:`core.invariants`) state on ``dataset`` describes, on
    ``device`` (None: CUDA when available)."""
    s, tensors, ds = state.state, state.tensors, dataset
    dev = resolve_device(device)
    coding = LabelCoding(tuple(s["classes"]), bool(s["binary"]))
    Y = coding.encode(ds.y_train).to(dev)
    omega = tensors["omega"].to(dev, torch.float64) if "omega" in tensors else torch.ones_like(Y)
    hyper = Hyper(**s["hyper"])
    problem = make_problem(ds.X_train, Y, omega, hyper.lam, dev)
    problem = dataclasses.replace(problem, x_norm2=max(problem.x_norm2, s["x_norm2"]))
    basis = s.get("auto_basis")  # absent in states written before it was kept
    if hyper.accounting != "exact" and s.get("auto_basis_accounting") != hyper.accounting:
        basis = None  # estimated on the exact residual: the next retrain estimates it again
    W = tensors["weights"].to(dev, torch.float64)
    alive = tensors["alive"].to(dev).bool()
    view = row_view(problem, alive)
    rows_problem, rows_alive = view_of(problem, view, alive)
    epoch = NoiseEpoch(
        version=int(s["version"]),
        W=W,
        alive=alive,
        noise=None,
        acct=anchored(hyper.accounting, rows_problem, W, rows_alive, r0=float(s["budget_used"])),
        certified=bool(s["certified"]),
        max_removals=s["max_removals_resolved"],
        auto_basis=(int(basis[0]), int(basis[1])) if basis else None,
        removed_in_epoch=int(s["removed_in_epoch"]),
        extractor_removed=int(s.get("extractor_removed", 0)),
        view=view,
    )
    return ModelParts(
        problem=problem,
        coding=coding,
        hyper=hyper,
        epoch=epoch,
        budget_total=float(s["budget_total"]),
        version=int(s["version"]),
        safety_retrains=int(s["safety_retrains"]),
        save_seq=int(s["seq"]),
        extra=dict(s.get("extra") or {}),
    )
