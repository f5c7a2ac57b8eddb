"""The rows a noise epoch can still touch, gathered once: :class:`RowView`.

A removed row weighs 0 in every sum of a step (its ``C = alive * omega`` is 0), yet a pass over
the training matrix reads it all the same: after half the rows are gone, half of every pass of a
removal step, a fit or a shadow run is wasted. An epoch fitted on ``alive`` never brings a row
back, so :func:`row_view` gathers the rows alive at the fit into a :class:`core.problem.Problem`
of their own (X, its float32 copy, labels, weights and row norms), built with the epoch (on the
background thread for a prepared retrain); the epoch's steps, fit, anchor and shadow runs read
that instead. Everything else keeps the full problem: the alive mask, the rows of requests and
of the state files stay global.

The maths is unchanged: the sums lose only terms that are exactly 0. The certificate's rounding
margins count the terms actually summed (the view's rows) and hold for any summation order;
``x_norm2`` stays the full matrix's bound (a submatrix's spectral norm is no larger).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.problem import Problem, restrict

#: a view is gathered when at least this fraction of the rows is gone (below it, the copy's
#: memory and its gather buy little)
MIN_SAVING = 0.1


@dataclass(frozen=True)
class RowView:
    """Rows ``index`` (ascending global rows) of a problem as a problem of their own.

    ``local`` (n,) maps a global row to its position in ``index`` (-1 outside); it lives on
    the CPU, where a step's rows are checked and mapped before they go to the device."""

    index: torch.Tensor
    local: torch.Tensor
    problem: Problem

    def alive(self, alive: torch.Tensor) -> torch.Tensor:
        """A global alive mask restricted to the view's rows."""
        return alive[self.index]

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Global rows (all inside the view; a CPU tensor) as the view's rows (on the CPU).

        Raises:
            RuntimeError: a row outside the view (an epoch never serves a row that was removed
                before it was fitted: a broken invariant, not bad input).
        """
        local = self.local[rows]
        if bool((local < 0).any()):
            raise RuntimeError("a removal step got a row outside its epoch's rows")
        return local


def row_view(
    problem: Problem, alive: torch.Tensor, *, min_saving: float = MIN_SAVING
) -> RowView | None:
    """The view of ``problem`` on the rows of ``alive``, or None when fewer than ``min_saving``
    of the rows are gone (the full problem serves then)."""
    n = alive.numel()
    m = int(alive.sum())
    if m == 0 or m > (1.0 - min_saving) * n:
        return None
    index = torch.nonzero(alive).flatten()
    local = torch.full((n,), -1, dtype=torch.long)
    local[index.cpu()] = torch.arange(m, dtype=torch.long)
    return RowView(index=index, local=local, problem=restrict(problem, index))


def view_of(
    problem: Problem, view: RowView | None, alive: torch.Tensor
) -> tuple[Problem, torch.Tensor]:
    """The problem and alive mask a step on an epoch with ``view`` works on."""
    return (problem, alive) if view is None else (view.problem, view.alive(alive))
