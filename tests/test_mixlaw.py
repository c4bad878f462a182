"""The D-CPT mixture law (rollmill.mixlaw): a worked prediction, parameter recovery from synthetic runs,
the optimal ratio against closed-form answers, and `rollmill mixlaw fit | predict` with bad tables."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from rollmill.cli import main
from rollmill.mixlaw import (
    PARAM_NAMES,
    Law,
    MixlawError,
    fit,
    optimal_ratio,
    predict,
    read_table,
    relative_errors,
)

# Both fall as their own share grows at every N, D of the grid below (test_the_synthetic_laws_are_sensible):
# the D-CPT form allows a loss that rises with its share, which no real mixture shows.
TRUE_DOMAIN = Law(E=1.5, A=30.0, alpha=0.4, B=20.0, eta=1.2, beta=0.4, C=1.5, gamma=0.6, epsilon=0.05)
TRUE_GENERAL = Law(E=1.8, A=20.0, alpha=0.35, B=10.0, eta=1.0, beta=0.35, C=1.2, gamma=0.5, epsilon=0.1)


def synthetic_rows(noise: float, seed: int = 0):
    """A grid of runs (4 sizes x 5 token counts x 6 domain shares) with losses from the true laws,
    each multiplied by 1 + noise * a standard normal draw."""
    rows = np.array(list(itertools.product([1e4, 3e4, 1e5, 3e5], [1e4, 3e4, 1e5, 3e5, 1e6],
                                           [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])))
    N, D, r = rows.T
    rng = np.random.default_rng(seed)
    domain = predict(TRUE_DOMAIN, N, D, r) * (1 + noise * rng.standard_normal(len(r)))
    general = predict(TRUE_GENERAL, N, D, 1 - r) * (1 + noise * rng.standard_normal(len(r)))
    return N, D, r, domain, general


def write_csv(path, header: str, rows) -> str:
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


def test_the_synthetic_laws_are_sensible():
    shares = np.linspace(0, 1, 101)
    for law in (TRUE_DOMAIN, TRUE_GENERAL):
        for N, D in itertools.product([1e4, 3e5], [1e4, 1e6]):
            assert (np.diff(predict(law, N, D, shares)) < 0).all()


def test_predict_worked_numbers():
    law = Law(E=1.0, A=10.0, alpha=0.5, B=4.0, eta=1.0, beta=0.5, C=0.2, gamma=1.0, epsilon=0.1)
    # 1 + 10/sqrt(100) + 4 * 0.5 / sqrt(400) + 0.2 / (0.5 + 0.1) = 1 + 1 + 0.1 + 1/3
    assert predict(law, 100, 400, 0.5) == pytest.approx(2.4333333333, rel=1e-10)
    # r = 0: the r^eta term vanishes and the ratio term is C / epsilon^gamma = 2
    assert predict(law, 100, 400, 0.0) == pytest.approx(1 + 1 + 0 + 2, rel=1e-12)
    no_interaction = Law(**{**law.__dict__, "interaction": False})
    assert predict(no_interaction, 100, 400, 0.0) == pytest.approx(1 + 1 + 0.2 + 2, rel=1e-12)


def test_fit_recovers_the_parameters_of_noiseless_runs():
    N, D, r, domain, _ = synthetic_rows(noise=0.0)
    got = fit(N, D, r, domain)
    for name, want, value in zip(PARAM_NAMES, TRUE_DOMAIN.values(), got.values()):
        assert value == pytest.approx(want, rel=0.01), name
    assert got.share_range == (0.0, 1.0)


def test_fit_with_noise_stays_close_and_predicts_unseen_points():
    N, D, r, domain, _ = synthetic_rows(noise=0.002, seed=1)
    got = fit(N, D, r, domain)
    for name in ("alpha", "beta", "eta", "gamma"):
        assert getattr(got, name) == pytest.approx(getattr(TRUE_DOMAIN, name), rel=0.2), name
    # held-out points: a larger model, more tokens, a share the table never had
    N2, D2, r2 = np.array([1e6, 3e5]), np.array([3e6, 2e5]), np.array([0.4, 0.9])
    assert np.abs(predict(got, N2, D2, r2) / predict(TRUE_DOMAIN, N2, D2, r2) - 1).max() < 0.01
    assert np.sqrt(np.mean(relative_errors(got, N, D, r, domain) ** 2)) < 0.003


def test_the_no_interaction_baseline_cannot_fit_interacting_runs():
    N, D, r, domain, _ = synthetic_rows(noise=0.0)
    baseline = fit(N, D, r, domain, interaction=False)
    assert baseline.eta == 0.0
    assert np.sqrt(np.mean(relative_errors(baseline, N, D, r, domain) ** 2)) > 0.005


def test_optimal_ratio_interior_minimum_matches_the_closed_form():
    # eta = gamma = 1: d/dr [b r + C/(r+eps)] = 0 at r* = sqrt(C/b) - eps, with b = B / D^beta
    law = Law(E=1.0, A=1.0, alpha=0.5, B=8.0, eta=1.0, beta=0.5, C=0.5, gamma=1.0, epsilon=0.05)
    D = 16.0
    want = math.sqrt(0.5 / (8.0 / 4.0)) - 0.05
    choice = optimal_ratio(law, N=1e4, D=D)
    assert choice.r == pytest.approx(want, abs=2e-4)
    assert choice.general_loss is None and choice.general_limit is None


def test_optimal_ratio_under_a_general_loss_tolerance():
    domain = Law(E=1.0, A=0.0, alpha=0.5, B=0.0, eta=1.0, beta=0.5, C=0.3, gamma=1.0, epsilon=0.1)
    # general loss in the general share g = 1 - r: 2 + 0.1 / (g + 0.1), lowest at r = 0 (g = 1)
    general = Law(E=2.0, A=0.0, alpha=0.5, B=0.0, eta=1.0, beta=0.5, C=0.1, gamma=1.0, epsilon=0.1)
    tolerance = 0.02
    limit = 1.02 * (2 + 0.1 / 1.1)
    want = 1.1 - 0.1 / (limit - 2)  # where the general loss reaches the limit; the domain loss falls in r
    choice = optimal_ratio(domain, 1e4, 1e4, general, tolerance)
    assert choice.general_limit == pytest.approx(limit)
    assert choice.r == pytest.approx(want, abs=2e-4)
    assert choice.general_loss <= limit
    # an explicit reference replaces the lowest predicted general loss
    looser = optimal_ratio(domain, 1e4, 1e4, general, tolerance, general_ref=2.2)
    assert looser.general_limit == pytest.approx(2.244) and looser.r > choice.r
    with pytest.raises(MixlawError, match="no share keeps"):
        optimal_ratio(domain, 1e4, 1e4, general, tolerance, general_ref=1.5)
    with pytest.raises(MixlawError, match="needs a general_loss law"):
        optimal_ratio(domain, 1e4, 1e4, None, tolerance)


def test_optimal_ratio_stays_within_the_fitted_shares():
    # the domain loss falls all the way to r = 1, but the laws saw domain shares 0.2-0.8 (general 0.3-0.9)
    domain = Law(**{**TRUE_DOMAIN.__dict__, "share_range": (0.2, 0.8)})
    general = Law(**{**TRUE_GENERAL.__dict__, "share_range": (0.3, 0.9)})
    assert optimal_ratio(domain, 1e5, 1e5).r == pytest.approx(0.8)
    assert optimal_ratio(domain, 1e5, 1e5, general).r == pytest.approx(0.7)
    assert optimal_ratio(TRUE_DOMAIN, 1e5, 1e5).r == pytest.approx(1.0)


def test_cli_fit_then_predict(tmp_path, capsys):
    N, D, r, domain, general = synthetic_rows(noise=0.001, seed=2)
    table = write_csv(tmp_path / "runs.csv", "N,D,r,domain_loss,general_loss,seed",
                      zip(N, D, r, domain, general, [0] * len(r)))
    params = tmp_path / "params.json"
    assert main(["mixlaw", "fit", table, "--out", str(params)]) == 0
    out = capsys.readouterr().out
    assert "domain_loss (law in the domain share r)" in out
    assert "general_loss (law in the general share 1 - r)" in out
    assert out.count("rows=120 rms_rel_err=") == 2
    saved = json.loads(params.read_text())["laws"]
    assert saved["domain_loss"]["rms_rel_err"] < 0.003 and saved["general_loss"]["max_rel_err"] < 0.01

    argv = ["mixlaw", "predict", str(params), "--N", "1e5", "--D", "1e5", "--r", "0.33", "--tolerance", "0.03"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    want = optimal_ratio(TRUE_DOMAIN, 1e5, 1e5, TRUE_GENERAL, 0.03)
    line = next(x for x in out.splitlines() if x.startswith("optimal ratio with general loss"))
    assert float(line.split(" r=")[1].split()[0]) == pytest.approx(want.r, abs=0.03)
    assert "<- --r" in out and "lowest predicted domain loss: r=" in out


@pytest.mark.parametrize(("header", "rows", "message"), [
    ("N,D,domain_loss", [(1, 2, 3)] * 12, "missing column(s) r"),
    ("N,D,r,loss", [(1, 2, 0.5, 3)] * 12, "no loss column"),
    ("N,D,r,domain_loss", [(1, 2, 0.5, 3)] * 5 + [(1, "abc", 0.5, 3)] + [(1, 2, 0.5, 3)] * 6,
     "row 6, column D: 'abc' is not a number"),
    ("N,D,r,domain_loss", [(1, 2, 1.5, 3)] * 12, "row 1, column r: 1.5 must be within [0, 1]"),
    ("N,D,r,domain_loss", [(1, 2, 0.5, 3)] * 11 + [(1, 2, 0.5, -1)],
     "row 12, column domain_loss: -1 must be positive"),
    ("N,D,r,domain_loss", [(1, 2, 0.5, 3)] * 11 + [(1, 2, 0.5, "nan")],
     "row 12, column domain_loss: 'nan' is not a finite"),
    ("N,D,r,domain_loss", [(1, 2, 0.5, 3)] * 4, "4 rows"),
])
def test_bad_tables_are_named(tmp_path, capsys, header, rows, message):
    table = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(MixlawError) as err:
        read_table(table)
    assert message in str(err.value) and "bad.csv" in str(err.value)
    assert main(["mixlaw", "fit", table]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_cli_predict_errors(tmp_path, capsys):
    assert main(["mixlaw", "predict", str(tmp_path / "none.json"), "--N", "1", "--D", "1"]) == 2
    assert "cannot read the params file" in capsys.readouterr().err
    not_params = tmp_path / "other.json"
    not_params.write_text('{"x": 1}')
    assert main(["mixlaw", "predict", str(not_params), "--N", "1", "--D", "1"]) == 2
    assert "is not a params file" in capsys.readouterr().err
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"laws": {"domain_loss": {**TRUE_DOMAIN.__dict__}}}))
    assert main(["mixlaw", "predict", str(params), "--N", "-5", "--D", "1"]) == 2
    assert "--N -5 must be a positive number" in capsys.readouterr().err
    assert main(["mixlaw", "predict", str(params), "--N", "1e5", "--D", "1e5", "--tolerance", "0.03"]) == 2
    assert "needs a general_loss law" in capsys.readouterr().err
