"""``certremove extractor``: train the DP feature extractor and extract features to a dataset file.

The main CLI (``worker/cli.py``) mounts :data:`app` with ``app.add_typer(app, name="extractor")``.
Human output is a few lines; ``--json`` prints one JSON object on stdout. Bad input exits with
status 2 and one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import InvalidInputError

app = typer.Typer(
    name="extractor",
    help="DP feature extractor (Opacus DP-SGD): train it, then extract features to a .npz file.",
    no_args_is_help=True,
    add_completion=False,
)

DatasetOpt = Annotated[str, typer.Option("--dataset", help="mnist or svhn")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="MNIST: root of MNIST/raw/; SVHN: folder of *_32x32.mat"),
]
DownloadOpt = Annotated[
    bool, typer.Option("--download", help="fetch missing files (needs internet; default ./data)")
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", envvar="CERTREMOVE_DEVICE", help="cuda or cpu (default: cuda if any)"),
]
ExtraOpt = Annotated[
    bool, typer.Option("--svhn-extra", help="SVHN: train on train + extra (the paper's setting)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _data_dir(data_dir: Path | None, download: bool) -> Path:
    if data_dir is None:
        if not download:
            raise _fail("no data: supply --data-dir DIR (the dataset files), or --download")
        return Path("data")
    if not data_dir.is_dir() and not download:
        raise _fail(f"--data-dir {data_dir} is not a directory: supply the dataset files there, "
                    "or use --download")  # fmt: skip
    return data_dir


def _emit(as_json: bool, payload: dict[str, Any], lines: list[str]) -> None:
    typer.echo(json.dumps(payload, sort_keys=True) if as_json else "\n".join(lines))


@app.command()
def train(
    dataset: DatasetOpt,
    out: Annotated[Path, typer.Option("--out", help="model file to write")],
    data_dir: DataDirOpt = None,
    target_epsilon: Annotated[
        float | None, typer.Option("--target-epsilon", help="DP-SGD target epsilon")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="fixed noise (instead of a target)")
    ] = None,
    delta: Annotated[float, typer.Option("--delta")] = 1e-5,
    epochs: Annotated[int, typer.Option("--epochs")] = 20,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="clip norm C")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="expected logical batch")] = 500,
    max_physical_batch_size: Annotated[int, typer.Option("--max-physical-batch-size")] = 500,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    num_filters: Annotated[int, typer.Option("--num-filters")] = 64,
    accountant: Annotated[str, typer.Option("--accountant", help="prv, rdp or gdp")] = "prv",
    svhn_extra: ExtraOpt = False,
    device: DeviceOpt = None,
    download: DownloadOpt = False,
    seed: Annotated[int | None, typer.Option("--seed", help="tests only: public noise")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the CNN with DP-SGD and save it; prints the epsilon the accountant spent."""
    import torch

    from core.extractor import config_for, save_extractor, train_extractor
    from core.images import load_image_split, load_split_with_ids

    root = _data_dir(data_dir, download)
    if (target_epsilon is None) == (noise_multiplier is None):
        raise _fail("give exactly one of --target-epsilon and --noise-multiplier")
    try:
        config = config_for(dataset, num_filters=num_filters)
        images, labels, _ = load_split_with_ids(
            dataset, root, train=True, include_extra=svhn_extra, download=download
        )
        trained = train_extractor(
            images, labels, config, delta=delta, epochs=epochs, target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            batch_size=batch_size, max_physical_batch_size=max_physical_batch_size, lr=lr,
            accountant=accountant, device=device, seed=seed, progress=not as_json,
        )  # fmt: skip
        test_images, test_labels = load_image_split(dataset, root, train=False, download=download)
    except (InvalidInputError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    with torch.no_grad():
        dev = next(trained.model.parameters()).device
        preds = torch.cat(
            [trained.model(b.to(dev)).argmax(1).cpu() for b in test_images.split(1024)]
        )
    accuracy = float((preds == test_labels).double().mean())
    save_extractor(out, trained)
    p = trained.config.privacy
    payload = {"model": str(out), "dataset": config.dataset, "test_accuracy": accuracy, **p}
    _emit(as_json, payload, [
        f"DP extractor trained on {p['n_train']} {config.dataset} images, {epochs} epoch(s)",
        f"spent epsilon = {trained.epsilon:.4g} at delta = {delta:g} (accountant {accountant}, "
        f"noise multiplier {trained.noise_multiplier:.4g}, clip {max_grad_norm:g}, "
        f"sample rate {p['sample_rate']:.3g})",
        f"classifier test accuracy {accuracy:.4f}; saved to {out}",
    ])  # fmt: skip


@app.command()
def extract(
    model: Annotated[Path, typer.Option("--model", help="file written by `extractor train`")],
    dataset: DatasetOpt,
    out: Annotated[Path, typer.Option("--out", help="dataset file (.npz) to write")],
    data_dir: DataDirOpt = None,
    binary_classes: Annotated[
        str | None, typer.Option("--binary-classes", help="keep two digits, e.g. 3,8")
    ] = None,
    svhn_extra: ExtraOpt = False,
    device: DeviceOpt = None,
    download: DownloadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the penultimate features (rows L2-normalised) as a dataset file with DP meta."""
    from core.extractor import extract_dataset, load_extractor, write_feature_dataset

    root = _data_dir(data_dir, download)
    classes: tuple[int, int] | None = None
    if binary_classes is not None:
        try:
            first, second = (int(c) for c in binary_classes.split(","))
        except ValueError:
            first = second = -1
        if first == second or not (0 <= first <= 9 and 0 <= second <= 9):
            raise _fail(
                f"--binary-classes takes two different digits like 3,8, got {binary_classes!r}"
            )
        classes = (first, second)
    if not model.is_file():
        raise _fail(f"--model {model} not found: train one with `certremove extractor train`")
    try:
        trained = load_extractor(model, device=device)
        if trained.config.dataset != dataset.lower():
            raise InvalidInputError(
                f"the extractor was trained on {trained.config.dataset}, not {dataset}"
            )
        arrays = extract_dataset(
            trained, dataset, root, binary_classes=classes, include_extra=svhn_extra,
            download=download,
        )  # fmt: skip
        write_feature_dataset(out, **arrays)
    except (InvalidInputError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    meta = arrays["meta"]
    payload = {"out": str(out), "n_train": len(arrays["y_train"]), "n_test": len(arrays["y_test"]),
               **meta}  # fmt: skip
    _emit(as_json, payload, [
        f"wrote {out}: {payload['n_train']} train / {payload['n_test']} test rows, "
        f"{meta['feature_dim']} features",
        f"extractor privacy: epsilon = {meta['dp_epsilon']:.4g}, delta = {meta['dp_delta']:g} "
        "(k removals cost k*epsilon by group privacy; see docs/extractor.md)",
    ])  # fmt: skip
