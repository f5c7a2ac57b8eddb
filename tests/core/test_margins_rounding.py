"""The rounding of the margins ``x . w`` is part of the certificate's rounding margin.

An independent oracle: the gradient of ``L_0`` evaluated in numpy's extended precision
(``longdouble``) on the float64 data, against the float64 gradient the certificate uses. The
case is built so that ``x . w`` cancels heavily (``||x|| ||w||`` about 1e8, ``x . w`` of order 1):
the summation margin alone is far below the error, the product term covers it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.bounds import margins_rounding, rounding_margin
from core.loss import gradient, margins

pytestmark = pytest.mark.skipif(
    np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps,
    reason="numpy's longdouble is no wider than float64 here",
)


def _exact_gradient(X: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float) -> np.ndarray:
    Xl, yl, wl = X.astype(np.longdouble), y.astype(np.longdouble), w.astype(np.longdouble)
    z = yl * (Xl @ wl)
    d1 = -1 / (1 + np.exp(z))  # l'(z) = -sigmoid(-z)
    return Xl.T @ (d1 * yl) + lam * len(y) * wl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_covers_the_rounding_of_cancelling_margins(seed: int) -> None:
    gen = np.random.default_rng(seed)
    n, d, lam = 200, 4, 1e-20
    base = gen.normal(size=d)
    X = base + 1e-9 * gen.normal(size=(n, d))  # nearly parallel rows
    y = np.where(gen.random(n) < 0.5, -1.0, 1.0)
    w = 1e8 * gen.normal(size=d)
    w[-1] -= (base @ w) / base[-1]  # base . w = 0: x_i . w is of order 1 after cancellation
    Xt, Yt, Wt = torch.tensor(X), torch.tensor(y)[:, None], torch.tensor(w)[:, None]
    C = torch.ones(n, 1, dtype=torch.float64)
    Z = margins(Xt, Yt, Wt)
    assert float(Z.abs().max()) < 50  # the margins are of order 1 (not saturated)
    g64 = gradient(Xt, Yt, C, Wt, lam, n, Z=Z)[:, 0].numpy()
    error = float(np.linalg.norm(g64.astype(np.longdouble) - _exact_gradient(X, y, w, lam)))
    row_norms = torch.linalg.vector_norm(Xt, dim=1)
    summation = rounding_margin(
        n,
        d,
        float((C * torch.sigmoid(-Z) * row_norms[:, None]).sum()),
        lam,
        n,
        float(torch.linalg.vector_norm(Wt)),
        float(np.linalg.norm(g64)),
    )
    products = margins_rounding(d, row_norms.square() @ C, Wt)
    assert error > 10 * summation  # the summation margin alone would not cover it
    assert error <= summation + products
