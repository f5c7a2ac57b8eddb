"""A removal step waits for its device only where it must (on a GPU every read of a value is a
host synchronisation that stalls the queue of kernels): the direct step reads once, at the end
of its certificate; the iterative one once per CG iteration and once for the certificate.

Counted with a torch function mode on the CPU (every way a tensor's value reaches Python:
``bool``, ``float``, ``int``, ``item``, ``tolist``, ``numpy``, ``cpu``), so the test runs
everywhere; ``benchmarks/gpu_check.sh`` counts CUDA's own synchronisations on a GPU."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from core.epoch import commit_prefix, fit_epoch
from core.labels import LabelCoding
from core.loss import margins
from core.problem import Hyper, make_problem
from core.removal import SolveOptions, newton_step
from tests.core.conftest import make_data

READS = {
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__array__",
}


class DeviceReads(TorchFunctionMode):
    """Records every read of a tensor's value by Python."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        # the NumPy layouts of core.products share a CPU tensor's memory with NumPy (CPU only:
        # never chosen for a tensor on a GPU), which is no read of a value
        if name in READS and sys._getframe(1).f_code.co_name != "_numpy_product":
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


LAM = 1e-2


def _problem(n: int = 600, classes: int = 3):  # type: ignore[no-untyped-def]
    X, y = make_data(n, 12, classes, seed=classes)
    coding = LabelCoding.fit(y)
    Y = coding.encode(y)
    return make_problem(X, Y, torch.ones_like(Y), LAM, torch.device("cpu")), coding


def _epoch(problem, coding, alive, accounting="bound"):  # type: ignore[no-untyped-def]
    hyper = Hyper(LAM, 1.0, 1.0, 1e-4, accounting, "classical", None, None)
    return fit_epoch(problem, hyper, 1.0, alive, binary=coding.binary, version=1, seed=3, W0=None)


@pytest.fixture(scope="module")
def fitted():  # type: ignore[no-untyped-def]
    p, coding = _problem()
    alive = torch.ones(p.X.shape[0], dtype=torch.bool)
    epoch = _epoch(p, coding, alive)
    return p, alive, epoch.W, epoch.acct.anchor_grad


def test_direct_step_reads_the_device_once(fitted):  # type: ignore[no-untyped-def]
    p, alive, W, anchor = fitted
    Z = margins(p.X, p.Y, W)
    rows = torch.tensor([3, 17, 40])
    with DeviceReads() as mode:
        step = newton_step(p, alive, W, rows, anchor, Z, options=SolveOptions(solver="direct"))
    assert step is not None and step.method == "direct"
    assert mode.reads == ["tolist"]
    # what came back is the certificate's: finite, on the CPU, float64
    assert step.increments.device.type == "cpu" and step.increments.dtype == torch.float64
    assert bool((step.increments >= step.solve_residual).all()) and step.anchor_distance > 0


def test_iterative_step_reads_once_per_cg_iteration(fitted):  # type: ignore[no-untyped-def]
    p, alive, W, anchor = fitted
    Z = margins(p.X, p.Y, W)
    first = newton_step(p, alive, W, torch.tensor([5]), anchor, Z)
    assert first is not None and first.cache is not None
    with DeviceReads() as mode:
        step = newton_step(
            p, first.alive, first.W, torch.tensor([9]), anchor, first.Z,
            cache=first.cache, options=SolveOptions(solver="iterative"),
        )  # fmt: skip
    assert step is not None and step.method == "iterative" and step.iterations >= 1
    # one before CG's first iteration, one per iteration, one for the certificate
    assert mode.reads == ["__bool__"] + ["tolist"] * step.iterations + ["tolist"]


def test_failed_factorisation_is_solved_again_in_float64(fitted, monkeypatch):  # type: ignore[no-untyped-def]
    """The fast dtype's failure is only known at the certificate's read: the step is solved
    again in float64 and certified, not lost."""
    import core.removal as removal

    p, alive, W, anchor = fitted
    real = removal.direct_solve
    dtypes = []

    def failing_first(problem, curvature, ridge, rhs, dtype, options):  # type: ignore[no-untyped-def]
        dtypes.append(dtype)
        S, L, ok, its = real(problem, curvature, ridge, rhs, dtype, options)
        return (S, L, torch.zeros_like(ok) if dtype != torch.float64 else ok, its)

    monkeypatch.setattr(removal, "direct_solve", failing_first)
    step = newton_step(p, alive, W, torch.tensor([1, 2]), anchor)
    assert dtypes == [torch.float32, torch.float64]
    assert step is not None and step.method == "direct" and step.hessian == "float64"
    assert step.cache is not None and step.cache.factor.dtype == torch.float64


@pytest.mark.parametrize("gone", [0, 120], ids=["all-rows", "row-view"])
def test_commit_prefix_serves_a_batch_with_one_read(gone):  # type: ignore[no-untyped-def]
    """A served batch (not split by the safety net) reads the device once, in its step. The
    other reads are of CPU tensors, which wait for nothing: the accounting's two norms (``fits``
    and the bound's increment, of ``beta`` and the step's increments, both on the CPU) and,
    with a row view, the check of the rows against ``RowView.local`` (on the CPU)."""
    p, coding = _problem()
    alive = torch.ones(p.X.shape[0], dtype=torch.bool)
    alive[:gone] = False
    epoch = _epoch(p, coding, alive)
    assert (epoch.view is not None) == (gone > 0)
    epoch = dataclasses.replace(epoch, solver=None)  # the direct solver: one read
    with DeviceReads() as mode:
        count, after, inc, reason = commit_prefix(p, epoch, [[200], [201, 202]], 1.0)
    assert (count, reason) == (2, None) and inc > 0
    assert mode.reads == (["__bool__"] if gone else []) + ["tolist", "__float__", "__float__"]
    assert after.acct.bound_used > epoch.acct.bound_used
    assert after.acct.beta is not None and after.acct.beta.device.type == "cpu"
