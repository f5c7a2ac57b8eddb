"""certremove core: certified data removal for L2 logistic regression (Guo et al., ICML 2020).

Objective (sum form, loss perturbation), for rows ``||x_i|| <= 1`` and labels ``y_i in {-1,+1}``:

    L_b(w; D) = sum_i log(1 + exp(-y_i w.x_i)) + (lam * n / 2) ||w||^2 + b.w,   b ~ N(0, sigma^2 I)

One-vs-rest models stack K such columns with independent ``b_k``. Removing a batch R is one Newton
step ``w <- w + H'^{-1} Delta`` with ``Delta = sum_R l'(z_j) y_j x_j + lam |R| w`` and ``H'`` the
Hessian of the remaining rows. While the gradient residual ``||U||`` (exact, anchored, or an
a-priori bound) stays below ``sigma * epsilon / sqrt(2 ln(1.5 / delta))`` the model is
(epsilon, delta)-indistinguishable from a retrain without R. ``core`` never imports celery, kombu,
redis or prometheus_client and never reads the environment.
"""

from __future__ import annotations

from core.budget import analytic_mu, budget_total, classical_c
from core.data import Dataset, load_dataset, load_npz, save_dataset
from core.errors import (
    CertRemoveError,
    ConvergenceError,
    InvalidInputError,
    NumericalError,
    StateDamagedError,
    StateError,
    StateNotFoundError,
)
from core.loading import list_snapshots, read_journal
from core.model import Model, RemovalResult, load_model
from core.snapshots import SnapshotInfo
from core.train import train

__all__ = [
    "CertRemoveError",
    "ConvergenceError",
    "Dataset",
    "InvalidInputError",
    "Model",
    "NumericalError",
    "RemovalResult",
    "SnapshotInfo",
    "StateDamagedError",
    "StateError",
    "StateNotFoundError",
    "analytic_mu",
    "budget_total",
    "classical_c",
    "list_snapshots",
    "load_dataset",
    "load_model",
    "load_npz",
    "read_journal",
    "save_dataset",
    "train",
]
