"""``certremove train``: train a removal-enabled model and write its state directory.

Its options and their parsers (``--max-removals``, ``--binary-classes``, the accounting and the
calibration), the progress shown on a terminal, and the warning when the noise dominates the
weights. Mounted on the ``certremove`` command by :mod:`worker.cli`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from worker.cli_common import err, fail
from worker.training import train_model


def parse_max_removals(text: str) -> int | float | str | None:
    """``auto``, ``none``, an integer count >= 1 or a fraction in (0, 1) (``core``'s parser,
    whose ``ValueError`` becomes a bad ``--max-removals``)."""
    from core.trigger import parse_max_removals as parse  # noqa: PLC0415 - torch only here

    try:
        return parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--max-removals'") from exc


def parse_binary_classes(text: str | None) -> tuple[int, int] | None:
    """``"3,8"`` -> ``(3, 8)``: two different non-negative labels (a bad ``--binary-classes``
    otherwise)."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        first, second = (int(p) for p in parts)
    except ValueError:
        first = second = -1
    if len(parts) != 2 or first == second or min(first, second) < 0:
        raise typer.BadParameter(
            f"two different labels like 3,8, got {text!r}", param_hint="'--binary-classes'"
        )
    return first, second


class Accounting(StrEnum):
    """``core.problem.ACCOUNTINGS``."""

    exact = "exact"
    bound = "bound"


class Calibration(StrEnum):
    """``core.budget.CALIBRATIONS``."""

    classical = "classical"
    analytic = "analytic"


@contextmanager
def stages(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A ``progress(stage)`` callback: on a terminal (``enabled``) a spinner on stderr names the
    running stage and each finished one is listed with its time; otherwise it does nothing."""
    if not enabled:
        yield lambda _text: None
        return
    current: list[tuple[str, float]] = []

    def done() -> None:
        if current:
            text, since = current.pop()
            elapsed = time.monotonic() - since
            err.print(f"[green]done[/green] {escape(text)} ({elapsed:.1f} s)", highlight=False)

    with err.status("starting") as status:

        def progress(text: str) -> None:
            done()
            current.append((text, time.monotonic()))
            status.update(escape(text) + " ...")

        yield progress
        done()


def train(
    dataset: Annotated[
        str,
        typer.Option(
            help="digits (embedded), mnist or svhn (with --data-dir or --download), "
            "synthetic:n=..,d=..,classes=..,seed=.., or a .npz dataset file."
        ),
    ],
    state: Annotated[Path, typer.Option(help="State directory to write (a new one).")],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="mnist: the folder holding MNIST/raw/ (the four IDX files); svhn: the folder "
            "of the *_32x32.mat files. With --download and no --data-dir: ./data"
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Fetch missing mnist/svhn files (needs internet access).")
    ] = False,
    binary_classes: Annotated[
        str | None,
        typer.Option(help="Keep two classes, e.g. 3,8 (the paper's MNIST 3 vs 8)."),
    ] = None,
    lam: Annotated[
        float,
        typer.Option(
            help="L2 regularisation (objective: sum of losses + lam*n/2 ||w||^2). The default "
            "suits MNIST-size data (60,000 rows); small data needs more (digits: 1e-2)."
        ),
    ] = 1e-3,
    sigma: Annotated[
        float,
        typer.Option(
            help="Standard deviation of the loss-perturbation noise b: a larger removal budget "
            "but a noisier model. The default suits MNIST-size data; small data needs less "
            "(digits: 1)."
        ),
    ] = 10.0,
    epsilon: Annotated[
        float,
        typer.Option(help="The certificate's epsilon (> 0; above 1 needs --calibration analytic)."),
    ] = 1.0,
    delta: Annotated[float, typer.Option(help="The certificate's delta, in (0, 1).")] = 1e-4,
    calibration: Annotated[
        Calibration,
        typer.Option(
            help="Budget from the noise: classical (sigma*epsilon/sqrt(2 ln(1.5/delta)), "
            "epsilon <= 1) or analytic (the analytic Gaussian mechanism, any epsilon)."
        ),
    ] = Calibration.classical,
    accounting: Annotated[
        Accounting,
        typer.Option(
            help="How removals are charged to the budget: exact (the anchored exact gradient "
            "residual, more removals per noise draw) or bound (the paper's a-priori bound)."
        ),
    ] = Accounting.exact,
    max_removals: Annotated[
        str,
        typer.Option(
            help="Rows removed per noise epoch before a retrain: auto (estimated by shadow "
            "runs), none (no count trigger), a count >= 1, or a fraction of the rows in (0, 1)."
        ),
    ] = "auto",
    seed: Annotated[
        int | None, typer.Option(help="Tests only: public noise, marks the model uncertified.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            envvar="CERTREMOVE_DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)."
        ),
    ] = None,
    extractor_eps_extra: Annotated[
        float | None, typer.Option(help="DP extractor: extra epsilon allowed (default: --epsilon)")
    ] = None,
    extractor_delta_extra: Annotated[
        float | None, typer.Option(help="DP extractor: extra delta allowed (default: --delta)")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace the model in an existing state directory (rows it removed come back)."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (no progress display).")
    ] = False,
) -> None:
    """Train a removal-enabled model and write its state directory.

    The defaults (--lam 1e-3 --sigma 10) are tuned for MNIST-size data (60,000 rows); on small
    data such as digits use --lam 1e-2 --sigma 1 (the demo's settings). A warning says when the
    noise dominates the weights.
    """
    from worker.training import noise_warning  # noqa: PLC0415

    spec = parse_max_removals(max_removals)
    classes = parse_binary_classes(binary_classes)
    if data_dir is None and download:
        data_dir = Path("data")
    try:
        with stages(not as_json and err.is_terminal) as progress:
            summary = train_model(
                dataset,
                state,
                overwrite=overwrite,
                data_dir=data_dir,
                download=download,
                binary_classes=classes,
                progress=progress,
                lam=lam,
                sigma=sigma,
                epsilon=epsilon,
                delta=delta,
                calibration=calibration.value,
                seed=seed,
                accounting=accounting.value,
                device=device,
                max_removals=spec,
                extractor_limit=(extractor_eps_extra, extractor_delta_extra),
            )
    except (ValueError, OSError) as exc:
        raise fail(str(exc).replace('calibration="analytic"', "--calibration analytic")) from exc
    except RuntimeError as exc:  # core's ConvergenceError / NumericalError
        raise fail(str(exc), 1) from exc
    if (warning := noise_warning(summary)) is not None:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if as_json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key}: {value}")
