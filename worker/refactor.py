"""Fresh preconditioners for the served model's Newton steps, factored in a background thread.

A removal step solves ``H' s = Delta`` by conjugate gradients preconditioned with the Cholesky
factor of an earlier Hessian. As an epoch's removals accumulate the Hessian drifts from that
factor and CG needs an iteration more; ``core`` then asks for a refactor. Done in the drain, it
is one direct step that builds and factors the Hessian: about twice a step's time (68 against 33
ms at n = 100,000, d = 64 on the 2-vCPU VM), a few times per epoch, and the slowest steps of a
drain are what its requests' tail latency is made of. With ``CERTREMOVE_BACKGROUND_REFACTOR``
on (the default, ``core.solvers.SolveOptions.defer_refactor``), the drain asks this thread to
factor the Hessian at the weights of the step that asked and goes on with CG on the old factor
(an iteration or two more per step) until the new one is installed, on the drain's thread,
before the next step (``core.Model.install_factor``).

A factor is a preconditioner, a function of released weights and the data only: the
certificate of every step measures whatever residual CG leaves, so when and whether a factor
arrives changes a step's cost, never what it certifies. A factor for an epoch that is gone, or
one a direct step replaced meanwhile, is dropped.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING

from worker.epochs import BackgroundRunner, niced

if TYPE_CHECKING:
    import torch

    from core.epoch import FactorJob
    from core.model import Model
    from worker.metrics import ServiceMetrics

log = logging.getLogger("certremove.worker")


class BackgroundRefactor:
    """At most one factorisation at a time, for whichever model the drain serves."""

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics
        self._runner: BackgroundRunner | None = None
        self._pending: tuple[FactorJob, Future[torch.Tensor | None]] | None = None
        #: factors installed, and dropped (stale, failed), since the start
        self.installed = 0
        self.dropped = 0
        #: the epoch (its anchor gradient) whose factorisation failed: not tried again on it
        #: (its steps refactor themselves if CG stalls)
        self._failed_for: object | None = None

    def after_step(self, model: Model) -> None:
        """On the drain's thread, after a committed step of ``model``: install a factor that is
        ready, then start the next one if the step asked for it. Never waits, never raises."""
        try:
            self._install(model)
            if self._pending is None:
                job = model.refactor_job()
                if job is not None and job.anchor is not self._failed_for:
                    if self._runner is None:
                        self._runner = BackgroundRunner(name="certremove-refactor")
                    device = str(job.W.device.type)
                    self._pending = (job, self._runner.submit(niced, device, job.run))
        except Exception:  # noqa: BLE001 - a preconditioner is an optimisation: never fatal
            log.exception("a background refactor failed; the steps refactor themselves")
            self._pending = None

    def _install(self, model: Model) -> None:
        if self._pending is None or not self._pending[1].done():
            return
        job, future = self._pending
        self._pending = None
        factor = None
        try:
            factor = future.result()
        except Exception:  # noqa: BLE001 - logged; the steps go on with the old factor
            log.exception("a background refactor failed; the steps go on with the old factor")
        else:
            if factor is None:
                log.warning(
                    "the Hessian did not factor for a background refactor (float32 nor float64); "
                    "the steps go on with the old factor"
                )
        if factor is None:  # not tried again on this epoch
            self._failed_for = job.anchor
            outcome = "failed"
        else:
            outcome = "installed" if model.install_factor(job, factor) else "dropped"
        if outcome == "installed":
            self.installed += 1
        else:
            self.dropped += 1
        if self.metrics is not None:
            self.metrics.on_background_refactor(outcome)
        log.debug("background refactors: %d installed, %d dropped", self.installed, self.dropped)

    def close(self) -> None:
        """Drop the factorisation in progress (it runs out in its daemon thread, unused)."""
        if self._pending is not None:
            self._pending[1].cancel()
        self._pending = None
