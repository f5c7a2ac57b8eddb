"""Blocking retrains from scratch (``certremove.retrain``, docs/design.md "Retrain").

When no prepared epoch can take over, nothing more is applied to the model: the service sends
``certremove.retrain``, which folds every pending request into a retrain from scratch (their rows
excluded) and answers them ``method=retrain``. A model on DP-extractor features whose extractor's
group privacy is spent needs a full-pipeline retrain (extractor, features, head: ``core.pipeline``);
without one configured, requests past the extractor's allowance are rejected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from producer import schema
from worker import faults
from worker.batch import Plan
from worker.entries import Entry
from worker.served import ServedModel

if TYPE_CHECKING:
    from core.data import Dataset
    from core.model import Model

log = logging.getLogger("certremove.worker")

EXTRACTOR_SPENT = (
    "the DP feature extractor's group privacy covers no more removed rows and a full-pipeline "
    "retrain (extractor, features, head) cannot run"
)
EXTRACTOR_WAITS = (
    "the DP feature extractor's group privacy covers no more removed rows: the request waits for "
    "the full-pipeline retrain (extractor, features, head)"
)

#: ``pipeline(model, pending_rows) -> (dataset, new_model)``: the full-pipeline retrain
PipelineRetrain = Callable[["Model", list[int]], tuple["Dataset", "Model"]]


@dataclass
class RetrainOutcome:
    """What one retrain did."""

    plan: Plan
    retrained: bool = False
    rows_removed: int = 0
    seconds: float = 0.0
    #: entries past the extractor's allowance, left pending for the full-pipeline retrain
    waiting: list[Entry] = field(default_factory=list)


class Retrainer:
    """Retrains the served model from scratch, folding pending requests in.

    Args:
        served: the served model.
        pipeline: the full-pipeline retrain for a model on DP-extractor features; None rejects
            requests past the extractor's group privacy with ``pipeline_off_reason``.
    """

    def __init__(
        self,
        served: ServedModel,
        pipeline: PipelineRetrain | None,
        pipeline_off_reason: str = "full-pipeline retrains are not configured",
    ) -> None:
        self.served = served
        self.pipeline = pipeline
        # With a pipeline configured, requests past the extractor wait for it (never rejected).
        self.extractor_spent = (
            f"{EXTRACTOR_SPENT}: {pipeline_off_reason}" if pipeline is None else EXTRACTOR_WAITS
        )

    def rejects_spent(self) -> str | None:
        """Why a request past the DP extractor's allowance is rejected; None while such
        requests wait for the full-pipeline retrain."""
        return self.extractor_spent if self.pipeline is None else None

    def limit_to_extractor(self, plan: Plan) -> list[Entry]:
        """Keep the groups a head retrain can exclude within what the DP extractor still covers
        (see :meth:`Plan.limit`); returns the entries that wait for a pipeline retrain."""
        left = self.served.extractor_removals_remaining()
        if left is None:
            return []
        return plan.limit(
            left,
            wait=self.pipeline is not None,
            reason=self.extractor_spent,
            now=self.served.clock(),
        )

    def run(self, entries: list[Entry], reason: str) -> RetrainOutcome:
        """Retrain for ``reason`` without the rows of ``entries`` (as far as they are valid and
        fit), persist the new version and leave the answers in the outcome's plan (persisted,
        not yet published)."""
        served = self.served
        plan = served.plan(entries, fold=True)
        full = reason == "extractor" and self.pipeline is not None
        waiting = [] if full else self.limit_to_extractor(plan)
        exclude = plan.rows
        retrained = True
        t0 = time.perf_counter()
        served.dirty = True
        try:
            if full:
                self._retrain_pipeline(exclude, plan)
            else:
                served.model.retrain(exclude=exclude)
        except ValueError as exc:  # core refused the exclusions: answer them
            if faults.is_infrastructure(exc):  # e.g. the source images could not be read
                served.metrics.on_retrain_failure()
                raise
            refusal = str(exc)
            if full:  # e.g. the source images are gone: stop trying, reject from now on
                served.metrics.on_retrain_failure()
                refusal = f"{EXTRACTOR_SPENT}: the full-pipeline retrain failed: {exc}"
                self.pipeline, self.extractor_spent = None, refusal
                retrained = False
                log.error("full-pipeline retrain failed: %s", exc)
            plan.reject_all(refusal, served.clock())
            exclude = []
            if not full:
                served.model.retrain(exclude=[])  # the retrain that was due, still fresh noise
        except Exception:
            served.metrics.on_retrain_failure()
            raise
        seconds = time.perf_counter() - t0
        if not full:  # a pipeline retrain persisted its new dataset and model already
            committed = plan.commit(
                plan.groups, schema.METHOD_RETRAIN, served.model.version, served.clock(), served.ids
            )
            served.persist(committed, retrain_reason=reason)
        served.dirty = False
        return RetrainOutcome(plan, retrained, len(exclude), seconds, waiting)

    def _retrain_pipeline(self, exclude: list[int], plan: Plan) -> None:
        """Extractor, features and head again without every removed row (``core.pipeline``);
        the new model takes over the state directory with its new dataset, and the answers of
        ``plan``'s groups are journaled with the new state."""
        assert self.pipeline is not None
        served = self.served
        log.info("DP extractor spent: full-pipeline retrain without %d more rows", len(exclude))
        ids = served.ids  # the rows of the old dataset
        dataset, model = self.pipeline(served.model, exclude)
        model.solve_options = served.model.solve_options  # the worker's (its settings')
        answers = plan.commit(
            plan.groups, schema.METHOD_RETRAIN, model.version, served.clock(), ids
        )
        served.persist(
            answers,
            model=model,
            dataset=dataset,
            replace_dataset=True,
            retrain_reason="extractor",
        )
        served.adopt(model)
