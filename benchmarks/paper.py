"""The reference's two README experiments (Guo et al. 2020, §4; facebookresearch/certified-removal).

    python benchmarks/paper.py mnist --data-dir DIR [--download] [--removals 1000] [--json]
    python benchmarks/paper.py svhn  --data-dir DIR [--download] [--removals 1000]
                                     [--extractor MODEL.pt] [--epochs 20] [--include-extra] [--json]

mnist: MNIST 3-vs-8 in pixel space (no extractor), binary, lam = 1e-3, sigma = 10, epsilon = 1,
delta = 1e-4. svhn: a CNN feature extractor trained with DP-SGD (Opacus; noise multiplier 6, clip
4, delta_dp = 1e-5, batch 500, 20 epochs), its features as a dataset file, a one-vs-rest head with
lam = 2e-4, sigma = 10 and negatives subsampled to 10%. Both then remove ``--removals`` training
rows one request at a time in a random order, retraining (fresh noise, pending rows excluded)
whenever the model asks for it, and print test accuracy before and after, removals certified per
retrain, retrains and their reasons, and seconds per removal against seconds per retrain.

svhn also prints the extractor's ``eps_dp`` and what its DP covers (``core.group_privacy``): the
head's certificate holds for a fixed extractor, but the extractor saw the removed rows, so the
pipeline after ``k`` removed rows is ``(eps + k eps_dp, delta + k e^((k-1) eps_dp) delta_dp)``.
The reference README removes 1,000 rows and ignores this; here the output says so when the
removals exceed what the extractor covers, and ``--enforce-extractor-cover`` lets ``core`` refuse
them (``core.train(extractor_dp=..., extractor_limit=...)``), which stops the run at the cover.

Deviation from the reference: the retrain trigger defaults to ``max_removals="auto"`` (a count
fixed without looking at the noise, docs/theory.md "The retrain trigger"); ``--max-removals
none`` gives the paper's rule (retrain when the budget would be crossed), which docs/theory.md
documents as outside the theorem.
No data is downloaded unless ``--download`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402
from core.errors import InvalidInputError  # noqa: E402

DATA_HINT = (
    "pass --data-dir with the original files (MNIST: DIR/MNIST/raw/*-ubyte; SVHN: "
    "DIR/train_32x32.mat, DIR/test_32x32.mat, and extra_32x32.mat for --include-extra), "
    "or --download on a machine with internet"
)


class DataMissingError(RuntimeError):
    """The dataset files are not where the options say (exit status 2)."""


# ------------------------------------------------------------------ the removal loop
def parse_max_removals(text: str) -> int | float | str | None:
    """``--max-removals``: core's parser (``auto``, ``none`` for the paper's rule, a count or a
    fraction), with its error as argparse's."""
    from core.trigger import parse_max_removals as parse  # noqa: PLC0415

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _sync(model: core.Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def removal_loop(
    model: core.Model, removals: int, *, order_seed: int | None, progress: bool
) -> dict[str, Any]:
    """Remove ``removals`` random training rows one request at a time; retrain when asked.

    A request the model cannot certify comes back pending (``res.needs_retrain``): the loop then
    retrains from scratch with fresh noise, excluding the pending rows, as the worker does. The
    removal order is public (it never depends on the noise).

    Returns:
        the loop's figures: Newton removals and their mean time, retrains, their reasons and
        mean time, and the removals certified in each noise epoch a retrain closed.
    """
    from tqdm.auto import tqdm

    n = model.n_alive
    if not 0 <= removals <= n - 2:
        raise InvalidInputError(f"--removals must lie in [0, {n - 2}] for {n} training rows")
    rng = np.random.default_rng(order_seed)
    order = rng.permutation(np.flatnonzero(model.alive.cpu().numpy()))[:removals]
    remove_seconds: list[float] = []
    retrain_seconds: list[float] = []
    per_epoch: list[int] = []
    reasons: Counter[str] = Counter()
    trigger_values = [model.max_removals]
    in_epoch = newton_rows = retrain_rows = 0
    stopped = False
    bar = tqdm(total=removals, desc="removals", unit="row", disable=not progress)
    for row in order.tolist():
        _sync(model)
        t0 = time.perf_counter()
        res = model.remove([row])
        _sync(model)
        elapsed = time.perf_counter() - t0
        if res.removed:
            remove_seconds.append(elapsed)
            in_epoch += len(res.removed)
            newton_rows += len(res.removed)
        left = model.extractor_removals_remaining  # None unless core enforces the cover
        if res.needs_retrain and (
            res.retrain_reason == "extractor" or (left is not None and len(res.pending) > left)
        ):
            # A head retrain keeps the extractor, so it cannot help: only a full-pipeline
            # retrain (extractor, features, head) can go on. The experiment stops here.
            stopped = True
            break
        if res.needs_retrain:
            reasons[res.retrain_reason or "unknown"] += 1
            per_epoch.append(in_epoch)
            in_epoch = 0
            t0 = time.perf_counter()
            model.retrain(exclude=res.pending)
            _sync(model)
            retrain_seconds.append(time.perf_counter() - t0)
            retrain_rows += len(res.pending)
            trigger_values.append(model.max_removals)
            bar.set_postfix(retrains=len(retrain_seconds))
        bar.update(1)
    bar.close()
    return {
        "removals": removals,
        "stopped_at_extractor_cover": stopped,
        "removed_by_newton": newton_rows,
        "removed_by_retrain": retrain_rows,
        "retrains": len(retrain_seconds),
        "retrain_reasons": dict(reasons),
        "safety_retrains": model.safety_retrains,
        "certified_per_retrain": per_epoch,
        "certified_per_retrain_mean": statistics.fmean(per_epoch) if per_epoch else None,
        "certified_per_retrain_min": min(per_epoch) if per_epoch else None,
        "certified_in_last_epoch": in_epoch,
        "max_removals_resolved": trigger_values,
        "removal_seconds_mean": statistics.fmean(remove_seconds) if remove_seconds else None,
        "removal_seconds_total": sum(remove_seconds),
        "retrain_seconds_mean": statistics.fmean(retrain_seconds) if retrain_seconds else None,
    }


def train_and_remove(ds: core.Dataset, args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    """Train the head (``core.train``), run :func:`removal_loop`, collect accuracy and timing."""
    n = int(ds.X_train.shape[0])
    if not 0 <= args.removals <= n - 2:
        raise InvalidInputError(f"--removals must lie in [0, {n - 2}] for {n} training rows")
    t0 = time.perf_counter()
    model = core.train(
        ds.X_train,
        ds.y_train,
        lam=args.lam,
        sigma=args.sigma,
        epsilon=args.epsilon,
        delta=args.delta,
        max_removals=args.max_removals,
        ids=ds.ids_train,
        device=args.device,
        **options,
    )
    _sync(model)
    train_seconds = time.perf_counter() - t0
    acc_before = model.accuracy(ds.X_test, ds.y_test)
    loop = removal_loop(model, args.removals, order_seed=args.order_seed, progress=args.progress)
    acc_after, version = model.accuracy(ds.X_test, ds.y_test), model.version
    retrain_s, basis = loop["retrain_seconds_mean"], "mean of the loop's retrains"
    if retrain_s is None:
        # No retrain was needed: time one (fresh noise, same rows) so that the comparison is
        # retrain against removal, not against the first training's one-off costs (||X||_2).
        t0 = time.perf_counter()
        model.retrain()
        _sync(model)
        retrain_s, basis = time.perf_counter() - t0, "one retrain timed after the loop"
    per_removal = loop["removal_seconds_mean"]
    return {
        "n_train": int(ds.X_train.shape[0]),
        "n_test": int(ds.X_test.shape[0]),
        "features": int(ds.X_train.shape[1]),
        "classes": model.classes,
        "device": str(model.device),
        "lam": args.lam,
        "sigma": args.sigma,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "max_removals": args.max_removals,
        "certified": model.certified,
        "budget_total": model.budget_total,
        "train_seconds": train_seconds,
        "test_accuracy_before": acc_before,
        "test_accuracy_after": acc_after,
        **loop,
        "retrain_seconds": retrain_s,
        "retrain_seconds_basis": basis,
        "retrain_over_removal": retrain_s / per_removal if per_removal else None,
        "model_version": version,
    }


# ------------------------------------------------------------------ the two experiments
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def required_files(experiment: str, root: Path, *, include_extra: bool = False) -> list[Path]:
    """The original files an experiment reads (MNIST IDX uncompressed, SVHN cropped-digit .mat)."""
    if experiment == "mnist":
        return [root / "MNIST" / "raw" / name for name in MNIST_FILES]
    splits = ("train", "test", "extra") if include_extra else ("train", "test")
    return [root / f"{split}_32x32.mat" for split in splits]


def data_root(args: argparse.Namespace) -> Path:
    """``--data-dir`` (or ``./data`` with ``--download``), with every file there unless
    ``--download`` may fetch it.

    Raises:
        DataMissingError: no ``--data-dir`` and no ``--download``, or files missing.
    """
    if args.data_dir is None and not args.download:
        raise DataMissingError(f"no data given: {DATA_HINT}")
    root = Path(args.data_dir if args.data_dir is not None else "data")
    missing = [
        str(path)
        for path in required_files(
            args.experiment, root, include_extra=getattr(args, "include_extra", False)
        )
        if not path.is_file()
    ]
    if missing and not args.download:
        raise DataMissingError(
            f"{args.experiment} data missing ({', '.join(missing)}): {DATA_HINT}"
        )
    return root


def run_mnist(args: argparse.Namespace) -> dict[str, Any]:
    """MNIST 3-vs-8, pixels as features (rows L2-normalised), binary head."""
    root = data_root(args)
    ds = core.load_dataset("mnist", data_dir=root, download=args.download, binary_classes=(3, 8))
    return {"experiment": "mnist-3v8", **train_and_remove(ds, args)}


def svhn_extractor(
    args: argparse.Namespace, root: Path, out_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """Load ``--extractor``, or train the paper's DP-SGD extractor and save it under ``out_dir``.

    Returns:
        the :class:`core.extractor.TrainedExtractor` and the figures to report.
    """
    from core.extractor import config_for, load_extractor, save_extractor, train_extractor
    from core.images import load_split_with_ids

    if args.extractor is not None:
        ext = load_extractor(args.extractor, device=args.device)
        if ext.config.dataset != "svhn":
            raise InvalidInputError(f"{args.extractor} is a {ext.config.dataset} extractor")
        return ext, {"extractor_path": str(args.extractor), "extractor_train_seconds": None}
    t0 = time.perf_counter()
    images, labels, _ = load_split_with_ids(
        "svhn", root, train=True, include_extra=args.include_extra, download=args.download
    )
    ext = train_extractor(
        images,
        labels,
        config_for("svhn", num_filters=args.num_filters),
        delta=args.dp_delta,
        epochs=args.epochs,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        max_physical_batch_size=args.max_physical_batch_size,
        lr=args.lr,
        accountant=args.accountant,
        device=args.device,
        progress=args.progress,
    )
    path = save_extractor(out_dir / "svhn_extractor.pt", ext)
    return ext, {"extractor_path": str(path), "extractor_train_seconds": time.perf_counter() - t0}


def extractor_cover(
    eps: float,
    delta: float,
    eps_dp: float,
    delta_dp: float,
    removed: int,
    *,
    eps_extra_max: float,
    delta_extra_max: float,
) -> dict[str, Any]:
    """What the extractor's DP covers: group privacy over ``removed`` rows (``core.group_privacy``).

    The head's ``(eps, delta)`` holds for a fixed extractor; the extractor saw every removed row,
    so the pipeline is ``(eps + k eps_dp, delta + k e^((k-1) eps_dp) delta_dp)`` after ``k`` rows
    (docs/theory.md "The DP feature extractor"). ``k`` counts rows removed since the extractor
    was trained, retrains included.
    """
    from core.group_privacy import combined_guarantee, extractor_removals_allowed

    allowed = extractor_removals_allowed(
        eps_dp, delta_dp, eps_extra_max=eps_extra_max, delta_extra_max=delta_extra_max
    )
    eps_all, delta_all = combined_guarantee(eps, delta, eps_dp, delta_dp, removed)
    eps_cap, delta_cap = combined_guarantee(eps, delta, eps_dp, delta_dp, allowed)
    return {
        "eps_extra_max": eps_extra_max,
        "delta_extra_max": delta_extra_max,
        "extractor_removals_allowed": allowed,
        "rows_removed": removed,
        "extractor_covers_all_removals": removed <= allowed,
        "combined_epsilon": eps_all,
        "combined_delta": delta_all,
        "combined_vacuous": not delta_all < 1,
        "combined_epsilon_at_allowed": eps_cap,
        "combined_delta_at_allowed": delta_cap,
    }


def run_svhn(args: argparse.Namespace) -> dict[str, Any]:
    """SVHN: DP-SGD extractor (trained or ``--extractor``), its features, one-vs-rest head."""
    from core.extractor import extract_dataset, write_feature_dataset

    root = data_root(args)
    out_dir = Path(args.out_dir)
    ext, info = svhn_extractor(args, root, out_dir)
    t0 = time.perf_counter()
    parts = extract_dataset(
        ext, "svhn", root, include_extra=args.include_extra, download=args.download
    )
    features = write_feature_dataset(out_dir / "svhn_features.npz", **parts)
    del parts
    info["extract_seconds"] = time.perf_counter() - t0
    ds = core.load_dataset(str(features))
    p = ext.config.privacy
    eps_dp, delta_dp = float(ds.meta["dp_epsilon"]), float(ds.meta["dp_delta"])
    info.update(
        features_path=str(features),
        include_extra=args.include_extra,
        eps_dp=eps_dp,
        delta_dp=delta_dp,
        noise_multiplier=float(ext.noise_multiplier),
        max_grad_norm=p.get("max_grad_norm"),
        accountant=p.get("accountant"),
        extractor_epochs=p.get("epochs"),
        extractor_n_train=p.get("n_train"),
    )
    options: dict[str, Any] = {"subsample_ratio": args.subsample_ratio}
    if args.enforce_extractor_cover:
        options["extractor_dp"] = (eps_dp, delta_dp)
        options["extractor_limit"] = (args.eps_extra_max, args.delta_extra_max)
    result = train_and_remove(ds, args, **options)
    removed = result["removed_by_newton"] + result["removed_by_retrain"]
    cover = extractor_cover(
        args.epsilon,
        args.delta,
        eps_dp,
        delta_dp,
        removed,
        eps_extra_max=args.eps_extra_max,
        delta_extra_max=args.delta_extra_max,
    )
    return {"experiment": "svhn-ovr", **info, **result, **cover}


# ------------------------------------------------------------------ output
def _fmt(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def report_lines(r: dict[str, Any]) -> list[str]:
    """The human report: the figures of the reference README, then the extractor's cover."""
    lines = [
        f"{r['experiment']}: {r['n_train']} training rows, {r['features']} features, "
        f"classes {r['classes']}, device {r['device']}"
    ]
    if "eps_dp" in r:
        lines.append(
            f"DP extractor: eps_dp = {r['eps_dp']:.4g} at delta_dp = {r['delta_dp']:g} "
            f"(noise multiplier {r['noise_multiplier']:g}, clip {r['max_grad_norm']}, "
            f"{r['extractor_epochs']} epoch(s), accountant {r['accountant']}, "
            f"{r['extractor_n_train']} images)"
        )
    trig = r["max_removals"]
    lines += [
        f"head: lam = {r['lam']:g}, sigma = {r['sigma']:g}, certificate (eps, delta) = "
        f"({r['epsilon']:g}, {r['delta']:g}), max_removals = "
        f"{'none (paper rule)' if trig is None else trig} -> {r['max_removals_resolved'][0]}",
        f"test accuracy: before {r['test_accuracy_before']:.4f}, after "
        f"{r['removed_by_newton'] + r['removed_by_retrain']} removals "
        f"{r['test_accuracy_after']:.4f}",
        f"removals: {r['removed_by_newton']} by Newton step, {r['removed_by_retrain']} folded "
        f"into retrains; retrains: {r['retrains']}"
        + "".join(f", {reason} {count}" for reason, count in sorted(r["retrain_reasons"].items())),
    ]
    if r["retrains"]:
        lines.append(
            f"removals certified per retrain: mean {r['certified_per_retrain_mean']:.1f}, "
            f"min {r['certified_per_retrain_min']} (then {r['certified_in_last_epoch']} in the "
            "open noise epoch)"
        )
    else:
        lines.append(
            f"no retrain needed: all {r['removed_by_newton']} removals certified in one "
            "noise epoch (certified per retrain: at least that many)"
        )
    if r["safety_retrains"]:
        lines.append(
            f"the budget safety net fired {r['safety_retrains']} time(s): that epoch's "
            "certificate is (eps, delta + e^eps p), p the firing probability"
        )
    lines.append(
        f"time: {_fmt(r['removal_seconds_mean'])} s per removal vs "
        f"{_fmt(r['retrain_seconds'])} s per retrain ({r['retrain_seconds_basis']}; ratio "
        f"{_fmt(r['retrain_over_removal'], '.1f')}x); first training {r['train_seconds']:.4g} s"
    )
    if "eps_dp" in r:
        lines.append(
            f"extractor cover (extra eps <= {r['eps_extra_max']:g}, extra delta <= "
            f"{r['delta_extra_max']:g}): {r['extractor_removals_allowed']} rows; pipeline "
            f"guarantee there ({r['combined_epsilon_at_allowed']:.4g}, "
            f"{r['combined_delta_at_allowed']:.3g})"
        )
        lines.append(
            f"combined guarantee after {r['rows_removed']} removed rows: "
            f"({r['combined_epsilon']:.4g}, {r['combined_delta']:.3g})"
            + (" -- vacuous (delta >= 1)" if r["combined_vacuous"] else "")
        )
        if r["stopped_at_extractor_cover"]:
            lines.append(
                f"stopped after {r['rows_removed']} of {r['removals']} rows: the extractor's DP "
                "covers no more (--enforce-extractor-cover); going on needs a full-pipeline "
                "retrain (extractor, features, head) without the removed rows"
            )
        if not r["extractor_covers_all_removals"]:
            lines.append(
                f"WARNING: {r['rows_removed']} rows removed but the extractor's DP covers only "
                f"{r['extractor_removals_allowed']}: past that the head's certificate no longer "
                "bounds what the pipeline reveals; a certified run needs a full-pipeline retrain "
                "(extractor, features, head) without the removed rows every "
                f"{r['extractor_removals_allowed']} rows. The reference README ignores this."
            )
    return lines


def _json_safe(value: Any) -> Any:
    """Strict JSON: infinities and NaN become null (a vacuous delta is flagged separately)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """Two subcommands sharing the data, head and loop options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="folder with the original files (see --help)")
    common.add_argument(
        "--download",
        action="store_true",
        help="fetch missing files with torchvision (needs internet)",
    )
    common.add_argument("--removals", type=int, default=1000, help="rows to remove (default 1000)")
    common.add_argument(
        "--max-removals",
        type=parse_max_removals,
        default="auto",
        help="per-epoch retrain trigger: an int, auto (default) or none "
        "(the paper's rule: retrain when the budget would be crossed)",
    )
    common.add_argument("--epsilon", type=float, default=1.0, help="head certificate epsilon")
    common.add_argument("--delta", type=float, default=1e-4, help="head certificate delta")
    common.add_argument("--sigma", type=float, default=10.0, help="objective noise std")
    common.add_argument(
        "--order-seed",
        type=int,
        default=None,
        help="seed of the (public) removal order; default: random",
    )
    common.add_argument("--device", default=None, help="cuda or cpu (default: cuda if any)")
    common.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object")

    mnist = sub.add_parser("mnist", parents=[common], help="MNIST 3-vs-8, binary, pixels")
    mnist.add_argument("--lam", type=float, default=1e-3)

    svhn = sub.add_parser("svhn", parents=[common], help="SVHN, DP extractor, one-vs-rest")
    svhn.add_argument("--lam", type=float, default=2e-4)
    svhn.add_argument(
        "--subsample-ratio", type=float, default=0.1, help="negatives kept per class (default 0.1)"
    )
    svhn.add_argument(
        "--extractor",
        help="a model file from a previous run or "
        "`certremove extractor train` (skips DP-SGD training)",
    )
    svhn.add_argument(
        "--include-extra",
        action="store_true",
        help="train on train + extra (604,388 images; the reference's setting)",
    )
    svhn.add_argument(
        "--out-dir", default="data/paper-svhn", help="where the extractor and the features .npz go"
    )
    svhn.add_argument("--epochs", type=int, default=20, help="DP-SGD epochs")
    svhn.add_argument("--noise-multiplier", type=float, default=6.0)
    svhn.add_argument("--max-grad-norm", type=float, default=4.0)
    svhn.add_argument("--dp-delta", type=float, default=1e-5, help="the extractor's delta")
    svhn.add_argument("--batch-size", type=int, default=500, help="expected logical batch")
    svhn.add_argument("--max-physical-batch-size", type=int, default=500)
    svhn.add_argument("--lr", type=float, default=1e-3)
    svhn.add_argument("--num-filters", type=int, default=64)
    svhn.add_argument("--accountant", default="prv", help="prv, rdp or gdp")
    svhn.add_argument(
        "--eps-extra-max",
        type=float,
        default=1.0,
        help="extra epsilon the extractor may add (default 1)",
    )
    svhn.add_argument(
        "--enforce-extractor-cover",
        action="store_true",
        help="let core refuse removals past the extractor's cover and stop there (default: "
        "remove them all, as the reference does, and warn)",
    )
    svhn.add_argument(
        "--delta-extra-max",
        type=float,
        default=1e-4,
        help="extra delta the extractor may add (default 1e-4)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; 0 on success, 2 with a one-paragraph message on missing data or bad
    options."""
    args = build_parser().parse_args(argv)
    try:
        result = run_mnist(args) if args.experiment == "mnist" else run_svhn(args)
    except (DataMissingError, InvalidInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), sort_keys=True, allow_nan=False))
    else:
        print("\n".join(report_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
