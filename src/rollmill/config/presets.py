"""Named recipes: `algorithm.name: dapo` fills the algorithm section's defaults in one line.

Presets are config defaults, so they live with the config: the names they set (advantage, loss,
...) are registry names that `rollmill.checks` validates. A preset only sets keys of the
`algorithm` section; settings of other sections that a recipe relies on (DAPO's dynamic sampling
and overlong shaping live in `filters`) are written in its example YAML under `examples/presets/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A recipe: a one-line description (`rollmill algos`) and the `algorithm` keys it defaults."""

    description: str
    settings: dict = field(default_factory=dict)


ALGORITHMS: dict[str, Preset] = {
    "grpo": Preset(
        "GRPO: group mean/std advantages, PPO clip, token-mean aggregation",
        {"advantage": "grpo", "loss": "ppo_clip", "loss_agg": "token-mean"},
    ),
    "dr_grpo": Preset(
        "Dr.GRPO: group-mean advantages (no std), constant-length normalization",
        {"advantage": "dr_grpo", "loss": "ppo_clip", "loss_agg": "seq-mean-token-sum-norm"},
    ),
    "dapo": Preset(
        "DAPO: GRPO advantages, clip-higher (0.2/0.28), token-mean, no KL (+ dynamic sampling, overlong shaping)",
        {"advantage": "grpo", "loss": "ppo_clip", "clip_eps_high": 0.28, "loss_agg": "token-mean", "kl_coef": 0.0},
    ),
    "gspo": Preset(
        "GSPO: sequence-level importance ratio with a narrow clip, seq-mean-token-mean",
        {"advantage": "grpo", "loss": "gspo", "loss_agg": "seq-mean-token-mean"},
    ),
    "rloo": Preset(
        "RLOO: leave-one-out group baseline, PPO clip",
        {"advantage": "rloo", "loss": "ppo_clip", "loss_agg": "seq-mean-token-mean"},
    ),
    "reinforce_pp": Preset(
        "REINFORCE++: batch-normalized rewards, PPO clip, token-mean",
        {"advantage": "reinforce_pp", "loss": "ppo_clip", "loss_agg": "token-mean"},
    ),
    "reinforce_pp_baseline": Preset(
        "REINFORCE++-baseline: group-mean baseline, batch std of the centred rewards",
        {"advantage": "reinforce_pp_baseline", "loss": "ppo_clip", "loss_agg": "token-mean"},
    ),
    "lite_ppo": Preset(
        "Lite PPO: group-mean, batch-std advantages, token-mean aggregation",
        {"advantage": "lite_ppo", "loss": "ppo_clip", "loss_agg": "token-mean"},
    ),
    "topr": Preset(
        "TOPR: tapered off-policy REINFORCE (positive samples untruncated, negatives clipped)",
        {"advantage": "grpo", "loss": "topr", "loss_agg": "seq-mean-token-mean"},
    ),
    "raft_pp": Preset(
        "RAFT++: train only on positive-advantage samples with a clipped ratio",
        {"advantage": "grpo", "loss": "raft_pp", "loss_agg": "token-mean"},
    ),
    "ppo": Preset(
        "PPO with a critic: GAE token advantages (gamma 1, lambda 0.95), whitened and clipped at 2, PPO clip",
        {"advantage": "gae", "loss": "ppo_clip", "loss_agg": "seq-mean-token-mean", "whiten_advantages": True,
         "advantage_clip": 2.0},
    ),
    "cispo": Preset(
        "CISPO: clipped, detached importance weight times log-prob (no token dropped)",
        {"advantage": "grpo", "loss": "cispo", "loss_agg": "token-mean"},
    ),
    "sapo": Preset(
        "SAPO: soft sigmoid gate on the token ratio instead of the hard clip (tau 1.0 / 1.05), seq-mean-token-mean",
        {"advantage": "grpo", "loss": "sapo", "loss_agg": "seq-mean-token-mean"},
    ),
    "gpg": Preset(
        "GPG: plain policy gradient -A*logp, group-mean advantages, loss scaled by B/(B-M), token-mean, no KL",
        {"advantage": "dr_grpo", "loss": "gpg", "loss_agg": "token-mean", "gpg_rescale": True, "kl_coef": 0.0},
    ),
    "gmpo": Preset(
        "GMPO: geometric mean of token ratios, clipped per token to (e^-0.4, e^0.4), seq-mean-token-mean",
        {"advantage": "grpo", "loss": "gmpo", "loss_agg": "seq-mean-token-mean", "kl_coef": 0.0},
    ),
    "opo": Preset(
        "OPO: length-weighted optimal group baseline, on-policy (one update per batch), token-mean, no KL",
        {"advantage": "opo", "loss": "ppo_clip", "loss_agg": "token-mean", "kl_coef": 0.0},
    ),
    "remax": Preset(
        "ReMax: the greedy reply's reward as baseline (one extra temperature-0 sample per prompt, never trained)",
        {"advantage": "remax", "loss": "ppo_clip", "loss_agg": "token-mean"},
    ),
}
