"""The `algorithm` section: the RL objective, its registry names and their parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rollmill.config.base import Strict
from rollmill.config.presets import ALGORITHMS


class AlgorithmConfig(Strict):
    """The RL objective. `name` is a preset (`rollmill.config.presets`); `advantage`, `loss`,
    `loss_agg` and `kl_estimator` name entries of the `rollmill.algos` registries, which
    `rollmill.checks.check_config` validates (the config package knows no registry)."""

    name: str = "grpo"
    advantage: str = "grpo"
    loss: str = "ppo_clip"
    loss_agg: str = "token-mean"
    clip_eps: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    kl_estimator: str = "k3"
    track_kl: bool = Field(False, description="keep a frozen reference to report KL even when kl_coef is 0 "
                           "(a reference forward per step, only to log it)")
    kl_placement: Literal["loss", "reward"] = Field("loss", description="KL as a loss term or as a reward penalty")
    kl_target: float | None = Field(None, gt=0.0, description="adapt kl_coef toward this KL (Ziegler); None = fixed")
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL horizon, in samples")
    # Critic (advantage "gae", the `ppo` preset): docs/algorithms.md §2.1, ROLL's defaults.
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    value_clip: float | None = Field(None, gt=0.0, description="clip new values to old +- this in the value loss; None = off")
    critic_lr: float = Field(1e-5, gt=0.0, description="learning rate of the value model")
    # Composable normalization (advantage "normalized"; whitening and advantage clip also apply to "gae").
    norm_mean: Literal["group", "batch", "running"] | None = Field("group", description="baseline subtracted from rewards")
    norm_std: Literal["group", "batch", "running"] | None = Field("group", description="std the rewards are divided by")
    reward_clip: float | None = Field(None, gt=0.0, description="clamp rewards to +- this before normalizing")
    whiten_advantages: bool = Field(False, description="whiten token advantages over the batch's valid tokens")
    advantage_clip: float | None = Field(None, gt=0.0, description="clamp advantages to +- this; None = off")
    # Train/inference mismatch corrections (§3.2), against the engine's behaviour log-probs.
    tis_cap: float | None = Field(None, gt=0.0, description="truncated IS: weight losses by min(pi_train/pi_behaviour, cap)")
    tis_level: Literal["token", "sequence", "geometric"] = Field("token", description="level of the TIS ratio and mismatch filter")
    mismatch_ratio_bounds: tuple[float, float] | None = Field(None, description="drop tokens/sequences whose ratio leaves [lo, hi]")
    # Preplan-and-anchor credit (§4.5; constants UNVERIFIED): amplify advantages on attention-selected tokens.
    anchor_credit: Literal["none", "waad", "fai", "preplan_anchor"] = Field(
        "none", description="attention-based token credit (agent.credit is the multi-turn rule)")
    anchor_kappa: float = Field(0.5, ge=0.0, description="amplification: A_t * (1 + kappa * gate_t)")
    anchor_top_q: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each reply's tokens gated")
    anchor_window: int = Field(16, gt=0, description="WAAD distance clip W")
    anchor_layer: int = Field(-1, description="which layer's attention maps to read (negative counts from the end)")
    anchor_positive_only: bool = Field(False, description="amplify only where A > 0")
    # Policy-loss parameters: each is named exactly like the keyword of the losses that take it.
    clip_eps_high: float | None = Field(None, gt=0.0, description="clip-higher upper epsilon (DAPO 0.28); None = clip_eps")
    dual_clip_c: float | None = Field(None, gt=1.0, description="dual-clip bound for A<0 (paper 3.0, ROLL 1+2*clip_eps); None = off")
    gspo_eps_low: float = Field(3e-4, gt=0.0, lt=1.0, description="GSPO sequence-ratio clip, lower")
    gspo_eps_high: float = Field(4e-4, gt=0.0, description="GSPO sequence-ratio clip, upper")
    topr_ratio_level: Literal["seq", "token"] = Field("seq", description="TOPR taper ratio: per sequence (paper) or token (ROLL)")
    topr_positive_weight: float = Field(1.0, ge=0.0, description="TOPR weight of samples with A > 0")
    topr_negative_weight: float = Field(1.0, ge=0.0, description="TOPR weight of samples with A <= 0")
    cispo_eps_low: float = Field(0.1, ge=0.0, le=1.0, description="CISPO IS-weight clip, lower; 1.0 = no lower bound")
    cispo_eps_high: float = Field(0.1, ge=0.0, description="CISPO IS-weight clip, upper")
    cispo_unified_mask: bool = Field(False, description="CISPO: drop tokens PPO's clip would zero (ROLL)")
    is_weight_cap: float = Field(1.2, gt=0.0, description="decoupled_ppo: cap C on exp(old_logp - behaviour_logp)")
    # Round two: SAPO, GMPO, GPG's loss scale, the KL term's form, aggregation denominators (§1.1, §1.4, §2.15-17).
    sapo_tau_pos: float = Field(1.0, gt=0.0, description="SAPO gate temperature where A > 0")
    sapo_tau_neg: float = Field(1.05, gt=0.0, description="SAPO gate temperature where A <= 0")
    gmpo_log_clip_low: float = Field(0.4, gt=0.0, description="GMPO per-token clip in log space: ratio >= e^-low")
    gmpo_log_clip_high: float = Field(0.4, gt=0.0, description="GMPO per-token clip in log space: ratio <= e^high")
    gpg_rescale: bool = Field(False, description="scale the loss by GPG's alpha = B/(B-M), M = rows with advantage 0")
    gpg_min_valid_fraction: float = Field(0.05, gt=0.0, le=1.0, description="cap alpha at 1/this (GPG authors' code)")
    kl_clamp: float | None = Field(10.0, gt=0.0, description="k3 and k3+ at most this (ROLL, verl); None = no clamp")
    kl_ratio_weighted: bool = Field(False, description="KL loss term times exp(logp - old_logp), not detached "
                                                       "(TRL's use_bias_correction_kl)")
    loss_agg_seq_count: Literal["nonempty", "all"] = Field("nonempty", description="what N counts: rows with a valid "
                                                           "token (ROLL, verl) or every row (TRL)")
    loss_agg_norm_length: int | None = Field(None, gt=0, description="L_norm of seq-mean-token-sum-norm; None = "
                                             "rollout.sampling.max_new_tokens (agentic: the batch's width)")
    loss_agg_norm_by_seqs: bool = Field(False, description="seq-mean-token-sum-norm also divides by N (verl; TRL's "
                                        "dr_grpo with loss_agg_seq_count: all)")
    # Round two: advantages
    std_eps: float = Field(1e-6, gt=0.0, description="eps added to every advantage std (whitening, GAE, GDPO and "
                                                      "GiGPO included; TurningPoint keeps its reference's 1e-4): "
                                                      "1e-6 as verl; TRL's GRPOTrainer uses 1e-4")
    value_loss_agg: str = Field("seq-mean-token-mean", description="critic value-loss aggregation, a loss_agg "
                                                                    "mode (ROLL's seq-mean-token-mean; verl: token-mean)")

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        """Keys a preset sets are defaults: anything written explicitly in the config wins."""
        if isinstance(data, dict) and data.get("name", "grpo") in ALGORITHMS:
            return {**ALGORITHMS[data.get("name", "grpo")].settings, **data}
        return data

    @field_validator("name")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; allowed: {sorted(ALGORITHMS)}")
        return name
