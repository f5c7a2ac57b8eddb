"""The direct solver's bfloat16 Hessian (``SolveOptions(hessian="bfloat16")``, for large
batches on a GPU): bfloat16 products summed in float32 make a preconditioner, and CG with
float64 Hessian-vector products refines the step to the tolerance. Checked on the CPU against
an independent float64 computation (numpy) of ``H' s - Delta`` and of the gradient residual,
and against the float32 direct step; a solve that does not converge falls back to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core
import core.removal as removal
from core.loss import weighted_gram
from core.removal import SolveOptions, newton_step
from tests.core.conftest import make_data
from tests.core.test_float32_products import _independent

BF16 = SolveOptions(solver="direct", hessian="bfloat16")


@pytest.fixture(scope="module", params=[2, 4], ids=["binary", "ovr4"])
def model(request) -> core.Model:
    X, y = make_data(1200, 60, request.param, 3)
    return core.train(X, y, lam=1e-3, sigma=10.0, seed=5, max_removals=None, device="cpu")


def test_the_bfloat16_gram_is_float32_and_close(model):
    p = model._problem
    C = p.weights(model.alive)
    exact = weighted_gram(p.X, C, 0.5, dtype=torch.float64)
    low = weighted_gram(p.X, C, 0.5, dtype=torch.bfloat16, X32=p.X32)
    assert low.dtype == torch.float32
    rel = float((low.double() - exact).norm() / exact.norm())
    assert 1e-5 < rel < 2e-2  # bfloat16's 8 bits show, and nothing worse


def test_bfloat16_step_is_refined_and_certified(model):
    e = model._epoch
    rows = torch.nonzero(e.alive).flatten()[:150]
    args = (model._problem, e.alive, e.W, rows, e.acct.anchor_grad, e.Z)
    low = newton_step(*args, options=BF16)
    ref = newton_step(*args, options=SolveOptions(solver="direct"))
    assert low is not None and ref is not None and low.method == "direct"
    assert (low.hessian, ref.hessian) == ("bfloat16", "float32")  # no silent fallback
    assert low.cache is not None and low.cache.iterations >= 1  # CG refined it
    anchor, residual = _independent(model, low, rows.tolist())
    # the certificate: measured as numpy measures it, and charged
    np.testing.assert_allclose(low.solve_residual.numpy(), residual, rtol=1e-3, atol=1e-12)
    assert low.anchor_distance == pytest.approx(anchor, rel=1e-9, abs=1e-12)
    assert bool((low.increments >= torch.as_tensor(residual)).all())
    # refined to CG's tolerance: the same step as the float32 direct solve, to about 1e-6
    assert low.residual_ratio <= 100 * BF16.cg_tol, low.residual_ratio
    moved = float((low.W - ref.W).norm() / (ref.W - e.W).norm())
    assert moved < 1e-4


def test_unconverged_refinement_falls_back_to_float32(model, monkeypatch):
    e = model._epoch
    rows = torch.nonzero(e.alive).flatten()[:40]
    dtypes = []
    real = removal.direct_solve

    def spy(problem, curvature, ridge, rhs, dtype, options):  # type: ignore[no-untyped-def]
        dtypes.append(dtype)
        return real(problem, curvature, ridge, rhs, dtype, options)

    monkeypatch.setattr(removal, "direct_solve", spy)
    hopeless = SolveOptions(solver="direct", hessian="bfloat16", cg_tol=1e-14, cg_max_iter=1)
    step = newton_step(
        model._problem, e.alive, e.W, rows, e.acct.anchor_grad, e.Z, options=hopeless
    )
    assert dtypes == [torch.bfloat16, torch.float32]
    assert step is not None and step.cache is not None and step.hessian == "float32"
    assert step.residual_ratio < 1e-6  # the float32 solve with its float64 refinement step


def test_a_model_serves_with_the_bfloat16_hessian_end_to_end(model):
    """Removals through ``Model.remove`` with the option: the accounting and the weights follow
    the float32 model's to the solve's tolerance."""
    X, y = make_data(900, 30, 3, 9)
    kw = {"lam": 1e-3, "sigma": 10.0, "seed": 2, "max_removals": None, "device": "cpu"}
    a, b = core.train(X, y, **kw), core.train(X, y, **kw)
    a.solve_options = SolveOptions(solver="direct")
    b.solve_options = BF16
    used = []
    for chunk in ([1, 2, 3], list(range(10, 200)), [400]):
        ra, rb = a.remove(chunk), b.remove(chunk)
        assert ra.applied and rb.applied
        used.append(b._epoch.solver.iterations)  # CG's refinement of each bfloat16 factor
    assert all(its >= 1 for its in used), used
    assert torch.allclose(a.weights, b.weights, rtol=0, atol=1e-6)
    assert b.exact_used == pytest.approx(a.exact_used, rel=1e-3)


def test_options_refuse_an_unknown_hessian():
    with pytest.raises(ValueError, match="hessian"):
        SolveOptions(hessian="float16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_step_matches_the_cpu_float32_step():
    """On CUDA the bfloat16 Gram keeps its float32 sums (``out_dtype``); the refined step is
    the CPU's float32 direct step to CG's tolerance, and the certificate reads the device once
    (CUDA's own count of synchronisations: one per CG iteration, one for the certificate)."""
    X, y = make_data(3000, 120, 3, 4)
    kw = {"lam": 1e-3, "sigma": 10.0, "seed": 2, "max_removals": None}
    cpu, gpu = core.train(X, y, device="cpu", **kw), core.train(X, y, device="cuda", **kw)
    cpu.solve_options = SolveOptions(solver="direct")
    gpu.solve_options = BF16
    rows = list(range(0, 900, 3))
    e = gpu._epoch
    rows_t = torch.tensor(rows, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings  # noqa: PLC0415

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = newton_step(
                gpu._problem, e.alive, e.W, rows_t, e.acct.anchor_grad, e.Z, options=BF16
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step is not None and step.method == "direct" and step.hessian == "bfloat16"
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert step.residual_ratio <= 100 * BF16.cg_tol
    assert cpu.remove(rows).applied and gpu.remove(rows).applied
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=0, atol=1e-6)
    assert syncs <= 2 + BF16.cg_max_iter, syncs
