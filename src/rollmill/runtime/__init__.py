"""The runtime: rollout workers, reward workers, the sample queue and the learner, run in one process
or as Ray actors, stepped by one run loop (docs/architecture.md).

`train(cfg, run_dir)` is the entry point: it builds the job for the configured pipeline (RL: the roles on
the configured backend; SFT: `runtime.sft.SFTJob`; DPO on a preference file: `runtime.dpo_offline.DPOJob`;
distillation: `runtime.distill.DistillJob`) and runs it; a cascade (`runtime.cascade`) runs its stages in turn.
"""

from __future__ import annotations

from pathlib import Path

from rollmill.checks import check_config
from rollmill.config import RunConfig
from rollmill.runtime.loop import TrainResult, check_resume_config, check_run_dir, run_job
from rollmill.runtime.rl import RLJob


def roles_for(cfg: RunConfig):
    """The backend's role builder: `local` (this process) or `ray` (actors)."""
    if cfg.runtime.backend == "ray":
        from rollmill.runtime.ray import RayRoles

        return RayRoles
    from rollmill.runtime.local import LocalRoles

    return LocalRoles


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train per `cfg` into `run_dir`: continuing from its latest checkpoint with `resume`, replacing a run
    already there with `overwrite`; a run already there is refused otherwise (ConfigError)."""
    cfg = check_config(cfg)
    if cfg.pipeline == "cascade":  # a run directory of stage directories, each stage a run of its own
        from rollmill.runtime.cascade import run_cascade

        return run_cascade(cfg, run_dir, resume, overwrite)
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        check_resume_config(cfg, run_dir)
    if cfg.pipeline == "sft":
        from rollmill.runtime.sft import SFTJob

        return run_job(SFTJob(cfg, run_dir), cfg, run_dir, resume)
    if cfg.pipeline == "distill":
        from rollmill.runtime.distill import DistillJob

        return run_job(DistillJob(cfg, run_dir), cfg, run_dir, resume)
    if cfg.pipeline == "dpo" and cfg.dpo.offline:
        from rollmill.runtime.dpo_offline import DPOJob

        return run_job(DPOJob(cfg, run_dir), cfg, run_dir, resume)
    return run_job(RLJob(cfg, run_dir, roles_for(cfg)), cfg, run_dir, resume)


def evaluate(cfg: RunConfig, checkpoint: Path | None = None) -> tuple[dict, int]:
    """Held-out metrics of `checkpoint`'s weights (the initial ones when None) on one rollout worker;
    returns them with the number of held-out prompts or episodes. An SFT run is scored as RLVR scores it:
    greedy replies to the task's held-out split."""
    cfg = check_config(cfg)
    if cfg.pipeline == "cascade":  # scored as its RL stage scores
        from rollmill.runtime.cascade import rl_view

        cfg = rl_view(cfg)
    if cfg.pipeline == "sft":
        from rollmill.runtime.sft import rlvr_view

        cfg = rlvr_view(cfg)
    if cfg.pipeline == "distill":
        from rollmill.runtime.distill import rlvr_view as distill_rlvr_view

        cfg = distill_rlvr_view(cfg)
    from rollmill.models import load_model
    from rollmill.pipelines import PIPELINES
    from rollmill.runtime.worker import RolloutWorker
    from rollmill.train.checkpoint import load_weights

    pipeline = PIPELINES[cfg.pipeline]
    specs = pipeline.source(cfg).eval_groups(cfg.eval.n)
    worker = RolloutWorker(cfg)
    try:
        if checkpoint is not None:
            model = load_model(cfg.model)[0]
            load_weights(checkpoint, model)  # through the model: checkpoints store tied weights once
            worker.update_weights(model.state_dict(), 0).result()
        trajs = worker.evaluate(specs, 0)
    finally:
        worker.close()
    groups = [[t for t in trajs if t.group_id == s.group_id] for s in specs]
    return pipeline.eval_metrics(groups), len(specs)


def export(cfg: RunConfig, checkpoint: Path, out: Path) -> Path:
    """Write `checkpoint`'s policy as a standalone transformers folder at `out` (weights, config,
    generation config, tokenizer), LoRA adapters merged in: `AutoModelForCausalLM.from_pretrained(out)`
    opens it with no rollmill and no peft."""
    from rollmill.models import load_model
    from rollmill.train.checkpoint import load_weights

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; export into a new folder")
    model, tokenizer = load_model(cfg.model)
    load_weights(checkpoint, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


__all__ = ["TrainResult", "evaluate", "export", "train"]
