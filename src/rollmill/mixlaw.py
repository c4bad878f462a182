"""The D-CPT law: a validation loss as a function of model size N, training tokens D and mixture ratio r.

    L(N, D, r) = E + A / N^alpha + B * r^eta / D^beta + C / (r + epsilon)^gamma

(Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for Large Language
Models"; docs/mixlaw.md). All nine parameters are positive. r is the share of the training mixture
drawn from the corpus whose loss L measures: the domain share for the domain loss, one minus it for the
general loss. One law is fitted per loss column of a table of small runs; `optimal_ratio` then picks
the domain share that minimises the predicted domain loss while the predicted general loss stays
within a tolerance.

The math (predict, fit, optimal_ratio) is pure functions of arrays; the table and params files are
plain CSV and JSON.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

PARAM_NAMES = ("E", "A", "alpha", "B", "eta", "beta", "C", "gamma", "epsilon")
LOSS_COLUMNS = ("domain_loss", "general_loss")
HUBER_DELTA = 1e-3  # on log-loss residuals, as in Chinchilla's fits: beyond 0.1% a row counts linearly

# Starting grid for the exponents and epsilon; E, A, B, C are solved for each grid point (see _starts).
_EXPONENT_GRID = (0.1, 0.3, 0.6, 1.0)
_EPSILON_GRID = (0.01, 0.1, 0.5)


class MixlawError(ValueError):
    """A table or params file that cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class Law:
    """One fitted D-CPT law. `interaction=False` drops the r^eta factor (the no-interaction baseline,
    L = E + A/N^alpha + B/D^beta + C/(r+epsilon)^gamma), in which eta is unused. `share_range` is the
    span of shares the law was fitted on: outside it a prediction is an extrapolation."""

    E: float
    A: float
    alpha: float
    B: float
    eta: float
    beta: float
    C: float
    gamma: float
    epsilon: float
    interaction: bool = True
    share_range: tuple[float, float] = (0.0, 1.0)

    def values(self) -> list[float]:
        return [getattr(self, name) for name in PARAM_NAMES]


def _law(xp, p, log_n, log_d, r, interaction: bool):
    """The law with p = the nine parameters, over numpy or torch (`xp`) arrays; one formula for both
    fitting (torch, for gradients) and prediction (numpy). Powers are taken as exp(-exponent * log x)
    from precomputed logs, so N and D may be raw counts."""
    e, a, alpha, b, eta, beta, c, gamma, eps = p
    size_term = a * xp.exp(-alpha * log_n)
    data_term = b * xp.exp(-beta * log_d)
    if interaction:
        # r^eta is 0 at r = 0; the log is taken of a safe stand-in so no -inf reaches a gradient
        share = xp.where(r > 0, r, 1.0 + 0.0 * r)
        data_term = xp.where(r > 0, data_term * xp.exp(eta * xp.log(share)), 0.0 * data_term)
    ratio_term = c * xp.exp(-gamma * xp.log(r + eps))
    return e + size_term + data_term + ratio_term


def predict(law: Law, N, D, r) -> np.ndarray:
    """The law's loss at model size N, tokens D and share r (scalars or arrays, broadcast)."""
    N, D, r = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (N, D, r)))
    return _law(np, law.values(), np.log(N), np.log(D), r, law.interaction)


def relative_errors(law: Law, N, D, r, loss) -> np.ndarray:
    """predicted / observed - 1 for each row."""
    return predict(law, N, D, r) / np.asarray(loss, dtype=np.float64) - 1.0


def _features(N, D, r, alpha, beta, eta, gamma, eps, interaction: bool) -> np.ndarray:
    """Columns [1, N^-alpha, r^eta D^-beta, (r+eps)^-gamma] for arrays of exponents, shape (G, rows, 4):
    with the exponents fixed the law is linear in (E, A, B, C)."""
    mix = r[None, :] ** eta[:, None] if interaction else np.ones((len(alpha), len(r)))
    return np.stack([np.ones((len(alpha), len(r))),
                     N[None, :] ** -alpha[:, None],
                     mix * D[None, :] ** -beta[:, None],
                     (r[None, :] + eps[:, None]) ** -gamma[:, None]], axis=-1)


def _starts(N, D, r, loss, interaction: bool, keep: int) -> list[np.ndarray]:
    """The `keep` best starting points (log-parameters) of a grid over the exponents and epsilon, each
    with its non-negative least-squares E, A, B, C. Solving the linear part exactly is what lets a
    coarse grid land near the optimum, where random starts for all nine parameters would need thousands
    of local fits."""
    etas = _EXPONENT_GRID if interaction else (0.0,)
    grid = np.array(list(itertools.product(_EXPONENT_GRID, _EXPONENT_GRID, etas, _EXPONENT_GRID, _EPSILON_GRID)))
    alpha, beta, eta, gamma, eps = grid.T
    X = _features(N, D, r, alpha, beta, eta, gamma, eps, interaction)
    scale = np.linalg.norm(X, axis=1, keepdims=True)  # columns span many decades: equalise them for pinv
    best_sse, best_coef = np.full(len(grid), np.inf), np.zeros((len(grid), 4))
    # Non-negative least squares by brute force: a zeroed column gets a zero coefficient from pinv, so
    # each of the 15 subsets of columns is one batched solve; keep each grid point's best feasible one.
    for mask in itertools.product((0.0, 1.0), repeat=4):
        if not any(mask):
            continue
        Xm = X / scale * np.array(mask)
        coef = (np.linalg.pinv(Xm) @ loss[None, :, None])[..., 0]
        sse = ((Xm @ coef[..., None])[..., 0] - loss[None, :]) ** 2
        sse = sse.sum(axis=1)
        better = (coef >= 0).all(axis=1) & (sse < best_sse)
        best_sse[better], best_coef[better] = sse[better], (coef / scale[:, 0, :])[better]
    # A coefficient the solve set to zero starts at a tiny positive value instead: its log must exist.
    floor = 1e-4 * loss.mean() / X.mean(axis=1).clip(min=1e-300)
    coef = np.maximum(best_coef, floor)
    starts = []
    for i in np.argsort(best_sse)[:keep]:
        params = [coef[i, 0], coef[i, 1], alpha[i], coef[i, 2], max(eta[i], 1e-3), beta[i], coef[i, 3],
                  gamma[i], eps[i]]
        starts.append(np.log(params))
    return starts


def _refine(theta0: np.ndarray, log_n, log_d, r, log_loss, interaction: bool, delta: float):
    """L-BFGS on the summed Huber loss of log(predicted) - log(observed), over log-parameters (which
    keeps every parameter positive). Returns (objective, parameters)."""
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def objective():
        # divided by delta: beyond delta the terms are |residual|, so L-BFGS's tolerances see O(1) values
        pred = _law(torch, list(theta.exp()), log_n, log_d, r, interaction)
        return torch.nn.functional.huber_loss(pred.log(), log_loss, delta=delta, reduction="sum") / delta

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(objective())
    return value, theta.detach().exp().numpy()


def fit(N, D, r, loss, *, interaction: bool = True, delta: float = HUBER_DELTA, starts: int = 6) -> Law:
    """Fit the law to rows (N, D, r, loss): the Huber loss (threshold `delta`) of the log-loss residuals
    is minimised by L-BFGS from the `starts` best points of a grid; the lowest objective wins.

    Huber on log-loss follows the scaling-law literature (Chinchilla, and the D-CPT paper's fits): the
    log makes every row count by its relative error, and Huber keeps one diverged or noisy run from
    dragging the whole fit."""
    import torch

    N, D, r, loss = (np.asarray(x, dtype=np.float64) for x in (N, D, r, loss))
    log_n, log_d, r_t, log_loss = (torch.tensor(x) for x in (np.log(N), np.log(D), r, np.log(loss)))
    best_value, best = math.inf, None
    for theta0 in _starts(N, D, r, loss, interaction, starts):
        value, params = _refine(theta0, log_n, log_d, r_t, log_loss, interaction, delta)
        if math.isfinite(value) and value < best_value:
            best_value, best = value, params
    if best is None:
        raise MixlawError("the fit diverged from every starting point")
    if not interaction:
        best[PARAM_NAMES.index("eta")] = 0.0
    return Law(*(float(v) for v in best), interaction=interaction, share_range=(float(r.min()), float(r.max())))


def share_for(column: str, r) -> np.ndarray:
    """The mixture share a loss column's law is written in: the domain share r for the domain loss,
    the general share 1 - r for the general loss."""
    r = np.asarray(r, dtype=np.float64)
    return 1.0 - r if column == "general_loss" else r


@dataclass
class Table:
    """A table of runs: model sizes, tokens, domain shares and one array per loss column."""

    N: np.ndarray
    D: np.ndarray
    r: np.ndarray
    losses: dict[str, np.ndarray]


def _number(text: str, path, row: int, column: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise MixlawError(f"{path}: row {row}, column {column}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise MixlawError(f"{path}: row {row}, column {column}: {text!r} is not a finite number")
    return value


def read_table(path: str | Path) -> Table:
    """Read a CSV with columns N, D, r and at least one of domain_loss, general_loss (others ignored).
    N, D and the losses must be positive and r within [0, 1]; rows are numbered from 1 after the header."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in reader.fieldnames or []]
    except OSError as err:
        raise MixlawError(f"cannot read the table {path}: {err.strerror or err}") from None
    missing = [c for c in ("N", "D", "r") if c not in header]
    if missing:
        raise MixlawError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})")
    columns = [c for c in LOSS_COLUMNS if c in header]
    if not columns:
        raise MixlawError(f"{path}: no loss column: expected {' and/or '.join(LOSS_COLUMNS)}")
    values = {c: [] for c in ("N", "D", "r", *columns)}
    for i, row in enumerate(rows, start=1):
        row = {(k or "").strip(): v for k, v in row.items()}
        for column, out in values.items():
            value = _number(row.get(column), path, i, column)
            bad = not 0.0 <= value <= 1.0 if column == "r" else value <= 0
            if bad:
                allowed = "within [0, 1]" if column == "r" else "positive"
                raise MixlawError(f"{path}: row {i}, column {column}: {value:g} must be {allowed}")
            out.append(value)
    if len(rows) <= len(PARAM_NAMES):
        raise MixlawError(f"{path}: {len(rows)} rows; fitting the law's {len(PARAM_NAMES)} parameters needs "
                          f"more than {len(PARAM_NAMES)}")
    arrays = {k: np.array(v) for k, v in values.items()}
    return Table(arrays["N"], arrays["D"], arrays["r"], {c: arrays[c] for c in columns})


def fit_table(table: Table, **kwargs) -> dict[str, Law]:
    """One law per loss column of `table` (see `share_for`); kwargs go to `fit`."""
    return {column: fit(table.N, table.D, share_for(column, table.r), loss, **kwargs)
            for column, loss in table.losses.items()}


def save_params(path: str | Path, laws: dict[str, Law], table: Table) -> None:
    """Write the fitted laws, with each one's error over the table, as JSON."""
    record = {"law": "D-CPT: L = E + A/N^alpha + B*r^eta/D^beta + C/(r+epsilon)^gamma",
              "share": {"domain_loss": "r (domain share)", "general_loss": "1 - r (general share)"},
              "laws": {}}
    for column, law in laws.items():
        err = relative_errors(law, table.N, table.D, share_for(column, table.r), table.losses[column])
        record["laws"][column] = {**asdict(law), "rows": len(err),
                                  "rms_rel_err": float(np.sqrt(np.mean(err ** 2))),
                                  "max_rel_err": float(np.abs(err).max())}
    try:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        raise MixlawError(f"cannot write the params file {path}: {err.strerror or err}") from None


def load_params(path: str | Path) -> dict[str, Law]:
    """The laws a `save_params` file holds, by loss column."""
    try:
        record = json.loads(Path(path).read_text())
        laws = record["laws"]
        return {column: Law(*(float(entry[name]) for name in PARAM_NAMES), interaction=bool(entry["interaction"]),
                            share_range=tuple(float(x) for x in entry.get("share_range", (0.0, 1.0))))
                for column, entry in laws.items() if column in LOSS_COLUMNS}
    except OSError as err:
        raise MixlawError(f"cannot read the params file {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MixlawError(f"{path} is not a params file written by `rollmill mixlaw fit` ({err!r})") from None


class Choice(NamedTuple):
    """The chosen domain share and the predicted losses there; `general_limit` is the cap the general
    loss had to stay under (None when unconstrained)."""

    r: float
    domain_loss: float
    general_loss: float | None
    general_limit: float | None


def search_range(domain: Law, general: Law | None = None) -> tuple[float, float]:
    """The domain shares both laws were fitted on (the general law's shares are 1 - r)."""
    lo, hi = domain.share_range
    if general is not None:
        lo, hi = max(lo, 1.0 - general.share_range[1]), min(hi, 1.0 - general.share_range[0])
    if lo > hi:
        raise MixlawError("the domain and general laws were fitted on disjoint domain shares")
    return lo, hi


def optimal_ratio(domain: Law, N: float, D: float, general: Law | None = None, tolerance: float | None = None,
                  general_ref: float | None = None, points: int = 10001) -> Choice:
    """The domain share r that minimises the predicted domain loss at (N, D), searched only over the
    shares the laws were fitted on (`search_range`): the law's r terms are least trustworthy outside,
    and a small fitted eta makes r^eta drop steeply just above r = 0.

    With `tolerance` (needs `general`, the general-loss law, written in the general share 1 - r), only
    shares whose predicted general loss is at most (1 + tolerance) * reference count; the reference is
    `general_ref` when given (e.g. the base model's general loss), else the lowest general loss any
    searched share reaches at this (N, D), usually at the smallest domain share. Searched on a
    grid of `points` shares: exact enough for a prediction and with no local-minimum pitfalls."""
    r = np.linspace(*search_range(domain, general), points)
    domain_loss = predict(domain, N, D, r)
    general_loss = predict(general, N, D, 1.0 - r) if general is not None else None
    limit = None
    if tolerance is not None:
        if general is None:
            raise MixlawError("a general-loss tolerance needs a general_loss law (fit a table with general_loss)")
        if tolerance < 0:
            raise MixlawError(f"tolerance {tolerance:g} must be >= 0")
        reference = general_ref if general_ref is not None else float(general_loss.min())
        limit = (1.0 + tolerance) * reference
        feasible = general_loss <= limit
        if not feasible.any():
            raise MixlawError(f"no share keeps the predicted general loss under {limit:.4f} (lowest predicted: "
                              f"{general_loss.min():.4f}); raise the tolerance or the reference")
        domain_loss = np.where(feasible, domain_loss, np.inf)
    i = int(np.argmin(domain_loss))
    return Choice(float(r[i]), float(domain_loss[i]), None if general_loss is None else float(general_loss[i]), limit)


def format_fit(laws: dict[str, Law], table: Table) -> str:
    """The fitted parameters of each law, its residual on every row and its RMS / max relative error."""
    lines = []
    for column, law in laws.items():
        share = share_for(column, table.r)
        pred = predict(law, table.N, table.D, share)
        err = pred / table.losses[column] - 1.0
        which = "domain share r" if column != "general_loss" else "general share 1 - r"
        lines.append(f"{column} (law in the {which}):")
        lines.append("  " + " ".join(f"{name}={value:.6g}" for name, value in zip(PARAM_NAMES, law.values())))
        lines.append(f"  {'N':>12} {'D':>12} {'r':>7} {'observed':>10} {'predicted':>10} {'rel err':>8}")
        for n, d, r, obs, p, e in zip(table.N, table.D, table.r, table.losses[column], pred, err):
            lines.append(f"  {n:>12.6g} {d:>12.6g} {r:>7.4g} {obs:>10.5f} {p:>10.5f} {e:>+8.2%}")
        lines.append(f"  rows={len(err)} rms_rel_err={np.sqrt(np.mean(err ** 2)):.4%} "
                     f"max_rel_err={np.abs(err).max():.4%}")
        lines.append("")
    return "\n".join(lines).rstrip()


def format_prediction(laws: dict[str, Law], N: float, D: float, r: float | None = None,
                      tolerance: float | None = None, general_ref: float | None = None) -> str:
    """Predicted losses over domain shares 0, 0.1, ..., 1 (and `r` if given) at (N, D), then the
    domain share `optimal_ratio` picks: unconstrained, and under `tolerance` when one is given."""
    for name, value in (("N", N), ("D", D)):
        if not (math.isfinite(value) and value > 0):
            raise MixlawError(f"--{name} {value:g} must be a positive number")
    if r is not None and not 0.0 <= r <= 1.0:
        raise MixlawError(f"--r {r:g} must be within [0, 1]")
    shares = sorted({round(0.1 * i, 10) for i in range(11)} | ({r} if r is not None else set()))
    columns = [c for c in LOSS_COLUMNS if c in laws]
    lines = [f"predicted losses at N={N:g}, D={D:g}:", f"  {'r':>7} " + " ".join(f"{c:>12}" for c in columns)]
    for s in shares:
        values = " ".join(f"{float(predict(laws[c], N, D, share_for(c, s))):>12.5f}" for c in columns)
        outside = any(not lo <= share_for(c, s) <= hi for c in columns for lo, hi in [laws[c].share_range])
        lines.append(f"  {s:>7.4g} {values}" + (" *" if outside else "") + ("  <- --r" if s == r else ""))
    lines.append("  (* outside the shares the laws were fitted on: an extrapolation)")
    if "domain_loss" not in laws:
        lines.append("no domain_loss law in the params file: no optimal ratio to pick")
        return "\n".join(lines)
    general = laws.get("general_loss")
    lo, hi = search_range(laws["domain_loss"], general)
    best = optimal_ratio(laws["domain_loss"], N, D, general)
    lines.append(f"searched domain ratios {lo:.4g}-{hi:.4g} (the fitted span)")
    lines.append(f"lowest predicted domain loss: r={best.r:.4f} (domain_loss={best.domain_loss:.5f}"
                 + (f", general_loss={best.general_loss:.5f})" if general is not None else ")"))
    if tolerance is not None:
        best = optimal_ratio(laws["domain_loss"], N, D, general, tolerance, general_ref)
        lines.append(f"optimal ratio with general loss <= {best.general_limit:.5f} (tolerance {tolerance:g}): "
                     f"r={best.r:.4f} (domain_loss={best.domain_loss:.5f}, general_loss={best.general_loss:.5f})")
    return "\n".join(lines)
