"""The fixed data of a model and its options: :class:`Problem` (float64 rows, labels, subsampling
mask, derived constants), :class:`Hyper` (the training options, persisted), and the validation of
training rows. Nothing here changes after training."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from core.blocked import calibrate_certificate, calibrate_hvp
from core.bounds import spectral_norm_upper
from core.errors import InvalidInputError
from core.products import calibrate_products

ACCOUNTINGS = ("exact", "bound")
#: ``int | float | str | None``: an int, a fraction of the rows, ``"auto"`` or None
MaxRemovals = int | float | str | None


@dataclass(frozen=True)
class Problem:
    """The fixed data of a model: float64 rows, labels, subsampling mask and derived constants.

    Shapes: X (n, d) float64; Y (n, K) in {-1, +1}; omega (n, K) in {0, 1}; row_norms (n,).
    ``x_norm2`` is an upper bound on the full training matrix's spectral norm.

    ``X32``: X rounded to float32 (half of X's memory), made with the problem (also by
    ``dataclasses.replace``); a row view's (:func:`restrict`) is gathered from its problem's
    with the same rows. It feeds only what the float64 certificate re-checks or what only
    shapes a direction: the float32 Hessians of the direct solve and the Hessian-vector
    products of the removal step's CG (core.removal) and of the fits' CG
    (:func:`core.newton.newton_fit`). Never a gradient or a margin; the certificate reads it
    only where it widens back to X exactly (:meth:`exact_float32`), for the same float64 values.
    """

    X: torch.Tensor
    Y: torch.Tensor
    omega: torch.Tensor
    row_norms: torch.Tensor
    x_norm2: float
    lam: float
    hess_dtype: torch.dtype
    X32: torch.Tensor = field(init=False, repr=False, compare=False)
    #: ``||x_i||^2`` (n,), for the certificate's rounding margins (computed once, not per step)
    row_norms_sq: torch.Tensor = field(init=False, repr=False, compare=False)
    #: ``X32``, X and their version counters when X32 was found to widen back to X exactly
    #: (CPU, tensors that count their changes); None otherwise (:meth:`exact_float32`)
    _exact32: tuple[torch.Tensor, int, torch.Tensor, int] | None = field(
        init=False, repr=False, compare=False
    )
    #: (:func:`restrict` only: nothing else may pass it) X's float32 copy and whether it widens
    #: back to X exactly, both already known: the rows of a problem's own ``X32`` gathered with
    #: the same rows of its X (a gather copies values, so the parent's exactness, checked by
    #: its :meth:`exact_float32` at the gather, holds for them). None (the default, and what
    #: ``dataclasses.replace`` passes) rounds X and checks it here.
    _gathered32: InitVar[tuple[torch.Tensor, bool] | None] = None

    def __post_init__(self, _gathered32: tuple[torch.Tensor, bool] | None) -> None:
        if _gathered32 is None:
            X32 = self.X.to(torch.float32).contiguous()
        else:
            X32 = _gathered32[0]
            if (
                X32.dtype != torch.float32
                or X32.shape != self.X.shape
                or X32.device != self.X.device
                or not X32.is_contiguous()
            ):
                raise ValueError("_gathered32 must be X's rows in float32, contiguous")
        object.__setattr__(self, "X32", X32)
        object.__setattr__(self, "row_norms_sq", self.row_norms.square())
        exact = (
            self.X.device.type == "cpu"
            # (tensors made under torch.inference_mode() count no changes: never trusted here)
            and not (X32.is_inference() or self.X.is_inference())
            and (_gathered32[1] if _gathered32 is not None else widens_exactly(X32, self.X))
        )
        held = (X32, _version(X32), self.X, _version(self.X)) if exact else None
        object.__setattr__(self, "_exact32", held)

    def exact_float32(self) -> torch.Tensor | None:
        """:attr:`X32` where its values widened to float64 are exactly X's (X's values are
        float32 numbers: every dataset's rows are stored in float32, ``core.data``), checked
        when the problem was made, while both are the same tensors, unchanged in place since
        (their version counters); else None (a float64 X with more digits, a CUDA device, a
        replaced or changed copy or X, tensors made under ``torch.inference_mode()``). The
        certificate's widened layouts read it instead of X
        (:func:`core.blocked.certificate_products`): the same float64 values, half the bytes.

        The counters see every in-place change made through torch; nothing in core writes to a
        problem's tensors at all, and writes that bypass torch (through ``.numpy()``, ``.data``
        or another tensor on the same storage) are not seen: do not make them."""
        held = self._exact32
        if (
            held is None
            or held[0] is not self.X32
            or held[2] is not self.X
            or _version(held[0]) != held[1]
            or _version(held[2]) != held[3]
        ):
            return None
        return held[0]

    def weights(self, alive: torch.Tensor) -> torch.Tensor:
        """Row weights ``C = alive * omega`` (n, K) in X's dtype."""
        return self.omega * alive.to(self.X.dtype)[:, None]


@dataclass
class Hyper:
    """Training options, persisted with the model."""

    lam: float
    sigma: float
    epsilon: float
    delta: float
    accounting: str
    calibration: str
    max_removals: MaxRemovals
    subsample_ratio: float | None
    #: (eps_dp, delta_dp) of a DP feature extractor the rows came from, or None
    extractor_dp: tuple[float, float] | None = None
    #: the extra (epsilon, delta) the operator accepts from the extractor's group privacy
    extractor_limit: tuple[float, float] | None = None


def _version(tensor: torch.Tensor) -> int:
    """``tensor``'s version counter: torch counts every in-place change of a tensor's memory
    (autograd checks the tensors it saved by it)."""
    return int(tensor._version)


def widens_exactly(X32: torch.Tensor, X: torch.Tensor, block_bytes: int = 8 << 20) -> bool:
    """Whether ``X32`` widened to ``X``'s dtype equals ``X`` element for element (NaN never
    equals), compared by blocks of rows (no full-size copy)."""
    if X32.shape != X.shape or X32.device != X.device:
        return False
    n, d = X.shape if X.ndim == 2 else (X.shape[0], 1)
    rows = max(1, block_bytes // (8 * max(1, d)))
    for start in range(0, n, rows):
        if not torch.equal(X32[start : start + rows].to(X.dtype), X[start : start + rows]):
            return False
    return True


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``
    (or such a ``torch.device``), checked up front.

    Raises:
        InvalidInputError: (a ``ValueError``) any other device name, or a CUDA device that this
            machine does not have (no usable CUDA, or ``N`` out of range).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev: torch.device | None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {str(device)!r}: this machine has no usable CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidInputError(
                f"device {str(device)!r}: this machine has {count} CUDA device(s) (cuda:0.."
                f"cuda:{count - 1})"
            )
    return dev


def make_problem(
    X: torch.Tensor, Y: torch.Tensor, omega: torch.Tensor, lam: float, dev: torch.device
) -> Problem:
    """Move the data to ``dev`` in float64 and compute the constants the bounds need; measure
    the layouts of the thin products the removal step makes (:func:`core.products.thin_product`:
    its float32 CG products and float64 certificate) so that no request pays for it."""
    X64 = X.to(dev, torch.float64)
    k = Y.shape[1] if Y.ndim == 2 else 1
    problem = Problem(
        X=X64,
        Y=Y.to(dev, torch.float64),
        omega=omega.to(dev, torch.float64),
        row_norms=torch.linalg.vector_norm(X64, dim=1),
        x_norm2=spectral_norm_upper(X64),
        lam=float(lam),
        # float32 Hessians (CPU and CUDA): 15 % faster steps and 30 % faster retrains on
        # n = 100,000, d = 64, same capacity on digits; the float64 refinement and certificate pay
        # for every difference (benchmarks/README.md)
        hess_dtype=torch.float32,
    )
    calibrate_products(problem.X32, (k,))
    calibrate_products(problem.X, (k, 2 * k))
    calibrate_certificate(problem.X, 2 * k, X32=problem.exact_float32())
    calibrate_hvp(problem.X32, k)  # the removal step's CG
    calibrate_hvp(problem.X, k)  # the training's and the direct solve's refinement
    return problem


def restrict(problem: Problem, index: torch.Tensor) -> Problem:
    """``problem`` on the rows ``index`` only (:mod:`core.rowview`): the same options, the full
    matrix's ``x_norm2`` (an upper bound for any subset of its rows) and the thin products'
    layouts measured on the full one (:func:`core.products.thin_product`).

    The float32 copy is gathered from ``problem``'s (half the bytes of rounding the gathered X
    again), and it widens back to the gathered X exactly where ``problem``'s widens back to its
    X (:meth:`Problem.exact_float32`): a gather copies values, so that is not checked again."""
    exact = problem.exact_float32() is not None
    return Problem(
        X=gather_rows(problem.X, index),
        Y=gather_rows(problem.Y, index),
        omega=gather_rows(problem.omega, index),
        row_norms=gather_rows(problem.row_norms, index),
        x_norm2=problem.x_norm2,
        lam=problem.lam,
        hess_dtype=problem.hess_dtype,
        _gathered32=(gather_rows(problem.X32, index), exact),
    )


#: the dtypes :func:`gather_rows` gathers by NumPy (NumPy has no bfloat16)
_NUMPY_GATHERED = (torch.float64, torch.float32, torch.int64, torch.int32, torch.bool)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` for integer row numbers ``index``, contiguous. On the CPU by NumPy's
    ``take`` (a new array): on the 2-vCPU VMs it gathers 75,000 of 100,000 rows of 64 float64
    in 19-22 ms against 47-48 ms for torch's indexing, and of float32 in 5-7 ms against 14-21
    (benchmarks/README.md). Anything else (a boolean mask, which ``take`` would read as the
    rows 0 and 1; another device; a tensor that requires grad; bfloat16) by torch's indexing."""
    if (
        tensor.device.type != "cpu"
        or index.device.type != "cpu"
        or tensor.requires_grad
        or tensor.dtype not in _NUMPY_GATHERED
        or index.dtype not in (torch.int64, torch.int32)
    ):
        return tensor[index].contiguous()
    return torch.from_numpy(np.take(tensor.numpy(), index.numpy(), axis=0))


def validate_rows_data(X: torch.Tensor, y: torch.Tensor) -> None:
    """Reject data the certificate does not cover: NaN, norms above ``1 + 1e-6``, bad labels."""
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        raise InvalidInputError("X must be a 2-D tensor (n, d)")
    if not isinstance(y, torch.Tensor) or y.ndim != 1:
        raise InvalidInputError(
            f"y must be a 1-D tensor of labels, got shape {tuple(getattr(y, 'shape', ()))}"
        )
    if y.shape[0] != X.shape[0]:
        raise InvalidInputError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise InvalidInputError(f"need at least 2 rows and 1 feature, got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise InvalidInputError(f"X must be floating point, got {X.dtype}")
    if not bool(torch.isfinite(X).all()):
        raise InvalidInputError("X contains NaN or infinite values")
    norms = torch.linalg.vector_norm(X.double(), dim=1)
    worst = float(norms.max())
    if worst > 1 + 1e-6:
        raise InvalidInputError(
            f"{int((norms > 1 + 1e-6).sum())} rows have L2 norm above 1 + 1e-6 (max {worst:.6g}); "
            "the certificate needs ||x_i|| <= 1: L2-normalise the rows first"
        )
