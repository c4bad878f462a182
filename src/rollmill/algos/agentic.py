"""Agentic credit assignment (docs/algorithms.md §4.1-§4.4) as pure functions over per-step rewards and chunks.

An episode is a list of steps (one turn each). Step-level functions take one 1-D tensor per episode and
return one per episode; the trainer broadcasts a step's value to that turn's policy tokens. Chunk-level
functions (IPA) work on token tensors [B, C] whose `segments` give each policy token its chunk id.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from rollmill.algos.normalize import EPS

AGENT_CREDITS = (
    "starpo",  # §4.1: whole trajectory is one sample, reward = sum of step scores, group-normalized
    "gigpo",  # §4.2: episode advantage + anchor-state step advantage (gigpo_advantages)
    "ipa",  # §4.3: discounted chunk returns with chunk-level IS ratio and mismatch mask
    "turning_point",  # §4.4: progress deltas, turning points get the long-term reward, per-step GRPO
)


def _as_float(x: torch.Tensor | Sequence[float]) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _group_normalize(
    x: torch.Tensor, keys: Sequence[Hashable], scale_by_std: bool, eps: float, unbiased: bool
) -> torch.Tensor:
    """(x - mean_key) / (std_key + eps) for each distinct key of `keys` (one per element of 1-D `x`).

    A key seen once is its own mean, so its entry is 0; its std is taken as 0 rather than NaN.
    """
    ids: dict[Hashable, int] = {}
    idx = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long, device=x.device)
    zeros = x.new_zeros(len(ids))
    count = zeros.index_add(0, idx, torch.ones_like(x))
    centred = x - (zeros.index_add(0, idx, x) / count)[idx]
    if not scale_by_std:
        return centred
    var = zeros.index_add(0, idx, centred**2) / (count - int(unbiased)).clamp(min=1)
    return centred / (var.sqrt()[idx] + eps)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{k>=t} gamma^(k-t) r_k over one episode's step rewards (1-D), §4.2."""
    rewards = _as_float(rewards)
    pos = torch.arange(rewards.shape[0], device=rewards.device)
    # Episodes are a few turns long, so the [T, T] discount matrix is cheaper than a Python scan.
    discount = torch.triu(gamma ** (pos[None, :] - pos[:, None]).clamp(min=0).to(rewards.dtype))
    return discount @ rewards


def gigpo_advantages(
    step_rewards: list[torch.Tensor],
    states: list[list[Hashable]],
    group_ids: list[int],
    gamma: float = 0.95,
    episode_weight: float = 1.0,
    step_weight: float = 1.0,
    scale_by_std: bool = True,
    eps: float = EPS,
) -> list[torch.Tensor]:
    """GiGPO (§4.2): A_t = w_E * A^E + w_S * A^S_t for every step of every episode.

    A^E_i = (R_i - mean_g R) / F with R_i the sum of episode i's step rewards and g its prompt group
    (`group_ids[i]`); stats are over trajectories (paper Eq.), not over step rows as verl-agent does.
    A^S_t = (R^step_t - mean_anchor) / F with R^step the discounted return from step t and the anchor
    group = all steps of the same prompt group whose state *before* the action (`states[i][t]`,
    any hashable) is equal. F = unbiased std + eps (the spec's ±0.707106 for a pair needs ddof=1;
    population std would give ±1), or 1 with `scale_by_std=False`. Singleton groups give 0.
    """
    if not (len(step_rewards) == len(states) == len(group_ids)):
        raise ValueError("step_rewards, states and group_ids need one entry per episode")
    rewards = [_as_float(r) for r in step_rewards]
    for r, s in zip(rewards, states):
        if len(s) != r.shape[0]:
            raise ValueError(f"episode has {r.shape[0]} step rewards but {len(s)} states")
    episode = _group_normalize(torch.stack([r.sum() for r in rewards]), group_ids, scale_by_std, eps, True)
    step_returns = torch.cat([discounted_returns(r, gamma) for r in rewards])
    anchors = [(g, s) for g, episode_states in zip(group_ids, states) for s in episode_states]
    step = _group_normalize(step_returns, anchors, scale_by_std, eps, True)
    lengths = [r.shape[0] for r in rewards]
    per_step_episode = episode.repeat_interleave(torch.tensor(lengths, device=episode.device))
    return list((episode_weight * per_step_episode + step_weight * step).split(lengths))


def ipa_chunk_returns(
    num_chunks: list[int],
    final_rewards: list[float],
    success: list[bool],
    gamma: float = 0.95,
    failure_reward: float | None = None,
) -> list[torch.Tensor]:
    """IPA chunk returns (§4.3, UNVERIFIED formula): G_k = gamma^(K-k) * R for chunk k = 1..K.

    R is the final reward of a successful episode and `failure_reward` for a failed one; None means 0,
    i.e. learn from successes only. No group normalization and no whitening follow.
    """
    if not (len(num_chunks) == len(final_rewards) == len(success)):
        raise ValueError("num_chunks, final_rewards and success need one entry per episode")
    out = []
    for k, reward, ok in zip(num_chunks, final_rewards, success):
        r = reward if ok else (0.0 if failure_reward is None else failure_reward)
        out.append(r * gamma ** torch.arange(k - 1, -1, -1, dtype=torch.float32))
    return out


def segment_mean(values: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of `values` [B, C] over each (row, segment), written back to every token of it.

    `segments` [B, C] is the chunk id of each token (ids are per row; any value where mask is 0) and
    `mask` [B, C] is 1 on the tokens that count. Tokens with mask 0 get 0. Gradient flows into `values`:
    each token of a chunk of n tokens receives 1/n of the chunk's gradient.
    """
    keep = mask > 0
    rows, width = values.shape
    # Padded positions may hold -inf log-probs: where() keeps them out of the sums and the gradient.
    vals = torch.where(keep, values, torch.zeros_like(values))
    seg = torch.where(keep, segments, torch.zeros_like(segments))
    seg = seg - seg.min()  # ids may be any integers; buckets need them non-negative
    span = int(seg.max()) + 1
    key = (torch.arange(rows, device=seg.device)[:, None] * span + seg).flatten()
    buckets = vals.new_zeros(rows * span)
    total = buckets.index_add(0, key, vals.flatten())
    count = buckets.index_add(0, key, keep.flatten().to(vals.dtype)).clamp(min=1)
    return torch.where(keep, (total / count)[key].view(rows, width), torch.zeros_like(vals))


def segment_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log rho_k = mean_{t in k}(logp - old_logp) on every token of chunk k (§4.3, ROLL `ratio_type: segment`).

    rho_k is the chunk's geometric-mean ratio. Feed `old_logp + segment_log_ratio(...)` as `logp` to
    `losses.ppo_clip_loss` so every token of chunk k is clipped with the same rho_k.
    """
    return segment_mean(logp - old_logp, segments, mask)


def segment_mismatch_mask(
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    segments: torch.Tensor,
    mask: torch.Tensor,
    upper: float = 5.0,
    lower: float = 0.0,
) -> torch.Tensor:
    """Float mask [B, C]: keep chunk k iff exp(mean_{t in k}(old_logp - behaviour_logp)) is in [lower, upper].

    IPA's train/inference mismatch guard (§4.3, H = 5): a chunk whose trainer-side probability drifted
    too far from what the sampler saw is dropped whole. Tokens with mask 0 stay 0.
    """
    with torch.no_grad():
        ratio = torch.exp(segment_mean(old_logp - behaviour_logp, segments, mask))
        kept = (mask > 0) & (ratio >= lower) & (ratio <= upper)
    return kept.to(old_logp.dtype)


def turning_point_rewards(
    values: Sequence[float] | torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """TP-GRPO step rewards (§4.4) from progress estimates R_0..R_n: returns (rewards [n], turning [n] bool).

    d_t = R_t - R_{t-1}, Delta = R_n - R_0, s_t = sign(d_t) sign(Delta). Step 1 is a turning point if
    sign(d_1) sign(R_n - R_1) > 0; step t >= 2 if s_{t-1} < 0, s_t > 0 and sign(d_t) sign(R_n - R_t) > 0,
    i.e. it flips the local trend and the rest of the episode keeps its direction. A turning point's
    reward is eta (R_n - R_{t-1}), the long-term gain it started; other steps get d_t. The last step can
    never be one (R_n - R_n = 0). For agents R_t is a per-turn progress estimate (UNVERIFIED proposal).
    """
    R = _as_float(values)
    d = R[1:] - R[:-1]
    s = torch.sign(d) * torch.sign(R[-1] - R[0])
    holds = torch.sign(d) * torch.sign(R[-1] - R[1:]) > 0
    flips = torch.ones_like(holds)
    flips[1:] = (s[:-1] < 0) & (s[1:] > 0)
    turning = flips & holds
    return torch.where(turning, eta * (R[-1] - R[:-1]), d), turning


def balance_turning_points(
    rewards_list: list[torch.Tensor],
    flags_list: list[torch.Tensor],
    values_list: list[Sequence[float] | torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batch balancing of turning points (§4.4, on in the released script); inputs are not modified.

    A turning point's sign is its episode's sign(Delta) (the rule forces sign(d_t) = sign(Delta)). If both
    signs occur across the batch, keep min(n+, n-) of each sign, those whose episode has the largest
    |Delta| (ties: batch order), and demote the rest to normal steps with reward d_t = R_t - R_{t-1}.
    """
    values = [_as_float(v) for v in values_list]
    rewards = [r.clone() for r in rewards_list]
    flags = [f.clone() for f in flags_list]
    delta = [float(v[-1] - v[0]) for v in values]
    points = [(i, t) for i, f in enumerate(flags) for t in f.nonzero().flatten().tolist()]
    positive = [p for p in points if delta[p[0]] > 0]
    negative = [p for p in points if delta[p[0]] < 0]
    if not positive or not negative:
        return rewards, flags
    keep = min(len(positive), len(negative))
    kept = {p for side in (positive, negative) for p in sorted(side, key=lambda p: -abs(delta[p[0]]))[:keep]}
    for i, t in points:
        if (i, t) not in kept:
            flags[i][t] = False
            rewards[i][t] = values[i][t + 1] - values[i][t]
    return rewards, flags


def per_step_group_advantages(
    step_rewards: list[torch.Tensor], group_ids: list[int], eps: float = 1e-4
) -> list[torch.Tensor]:
    """TP-GRPO advantage (§4.4): (r_t - mean) / (population std + eps) per (prompt group, step index t).

    The stats at step t are over the episodes of the group that reached step t, so episodes may differ in
    length; a step only one episode of its group reached gets 0.
    """
    if len(step_rewards) != len(group_ids):
        raise ValueError("step_rewards and group_ids need one entry per episode")
    rewards = [_as_float(r) for r in step_rewards]
    keys = [(g, t) for g, r in zip(group_ids, rewards) for t in range(r.shape[0])]
    adv = _group_normalize(torch.cat(rewards), keys, True, eps, unbiased=False)
    return list(adv.split([r.shape[0] for r in rewards]))
