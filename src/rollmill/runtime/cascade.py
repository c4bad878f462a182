"""The cascade recipe (`pipeline: cascade`, docs/cascade.md), STAgent-style: SFT, a difficulty probe that
routes each training example by the SFT model's pass rate, then a second SFT on the examples too hard for
RL and RL on the learnable ones.

One config; each stage is a run of its own in a directory under the cascade's (1-sft/, 2-probe/, 3-sft2/,
4-rl/), and each training stage starts from the final checkpoint of the last stage that trained. Resume:
a stage whose final checkpoint is there (the probe: its routing table) is skipped, one cut short continues
through the ordinary resume path. cascade.json and cascade.md collect what each stage did, its held-out
accuracy and the final checkpoint; they are rewritten after every stage.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from rollmill.checks import check_config
from rollmill.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from rollmill.config.cascade import (PROBE_STAGE, RL_STAGE, SFT2_STAGE, SFT_STAGE, TRAINING_STAGES, stage_error,
                                     stage_tree)
from rollmill.runtime import export, train
from rollmill.runtime.cascade_probe import EVAL_FILE, ROUTE_FILES, ROUTING_FILE, read_routing, route_counts, run_probe
from rollmill.runtime.loop import TrainResult, check_resume_config, check_run_dir
from rollmill.track import read_jsonl
from rollmill.track.metrics import RUN_FILES, run_files
from rollmill.train.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

SUMMARY_JSON, SUMMARY_MD = "cascade.json", "cascade.md"
# What a cascade writes into its run directory; --overwrite removes these (and a plain run's files) only.
CASCADE_FILES = (SUMMARY_JSON, SUMMARY_MD, SFT_STAGE, PROBE_STAGE, SFT2_STAGE, RL_STAGE, *RUN_FILES)

T = TypeVar("T")


class _Interrupted(Exception):
    """Ctrl-C stopped a training stage after a checkpoint: the cascade stops there too."""


def run_cascade(cfg: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run the cascade of `cfg` in `run_dir`; with `resume`, skip the stages that finished and continue the one
    cut short. Every stage's config is checked (registries included) before the first one starts."""
    check_run_dir(run_dir, resume, overwrite, CASCADE_FILES)
    if resume:
        check_resume_config(cfg, run_dir)
        _check_steps_kept(cfg, run_dir)
    base = cfg.model_dump(mode="json", by_alias=True)
    for stage, knob in TRAINING_STAGES.items():
        if getattr(cfg.cascade, knob).enabled:
            try:
                check_config(config_from_dict(stage_tree(base, stage)))
            except ConfigError as err:
                raise ConfigError(stage_error(stage, err)) from None
    return Cascade(cfg, run_dir.resolve()).run()


def rl_view(cfg: RunConfig) -> RunConfig:
    """The RL stage's config of cascade `cfg`, from the configured model: what `rollmill eval` scores."""
    return config_from_dict(stage_tree(cfg.model_dump(mode="json", by_alias=True), RL_STAGE))


def _check_steps_kept(cfg: RunConfig, run_dir: Path) -> None:
    """A plain run may change train.steps on resume; in a cascade that would retrain a finished stage whose
    checkpoint later stages already started from."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and (before := load_config(saved).train.steps) != cfg.train.steps:
        raise ConfigError(f"--resume with train.steps {before} -> {cfg.train.steps}: the cascade's stages start "
                          f"from each other's final checkpoints, so their steps cannot change mid-cascade; resume "
                          f"with the cascade's own config ({saved}) or start a new cascade")


def _guarded(stage: str, stage_dir: Path, call: Callable[[], T]) -> T:
    """`call()`, its failure reported as this stage's, naming the stage's run directory."""
    try:
        return call()
    except ConfigError as err:
        raise ConfigError(f"cascade stage {stage} (run directory {stage_dir}): {err}") from err
    except Exception as err:
        raise RuntimeError(f"cascade stage {stage} failed ({type(err).__name__}: {err}); its run directory {stage_dir} "
                           "and every earlier stage are kept: fix the cause and rerun with --resume") from err


def final_checkpoint(stage_dir: Path, steps: int) -> Path | None:
    """The stage's checkpoint of its last step, None while it has none (not started, or cut short)."""
    ckpts = list_checkpoints(stage_dir / "checkpoints")
    if ckpts and json.loads((ckpts[-1] / "state.json").read_text())["step"] >= steps:
        return ckpts[-1]
    return None


def stage_evals(stage_dir: Path) -> dict:
    """A training stage's held-out metrics before training (its step-0 eval, when it ran one) and at its last eval."""
    before = after = None
    for record in read_jsonl(stage_dir / "metrics.jsonl"):
        found = {k: v for k, v in record.items() if k.startswith("eval/")}
        if found and record["step"] == 0:
            before = found
        elif found:
            after = found
    return {"eval_before": before, "eval_after": after}


class Cascade:
    """The stages of one cascade, run in order in `run_dir` (an absolute path: later stages' configs name
    earlier stages' checkpoints and files by it, and a resumed stage's config must read the same)."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.base = cfg.model_dump(mode="json", by_alias=True)
        self.model: dict | None = None  # model keys the next stage starts from; None: the configured model
        self.records: list[dict] = []  # one per stage, for the summary

    def run(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        try:
            self._train(SFT_STAGE)
            routes = self._probe()
            self._train(SFT2_STAGE, "hard", routes["hard"])
            self._train(RL_STAGE, "learnable", routes["learnable"])
        except _Interrupted as stop:
            log.info("%s: continue the cascade with --resume", stop)
        return self._finish()

    # -- stages -----------------------------------------------------------------------------------
    def _train(self, stage: str, route: str | None = None, rows: int | None = None) -> None:
        """Training stage `stage` (on the probe's `route` rows, `rows` of them, when given)."""
        knob, stage_dir = TRAINING_STAGES[stage], self.run_dir / stage
        if not getattr(self.cfg.cascade, knob).enabled:
            return self._skipped(stage, f"cascade.{knob}.enabled is false", logging.INFO)
        if rows == 0:
            return self._skipped(stage, f"the probe routed no example to it (route {route!r})", logging.WARNING)
        task = None if route is None else self._routed_task(route, rows)
        cfg = _guarded(stage, stage_dir, lambda: config_from_dict(stage_tree(self.base, stage, self.model, task)))
        ckpt = final_checkpoint(stage_dir, cfg.train.steps)
        if ckpt is not None:
            log.info("cascade stage %s: finished earlier (%s), skipped", stage, ckpt)
        else:
            resume = bool(run_files(stage_dir))
            log.info("cascade stage %s: %s in %s", stage, "resuming" if resume else "training", stage_dir)
            _guarded(stage, stage_dir, lambda: train(cfg, stage_dir, resume=resume))
            ckpt = final_checkpoint(stage_dir, cfg.train.steps)
            if ckpt is None:
                raise _Interrupted(f"cascade stage {stage} stopped before its last step ({stage_dir})")
        folder = ckpt if (ckpt / "config.json").is_file() else _guarded(stage, stage_dir, lambda: _merged(cfg, ckpt))
        self.model = {"source": "hf_dir", "path": str(folder)}
        if "keep_layers" in self.base["model"]:  # the checkpoint holds the kept layers only
            self.model["keep_layers"] = None
        self._record({"stage": stage, "status": "trained", "run_dir": str(stage_dir), "checkpoint": str(ckpt),
                      "model_folder": str(folder), "steps": cfg.train.steps,
                      **({"examples": rows} if rows is not None else {}), **stage_evals(stage_dir)})

    def _routed_task(self, route: str, rows: int) -> dict:
        """The task section of a stage that trains on the probe's `route` rows and evaluates on the held-out
        rows the probe wrote (the configured task's eval split, so every stage's accuracy compares)."""
        probe_dir, task = self.run_dir / PROBE_STAGE, self.cfg.task
        return {"source": "file", "path": str(probe_dir / ROUTE_FILES[route]), "eval_path": str(probe_dir / EVAL_FILE),
                "train_size": rows, "seed": task.seed, "system_prompt": task.system_prompt,
                "chat_template": task.chat_template,
                "instruction": ""}  # the rows' prompts already end with the task's instruction

    def _probe(self) -> dict[str, int]:
        stage_dir = self.run_dir / PROBE_STAGE
        if (stage_dir / ROUTING_FILE).is_file():
            counts = route_counts(read_routing(stage_dir))
            log.info("cascade stage %s: routed earlier (%s), skipped", PROBE_STAGE, stage_dir / ROUTING_FILE)
        else:
            log.info("cascade stage %s: probing in %s", PROBE_STAGE, stage_dir)
            cfg = _guarded(PROBE_STAGE, stage_dir, self._probe_config)
            counts = _guarded(PROBE_STAGE, stage_dir, lambda: run_probe(cfg, self.cfg.cascade.probe, stage_dir))
        log.info("cascade stage %s: %d easy (dropped), %d learnable (to %s), %d hard (to %s); see %s", PROBE_STAGE,
                 counts["easy"], counts["learnable"], RL_STAGE, counts["hard"], SFT2_STAGE, stage_dir / "routing.md")
        self._record({"stage": PROBE_STAGE, "status": "routed", "run_dir": str(stage_dir),
                      "model_folder": self.model["path"] if self.model else None, "routes": counts})
        return counts

    def _probe_config(self) -> RunConfig:
        """The RL stage's config with the model to probe; its eval section samples as the probe asks."""
        tree = stage_tree(self.base, RL_STAGE, self.model)
        probe, sampling = self.cfg.cascade.probe, tree["rollout"]["sampling"]
        temperature = sampling["temperature"] if probe.temperature is None else probe.temperature
        max_new_tokens = probe.max_new_tokens or sampling["max_new_tokens"]
        tree["eval"].update(n=probe.k, temperature=temperature, max_new_tokens=max_new_tokens)
        return check_config(config_from_dict(tree))

    def _skipped(self, stage: str, reason: str, level: int) -> None:
        log.log(level, "cascade stage %s skipped: %s", stage, reason)
        self._record({"stage": stage, "status": "skipped", "reason": reason, "run_dir": str(self.run_dir / stage)})

    # -- summary ----------------------------------------------------------------------------------
    def _record(self, record: dict) -> None:
        self.records.append(record)
        write_summary(self.run_dir, self.cfg.name, self.records)

    def _finish(self) -> TrainResult:
        write_summary(self.run_dir, self.cfg.name, self.records)
        trained = [r for r in self.records if r["status"] == "trained"]
        if trained:
            log.info("cascade: final model %s (stage %s); summary in %s", trained[-1]["checkpoint"],
                     trained[-1]["stage"], self.run_dir / SUMMARY_MD)
        else:
            log.warning("cascade: no stage trained; the final model is the configured one")
        return TrainResult(self.run_dir, trained[0]["eval_before"] if trained else None,
                           trained[-1]["eval_after"] if trained else None, sum(r["steps"] for r in trained))


def _merged(cfg: RunConfig, ckpt: Path) -> Path:
    """A LoRA checkpoint holds the adapter alone: the next stage starts from it merged into a standalone
    folder (`stage_dir/merged`, written once)."""
    out = ckpt.parent.parent / "merged"
    if not (out / "config.json").is_file():
        tmp = out.with_name(".merged-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        export(cfg, ckpt, tmp)
        tmp.rename(out)
    return out


def accuracy_by_stage(records: list[dict]) -> dict[str, float]:
    """Held-out accuracy of the configured model ("base", when the first trained stage evaluated before
    training) and after each trained stage."""
    out = {}
    for r in records:
        if r["status"] != "trained":
            continue
        if not out and "eval/accuracy" in (r["eval_before"] or {}):
            out["base"] = r["eval_before"]["eval/accuracy"]
        if "eval/accuracy" in (r["eval_after"] or {}):
            out[r["stage"]] = r["eval_after"]["eval/accuracy"]
    return out


def write_summary(run_dir: Path, name: str, records: list[dict]) -> None:
    """cascade.json (the records, the accuracy after each stage, the final checkpoint) and cascade.md."""
    trained = [r for r in records if r["status"] == "trained"]
    final = trained[-1] if trained else None
    summary = {"name": name, "final_checkpoint": final["checkpoint"] if final else None,
               "final_stage": final["stage"] if final else None, "accuracy": accuracy_by_stage(records),
               "stages": records}
    (run_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    (run_dir / SUMMARY_MD).write_text(summary_markdown(summary, run_dir))


def read_summary(run_dir: Path) -> dict | None:
    """The cascade.json of a cascade's run directory; None when `run_dir` holds no cascade."""
    path = run_dir / SUMMARY_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def summary_markdown(summary: dict, run_dir: Path) -> str:
    """A table of the stages: what each did and its held-out accuracy; paths relative to `run_dir`."""
    accuracy = summary["accuracy"]

    def short(path: str) -> str:
        return str(Path(path).relative_to(run_dir)) if Path(path).is_relative_to(run_dir) else path

    lines = [f"# Cascade {summary['name']}", "",
             f"Final checkpoint: `{summary['final_checkpoint']}` (stage {summary['final_stage']})"
             if summary["final_checkpoint"] else "Final model: the configured one (no stage trained).", "",
             "| stage | what happened | held-out accuracy after |", "|---|---|---:|"]
    if "base" in accuracy:
        lines.append(f"| (configured model) | before training | {accuracy['base']:.3f} |")
    for r in summary["stages"]:
        if r["status"] == "trained":
            rows = f" on {r['examples']} routed examples" if "examples" in r else ""
            what = f"{r['steps']} steps{rows}; checkpoint `{short(r['checkpoint'])}`"
        elif r["status"] == "routed":
            routes = ", ".join(f"{n} {route}" for route, n in r["routes"].items())
            what = f"{routes} (`{short(r['run_dir'])}/routing.md`)"
        else:
            what = f"skipped: {r['reason']}"
        score = f"{accuracy[r['stage']]:.3f}" if r["stage"] in accuracy else "-"
        lines.append(f"| {r['stage']} | {what} | {score} |")
    return "\n".join(lines) + "\n"
