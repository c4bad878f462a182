"""Policy losses and IS helpers: docs/algorithms.md worked examples to 1e-5, gradients, masking, trainer wiring."""

import math

import pytest
import torch
from pydantic import ValidationError

from rollmill.algos import aggregate_loss
from rollmill.algos.losses import (
    POLICY_LOSSES,
    cispo_loss,
    decoupled_ppo_loss,
    gspo_loss,
    gspo_token_loss,
    loss_param_names,
    mismatch_mask,
    ppo_clip_loss,
    raft_pp_loss,
    tis_weights,
    topr_loss,
)
from rollmill.checks import check_config
from rollmill.config import AlgorithmConfig, ConfigError, RunConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.types import Row
from rollmill.train import PolicyTrainer, build_batch
from rollmill.train.trainer import loss_params


def close(a, b, tol=1e-5):
    a = torch.as_tensor(a).detach().double()
    return a.shape == torch.tensor(b).shape and torch.allclose(a, torch.tensor(b, dtype=torch.float64), atol=tol)


def grad_of(fn, logp, *args, **kwargs):
    """d(sum of token losses)/d logp."""
    logp = logp.clone().requires_grad_(True)
    fn(logp, *args, **kwargs).token_loss.sum().backward()
    return logp.grad


# §2.2 / §2.3 ------------------------------------------------------------------------------------

RATIO = torch.tensor([0.5, 1.1, 1.3, 1.3, 0.5, 4.0])
ADV = torch.tensor([1.0, 1, 1, -1, -1, -1])


@pytest.mark.parametrize("c,last", [(None, 4.0), (3.0, 3.0), (1.4, 1.4)])
def test_dual_clip_worked_example(c, last):
    out = ppo_clip_loss(RATIO.log(), torch.zeros(6), ADV, clip_eps=0.2, dual_clip_c=c)
    assert close(out.token_loss, [-0.5, -1.1, -1.2, 1.3, 0.8, last])
    assert out.clipped.tolist() == [False, False, True, False, True, c is not None]


def test_dual_clip_leaves_positive_advantages_alone():
    # r*A = 4 > c*A = 3 only matters for A < 0; with A > 0 the ordinary clip gives -1.2
    out = ppo_clip_loss(torch.tensor([4.0]).log(), torch.zeros(1), torch.ones(1), dual_clip_c=3.0)
    assert close(out.token_loss, [-1.2])


def test_clip_higher_worked_example():
    lp, old, adv = torch.tensor([1.3]).log(), torch.zeros(1), torch.ones(1)
    assert close(ppo_clip_loss(lp, old, adv, clip_eps=0.2).token_loss, [-1.2])
    assert close(ppo_clip_loss(lp, old, adv, clip_eps=0.2, clip_eps_high=0.28).token_loss, [-1.28])


def test_ppo_dual_clip_gradient_is_zero_where_bounded():
    g = grad_of(ppo_clip_loss, RATIO.log(), torch.zeros(6), ADV, dual_clip_c=3.0)
    assert close(g, [-0.5, -1.1, 0.0, 1.3, 0.0, 0.0])


# §2.8 GSPO --------------------------------------------------------------------------------------

GSPO_LP = torch.tensor([[-1.0, -0.5, -2.0, 7.0]])  # last column is padding with a wild value
GSPO_OLD = torch.tensor([[-1.0002, -0.5004, -1.9997, -3.0]])
GSPO_MASK = torch.tensor([[1.0, 1, 1, 0]])


@pytest.mark.parametrize("fn", [gspo_loss, gspo_token_loss])
@pytest.mark.parametrize("adv,loss", [(1.0, -1.0001), (-1.0, 1.0001)])
def test_gspo_worked_example(fn, adv, loss):
    out = fn(GSPO_LP, GSPO_OLD, torch.tensor([[adv]]), GSPO_MASK)
    assert close(out.ratio, [[1.000100005] * 4])  # padding excluded from the mean, ratio broadcast
    assert close(out.token_loss, [[loss] * 4])
    assert not out.clipped.any()


def test_gspo_clips_whole_sequence_with_its_own_narrow_range():
    old = torch.tensor([[-1.001, -0.5, -2.0, 0.0]])  # s = exp(0.001 / 3) = 1.000333, inside [0.9997, 1.0004]
    out = gspo_loss(GSPO_LP, old, torch.tensor([[-1.0]]), GSPO_MASK)
    assert not out.clipped.any()
    old = torch.tensor([[-1.003, -0.5, -2.0, 0.0]])  # s = exp(0.001) = 1.0010005 > 1 + 4e-4
    out = gspo_loss(GSPO_LP, old, torch.tensor([[1.0]]), GSPO_MASK)
    assert out.clipped.all() and close(out.token_loss, [[-1.0004] * 4])
    assert close(grad_of(gspo_loss, GSPO_LP, old, torch.tensor([[1.0]]), GSPO_MASK), [[0.0] * 4])


def test_gspo_and_gspo_token_differ_only_in_the_gradient_path():
    lp, old, adv = GSPO_LP, GSPO_OLD, torch.tensor([[2.0]])
    s = math.exp(0.0001)
    # gradient of token 0's loss alone: GSPO spreads it over the sequence, GSPO-token keeps it local
    g_seq = torch.autograd.grad(gspo_loss(lp.requires_grad_(True), old, adv, GSPO_MASK).token_loss[0, 0], lp)[0]
    g_tok = torch.autograd.grad(gspo_token_loss(lp, old, adv, GSPO_MASK).token_loss[0, 0], lp)[0]
    lp.requires_grad_(False)
    assert close(g_seq, [[-2 * s / 3] * 3 + [0.0]])
    assert close(g_tok, [[-2 * s, 0.0, 0.0, 0.0]])


# §2.9 TOPR --------------------------------------------------------------------------------------

TOPR_LP = torch.tensor([[-0.2, -0.3], [-0.2, -0.3]])
TOPR_BEH = torch.tensor([[-0.1, 0.0], [-0.1, 0.0]])
TOPR_ADV = torch.tensor([[-1.0], [1.0]])


def test_topr_worked_example_sequence_ratio():
    out = topr_loss(TOPR_LP, TOPR_BEH, TOPR_ADV, torch.ones(2, 2))
    w = 0.670320
    assert close(out.token_loss, [[-0.2 * w, -0.3 * w], [0.2, 0.3]])  # -w * A * logp
    assert close(grad_of(topr_loss, TOPR_LP, TOPR_BEH, TOPR_ADV, torch.ones(2, 2)), [[w, w], [-1.0, -1.0]])
    assert not out.clipped.any()  # pi/mu < 1: nothing tapered


def test_topr_token_ratio_and_weights():
    g = grad_of(topr_loss, TOPR_LP, TOPR_BEH, TOPR_ADV, torch.ones(2, 2), topr_ratio_level="token",
                topr_positive_weight=0.5, topr_negative_weight=2.0)
    assert close(g, [[2 * 0.904837, 2 * 0.740818], [-0.5, -0.5]])


def test_topr_tapers_only_negative_samples_above_ratio_one():
    lp, beh = torch.tensor([[0.0, 0.5], [0.0, 0.5]]), torch.zeros(2, 2)
    out = topr_loss(lp, beh, TOPR_ADV, torch.tensor([[1.0, 1], [1, 1]]))
    assert out.clipped.tolist() == [[True, True], [False, False]]
    assert close(grad_of(topr_loss, lp, beh, TOPR_ADV, None), [[1.0, 1.0], [-1.0, -1.0]])
    with pytest.raises(ValueError, match="topr_ratio_level"):
        topr_loss(lp, beh, TOPR_ADV, None, topr_ratio_level="segment")


# §2.10 RAFT++ -----------------------------------------------------------------------------------

def test_raft_pp_keeps_positive_samples_only():
    adv = torch.tensor([[1.0], [0.0], [1.0], [0.0]])  # R = [1, 0, 1, 0] as the advantage
    lp = torch.tensor([[0.0, math.log(1.3)]]).expand(4, 2)
    out = raft_pp_loss(lp, torch.zeros(4, 2), adv, torch.ones(4, 2))
    assert close(out.token_loss, [[-1.0, -1.2], [0, 0], [-1.0, -1.2], [0, 0]])
    assert ((out.token_loss != 0).any(-1).float()).tolist() == [1, 0, 1, 0]
    assert out.clipped.tolist() == [[False, True], [False, False], [False, True], [False, False]]
    assert close(grad_of(raft_pp_loss, lp, torch.zeros(4, 2), adv), [[-1.0, 0], [0, 0], [-1.0, 0], [0, 0]])


# §2.11 CISPO and §3.2 (b) -----------------------------------------------------------------------

CISPO_R = torch.tensor([0.6, 1.0, 1.5, 3.0])


@pytest.mark.parametrize(
    "params,weights",
    [
        ({}, [0.9, 1.0, 1.1, 1.1]),  # ROLL defaults 0.1 / 0.1
        ({"cispo_eps_low": 1.0, "cispo_eps_high": 0.28}, [0.6, 1.0, 1.28, 1.28]),  # no lower bound
        ({"cispo_eps_low": 1.0, "cispo_eps_high": 0.0}, [0.6, 1.0, 1.0, 1.0]),  # ROLL pg_variant "tis"
    ],
)
def test_cispo_worked_example(params, weights):
    lp, adv = CISPO_R.log(), torch.full((4,), 2.0)
    out = cispo_loss(lp, torch.zeros(4), adv, **params)
    assert close(out.token_loss, (-torch.tensor(weights) * 2.0 * lp).tolist())
    assert close(grad_of(cispo_loss, lp, torch.zeros(4), adv, **params), [-2.0 * w for w in weights])


def test_cispo_unified_mask_drops_what_ppo_would_zero():
    lp = CISPO_R.log()
    pos = grad_of(cispo_loss, lp, torch.zeros(4), torch.ones(4), cispo_unified_mask=True)
    neg = grad_of(cispo_loss, lp, torch.zeros(4), -torch.ones(4), cispo_unified_mask=True)
    assert close(pos, [-0.9, -1.0, 0.0, 0.0]) and close(neg, [0.0, 1.0, 1.1, 1.1])
    assert cispo_loss(lp, torch.zeros(4), torch.ones(4)).clipped.tolist() == [True, False, True, True]


# §3.1 decoupled PPO -----------------------------------------------------------------------------

def test_decoupled_ppo_worked_example():
    beh, prox, cur = torch.tensor([0.2, 0.5]).log(), torch.tensor([0.3, 0.45]).log(), torch.tensor([0.39, 0.30]).log()
    adv = torch.tensor([1.0, -1.0])
    out = decoupled_ppo_loss(cur, prox, adv, behaviour_logp=beh, clip_eps=0.2, is_weight_cap=1.2)
    assert close(out.ratio, [1.3, 0.666667]) and close(out.token_loss, [-1.44, 0.72])
    assert out.clipped.tolist() == [True, True]
    # unclipped tokens: d/dlogp = -w * r * A
    g = grad_of(decoupled_ppo_loss, torch.tensor([0.33, 0.45]).log(), prox, adv, behaviour_logp=beh)
    assert close(g, [-1.2 * 1.1, 0.9 * 1.0])


def test_decoupled_ppo_requires_behaviour_logprobs():
    with pytest.raises(TypeError, match="behaviour_logp"):
        decoupled_ppo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2))


# §3.2 (a) TIS and mismatch filter ---------------------------------------------------------------

def test_tis_weights_worked_example_and_levels():
    assert close(tis_weights(CISPO_R.log()[None], torch.zeros(1, 4), torch.ones(1, 4), cap=2.0), [[0.6, 1.0, 1.5, 2.0]])
    lp = torch.tensor([[math.log(0.6), math.log(1.5), 9.0]])  # third column padded
    mask = torch.tensor([[1.0, 1, 0]])
    assert close(tis_weights(lp, torch.zeros(1, 3), mask, cap=2.0, level="sequence"), [[0.9, 0.9, 0.0]])
    assert close(tis_weights(lp, torch.zeros(1, 3), mask, cap=2.0, level="geometric"), [[0.948683, 0.948683, 0.0]])
    assert close(tis_weights(lp, torch.zeros(1, 3), mask, cap=0.5, level="sequence"), [[0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="level"):
        tis_weights(lp, torch.zeros(1, 3), mask, cap=2.0, level="segment")


def test_mismatch_mask_by_ratio_and_probability_difference():
    lp, beh, ones = CISPO_R.log()[None], torch.zeros(1, 4), torch.ones(1, 4)
    assert mismatch_mask(lp, beh, ones).tolist() == [[0, 1, 0, 0]]
    rows, zeros, ones = torch.tensor([[0.9, 0.85], [0.6, 0.6]]).log(), torch.zeros(2, 2), torch.ones(2, 2)
    assert mismatch_mask(rows, zeros, ones, level="geometric").tolist() == [[1, 1], [0, 0]]  # 0.875, 0.6
    assert mismatch_mask(rows, zeros, ones, level="sequence").tolist() == [[0, 0], [0, 0]]  # 0.765, 0.36
    # p_train - p_beh: [0.5-0.4, 0.9-0.5]; the second token is out of [-0.2, 0.2]
    lp, beh = torch.tensor([[0.5, 0.9]]).log(), torch.tensor([[0.4, 0.5]]).log()
    mask = mismatch_mask(lp, beh, torch.ones(1, 2), ratio_bounds=None, diff_bounds=(-0.2, 0.2))
    assert mask.tolist() == [[1, 0]]
    whole = mismatch_mask(lp, beh, torch.ones(1, 2), level="sequence", ratio_bounds=None, diff_bounds=(-0.2, 0.2))
    assert whole.tolist() == [[0, 0]]
    padded = mismatch_mask(lp, beh, torch.tensor([[1.0, 0]]), level="sequence", ratio_bounds=None, diff_bounds=(-0.2, 0.2))
    assert padded.tolist() == [[1, 0]]  # an out-of-range padded token does not veto its sequence


# Gradients, masking, interface, for every loss ----------------------------------------------------

def case(seed=0):
    """A float64 batch: 3 rows of width 4, row 1 partly padded, row 2 fully masked; ratios near 1."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.5
    logp = old + 0.05 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([[1.3], [-0.7], [0.4]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    return logp, old, adv, mask


# Params that keep every token of `case()` away from clip boundaries (so finite differences are exact).
WIDE = {"gspo": {"gspo_eps_low": 0.5, "gspo_eps_high": 0.5}, "gspo_token": {"gspo_eps_low": 0.5, "gspo_eps_high": 0.5}}


def call(name, logp, old, adv, mask, **params):
    extra = {"behaviour_logp": old - 0.1} if name == "decoupled_ppo" else {}
    return POLICY_LOSSES[name](logp, old, adv, mask, **WIDE.get(name, {}), **extra, **params)


def expected_grad(name, logp, old, adv, mask):
    """Analytic d(sum_t m*l)/d logp with every token unclipped (ratios near 1, default params)."""
    r = (logp - old).exp()
    if name in ("ppo_clip", "gspo", "gspo_token", "gmpo"):
        # gmpo: every token of row i carries l_i = -A_i s_i, so sum_t l_i has the gradient -A_i s_i on each token
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        s = ((logp - old) * mask).sum(-1, keepdim=True).div(n).exp()
        per_token = -adv * (r if name == "ppo_clip" else s)
    elif name == "sapo":  # d/dlogp of -(4/tau) sigmoid(tau (r - 1)) A = -4 sigma (1 - sigma) r A
        sigma = torch.sigmoid(torch.where(adv > 0, 1.0, 1.05) * (r - 1))
        per_token = -4 * sigma * (1 - sigma) * r * adv
    elif name == "gpg":
        per_token = -adv * torch.ones_like(r)
    elif name == "topr":
        taper = ((logp - old) * mask).sum(-1, keepdim=True).clamp(max=0).exp()
        per_token = -adv * torch.where(adv > 0, torch.ones_like(taper), taper)
    elif name == "raft_pp":
        per_token = -r * (adv > 0)
    elif name == "cispo":
        per_token = -r.clamp(0.9, 1.1) * adv
    else:  # decoupled_ppo with behaviour = old - 0.1: w = min(e^0.1, 1.2) = e^0.1
        per_token = -math.exp(0.1) * r * adv
    return per_token * mask


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_autograd_matches_analytic_gradient(name):
    logp, old, adv, mask = case()
    logp.requires_grad_(True)
    out = call(name, logp, old, adv, mask)
    assert not (out.clipped & (mask > 0)).any()  # the analytic form below assumes no clipping
    (out.token_loss * mask).sum().backward()
    assert torch.allclose(logp.grad, expected_grad(name, logp.detach(), old, adv, mask), atol=1e-10)


@pytest.mark.parametrize("name,params", [("ppo_clip", {}), ("ppo_clip", {"clip_eps_high": 0.3, "dual_clip_c": 2.0}),
                                         ("gspo", {}), ("raft_pp", {})])
def test_gradcheck_losses_without_stop_gradient(name, params):
    # stop-gradient losses (gspo_token, topr, cispo, decoupled_ppo) have gradients that are, by design,
    # not the derivative of their value, so finite differences only apply to these
    logp, old, adv, mask = case(1)
    logp = logp.clone().requires_grad_(True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        fn = lambda lp: aggregate_loss(call(name, lp, old, adv, mask, **params).token_loss, mask, agg)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logp,))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_fully_masked_rows_and_zero_tokens_are_finite(name, agg):
    logp, old, adv, mask = case(2)
    for m in (mask, torch.zeros_like(mask)):
        lp = logp.clone().requires_grad_(True)
        out = call(name, lp, old, adv, m)
        loss = aggregate_loss(out.token_loss, m, agg)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and torch.isfinite(out.ratio).all()
        assert (lp.grad[2] == 0).all()  # the fully masked row gets no gradient
        if not m.any():
            assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_losses_reject_unknown_params(name):
    logp, old, adv, mask = case()
    with pytest.raises(TypeError):
        call(name, logp, old, adv, mask, clip_eps_hi=0.3)


# Config and trainer wiring ------------------------------------------------------------------------

TRAINER_INPUTS = {"behaviour_logp"}  # per-batch tensors the trainer passes by name


def test_every_loss_param_is_a_config_field_or_trainer_input():
    for name, fn in POLICY_LOSSES.items():
        missing = set(loss_param_names(fn)) - set(AlgorithmConfig.model_fields) - TRAINER_INPUTS
        assert not missing, (name, missing)
    assert loss_params(AlgorithmConfig(dual_clip_c=3.0)) == {"clip_eps": 0.2, "clip_eps_high": None, "dual_clip_c": 3.0}
    assert loss_params(AlgorithmConfig(loss="gspo")) == {"gspo_eps_low": 3e-4, "gspo_eps_high": 4e-4}


def test_config_rejects_params_the_selected_loss_ignores():
    def check(**algorithm):
        return check_config(RunConfig(algorithm=AlgorithmConfig(**algorithm)))

    with pytest.raises(ConfigError, match="algorithm.loss = 'gspo': loss 'gspo' does not use \\['clip_eps'\\]"):
        check(loss="gspo", clip_eps=0.3)
    with pytest.raises(ConfigError, match="dual_clip_c"):
        check(loss="cispo", dual_clip_c=3.0)
    with pytest.raises(ValidationError):
        AlgorithmConfig(dual_clip_c=0.5)  # c <= 1 would bound below the clipped surrogate itself
    dumped = check(loss="cispo", cispo_eps_high=0.28).algorithm.model_dump()
    assert AlgorithmConfig.model_validate(dumped).cispo_eps_high == 0.28  # a dumped config reloads


def random_batch(vocab, n=6):
    g = torch.Generator().manual_seed(0)
    comps = []
    for _ in range(n):
        p = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        comps.append(Row.sampled(p, c, [-1.0] * len(c)))
    return build_batch(comps, torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.4]), pad_id=2)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_trainer_step_runs_every_loss(name):
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PolicyTrainer(model, TrainConfig(lr=1e-2, micro_batch_size=2, ppo_epochs=2, mini_batch_size=3),
                            AlgorithmConfig(loss=name))
    metrics = trainer.step(random_batch(len(tok)))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
