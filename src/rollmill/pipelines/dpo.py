"""DPO on the policy's own samples: RLVR's prompts, samples and verifier, a preference update.

Sampling, scoring, filters, evaluation and checkpoints are the RLVR pipeline's; only `update` differs:
it pairs each group's best-scored replies with its worst-scored ones (`train.preference.verified_pairs`)
and takes `dpo.epochs_per_step` DPO steps on them (`train.preference.preference_step`: the reference
scores each reply once, whatever the count), so the run needs no preference data set. The frozen
reference is the initial policy (LoRA: the base with its adapters off). Training on a preference file
(`dpo.path`) is another job: `rollmill.runtime.dpo_offline`.
"""

from __future__ import annotations

from rollmill.pipelines.rlvr import RLVRPipeline
from rollmill.train.preference import pair_batch, preference_step, verified_pairs
from rollmill.types import Trajectory


class DPOPipeline(RLVRPipeline):
    name = "dpo"
    needs_reference = True

    def update(self, learner, groups: list[list[Trajectory]]) -> dict[str, float]:
        """`dpo.epochs_per_step` DPO steps on the verified pairs of `groups`; no step (and `dpo/pairs` 0)
        when no group has replies that score differently."""
        dpo = learner.cfg.dpo
        pairs = verified_pairs(groups, dpo.pairs_per_group)
        if not pairs:
            return {"dpo/pairs": 0.0}
        batch = pair_batch([(c.rows[0], r.rows[0]) for c, r in pairs], learner.pad_id)
        return preference_step(learner.trainer, batch, dpo.loss, dpo.beta, dpo.label_smoothing,
                               learner.cfg.train.micro_batch_size, dpo.epochs_per_step)
