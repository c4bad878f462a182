"""What SFT and offline DPO jobs share: they walk a fixed data set with a seeded `PromptCursor`, so a
checkpoint is the learner's state plus the cursor's, and resuming restores both."""

from __future__ import annotations

from pathlib import Path

from rollmill.config import RunConfig
from rollmill.pipelines.common import PromptCursor
from rollmill.runtime.learner import Learner
from rollmill.runtime.loop import resume_newest
from rollmill.runtime.task_eval import TaskEval


class CursorJob:
    """Checkpointing and closing for a job stepped by `runtime.loop.run_job` over a data set; a subclass sets
    `cfg`, `run_dir`, `learner`, `cursor`, `step` and `task_eval` (None when it measures no task accuracy)."""

    cfg: RunConfig
    run_dir: Path
    learner: Learner
    cursor: PromptCursor
    step: int
    task_eval: TaskEval | None

    def save(self, extra: dict) -> Path:
        state = {**extra, "cursor": self.cursor.state()}
        return self.learner.save(self.run_dir / "checkpoints", self.step, state, self.cfg.checkpoint.keep, {})

    def resume(self) -> dict | None:
        """Restore the newest readable checkpoint (an unreadable one falls back to the one before)."""
        found = resume_newest(self.run_dir, self.learner.load)
        if found is None:
            return None
        state = found[1]
        self.step = state["step"]
        self.cursor = PromptCursor(self.cursor.size, self.cursor.seed, **state["cursor"])
        return state

    def close(self) -> None:
        if self.task_eval is not None:
            self.task_eval.close()
