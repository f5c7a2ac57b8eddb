"""``certremove audit``: look at what a removal left behind, offline (operator only).

The certificate says: after the removals, the released model is as close to a model retrained
from scratch without the removed rows as two such retrains (independent noise draws) are to each
other. This module measures that for the current model of a state directory (or for a release
written under ``<state_dir>/releases/<model>/NNNNNNNN/``, or for a model in memory):

- **Distances.** It retrains from scratch on the model's remaining rows (every row the removal
  ledger names is excluded) with the same hyper-parameters: once unperturbed (``b = 0``) and
  ``draws`` times (10) with fresh, independent noise. It reports ``||W_released - W_draw_i||``
  per class and in total (Frobenius; mean over the draws) against the spread of two retrains
  ``||W_draw_i - W_draw_j||`` (mean over the pairs), and against the spread the linearised noise
  predicts, ``E||H^-1 (b_1 - b_2)||`` with ``H`` the Hessian of the unperturbed retrain
  (``sqrt(2) sigma sqrt(sum_k tr H_k^-2)``, with its relative standard deviation). The released
  weights pass within ``max(observed, predicted spread) (1 + 3 rel_sd) + budget_used / (lam n')``
  (the last term is the most the certified residual ``U`` can move the minimiser:
  ``||H^-1 U|| <= ||U|| / (lam n')``).
- **Membership.** For a sample of ``sample`` removed rows, the row's one-vs-rest loss
  ``sum_k log(1 + exp(-y_k w_k.x))`` and the predicted probability of its true label
  (``sigmoid`` of the true class's margin) under (1) the released model, (2) a retrain with a
  fresh draw, (3) the model before removal, counterfactually: retrained from scratch on the
  remaining rows plus the removed ones, same hyper-parameters, its own fresh draw (the first
  snapshot is usually pruned). Two tests at ``level`` (0.01), each of (1) and (3) against
  retrains: the two-sided Mann-Whitney U test (unpaired; KS alongside) against the retrain with
  draw 1, and the **across-draws** test, which decides: the sampled rows' mean loss under the
  model against its values under the ``draws`` retrains (a two-sided prediction-interval t
  test). Rows removed together share each draw's effect (a class emptied by the removal has a
  column of pure noise), so two honest retrains can differ systematically on them and the
  two-sample test over-rejects; the report gives the share of retrain pairs it tells apart.
  Expected: (1) is not distinguishable; (3) is for a removal that leaves a mark (a whole class
  or cluster); many scattered rows usually are not, and then the membership test has little
  power on this removal (the report says so).
- **Residual.** The certificate promises that the released weights exactly minimise
  ``L_{b-U}`` on the remaining rows with ``||U||_F <= budget_used <= budget_total``. ``b`` never
  reaches the disk, so offline the audit checks what it can independently, in float64:
  ``U`` changes between two snapshots of one noise epoch (one model version) by exactly
  ``grad L_0(W_1; D_1) - grad L_0(W_0; D_0)`` (the ``b`` terms cancel), so the budget used
  recorded at the oldest kept snapshot of the epoch plus that norm is an upper bound on
  ``||U||`` recomputed from the files alone, which must stay within the budget; and
  ``-grad L_0(W; D') = b - U`` must look like a draw of ``N(0, sigma^2 I)`` (its norm against
  ``sigma sqrt(dK)``, a KS test of its coordinates): a model released without its noise fails
  it. For a model in memory (``b`` still there) it computes ``||U||_F = ||grad L_b(W; D')||_F``
  itself and compares it with the budget used.

**Internal only.** The distances, the removed rows' losses, the residual figures and the budget
depend on the secret noise draw (docs/design.md "Secrets and limits"): keep the report with the
state directory, never publish it. It holds no sample id and never the noise. The audit's own
draws are not secret (``seed`` makes them reproducible) and are never released.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from producer import schema

if TYPE_CHECKING:
    import torch

    from core.model import Model
    from core.problem import Hyper, Problem

#: the notice every output carries
NOTICE = (
    "INTERNAL ONLY: these figures depend on the secret noise draw (distances, removed rows' "
    "losses, residual and budget); never publish them"
)
#: the default level of the two-sample tests
LEVEL = 0.01
#: removed rows sampled for the membership test by default
DEFAULT_SAMPLE = 500
#: ``--out`` suffixes and what they write
FORMATS = {".json": "json", ".png": "png"}
#: retrains with independent draws (the spread, and the null of the across-draws test)
DEFAULT_DRAWS = 10
#: a distance passes within this many relative standard deviations of the spread
SPREAD_SDS = 3.0
#: the folder of a state directory that holds the releases
RELEASES = "releases"


class AuditError(ValueError):
    """The audit cannot run; ``code`` is the exit status (1: nothing to audit yet or a state the
    audit refuses, 2: bad arguments)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Target:
    """What is audited: released weights on a model's fixed problem, and which rows are gone."""

    #: ``state``, ``release`` or ``memory``
    source: str
    #: a short description (``snapshot 000000000004``, ``release 3``, ``model in memory``)
    label: str
    problem: Problem
    hyper: Hyper
    binary: bool
    classes: list[int]
    #: released weights (d, K) float64
    W: torch.Tensor
    #: rows alive in the released model (n,)
    alive: torch.Tensor
    #: rows the released model no longer holds (sorted)
    removed_rows: np.ndarray
    version: int | None
    budget_total: float
    budget_used: float | None
    certified: bool | None
    #: ``b`` (only for a model in memory)
    noise: torch.Tensor | None = None
    #: what the ledger said (counts only)
    ledger: dict[str, Any] = field(default_factory=dict)
    #: the residual's independent bound from an older snapshot of the same epoch
    epoch_check: dict[str, Any] | None = None
    #: held-out rows, for accuracies (float32 (m, d), int64 (m,)) or None
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- arguments


def check_outs(outs: Sequence[Path]) -> None:
    """Refuse ``--out`` paths that cannot be written, before any work.

    Raises:
        AuditError: a suffix other than .json or .png, a directory, a missing or unwritable
            folder (2).
    """
    for out in outs:
        out = Path(out)
        if out.suffix.lower() not in FORMATS:
            raise AuditError(f"--out {out}: name a {' or '.join(FORMATS)} file")
        folder = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            raise AuditError(f"--out {out} is a directory")
        if not folder.is_dir():
            raise AuditError(f"--out {out}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise AuditError(f"--out {out}: not writable")


def check_numbers(sample: int, draws: int, level: float) -> None:
    """Refuse a bad ``--sample``, ``--draws`` or ``--level``.

    Raises:
        AuditError: (2) what is wrong.
    """
    if sample < 1:
        raise AuditError(f"--sample must be >= 1, got {sample}")
    if draws < 3:
        raise AuditError(
            f"--draws must be >= 3 (two for the spread, the rest for the null), got {draws}"
        )
    if not 0 < level < 1:
        raise AuditError(f"--level must lie in (0, 1), got {level}")


def _need_state(state_dir: Path) -> Path:
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise AuditError(f"{state_dir} is not a directory (give the worker's --state)")
    return state_dir


# --------------------------------------------------------------------------- targets


def _ledger_rows(
    state_dir: Path, index: Any, until: float | None = None
) -> tuple[list[int], dict[str, Any]]:
    """Rows of the ids the ledger says were removed (those applied at or before ``until``
    when given), and counts of what it held."""
    from worker.ledger import LedgerDamagedError, read_records  # noqa: PLC0415

    ids: list[Any] = []
    try:
        for rec in read_records(state_dir):
            if until is not None and rec.get("t") is not None and float(rec["t"]) > until:
                continue  # applied after the release (a line without a time is counted)
            ids += rec.get("x") or []
    except LedgerDamagedError as exc:
        raise AuditError(str(exc), 1) from exc
    rows, unknown = index.rows_for_ids(ids)
    return sorted(set(rows)), {"ids": len(ids), "rows": len(set(rows)), "unknown_ids": len(unknown)}


def _load(state_dir: Path, snapshot: str | None, device: str) -> tuple[Any, Any]:
    """(:class:`core.persist.Loaded`, :class:`core.state.ModelParts`) of a snapshot."""
    from core.errors import StateError, StateNotFoundError  # noqa: PLC0415
    from core.persist import read_state  # noqa: PLC0415
    from core.state import decode  # noqa: PLC0415

    try:
        loaded = read_state(state_dir, snapshot)
    except StateNotFoundError as exc:
        raise AuditError(f"no model in {state_dir}: {exc}", 1) from exc
    except (StateError, ValueError) as exc:
        raise AuditError(str(exc), 1) from exc
    return loaded, decode(loaded.state, loaded.dataset, device)


def _removed(alive: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(~alive.cpu().numpy())


def _test_rows(dataset: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if dataset is None or len(dataset.y_test) == 0:
        return None
    return dataset.X_test, dataset.y_test


def target_from_state(
    state_dir: Path, *, snapshot: str | None = None, device: str = "cpu"
) -> Target:
    """The current model of ``state_dir`` (or the snapshot named), with the ledger's removed rows.

    Raises:
        AuditError: no directory (2), no model, a damaged state, a ledger that names rows alive
            in the model (1).
    """
    from core.ids import IdIndex  # noqa: PLC0415

    state_dir = _need_state(state_dir)
    loaded, parts = _load(state_dir, snapshot, device)
    epoch, s = parts.epoch, loaded.state.state
    rows, counts = _ledger_rows(state_dir, IdIndex(loaded.dataset.ids_train))
    alive = epoch.alive
    alive_np = alive.cpu().numpy()
    back = [r for r in rows if alive_np[r]]
    if back:
        raise AuditError(
            f"{len(back)} rows the ledger says were removed are alive in snapshot {loaded.name}: "
            "the state is damaged or rolled back (run certremove state verify)",
            1,
        )
    removed = _removed(alive)
    counts["dead_rows_not_in_ledger"] = int(len(set(removed.tolist()) - set(rows)))
    target = Target(
        source="state",
        label=f"snapshot {loaded.name}",
        problem=parts.problem,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=epoch.W,
        alive=alive,
        removed_rows=removed,
        version=parts.version,
        budget_total=parts.budget_total,
        budget_used=float(s["budget_used"]),
        certified=bool(s["certified"]),
        ledger=counts,
        test=_test_rows(loaded.dataset),
        extra={"snapshot": loaded.name, "removed_in_epoch": int(s["removed_in_epoch"])},
    )
    target.epoch_check = _epoch_check(state_dir, loaded.name, parts, float(s["budget_used"]))
    return target


def target_from_model(model: Model) -> Target:
    """A model in memory (its noise ``b`` included when it still has it: then the audit
    computes the true residual ``||U||_F``). The removed rows are the ones not alive."""
    from core.state import decode  # noqa: PLC0415

    ds = model.dataset
    if ds is None:
        from core.data import Dataset  # noqa: PLC0415

        X, y, ids = model.training_data()
        ds = Dataset(X, y, ids, X[:0], y[:0], None, meta={"name": "in-memory"})
    parts = decode(model.to_state(), ds, model.device)
    return Target(
        source="memory",
        label="model in memory",
        problem=parts.problem,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=parts.epoch.W,
        alive=parts.epoch.alive,
        removed_rows=_removed(parts.epoch.alive),
        version=model.version,
        budget_total=model.budget_total,
        budget_used=model.budget_used,
        certified=model.certified,
        noise=model.noise,
        test=_test_rows(ds),
    )


def release_dirs(
    state_dir: Path, model: str | None, release_dir: Path | None = None
) -> tuple[str, Path]:
    """(model name, its release folder) under ``release_dir`` (default
    ``<state_dir>/releases``).

    Raises:
        AuditError: no releases, or several models and none named (2).
    """
    root = Path(release_dir) if release_dir is not None else Path(state_dir) / RELEASES
    if model is not None:
        try:
            schema.check_model_name(model)
        except ValueError as exc:
            raise AuditError(str(exc)) from None
    models = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if model is None:
        if len(models) != 1:
            what = "no releases" if not models else f"releases of {', '.join(models)}"
            raise AuditError(f"{root}: {what}; name the model with --model")
        model = models[0]
    folder = root / model
    if not folder.is_dir():
        raise AuditError(f"no releases of model {model!r} under {root}")
    return model, folder


def _created_at(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
    return None


def target_from_release(
    state_dir: Path,
    release: int,
    *,
    model: str | None = None,
    release_dir: Path | None = None,
    device: str = "cpu",
) -> Target:
    """Release ``release`` of ``<state_dir>/releases/<model>/``: its weights (verified against
    the manifest's ``content_sha256``) on the state directory's data. Its remaining rows are a
    kept snapshot's with the very same weights when there is one, else every row but those the
    ledger removed at or before the release's ``created_at``.

    Raises:
        AuditError: no such release, a tampered or unreadable one, weights of the wrong shape.
    """
    import torch  # noqa: PLC0415
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load as load_tensors  # noqa: PLC0415

    from core.ids import IdIndex  # noqa: PLC0415
    from core.persist import list_snapshots  # noqa: PLC0415

    state_dir = _need_state(state_dir)
    name, folder = release_dirs(state_dir, model, release_dir)
    path = folder / f"{int(release):08d}"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        blob = (path / "weights.safetensors").read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(
            f"no release {release} of model {name!r} ({exc.filename} missing)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise AuditError(f"release {release} of model {name!r} cannot be read: {exc}", 1) from exc
    if not isinstance(manifest, dict):
        raise AuditError(f"{path / 'manifest.json'} is not a JSON object", 1)
    digest = manifest.get("content_sha256")
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise AuditError(f"{path / 'weights.safetensors'} does not match its manifest", 1)
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError) as exc:
        raise AuditError(f"{path / 'weights.safetensors'} cannot be read: {exc}", 1) from exc
    loaded, parts = _load(state_dir, None, device)
    p = parts.problem
    d, k = p.X.shape[1], p.Y.shape[1]
    W = None
    for key in ("weights", "W", *sorted(tensors)):
        t = tensors.get(key)
        if t is not None and t.numel() == d * k and t.ndim in (1, 2):
            W = t.to(p.X.device, torch.float64).reshape(d, k)
            break
    if W is None:
        raise AuditError(f"release {release} holds no ({d}, {k}) weights for this state", 1)
    alive = None
    snapshot = None
    check = None
    for info in list_snapshots(state_dir):
        if not info.valid:
            continue
        kept, other = _load(state_dir, info.name, device)
        if torch.equal(other.epoch.W, W):
            alive, snapshot = other.epoch.alive, info.name
            used = float(kept.state.state["budget_used"])
            check = _epoch_check(state_dir, info.name, other, used)
            break
    until = _created_at(manifest.get("created_at"))
    rows, counts = _ledger_rows(state_dir, IdIndex(loaded.dataset.ids_train), until)
    if alive is None:
        used = math.nan
        alive = torch.ones_like(parts.epoch.alive)
        alive[torch.as_tensor(rows, dtype=torch.long, device=alive.device)] = False
    counts["rows_from"] = f"snapshot {snapshot}" if snapshot else "ledger up to created_at"
    return Target(
        source="release",
        label=f"release {int(release)} of model {name}",
        problem=p,
        hyper=parts.hyper,
        binary=parts.coding.binary,
        classes=list(parts.coding.classes),
        W=W,
        alive=alive,
        removed_rows=_removed(alive),
        version=manifest.get("model_version"),
        budget_total=parts.budget_total,
        budget_used=None if math.isnan(used) else used,
        certified=manifest.get("certified"),
        ledger=counts,
        epoch_check=check,
        test=_test_rows(loaded.dataset),
        extra={"release": int(release), "model": name, "snapshot": snapshot},
    )


# --------------------------------------------------------------------------- the maths


def _grad0(problem: Problem, W: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``grad L_0(W; alive rows)`` in float64 (d, K)."""
    from core.loss import gradient  # noqa: PLC0415

    return gradient(
        problem.X, problem.Y, problem.weights(alive), W, problem.lam, float(alive.sum())
    )


def _epoch_check(state_dir: Path, current: str, parts: Any, used: float) -> dict[str, Any]:
    """An independent upper bound on ``||U||_F`` of the current weights, from the oldest valid
    kept snapshot of the same noise epoch (model version): ``U`` changed since by exactly
    ``grad L_0(W; D') - grad L_0(W_e; D_e)`` (the ``b`` terms cancel), so
    ``||U|| <= budget_used_e + ||that||``, recomputed here in float64 from the two snapshots'
    files alone. It must stay within the budget; the recorded budget used is the worker's own
    bound of the same kind (from its own anchor: the training, or the state it started from)."""
    from core.loss import frobenius  # noqa: PLC0415
    from core.persist import list_snapshots  # noqa: PLC0415

    same = [
        i
        for i in list_snapshots(state_dir)
        if i.valid and i.version == parts.version and i.seq < int(current)
    ]
    if not same:
        return {"available": False, "why": "no older kept snapshot of this noise epoch"}
    oldest = min(same, key=lambda i: i.seq)
    loaded, other = _load(state_dir, oldest.name, str(parts.problem.X.device))
    p = parts.problem
    g_now = _grad0(p, parts.epoch.W, parts.epoch.alive)
    g_then = _grad0(p, other.epoch.W, other.epoch.alive)
    change = frobenius(g_now - g_then)
    used_then = float(loaded.state.state["budget_used"])
    bound = used_then + change
    # float64 summation of O(n d) terms: a relative slack far above its rounding error
    slack = 1e-9 * max(1.0, parts.budget_total)
    return {
        "available": True,
        "from_snapshot": oldest.name,
        "budget_used_then": used_then,
        "gradient_change": change,
        "independent_bound": bound,
        "recorded_budget_used": used,
        "within_budget": bool(bound <= parts.budget_total + slack),
    }


def _fit(
    problem: Problem, alive: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, budget: float
) -> tuple[torch.Tensor, float]:
    """Minimise ``L_B`` on ``alive`` from scratch (the minimiser is unique: the warm start only
    saves iterations); (weights, final residual)."""
    from core.newton import gradient_tolerance, newton_fit  # noqa: PLC0415

    n_reg = float(alive.sum())
    fit = newton_fit(
        problem.X,
        problem.Y,
        problem.weights(alive),
        problem.lam,
        n_reg,
        B,
        tol=gradient_tolerance(problem.lam, n_reg, budget),
        W0=W0,
        hess_dtype=problem.hess_dtype,
    )
    return fit.W, fit.r0


def _row_figures(problem: Problem, W: torch.Tensor, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: the one-vs-rest loss ``sum_k log(1 + exp(-Y_k w_k.x))`` and the predicted
    probability of the true label (``sigmoid`` of the true class's margin)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    idx = torch.as_tensor(rows, dtype=torch.long, device=problem.X.device)
    X, Y = problem.X[idx], problem.Y[idx]
    Z = Y * (X @ W)
    loss = F.softplus(-Z).sum(1)
    true_col = Y.argmax(1) if Y.shape[1] > 1 else torch.zeros(len(idx), dtype=torch.long)
    z_true = Z.gather(1, true_col.to(Z.device)[:, None])[:, 0]
    return {"loss": loss.cpu().numpy(), "p_true": torch.sigmoid(z_true).cpu().numpy()}


def _accuracy(target: Target, W: torch.Tensor) -> float | None:
    import torch  # noqa: PLC0415

    if target.test is None:
        return None
    X, y = target.test
    scores = X.to(W.device, torch.float64) @ W
    if target.binary:
        pred = torch.where(scores[:, 0] > 0, target.classes[1], target.classes[0])
    else:
        pred = scores.argmax(1)
    return float((pred.cpu() == y.cpu().long()).double().mean())


def _spread_prediction(
    problem: Problem, alive: torch.Tensor, W0: torch.Tensor, sigma: float
) -> dict[str, Any]:
    """The spread of two draws the linearised noise predicts: ``v = H^-1 (b_1 - b_2)``,
    ``E||v||^2 = 2 sigma^2 sum_k tr H_k^-2``, and the relative sd of ``||v||``."""
    import torch  # noqa: PLC0415

    from core.loss import hessians, margins  # noqa: PLC0415

    n_reg = float(alive.sum())
    H = hessians(
        problem.X,
        problem.weights(alive),
        margins(problem.X, problem.Y, W0),
        problem.lam,
        n_reg,
        dtype=torch.float64,
    )
    eig = torch.linalg.eigvalsh(H)  # (K, d), positive
    tr2 = (eig**-2).sum(1)
    tr4 = (eig**-4).sum(1)
    mean_sq = 2 * sigma**2 * tr2
    var_sq = 2 * (2 * sigma**2) ** 2 * tr4
    total_mean, total_var = float(mean_sq.sum()), float(var_sq.sum())
    return {
        "per_class": [math.sqrt(float(v)) for v in mean_sq],
        "total": math.sqrt(total_mean),
        "rel_sd": math.sqrt(total_var) / (2 * total_mean) if total_mean > 0 else 0.0,
    }


def _norms(A: torch.Tensor, B: torch.Tensor) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    D = (A - B).double()
    return {
        "per_class": [float(x) for x in torch.linalg.vector_norm(D, dim=0)],
        "total": float(torch.linalg.vector_norm(D)),
    }


def _test(a: np.ndarray, b: np.ndarray, level: float) -> dict[str, Any]:
    from scipy.stats import ks_2samp, mannwhitneyu  # noqa: PLC0415

    if len(a) == 0 or len(b) == 0:
        return {"mannwhitney_p": None, "ks_p": None, "distinguishable": None}
    mw = mannwhitneyu(a, b, alternative="two-sided")
    ks = ks_2samp(a, b)
    return {
        "mannwhitney_u": float(mw.statistic),
        "mannwhitney_p": float(mw.pvalue),
        "ks_statistic": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "distinguishable": bool(mw.pvalue < level),
    }


def _summary(fig: dict[str, np.ndarray]) -> dict[str, Any]:
    loss, p = fig["loss"], fig["p_true"]
    if len(loss) == 0:
        return {}
    return {
        "loss_mean": float(loss.mean()),
        "loss_median": float(np.median(loss)),
        "p_true_mean": float(p.mean()),
        "share_p_true_over_half": float((p > 0.5).mean()),
    }


def _noise_check(target: Target, g0: torch.Tensor) -> dict[str, Any]:
    """``-grad L_0(W; D') = b - U`` against ``N(0, sigma^2 I)``."""
    from scipy.stats import kstest  # noqa: PLC0415

    sigma = float(target.hyper.sigma)
    v = (-g0).double().cpu().numpy().ravel()
    expected = sigma * math.sqrt(v.size)
    norm = float(np.linalg.norm(v))
    out: dict[str, Any] = {"norm": norm, "expected_norm": expected, "sigma": sigma}
    if sigma <= 0:
        out.update(ratio=None, ks_p=None, consistent=norm <= (target.budget_used or 0.0) + 1e-9)
        return out
    # a chi distribution with dK degrees of freedom: sd about sigma / sqrt(2); U adds its norm
    slack = 5 * sigma / math.sqrt(2) + (target.budget_used or target.budget_total)
    ks = kstest(v / sigma, "norm")
    out.update(
        ratio=norm / expected,
        coordinate_sd_over_sigma=float(v.std() / sigma),
        ks_p=float(ks.pvalue),
        consistent=bool(abs(norm - expected) <= slack),
    )
    return out


def _across_draws(value: float, null: np.ndarray, level: float) -> dict[str, Any]:
    """Is ``value`` (one model's mean loss on the sampled removed rows) a plausible member of
    ``null`` (the same figure under retrains with independent draws)? A two-sided prediction
    interval test on the logarithm (a mean loss is positive and skewed where the loss is near
    0): ``t = (log value - m) / (s sqrt(1 + 1/R))``, ``m``, ``s`` the mean and sd of the
    retrains' logs, ``R - 1`` degrees of freedom. ``band`` is the interval that holds a further
    retrain's value with probability ``1 - level``, in loss units."""
    from scipy.stats import t as student  # noqa: PLC0415

    r = len(null)
    logs = np.log(np.maximum(null, 1e-300))
    mean, sd = float(logs.mean()), float(logs.std(ddof=1))
    scale = sd * math.sqrt(1 + 1 / r)
    x = math.log(max(value, 1e-300))
    if scale <= 0:
        stat = 0.0 if x == mean else math.inf
    else:
        stat = (x - mean) / scale
    p = float(2 * student.sf(abs(stat), r - 1)) if math.isfinite(stat) else 0.0
    half = float(student.ppf(1 - level / 2, r - 1)) * scale
    return {
        "value": value,
        "retrains_mean": float(null.mean()),
        "retrains_sd": float(null.std(ddof=1)),
        "t": stat if math.isfinite(stat) else None,
        "p": p,
        "band": [math.exp(mean - half), math.exp(mean + half)],
        "distinguishable": bool(p < level),
    }


def run_audit(
    target: Target,
    *,
    sample: int = DEFAULT_SAMPLE,
    draws: int = DEFAULT_DRAWS,
    seed: int | None = None,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Audit ``target`` (see the module docstring); return every figure as JSON-able data.

    Raises:
        AuditError: nothing removed yet (1), a bad ``sample``, ``draws`` or ``level`` (2).
    """
    import torch  # noqa: PLC0415

    from core.loss import frobenius  # noqa: PLC0415
    from core.noise import draw_noise  # noqa: PLC0415

    check_numbers(sample, draws, level)
    removed = target.removed_rows
    if len(removed) == 0:
        raise AuditError(f"no rows removed yet in {target.label}: nothing to audit", 1)
    started = time.monotonic()
    p, h = target.problem, target.hyper
    shape = (p.X.shape[1], p.Y.shape[1])
    seeds = np.random.SeedSequence(seed).spawn(draws + 2)
    rng = np.random.default_rng(seeds[-1])

    def draw(i: int) -> torch.Tensor:
        return draw_noise(shape, h.sigma, np.random.default_rng(seeds[i]), p.X.device)

    alive = target.alive
    before_alive = alive.clone()
    before_alive[torch.as_tensor(removed, dtype=torch.long, device=alive.device)] = True
    W = target.W
    zero = torch.zeros(shape, dtype=torch.float64, device=p.X.device)
    fits: dict[str, Any] = {}
    W0, fits["unperturbed"] = _fit(p, alive, zero, W, target.budget_total)
    Ws = []
    for i in range(draws):
        Wi, fits[f"draw_{i + 1}"] = _fit(p, alive, draw(i), W0, target.budget_total)
        Ws.append(Wi)
    Wb, fits["before_removal"] = _fit(p, before_alive, draw(draws), W0, target.budget_total)

    # distances
    predicted = _spread_prediction(p, alive, W0, h.sigma)
    n_alive = float(alive.sum())
    shift = (target.budget_used or target.budget_total) / (h.lam * n_alive)
    pairs = [_norms(Ws[i], Ws[j]) for i in range(draws) for j in range(i + 1, draws)]
    pair_totals = np.array([x["total"] for x in pairs])
    observed = {
        "per_class": [float(np.mean([x["per_class"][k] for x in pairs])) for k in range(shape[1])],
        "total": float(pair_totals.mean()),
        "min": float(pair_totals.min()),
        "max": float(pair_totals.max()),
        "pairs": len(pairs),
    }
    reference = max(observed["total"], predicted["total"])
    allowed = reference * (1 + SPREAD_SDS * predicted["rel_sd"]) + shift
    to_draws = [_norms(W, Wi) for Wi in Ws]
    released_mean = {
        "per_class": [
            float(np.mean([x["per_class"][k] for x in to_draws])) for k in range(shape[1])
        ],
        "total": float(np.mean([x["total"] for x in to_draws])),
        "max": float(max(x["total"] for x in to_draws)),
    }
    distances: dict[str, Any] = {
        "released_vs_draws": released_mean,
        "released_vs_each_draw": [x["total"] for x in to_draws],
        "draw_spread": observed,
        "predicted_spread": predicted,
        "released_vs_unperturbed": _norms(W, W0),
        "draws_vs_unperturbed": float(np.mean([_norms(Wi, W0)["total"] for Wi in Ws])),
        "before_removal_vs_draws": {
            "per_class": [
                float(np.mean([_norms(Wb, Wi)["per_class"][k] for Wi in Ws]))
                for k in range(shape[1])
            ],
            "total": float(np.mean([_norms(Wb, Wi)["total"] for Wi in Ws])),
        },
        "residual_shift_bound": shift,
        "allowed": allowed,
        "ratio_to_spread": released_mean["total"] / reference if reference > 0 else None,
        "within_spread": bool(released_mean["total"] <= allowed),
    }

    # membership
    n = min(int(sample), len(removed))
    rows = np.sort(rng.choice(removed, size=n, replace=False))
    figs = {
        "released": _row_figures(p, W, rows),
        "retrained": _row_figures(p, Ws[0], rows),
        "before_removal": _row_figures(p, Wb, rows),
    }
    others = [_row_figures(p, Wi, rows)["loss"] for Wi in Ws[1:]]
    rel_vs_re = _test(figs["released"]["loss"], figs["retrained"]["loss"], level)
    before_vs_re = _test(figs["before_removal"]["loss"], figs["retrained"]["loss"], level)
    null_ref = _test(others[0], figs["retrained"]["loss"], level)
    # how often the same two-sample test tells two honest retrains apart on these rows
    all_losses = [figs["retrained"]["loss"], *others]
    pair_p = [
        _test(all_losses[i], all_losses[j], level)["mannwhitney_p"]
        for i in range(len(all_losses))
        for j in range(i + 1, len(all_losses))
    ]
    means = np.array([float(x.mean()) for x in all_losses])
    membership: dict[str, Any] = {
        "sample": n,
        "removed_rows": int(len(removed)),
        "level": level,
        "draws": draws,
        "test": (
            "two-sided Mann-Whitney U on the sampled removed rows' losses (unpaired; KS "
            "alongside), each model against the retrain with draw 1"
        ),
        "released_vs_retrained": rel_vs_re,
        "before_removal_vs_retrained": before_vs_re,
        "retrained_vs_retrained": null_ref,
        "retrain_pairs_distinguishable": float(np.mean([q < level for q in pair_p])),
        "across_draws_test": (
            "the mean loss of the sampled removed rows under one model against its values "
            f"under the {draws} retrains (two-sided prediction-interval t test on its "
            "logarithm): it accounts for the draw-to-draw variation the two-sample test "
            "cannot see"
        ),
        "retrain_mean_losses": [float(x) for x in means],
        "released_across_draws": _across_draws(
            float(figs["released"]["loss"].mean()), means, level
        ),
        "before_removal_across_draws": _across_draws(
            float(figs["before_removal"]["loss"].mean()), means, level
        ),
        "summary": {k: _summary(v) for k, v in figs.items()},
        "losses": {k: [round(float(x), 6) for x in v["loss"]] for k, v in figs.items()},
        "p_true": {k: [round(float(x), 6) for x in v["p_true"]] for k, v in figs.items()},
    }
    # the calibrated test decides (the two-sample test over-rejects for correlated rows)
    membership["has_power"] = bool(membership["before_removal_across_draws"]["distinguishable"])
    W1 = Ws[0]

    # residual
    g0 = _grad0(p, W, alive)
    used = target.budget_used
    residual: dict[str, Any] = {
        "accounting": h.accounting,
        "budget_total": target.budget_total,
        "budget_used": used,
        "budget_used_ratio": None if used is None else used / target.budget_total,
        "within_budget": None if used is None else bool(used <= target.budget_total),
        "epoch_check": target.epoch_check,
        "implied_noise": _noise_check(target, g0),
        "true_residual": None,
        "true_residual_note": "b is never on disk: computed for a model in memory only",
    }
    if target.noise is not None:
        true = frobenius(g0 + target.noise.to(g0))
        residual["true_residual"] = true
        residual["true_residual_note"] = "||grad L_b(W; D')||_F in float64, b from memory"
        residual["true_residual_within_budget_used"] = bool(used is None or true <= used)

    verdict: dict[str, Any] = {
        "distance_within_spread": distances["within_spread"],
        "released_indistinguishable_from_retrained": not membership["released_across_draws"][
            "distinguishable"
        ],
        "released_two_sample_distinguishable": rel_vs_re["distinguishable"],
        "before_removal_distinguishable": membership["has_power"],
        "budget_respected": residual["within_budget"],
        "independent_bound_within_budget": (target.epoch_check or {}).get("within_budget"),
        "noise_consistent": residual["implied_noise"].get("consistent"),
    }
    if target.noise is not None:
        verdict["true_residual_within_budget_used"] = residual["true_residual_within_budget_used"]
    verdict["pass"] = bool(
        verdict["distance_within_spread"]
        and verdict["released_indistinguishable_from_retrained"]
        and verdict["budget_respected"] is not False
        and verdict["independent_bound_within_budget"] is not False
        and verdict["noise_consistent"] is not False
        and verdict.get("true_residual_within_budget_used") is not False
    )
    return {
        "notice": NOTICE,
        "internal_only": True,
        "target": {
            "source": target.source,
            "label": target.label,
            "version": target.version,
            "certified": target.certified,
            "rows": int(alive.numel()),
            "rows_alive": int(n_alive),
            "rows_removed": int(len(removed)),
            "features": int(shape[0]),
            "classes": target.classes,
            "binary": target.binary,
            "lam": h.lam,
            "sigma": h.sigma,
            "epsilon": h.epsilon,
            "delta": h.delta,
            "ledger": target.ledger,
            **target.extra,
        },
        "seed": seed,
        "fit_residuals": fits,
        "test_accuracy": {
            "released": _accuracy(target, W),
            "unperturbed": _accuracy(target, W0),
            "retrained": _accuracy(target, W1),
            "before_removal": _accuracy(target, Wb),
        },
        "distances": distances,
        "membership": membership,
        "residual": residual,
        "verdict": verdict,
        "seconds": round(time.monotonic() - started, 3),
    }


# --------------------------------------------------------------------------- outputs


def write_json(report: dict[str, Any], out: Path) -> None:
    try:
        Path(out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot write {out}: {exc}") from exc


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines of a report."""
    t, d, m, r, v = (
        report["target"],
        report["distances"],
        report["membership"],
        report["residual"],
        report["verdict"],
    )
    rel, bef = m["released_vs_retrained"], m["before_removal_vs_retrained"]
    rel_x, bef_x = m["released_across_draws"], m["before_removal_across_draws"]

    def said(test: dict[str, Any]) -> str:
        return "distinguishable" if test["distinguishable"] else "not distinguishable"

    lines = [
        f"audit of {t['label']} (version {t['version']}): {t['rows_removed']} rows removed, "
        f"{t['rows_alive']} remaining; {m['draws']} retrains with fresh noise",
        f"distance released-retrained {d['released_vs_draws']['total']:.4g} (mean over the "
        f"draws) against two retrains' spread {d['draw_spread']['total']:.4g} (predicted "
        f"{d['predicted_spread']['total']:.4g}, allowed {d['allowed']:.4g}): "
        + ("within" if d["within_spread"] else "OUTSIDE"),
        f"membership, {m['sample']} removed rows at level {m['level']:g}: released vs retrained "
        f"Mann-Whitney p {rel['mannwhitney_p']:.3g} ({said(rel)}), across draws p "
        f"{rel_x['p']:.3g} ({said(rel_x)}); before removal vs retrained p "
        f"{bef['mannwhitney_p']:.3g} ({said(bef)}), across draws p {bef_x['p']:.3g} "
        f"({said(bef_x)}); two honest retrains told apart by Mann-Whitney in "
        f"{m['retrain_pairs_distinguishable']:.0%} of pairs",
    ]
    if not m["has_power"]:
        lines.append(
            "  (the model before removal is not distinguishable either: the membership test "
            "has little power on this removal)"
        )
    used = r["budget_used"]
    line = "residual: budget used " + ("unknown" if used is None else f"{used:.4g}")
    line += f" of {r['budget_total']:.4g}"
    ec = r.get("epoch_check") or {}
    if ec.get("available"):
        line += (
            f"; independent bound from snapshot {ec['from_snapshot']} "
            f"{ec['independent_bound']:.4g} ("
            + ("within the budget" if ec["within_budget"] else "OVER THE BUDGET")
            + ")"
        )
    if r.get("true_residual") is not None:
        line += f"; true residual {r['true_residual']:.4g}"
    n = r["implied_noise"]
    if n.get("ratio") is not None:
        line += f"; implied noise norm {n['ratio']:.3f} x sigma sqrt(dK)"
    lines.append(line)
    lines.append(f"verdict: {'pass' if v['pass'] else 'FAIL'}. {NOTICE}")
    return lines


def draw_png(report: dict[str, Any], out: Path) -> None:
    """Histograms of the removed rows' losses under the three models, their mean loss against
    the retrains', the distances against the spread of two retrains, and the residual against
    the budget, in one image."""
    import matplotlib  # noqa: PLC0415 - only this command needs it

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415

    t, d, m, r, v = (
        report["target"],
        report["distances"],
        report["membership"],
        report["residual"],
        report["verdict"],
    )
    fig = Figure(figsize=(12, 9), dpi=90, layout="constrained")
    (loss_ax, prob_ax), (dist_ax, res_ax) = fig.subplots(2, 2)
    colours = {"released": "tab:green", "retrained": "tab:blue", "before_removal": "tab:red"}
    names = {
        "released": "released",
        "retrained": "retrained without them (fresh noise)",
        "before_removal": "before removal (retrained with them)",
    }
    losses = {k: np.asarray(m["losses"][k]) for k in colours}
    pooled = np.concatenate([x for x in losses.values() if len(x)])
    low, top = float(np.quantile(pooled, 0.0)), float(np.quantile(pooled, 0.995))
    top = top if top > low else low + 1.0
    bins = np.linspace(low, top, 40)
    for k, c in colours.items():
        loss_ax.hist(
            np.clip(losses[k], low, top),
            bins=bins,
            histtype="step",
            lw=1.6,
            color=c,
            label=names[k],
        )
    rel, bef = m["released_vs_retrained"], m["before_removal_vs_retrained"]
    loss_ax.set_title(
        f"Losses of {m['sample']} removed rows (of {m['removed_rows']}); Mann-Whitney p\n"
        f"released vs retrained {rel['mannwhitney_p']:.3g}, "
        f"before vs retrained {bef['mannwhitney_p']:.3g} (level {m['level']:g})",
        loc="left",
        fontsize=10,
    )
    loss_ax.set_xlabel("one-vs-rest logistic loss of the row")
    loss_ax.set_ylabel("rows")
    loss_ax.legend(fontsize=8)
    # the mean removed-row loss of each model, against the retrains' values
    means = np.asarray(m["retrain_mean_losses"])
    rel_x, bef_x = m["released_across_draws"], m["before_removal_across_draws"]
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(means))
    prob_ax.scatter(
        means,
        jitter,
        color="tab:blue",
        s=30,
        label=f"{len(means)} retrains (fresh noise)",
        zorder=3,
    )
    prob_ax.axvline(rel_x["value"], color="tab:green", lw=2.0, label="released")
    prob_ax.axvline(bef_x["value"], color="tab:red", lw=2.0, label="before removal")
    low_band, high_band = rel_x["band"]
    prob_ax.axvspan(
        low_band,
        high_band,
        color="tab:blue",
        alpha=0.12,
        lw=0,
        label=f"a retrain's {1 - m['level']:.0%} band",
    )
    prob_ax.set_ylim(-1, 1)
    span = [
        *means,
        rel_x["value"],
        bef_x["value"],
        low_band,
        high_band,
    ]
    pad = 0.05 * (max(span) - min(span) or 1.0)
    prob_ax.set_xlim(min(span) - pad, max(span) + pad)
    prob_ax.set_yticks([])
    prob_ax.set_xlabel("mean loss of the sampled removed rows")
    prob_ax.set_title(
        f"Mean loss of the removed rows across draws (t test, level {m['level']:g}):\n"
        f"released p {rel_x['p']:.3g}, before removal p {bef_x['p']:.3g}; Mann-Whitney\n"
        f"tells two retrains apart in {m['retrain_pairs_distinguishable']:.0%} of pairs",
        loc="left",
        fontsize=10,
    )
    prob_ax.legend(fontsize=8, loc="lower right")

    # distances per class and in total
    groups = [f"class {c}" for c in t["classes"]] if not t["binary"] else []
    groups.append("total")

    def vals(x: dict[str, Any]) -> list[float]:
        return [*x["per_class"], x["total"]]

    series = [
        ("released vs retrains (mean)", vals(d["released_vs_draws"]), "tab:green"),
        ("retrain vs retrain (spread, mean)", vals(d["draw_spread"]), "tab:blue"),
        ("predicted spread", vals(d["predicted_spread"]), "tab:gray"),
        ("before removal vs retrains (mean)", vals(d["before_removal_vs_draws"]), "tab:red"),
    ]
    if t["binary"]:
        series = [(a, [v_[-1]], c) for a, v_, c in series]
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for i, (label, heights, c) in enumerate(series):
        dist_ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, color=c, label=label)
    dist_ax.axhline(d["allowed"], color="black", ls="--", lw=1.0, label="allowed (total)")
    dist_ax.set_xticks(x, groups, rotation=45 if len(groups) > 4 else 0, fontsize=8)
    dist_ax.set_ylabel("||W_a - W_b|| (Frobenius)")
    dist_ax.set_title(
        "Distance of the released weights to retrains, against the\nspread of two retrains: "
        + ("within" if d["within_spread"] else "OUTSIDE")
        + f" (allowed {d['allowed']:.3g})",
        loc="left",
        fontsize=10,
    )
    dist_ax.legend(fontsize=7, ncols=2)

    # residual against the budget
    bars: list[tuple[str, float, str]] = []
    if r["budget_used"] is not None:
        bars.append(("budget used\n(recorded)", r["budget_used"], "tab:green"))
    ec = r.get("epoch_check") or {}
    if ec.get("available"):
        bars.append(("independent bound\n(from snapshots)", ec["independent_bound"], "tab:purple"))
    if r.get("true_residual") is not None:
        bars.append(("true residual\n||U|| (memory)", r["true_residual"], "tab:orange"))
    bars.append(("budget", r["budget_total"], "black"))
    res_ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars], width=0.6)
    res_ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    for i, (_, val, _) in enumerate(bars):
        res_ax.annotate(f"{val:.3g}", (i, val), ha="center", va="bottom", fontsize=8)
    noise = r["implied_noise"]
    note = ""
    if noise.get("ratio") is not None:
        note = f"\nimplied noise b-U: norm {noise['ratio']:.3f}x sigma sqrt(dK), KS p {noise['ks_p']:.2g}"
    res_ax.set_title(
        f"Gradient residual against the budget ({r['accounting']} accounting){note}",
        loc="left",
        fontsize=10,
    )
    res_ax.set_ylabel("||U||_F")
    acc = report["test_accuracy"]
    acc_text = ", ".join(
        f"{k.replace('_', ' ')} {val:.3f}" for k, val in acc.items() if val is not None
    )
    fig.suptitle(
        f"certremove audit: {t['label']}, version {t['version']}, {t['rows_removed']:,} rows "
        f"removed, {t['rows_alive']:,} remaining; lam {t['lam']:g}, sigma {t['sigma']:g}, "
        f"(eps, delta) = ({t['epsilon']:g}, {t['delta']:g}): "
        + ("PASS" if v["pass"] else "FAIL")
        + (f"\ntest accuracy: {acc_text}" if acc_text else "")
        + f"\n{NOTICE}.",
        fontsize=11,
    )
    try:
        fig.savefig(out)
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc}") from exc


def audit(
    state_dir: Path,
    *,
    release: int | None = None,
    model: str | None = None,
    release_dir: Path | None = None,
    sample: int = DEFAULT_SAMPLE,
    draws: int = DEFAULT_DRAWS,
    seed: int | None = None,
    level: float = LEVEL,
    outs: Sequence[Path] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """Audit the current model of ``state_dir`` (or release ``release``) and write ``outs``
    (.json: every figure; .png: the picture). Returns the report.

    Raises:
        AuditError: see :func:`check_outs`, the ``target_from_*`` functions and
            :func:`run_audit`.
    """
    check_outs(outs)
    check_numbers(sample, draws, level)
    if release is None:
        target = target_from_state(state_dir, device=device)
    else:
        target = target_from_release(
            state_dir, release, model=model, release_dir=release_dir, device=device
        )
    report = run_audit(target, sample=sample, draws=draws, seed=seed, level=level)
    for out in outs:
        if FORMATS[Path(out).suffix.lower()] == "json":
            write_json(report, out)
        else:
            draw_png(report, out)
    return report
