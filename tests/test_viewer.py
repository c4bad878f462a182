"""`rollmill view`: the JSON API, its refusal of any path outside the runs, and the page in headless chromium."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import pytest

from rollmill.cli import main
from rollmill.view import load_runs, make_server, serve_in_thread, url_of

SCREENSHOT = Path("/tmp/viewer.png")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _rlvr_run(root: Path) -> Path:
    run = root / "rlvr-run"
    run.mkdir()
    metrics = [{"step": 0, "eval/accuracy": 0.2, "eval/reward": 0.2}]
    metrics += [{"step": s, "reward/mean": 0.1 * s, "loss": 1.0 / s, "kl": 0.01 * s} for s in range(1, 6)]
    metrics += [{"step": 5, "eval/accuracy": 0.5, "eval/reward": 0.5}]
    _write_jsonl(run / "metrics.jsonl", metrics)
    samples = [{"step": s, "prompt": f"What is {s}+{k}?", "answer": str(s + k), "completion": f"<answer>{s + k}</answer>",
                "reward": float(k % 2), "correct": bool(k % 2), "finish_reason": "stop"}
               for s in (1, 2, 3) for k in range(4)]
    _write_jsonl(run / "samples.jsonl", samples)
    (run / "config.yaml").write_text("secret: not served\n")
    return run


def _agentic_run(root: Path) -> Path:
    run = root / "agentic-run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": s, "reward/mean": 0.5 - 0.05 * s, "episode/turns": 3.0}
                                         for s in range(1, 5)])
    episode = {"step": 2, "seed": 7, "group": 0, "reward": 1.0, "success": True, "end_reason": "terminated",
               "error": None, "initial_observation": "You are at the maze entrance.",
               "turns": [{"reply": "I go north.", "action": "north", "reward": 0.0, "invalid": False,
                          "observation": "A wall blocks the way."},
                         {"reply": "I go east.", "action": "east", "reward": 1.0, "invalid": False,
                          "observation": None}],
               "trained_view": ["maze entrance.[[I go north.]] A wall blocks the way.[[I go east.]]"]}
    _write_jsonl(run / "samples.jsonl", [episode, {**episode, "step": 3, "reward": 0.0, "success": False}])
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [_rlvr_run(tmp_path), _agentic_run(tmp_path)]


@pytest.fixture
def url(runs):
    server = make_server(runs, port=0)
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


def _get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` sent verbatim (no client-side normalisation of `..`), as a hostile client would."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    status, body = resp.status, resp.read()
    conn.close()
    return status, body


def test_binds_loopback_only(url):
    assert url.startswith("http://127.0.0.1:")


def test_json_endpoints(url, runs):
    status, body = _get(url, "/api/runs")
    assert status == 200
    listed = json.loads(body)
    assert [r["name"] for r in listed] == ["rlvr-run", "agentic-run"]
    assert all(r["has_metrics"] and r["has_samples"] for r in listed)
    metrics = json.loads(_get(url, "/api/runs/0/metrics")[1])
    assert metrics[0] == {"step": 0, "eval/accuracy": 0.2, "eval/reward": 0.2} and len(metrics) == 7
    samples = json.loads(_get(url, "/api/runs/1/samples")[1])
    assert samples[0]["turns"][0]["action"] == "north"
    status, body = _get(url, "/")
    assert status == 200 and b"rollmill view" in body and b"src=\"http" not in body


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/api/runs/0/../../../../etc/passwd", "/api/runs/0/config",
                                  "/api/runs/0/config.yaml", "/api/runs/2/metrics", "/api/runs/-1/metrics",
                                  "/%2e%2e/%2e%2e/etc/passwd", "/api/runs/0/%2e%2e/config.yaml",
                                  "/api/runs/0/metrics.jsonl", "/static/index.html", "/etc/passwd"])
def test_no_path_outside_the_api(url, path):
    status, body = _get(url, path)
    assert status == 404
    assert b"secret" not in body and b"root:" not in body


def test_metrics_nan_is_sent_as_null(tmp_path):
    run = tmp_path / "diverged"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n')
    server = make_server([run], port=0)
    serve_in_thread(server)
    try:
        assert json.loads(_get(url_of(server), "/api/runs/0/metrics")[1]) == [{"step": 1, "loss": None}]
    finally:
        server.shutdown()
        server.server_close()


def test_rejects_folders_that_are_not_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="neither metrics.jsonl nor samples.jsonl"):
        load_runs([tmp_path])
    assert main(["view", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_port_in_use_is_a_clear_error(runs, capsys):
    taken = make_server(runs, port=0)
    try:
        assert main(["view", str(runs[0]), "--port", str(taken.server_address[1])]) == 2
    finally:
        taken.server_close()
    assert "try --port 0" in capsys.readouterr().err


def test_same_folder_names_are_told_apart(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for d in (a, b):
        d.mkdir(parents=True)
        _write_jsonl(d / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    assert [r.name for r in load_runs([a, b])] == ["run", "run (1)"]


def _browser():
    """Debian's chromium driven by playwright (never playwright's own browser download), or a skip saying why."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; see the Makefile's install step)")
    return sync_api, executable


def test_page_in_headless_chromium(url):
    sync_api, executable = _browser()
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: chromium refuses to start its own sandbox as root (CI containers)
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)

        # reward/mean is selected by default and both runs log it: two overlaid polylines with points
        lines = page.locator(".chart[data-metric='reward/mean'] polyline.series")
        assert lines.count() == 2
        assert all(len(lines.nth(i).get_attribute("points").split()) >= 4 for i in range(2))
        page.check("input[data-metric='loss']")
        assert page.locator(".chart[data-metric='loss'] polyline.series").count() == 1  # only the RLVR run has it

        samples = page.locator("#sample-list .sample")
        assert samples.count() == 12
        page.select_option("#step", "2")
        assert samples.count() == 4
        page.fill("#rmin", "0.5")
        assert samples.count() == 2
        page.select_option("#step", "")
        assert samples.count() == 6

        page.select_option("#sample-run", "1")
        page.wait_for_selector("#sample-list .sample.agentic")
        page.fill("#rmin", "")
        assert samples.count() == 2
        episode = samples.first
        assert episode.locator(".turn.model").count() == 2 and episode.locator(".turn.env").count() == 2
        assert episode.locator("mark.trained").all_inner_texts() == ["I go north.", "I go east."]
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    assert not errors
