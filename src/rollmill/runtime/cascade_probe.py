"""The cascade's difficulty probe (stage 2-probe, docs/cascade.md): k replies per training example from
the stage-1 model, each scored by the task's verifier; an example's pass rate (the mean of its k scores)
routes it to nowhere (easy), to the second SFT stage (hard) or to RL (learnable).

It writes into its stage directory the routing table (`routing.jsonl`, one row per probed example, and
`routing.md`, a readable summary) and the routed rows as task files (`hard.jsonl`, `learnable.jsonl`, and
`eval.jsonl`, the held-out split every later stage evaluates on), which the later stages read through
`task.source: file`. `routing.jsonl` is written last, so its presence means the probe finished.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from rollmill.config import RunConfig
from rollmill.config.cascade import ProbeConfig
from rollmill.pipelines import PIPELINES
from rollmill.pipelines.rlvr import PromptSource
from rollmill.tasks import Example
from rollmill.types import GroupSpec, Trajectory

log = logging.getLogger(__name__)

ROUTING_FILE = "routing.jsonl"
ROUTE_FILES = {"hard": "hard.jsonl", "learnable": "learnable.jsonl"}
EVAL_FILE = "eval.jsonl"
ROUTES = ("easy", "learnable", "hard")


def run_probe(cfg: RunConfig, probe: ProbeConfig, stage_dir: Path) -> dict[str, int]:
    """Probe the training examples of `cfg` (the RL stage's config with the model to probe, its eval section
    set to the probe's sampling) and write the routing into `stage_dir`; returns the count per route."""
    from rollmill.runtime.worker import RolloutWorker  # loads the model stack: only when a probe runs

    source = PromptSource(cfg)
    examples = [source.train[i] for i in probed(len(source.train), probe.max_examples, cfg.task.seed)]
    log.info("probe: %d training examples, %d replies each at temperature %g", len(examples), probe.k,
             cfg.eval.temperature)
    worker = RolloutWorker(cfg)
    try:
        scores = sample_scores(worker, examples, probe.k, cfg.reward.correct_name, cfg.rollout.batch_size)
    finally:
        worker.close()
    rows = [{"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "scores": s, "pass_rate": sum(s) / len(s),
             "route": probe.route(sum(s) / len(s))} for ex, s in zip(examples, scores)]
    write_routing(stage_dir, rows, examples, source.eval, probe, cfg)
    return route_counts(rows)


def probed(size: int, cap: int | None, seed: int) -> list[int]:
    """Which of `size` training examples the probe samples: all of them, or a seeded `cap` of them in order."""
    if cap is None or cap >= size:
        return list(range(size))
    return sorted(random.Random(f"{seed}/cascade-probe").sample(range(size), cap))


def sample_scores(worker, examples: list[Example], k: int, key: str, batch_size: int) -> list[list[float]]:
    """Each example's k verifier scores (the `key` reward function's values; a failed sample scores 0), the
    examples taken in waves that fill about one engine batch."""
    per_wave = max(1, batch_size // k)
    out: list[list[float]] = []
    for start in range(0, len(examples), per_wave):
        specs = [GroupSpec(start + j, start + j, ex, tuple(range(k)), eval=True)
                 for j, ex in enumerate(examples[start:start + per_wave])]
        trajs = worker.evaluate(specs, 0)
        PIPELINES["rlvr"].log_failures(0, trajs, where="probe ")
        out.extend(verifier_scores(trajs, [s.group_id for s in specs], key))
        log.info("probe: %d/%d examples sampled", len(out), len(examples))
    return out


def verifier_scores(trajs: list[Trajectory], group_ids: list[int], key: str) -> list[list[float]]:
    """For each group id, its samples' `key` scores in sample order; a failed sample scores 0."""
    by_group: dict[int, list[Trajectory]] = {gid: [] for gid in group_ids}
    for t in trajs:
        by_group[t.group_id].append(t)
    return [[0.0 if t.failed else float(t.info["reward_terms"][key]) for t in sorted(group, key=lambda t: t.index)]
            for group in by_group.values()]


def route_counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(r["route"] for r in rows)
    return {route: counts.get(route, 0) for route in ROUTES}


def read_routing(stage_dir: Path) -> list[dict]:
    """The routing table a finished probe wrote."""
    return [json.loads(line) for line in (stage_dir / ROUTING_FILE).read_text().splitlines() if line.strip()]


def task_row(example: Example) -> dict:
    """`example` as a task file row: its prompt (a chat when it came as one; the instruction is already in
    it), its answer, its other columns (rewards may read them) and its id in the original task."""
    prompt = list(example.messages) if example.messages else example.prompt
    return {**example.meta, "prompt": prompt, "answer": example.answer, "cascade_source_id": example.id}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # default=str: a column of the original data that JSON has no type for is kept as its text
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_routing(stage_dir: Path, rows: list[dict], examples: list[Example], held_out: list[Example],
                  probe: ProbeConfig, cfg: RunConfig) -> None:
    """The routed task files, routing.md, then routing.jsonl (through a temporary name: it marks the probe done)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    for route, name in ROUTE_FILES.items():
        _write_jsonl(stage_dir / name, [task_row(ex) for ex, r in zip(examples, rows) if r["route"] == route])
    _write_jsonl(stage_dir / EVAL_FILE, [task_row(ex) for ex in held_out])
    (stage_dir / "routing.md").write_text(routing_markdown(rows, probe, cfg))
    tmp = stage_dir / f".{ROUTING_FILE}.tmp"
    _write_jsonl(tmp, rows)
    tmp.rename(stage_dir / ROUTING_FILE)


def routing_markdown(rows: list[dict], probe: ProbeConfig, cfg: RunConfig) -> str:
    """Counts per route, the pass-rate histogram and a few examples of each route."""
    counts = route_counts(rows)
    lines = ["# Difficulty probe", "",
             f"{len(rows)} training examples, {probe.k} replies each (temperature {cfg.eval.temperature:g}, at most "
             f"{cfg.eval.max_new_tokens} new tokens), scored by `{cfg.reward.correct_name}`; an example's pass rate "
             "is the mean of its scores.", "",
             "| route | pass rate | examples | trained by |", "|---|---|---:|---|",
             f"| easy | >= {probe.easy:g} | {counts['easy']} | nothing (dropped) |",
             f"| learnable | between | {counts['learnable']} | 4-rl ({ROUTE_FILES['learnable']}) |",
             f"| hard | <= {probe.hard:g} | {counts['hard']} | 3-sft2 ({ROUTE_FILES['hard']}) |", "",
             "## Pass rates", "", "| pass rate | examples | |", "|---|---:|---|"]
    histogram = pass_rate_histogram([r["pass_rate"] for r in rows])
    top = max(histogram.values(), default=1)
    lines += [f"| {label} | {n} | {'#' * max(1, round(40 * n / top))} |" for label, n in histogram.items()]
    for route in ROUTES:
        picked = [r for r in rows if r["route"] == route][:3]
        if picked:
            lines += ["", f"## {route}: first examples", ""]
            lines += [f"- {r['prompt']!r}, answer {r['answer']!r}: pass rate {r['pass_rate']:.2f}" for r in picked]
    return "\n".join(lines) + "\n"


def pass_rate_histogram(rates: list[float]) -> dict[str, int]:
    """Examples per pass rate: each distinct value (k samples of a 0/1 verifier give k + 1 of them), or ten
    bins of width 0.1 when there are more than eleven distinct values."""
    exact = Counter(round(r, 3) for r in rates)
    if len(exact) <= 11:
        return {f"{v:.2f}": exact[v] for v in sorted(exact)}
    bins = Counter(min(int(r * 10), 9) for r in rates)
    return {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": bins[b] for b in sorted(bins)}
