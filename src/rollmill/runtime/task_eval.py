"""Held-out task accuracy for the jobs that train without RL's sampling loop (SFT, offline DPO, distillation).

Their policy lives in the learner. A rollout worker keeps a copy for sampling: the held-out replies the
RLVR eval scores (`eval.temperature`, greedy by default, scored by `reward.functions`), and a distillation
run's own samples. `publish` sends it the learner's weights whenever they changed since it last had them.
"""

from __future__ import annotations

from rollmill.config import RunConfig
from rollmill.pipelines import PIPELINES
from rollmill.pipelines.common import spread
from rollmill.pipelines.rlvr import PromptSource
from rollmill.runtime.worker import RolloutWorker, wait_for_update


class TaskEval:
    """The RLVR held-out eval of `source`'s eval split, on `worker`, with the learner's current weights."""

    def __init__(self, cfg: RunConfig, source: PromptSource, tokenizer, worker: RolloutWorker):
        self.cfg, self.source, self.tokenizer, self.worker = cfg, source, tokenizer, worker
        self.published = 0  # the weights version the worker serves; version 0 is the initial weights it loaded

    def publish(self, learner, step: int) -> None:
        """Give the worker the learner's weights of `step` unless it has them already."""
        if self.published != step:
            update = self.worker.update_weights(learner.weights(), step)
            wait_for_update(update, self.worker.engine.name, step, self.cfg.rollout.weight_sync_timeout_s)
            self.published = step

    def metrics(self, learner, step: int, dumps: list[dict]) -> dict:
        """eval/accuracy, eval/pass@k, ... of the weights of `step`; readable replies are appended to `dumps`."""
        self.publish(learner, step)
        rlvr = PIPELINES["rlvr"]
        specs = self.source.eval_groups(self.cfg.eval.n)
        trajs = self.worker.evaluate(specs, step)
        rlvr.log_failures(step, trajs, where="held-out ")
        dumps.extend(rlvr.sample_dump(trajs[i], self.tokenizer) for i in spread(len(trajs), self.cfg.log.samples_per_step))
        return rlvr.eval_metrics([[t for t in trajs if t.group_id == s.group_id] for s in specs])

    def close(self) -> None:
        self.worker.close()
