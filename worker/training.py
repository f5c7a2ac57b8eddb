"""Train a removal-enabled model on a dataset and persist its state directory.

Used by ``certremove train`` (``worker.cli``), the demo (``worker.demo``) and the benchmarks; a
module of its own so that none of them imports another for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def train_model(
    dataset: str,
    state: Path,
    *,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Train on ``dataset`` and persist into ``state``; return a summary.

    Raises:
        ValueError: bad dataset, options, or a state directory that already holds a model.
    """
    import core  # noqa: PLC0415 - torch only for the commands that need it
    from worker.integrity import state_contents  # noqa: PLC0415

    found = state_contents(state) if state.is_dir() else []
    if found:
        if not overwrite:
            raise ValueError(
                f"{state} already holds a model's state ({', '.join(found)}): training over it "
                "would bring removed rows back; use a new state directory (or --overwrite to "
                "delete all of it)"
            )
        shutil.rmtree(state)
    ds = core.load_dataset(dataset)
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
    model = core.train(ds.X_train, ds.y_train, ids=ds.ids_train, **options)
    model.save(state, dataset=ds)
    return {
        "state": str(state),
        "dataset": dataset,
        "rows": model.n_rows,
        "features": int(ds.X_train.shape[1]),
        "classes": model.classes,
        "budget_total": model.budget_total,
        "budget_used": model.budget_used,
        "max_removals": model.max_removals,
        "certified": model.certified,
        "version": model.version,
        "test_accuracy": model.accuracy(ds.X_test, ds.y_test) if len(ds.y_test) else None,
        "extractor_removals_remaining": model.extractor_removals_remaining,
    }
