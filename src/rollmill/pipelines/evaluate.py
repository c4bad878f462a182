"""Held-out evaluation: pass@1 and unbiased pass@k over the eval split."""

from __future__ import annotations

import math

from rollmill.config import RunConfig
from rollmill.pipelines.common import encode_prompt, sampling_params
from rollmill.rewards import compute_rewards
from rollmill.tasks import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, tokenizer, examples: list[Example], cfg: RunConfig, seed: int = 0, n: int | None = None,
             temperature: float | None = None) -> dict[str, float]:
    """Sample `n` completions per held-out prompt and score them with the run's reward functions.

    Returns eval/accuracy (= pass@1, the mean correctness over all samples), eval/pass@k for
    k = 2, 4, ... up to n, eval/reward (mean total reward) and eval/failed (reward errors).
    """
    n = n or cfg.eval.n
    temperature = cfg.eval.temperature if temperature is None else temperature
    sp = sampling_params(cfg.rollout.sampling, n=n, temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens)
    prompts = [encode_prompt(tokenizer, ex, cfg.task) for ex in examples]
    completions = engine.generate(prompts, sp, seed=seed)
    repeated = [examples[c.prompt_index] for c in completions]
    result = compute_rewards([c.text for c in completions], repeated, cfg.reward)
    correct_per_prompt = [sum(result.correct[i * n : (i + 1) * n]) for i in range(len(examples))]
    metrics = {
        "eval/accuracy": sum(result.correct) / len(completions),
        "eval/reward": sum(result.total) / len(completions),
        "eval/failed": float(sum(result.failed)),
    }
    k = 2
    while k <= n:
        metrics[f"eval/pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct_per_prompt) / len(examples)
        k *= 2
    return metrics
