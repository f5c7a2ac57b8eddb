"""Train a removal-enabled model on a dataset and persist its state directory.

Used by ``certremove train`` (``worker.cli``), the demo (``worker.demo``) and the benchmarks; a
module of its own so that none of them imports another for it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``sigma sqrt(d) / (lam n)`` (the expected size of ``b / (lam n)``, the noise's pull on the
#: weights) above this fraction of the weights' norm: the noise dominates, accuracy suffers
NOISE_WARN_RATIO = 0.5


def check_state_target(state: Path) -> None:
    """Refuse, before any work, a state directory that could not be written: a file in its
    place, or a nearest existing ancestor that is not a writable directory.

    Raises:
        ValueError: what is wrong with ``state``.
    """
    if state.exists() and not state.is_dir():
        raise ValueError(f"the state directory {state} is a file, not a directory")
    parent = state
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create the state directory {state}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the state directory {state}: {parent} is not writable")


def check_options(options: dict[str, Any]) -> None:
    """Check the device, the privacy parameters and ``lam`` up front (cheap), so that bad
    options fail before a dataset is loaded or a model fitted.

    Raises:
        ValueError: (``core.InvalidInputError``) the first bad option.
    """
    import core  # noqa: PLC0415
    from core.problem import resolve_device  # noqa: PLC0415
    from core.trigger import validate_spec  # noqa: PLC0415

    resolve_device(options.get("device"))
    lam = options.get("lam", 1e-3)
    if not (math.isfinite(lam) and lam > 0):
        raise core.InvalidInputError(f"lam must be > 0 (strong convexity), got {lam}")
    core.budget_total(
        options.get("sigma", 10.0),
        options.get("epsilon", 1.0),
        options.get("delta", 1e-4),
        options.get("calibration", "classical"),
    )
    validate_spec(options.get("max_removals", "auto"))


def noise_ratio(model: Any, n_features: int) -> float:
    """``sigma sqrt(d) / (lam n)`` (the expected norm of the noise's pull ``b / (lam n)`` on a
    class's weights) over the mean norm of the classes' weights: above about
    :data:`NOISE_WARN_RATIO` the noise dominates what the data says (0 without noise)."""
    import torch  # noqa: PLC0415

    hyper = model.hyper
    if hyper.sigma <= 0:
        return 0.0
    pull = hyper.sigma * math.sqrt(n_features) / (hyper.lam * model.n_alive)
    W = model.weights.reshape(n_features, -1)
    size = float(torch.linalg.vector_norm(W, dim=0).mean())
    return math.inf if size == 0 else pull / size


def noise_warning(summary: dict[str, Any]) -> str | None:
    """One line when a trained model's noise dominates its weights (see :func:`noise_ratio`),
    naming the settings for small data; None otherwise."""
    ratio = summary.get("noise_ratio")
    if ratio is None or ratio <= NOISE_WARN_RATIO:
        return None
    acc = summary.get("test_accuracy")
    accuracy = "" if acc is None else f"; test accuracy {acc:.3f}"
    return (
        f"the noise dominates the weights (sigma*sqrt(d)/(lam*n) is {ratio:.2f} times the "
        f"weights' norm, above {NOISE_WARN_RATIO}{accuracy}): the defaults lam 1e-3, sigma 10 are tuned for MNIST-size data; on small data raise "
        "--lam or lower --sigma (digits: --lam 1e-2 --sigma 1, the demo's settings)"
    )


def train_model(
    dataset: str,
    state: Path,
    *,
    overwrite: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    binary_classes: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train on ``dataset`` and persist into ``state``; return a summary.

    ``data_dir``/``download``/``binary_classes`` go to :func:`core.load_dataset`; ``options`` to
    :func:`core.train`. The device, the options and ``state`` are checked before any data is
    loaded. ``progress`` (if given) is called with the name of each stage as it starts.

    Raises:
        ValueError: bad dataset, options, or a state directory that already holds a model (or
            cannot be written).
    """
    import core  # noqa: PLC0415 - torch only for the commands that need it
    from worker.integrity import state_contents  # noqa: PLC0415

    def stage(text: str) -> None:
        if progress is not None:
            progress(text)

    check_options(options)
    check_state_target(state)
    found = state_contents(state) if state.is_dir() else []
    if found and not overwrite:
        raise ValueError(
            f"{state} already holds a model's state ({', '.join(found)}): training over it "
            "would bring removed rows back; use a new state directory (or --overwrite to "
            "delete all of it)"
        )
    stage(f"loading the dataset {dataset}")
    ds = core.load_dataset(
        dataset, data_dir=data_dir, download=download, binary_classes=binary_classes
    )
    meta = ds.meta or {}
    if meta.get("dp_epsilon") is not None and meta.get("dp_delta") is not None:
        # Rows from a DP feature extractor: the head's certificate composes with its group
        # privacy; by default the extractor may add as much as the head's own (epsilon, delta).
        options.setdefault("extractor_dp", (float(meta["dp_epsilon"]), float(meta["dp_delta"])))
        limit = options.pop("extractor_limit", None) or (None, None)
        options["extractor_limit"] = (
            options.get("epsilon", 1.0) if limit[0] is None else limit[0],
            options.get("delta", 1e-4) if limit[1] is None else limit[1],
        )
    else:
        options.pop("extractor_limit", None)
    n, d = int(ds.X_train.shape[0]), int(ds.X_train.shape[1])
    auto = options.get("max_removals", "auto") == "auto"
    stage(
        f"fitting the model on {n} rows of {d} features"
        + (", then estimating max_removals (shadow runs)" if auto else "")
    )
    model = core.train(ds.X_train, ds.y_train, ids=ds.ids_train, **options)
    stage(f"saving the state to {state}")
    if found:  # --overwrite: only now that a new model exists
        shutil.rmtree(state)
    model.save(state, dataset=ds)
    return {
        "state": str(state),
        "dataset": dataset,
        "rows": model.n_rows,
        "features": d,
        "classes": model.classes,
        "budget_total": model.budget_total,
        "budget_used": model.budget_used,
        "max_removals": model.max_removals,
        "certified": model.certified,
        "version": model.version,
        "test_accuracy": model.accuracy(ds.X_test, ds.y_test) if len(ds.y_test) else None,
        "extractor_removals_remaining": model.extractor_removals_remaining,
        "noise_ratio": noise_ratio(model, d),
    }
