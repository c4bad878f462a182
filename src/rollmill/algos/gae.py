"""Token-level credit assignment: token rewards, GAE and the clipped value loss of a critic (§1.2, §2.1),
and the critic-free token form of REINFORCE++ (discounted returns, whitened).

All per-token tensors are [B, L] aligned to response tokens; `mask` is 1 on tokens the policy generated
and 0 on prompt, padding and environment-observation tokens.
"""

from __future__ import annotations

import torch

from rollmill.algos.aggregation import aggregate_loss
from rollmill.algos.normalize import EPS, whiten


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row, -1 for a fully masked row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values


def token_rewards_from_outcome(
    outcome: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Token rewards rho_t = -beta * k_t + 1[t = last valid token] * R, zero on masked tokens.

    `outcome` [B] is the scalar reward R of each sequence, `kl` [B, L] a per-token KL estimate
    (§1.1; k1 is the usual reward-side choice). The KL is detached: a reward is a target, not
    something to differentiate through. A fully masked row has no last token and gets all zeros.
    """
    if outcome.dim() != 1 or outcome.shape[0] != mask.shape[0]:
        raise ValueError(f"outcome must be [B] with B={mask.shape[0]}, got shape {tuple(outcome.shape)}")
    dtype = torch.promote_types(outcome.dtype, torch.float32)
    if kl is not None:
        dtype = torch.promote_types(dtype, kl.dtype)
    valid = (mask > 0).to(dtype)
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl.detach().to(dtype) * valid
    last = _last_valid_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += outcome.detach().to(dtype)[rows]
    return rewards


@torch.no_grad()
def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE: delta_t = rho_t + gamma*V_{t+1} - V_t, A_t = sum_k (gamma*lam)^k delta_{t+k}, G_t = A_t + V_t.

    Returns (advantages, returns) [B, L], both 0 on masked tokens and detached (they are targets).
    V after the last valid token is 0: no bootstrapping through a length cut. Masked tokens are
    skipped rather than treated as steps, so "next" means the next *valid* token; this keeps multi-turn
    sequences with environment tokens in between correct (as verl does) and equals ROLL's recursion on
    right-padded batches. Rewards must therefore sit on valid tokens; one on a masked token is ignored.
    With zero values and lam=1 this gives the discounted returns of REINFORCE(++).
    """
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    rewards, values = token_rewards.to(dtype), values.to(dtype)
    valid = (mask > 0).to(dtype)
    next_value = torch.zeros(values.shape[0], dtype=dtype, device=values.device)
    running = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        # On a masked token carry the recursion through unchanged.
        running = m * step + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = m * step
    return advantages, (advantages + values) * valid


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_k gamma^k * rho_{t+k} over the valid tokens from t on (GAE with V = 0 and lam = 1);
    masked tokens are skipped as in `gae_advantages` and get 0."""
    return gae_advantages(token_rewards, torch.zeros_like(token_rewards), mask, gamma, lam=1.0)[0]


def reinforce_pp_token_advantages(
    outcome: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    eps: float = EPS,
) -> torch.Tensor:
    """REINFORCE++ token form: discounted token returns, whitened over the batch's valid tokens.

    rho_t = -beta * k_t + 1[t = last valid token] * R, G_t = sum_k gamma^k * rho_{t+k},
    A_t = (G_t - mean) / (std + eps), mean and std over every valid token of the batch. `outcome` [B] is
    each sequence's scalar reward, `kl` [B, L] the per-token KL estimate (detached); the result [B, L]
    is 0 on masked tokens (`normalize.whiten`: token-weighted, unbiased std).
    """
    returns = discounted_returns(token_rewards_from_outcome(outcome, mask, kl=kl, beta=beta), mask, gamma)
    return whiten(returns, mask, eps)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    mode: str = "seq-mean-token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Critic loss: 1/2 * agg(max((V - G)^2, (clip(V, V_old - eps, V_old + eps) - G)^2)) over valid tokens.

    Without `clip_eps` the token loss is the plain (V - G)^2. `agg` is `aggregation.aggregate_loss` with
    `mode` (default: the per-sequence masked mean, then the mean over non-empty sequences, as ROLL;
    verl's default is token-mean) and the given global denominators; zero valid tokens give exactly 0.
    """
    returns = returns.detach()
    loss = (values - returns) ** 2
    if clip_eps is not None:
        old = old_values.detach()
        clipped = torch.maximum(torch.minimum(values, old + clip_eps), old - clip_eps)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * aggregate_loss(loss, mask, mode, num_tokens, num_seqs, norm_length)
