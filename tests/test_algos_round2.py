"""Algorithms, round two: the NaN fix (huge log-prob gaps, -inf/NaN padding), SAPO, GPG, GMPO, the new KL forms and
aggregation denominators, each against docs/algorithms.md's worked numbers (to 1e-5), and their trainer wiring.

New names are reached through `rollmill.algos` modules (`algos.kl.kl_k3`, ...) rather than imported by name, so the
NaN tests also run against the code before this change: there they fail on NaN, not on imports.
"""

import math

import pytest
import torch
from test_algos_losses import close, grad_of

from rollmill import algos
from rollmill.algos import LOSS_AGGREGATIONS, aggregate_loss, kl_estimate
from rollmill.algos.losses import POLICY_LOSSES
from rollmill.checks import check_config
from rollmill.config import AlgorithmConfig, ConfigError, RunConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.train import PolicyTrainer, build_batch
from rollmill.train import trainer as trainer_module
from rollmill.types import Row

INF = math.inf


# §0 NaN fix: huge gaps and non-finite padding, float32 ------------------------------------------------------------

# Row 0: valid gaps +200 and -200 (exp overflows float32 past ~88), a normal token, padding with logp = -inf.
# Row 1: two gaps of +100 (so a sequence mean overflows too), padding whose logp and old_logp are both -inf
# (their difference is NaN). Row 2: fully masked, all -inf.
HUGE_LP = torch.tensor([[-0.5, -201.0, -1.0, -INF], [-0.5, -0.2, -INF, -INF], [-INF] * 4])
HUGE_OLD = torch.tensor([[-200.5, -1.0, -1.1, -0.3], [-100.5, -100.2, -INF, -INF], [-INF] * 4])
HUGE_MASK = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
HUGE_ADV = torch.tensor([[1.0], [-1.0], [0.5]])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_every_policy_loss_is_finite_with_huge_gaps_and_inf_padding(name, agg):
    extra = {"behaviour_logp": HUGE_OLD - 150.0} if name == "decoupled_ppo" else {}  # a huge gap there too
    for adv in (HUGE_ADV, -HUGE_ADV):
        lp = HUGE_LP.clone().requires_grad_(True)
        out = POLICY_LOSSES[name](lp, HUGE_OLD, adv, HUGE_MASK, **extra)
        loss = aggregate_loss(out.token_loss, HUGE_MASK, agg)
        loss.backward()
        assert torch.isfinite(loss), (name, agg)
        assert torch.isfinite(lp.grad).all(), (name, agg, lp.grad)
        assert (lp.grad[HUGE_MASK == 0] == 0).all()
        assert torch.isfinite(out.ratio[HUGE_MASK > 0]).all()


def test_k3_is_finite_in_float32_with_huge_gaps():
    # d = logp - ref = -200 (exp(200) = inf in float32), +200, -0.2; the padded logp is -inf
    ref = torch.tensor([[-1.0, -1.0, -1.0, -0.5]])
    lp = torch.tensor([[-201.0, 199.0, -1.2, -INF]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 0]])
    kl = kl_estimate("k3", lp, ref)
    loss = aggregate_loss(kl, mask, "token-mean")
    loss.backward()
    k3 = math.exp(0.2) - 1 - 0.2  # 0.021403
    assert close(loss, (10 + 10 + k3) / 3)
    assert close(lp.grad, [[0.0, 0.0, (1 - math.exp(0.2)) / 3, 0.0]])  # clamped tokens: value 10, gradient 0


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs", "k1+", "k3+"])
def test_kl_estimate_masks_nan_padding_before_any_estimator(name):
    lp = torch.tensor([[-1.0, -2.0, math.nan, -INF]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5, -0.5, -INF]])
    mask = torch.tensor([[1.0, 1, 0, 0]])
    kl = kl_estimate(name, lp, ref, mask)
    aggregate_loss(kl, mask, "token-sum").backward()
    assert (kl[0, 2:] == 0).all() and torch.isfinite(lp.grad).all() and (lp.grad[0, 2:] == 0).all()


def test_aggregate_loss_drops_non_finite_masked_values():
    loss = torch.tensor([[1.0, INF], [math.nan, 2.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0], [0, 1]])
    out = aggregate_loss(loss, mask, "token-mean")
    out.backward()
    assert float(out.detach()) == pytest.approx(1.5)
    assert close(loss.grad, [[0.5, 0.0], [0.0, 0.5]])


# §2.15 SAPO -------------------------------------------------------------------------------------------------------

SAPO_R = torch.tensor([1.0, 1.5, 0.5])
SAPO_ADV = torch.tensor([1.0, 1.0, -1.0])


def test_sapo_worked_example():
    sapo = POLICY_LOSSES["sapo"]
    out = sapo(SAPO_R.log(), torch.zeros(3), SAPO_ADV)
    # -(4/tau) sigmoid(tau (r - 1)) A: tau = 1 for A > 0, 1.05 for A < 0
    assert close(out.token_loss, [-2.0, -2.489837, 1.415938])
    assert close(out.ratio, [1.0, 1.5, 0.5]) and not out.clipped.any()
    # -4 sigma (1 - sigma) r A: exactly GRPO's -A at r = 1
    assert close(grad_of(sapo, SAPO_R.log(), torch.zeros(3), SAPO_ADV), [-1.0, -1.410022, 0.467070])
    same_tau = sapo(SAPO_R.log(), torch.zeros(3), SAPO_ADV, sapo_tau_pos=1.0, sapo_tau_neg=1.0)
    assert close(same_tau.token_loss[2], 1.510163)  # 4 sigmoid(-0.5)


# §2.16 GPG --------------------------------------------------------------------------------------------------------

def test_gpg_is_the_plain_policy_gradient():
    gpg = POLICY_LOSSES["gpg"]
    lp, old, adv = torch.tensor([-0.5, -1.2]), torch.tensor([-0.7, -1.2]), torch.tensor([2.0, -1.0])
    out = gpg(lp, old, adv)
    assert close(out.token_loss, [1.0, -1.2]) and not out.clipped.any()
    assert close(out.ratio, [math.exp(0.2), 1.0])  # reported, not used
    assert close(grad_of(gpg, lp, old, adv), [-2.0, 1.0])


def test_gpg_alpha_counts_rows_with_a_non_zero_advantage_on_a_valid_token():
    ca = algos.clip_alternatives
    adv = torch.tensor([[0.5], [-0.5], [0.0], [0.0], [0.7]])
    mask = torch.ones(5, 3)
    mask[4] = 0  # a non-zero advantage on a fully masked row carries no gradient either
    assert ca.valid_rows(adv, mask) == 2.0
    assert ca.gpg_alpha(2.0, 5.0) == pytest.approx(2.5)  # B / (B - M)
    assert ca.gpg_alpha(0.0, 8.0) == pytest.approx(20.0)  # capped at 1 / 0.05
    assert ca.gpg_alpha(1.0, 40.0, min_valid_fraction=0.01) == pytest.approx(40.0)


# §2.17 GMPO -------------------------------------------------------------------------------------------------------

GMPO_LP = torch.tensor([[0.1, 0.6, -0.5, 7.0]])  # old_logp = 0; the last column is padding with a wild value
GMPO_MASK = torch.tensor([[1.0, 1, 1, 0]])


@pytest.mark.parametrize("adv,loss,clipped,grad", [
    # A > 0: only the upper bound acts, [0.1, 0.4, -0.5] -> mean 0 -> s = 1
    (1.0, -1.0, [False, True, False, False], [-1 / 3, 0.0, -1 / 3, 0.0]),
    # A < 0: only the lower bound acts, [0.1, 0.6, -0.4] -> mean 0.1 -> s = e^0.1
    (-1.0, 1.105171, [False, False, True, False], [0.368390, 0.368390, 0.0, 0.0]),
])
def test_gmpo_worked_example(adv, loss, clipped, grad):
    gmpo = POLICY_LOSSES["gmpo"]
    out = gmpo(GMPO_LP, torch.zeros(1, 4), torch.tensor([[adv]]), GMPO_MASK)
    assert close(out.token_loss, [[loss] * 4]) and out.clipped.tolist() == [clipped]
    lp = GMPO_LP.clone().requires_grad_(True)
    g = torch.autograd.grad(gmpo(lp, torch.zeros(1, 4), torch.tensor([[adv]]), GMPO_MASK).token_loss[0, 0], lp)[0]
    assert close(g, [grad])  # token 0's loss is the whole row's: -A s / n on each unclipped token


def test_gmpo_inside_the_bounds_is_the_geometric_mean_of_the_ratios():
    r = torch.tensor([[1.1, 1.2, 0.9]])
    out = POLICY_LOSSES["gmpo"](r.log(), torch.zeros(1, 3), torch.tensor([[2.0]]))
    assert close(out.ratio, [[1.059105] * 3])  # (1.1 * 1.2 * 0.9)^(1/3) = 1.188^(1/3)
    assert close(out.token_loss, [[-2.118209] * 3]) and not out.clipped.any()


# §1.1 KL estimators -----------------------------------------------------------------------------------------------

KL_LP, KL_REF = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.5, -0.5])  # d = [0.2, -0.5, 0]


@pytest.mark.parametrize("name,value,grad", [
    ("abs", [0.2, 0.5, 0.0], [1.0, -1.0, 0.0]),
    ("k1+", [0.2, -0.5, 0.0], [0.2, -0.5, 0.0]),  # k1's value, k2's gradient d
    ("k3+", [0.018731, 0.148721, 0.0], [0.2, -0.5, 0.0]),  # k3's value, k2's gradient d
    ("k3", [0.018731, 0.148721, 0.0], [0.181269, -0.648721, 0.0]),  # 1 - e^-d
])
def test_kl_estimators_worked_example(name, value, grad):
    lp = KL_LP.clone().requires_grad_(True)
    kl = kl_estimate(name, lp, KL_REF)
    kl.sum().backward()
    assert close(kl, value) and close(lp.grad, grad)


def test_k3_clamp_keeps_the_exact_value_inside_and_a_zero_gradient_outside():
    d = torch.tensor([-3.0, 3.0, 12.0, -2.0], requires_grad=True)  # k3 = 16.09, 2.05, 11.00, 4.39
    k3 = algos.kl.kl_k3(d, torch.zeros(4), clamp=10.0)
    k3.sum().backward()
    assert close(k3, [10.0, 2.049787, 10.0, 4.389056])
    assert close(d.grad, [0.0, 1 - math.exp(-3), 0.0, 1 - math.exp(2)])
    d.grad = None
    unclamped = algos.kl.kl_k3(d, torch.zeros(4), clamp=None)  # TRL's form
    unclamped.sum().backward()
    assert close(unclamped, [16.085537, 2.049787, 11.000006, 4.389056])
    assert close(d.grad, [1 - math.exp(3), 1 - math.exp(-3), 1 - math.exp(-12), 1 - math.exp(2)])
    assert close(kl_estimate("k3", d, torch.zeros(4), clamp=5.0), [5.0, 2.049787, 5.0, 4.389056])


def test_importance_weighted_kl_multiplies_by_the_undetached_ratio():
    kl = torch.tensor([[0.5, 0.2, 0.3]])
    lp = torch.tensor([[math.log(2.0), 0.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0]])
    term = algos.kl.importance_weighted_kl(kl, lp, torch.zeros(1, 3), mask)
    term.sum().backward()
    assert close(term, [[1.0, 0.2, 0.3]])  # r = 2, 1, and 1 off the mask
    assert close(lp.grad, [[1.0, 0.2, 0.0]])  # d(k r)/dlogp = k r with k held fixed


# §1.4 aggregation -------------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2, 3, 0], [4, 0, 0, 0], [9, 9, 9, 9]])
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the third row is empty


@pytest.mark.parametrize("mode,options,expected", [
    ("token-sum", {}, 10.0),
    ("seq-mean-token-sum", {}, 5.0),  # N = 2 non-empty rows
    ("seq-mean-token-sum", {"seq_count": "all"}, 10 / 3),
    ("seq-mean-token-mean", {}, 3.0),
    ("seq-mean-token-mean", {"seq_count": "all"}, 2.0),
    ("seq-mean-token-sum-norm", {"norm_length": 4}, 2.5),
    ("seq-mean-token-sum-norm", {"norm_length": 8}, 1.25),
    ("seq-mean-token-sum-norm", {"norm_length": 4, "norm_by_seqs": True}, 1.25),
    ("seq-mean-token-sum-norm", {"norm_length": 4, "norm_by_seqs": True, "seq_count": "all"}, 10 / 12),
])
def test_aggregation_worked_example(mode, options, expected):
    assert float(aggregate_loss(LOSS, MASK, mode, **options)) == pytest.approx(expected, abs=1e-6)


def test_aggregation_rejects_an_unknown_seq_count():
    with pytest.raises(ValueError, match="nonempty"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum", seq_count="some")


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("norm_by_seqs", [False, True])
def test_aggregation_is_linear_in_its_denominators(mode, norm_by_seqs):
    # what finish_stream relies on: loss(denominators) = loss(all 1) * loss of one unit token(denominators)
    agg = dict(mode=mode, num_tokens=7.0, num_seqs=3.0, norm_length=5.0, norm_by_seqs=norm_by_seqs)
    ones = {**agg, "num_tokens": 1.0, "num_seqs": 1.0, "norm_length": 1.0}
    unit = float(aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), **agg))
    whole = float(aggregate_loss(LOSS, MASK, **agg))
    # token-mean 10/7, token-sum 10, seq-mean-token-sum 10/3, seq-mean-token-mean 6/3, -norm 10/5 or 10/15
    expected = {"token-mean": 10 / 7, "token-sum": 10.0, "seq-mean-token-sum": 10 / 3, "seq-mean-token-mean": 2.0,
                "seq-mean-token-sum-norm": 10 / 15 if norm_by_seqs else 2.0}[mode]
    assert whole == pytest.approx(expected)
    assert float(aggregate_loss(LOSS, MASK, **ones)) * unit == pytest.approx(whole)


# Config, presets, registries --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,loss", [("sapo", "sapo"), ("gpg", "gpg"), ("gmpo", "gmpo")])
def test_new_presets_pass_the_config_checks(name, loss):
    cfg = check_config(RunConfig(algorithm=AlgorithmConfig(name=name)))
    assert cfg.algorithm.loss == loss


def test_gpg_preset_is_the_papers_best_recipe():
    algo = AlgorithmConfig(name="gpg")  # F_norm = 1 (group mean only), alpha = B / (B - M), no KL
    assert (algo.advantage, algo.gpg_rescale, algo.kl_coef, algo.loss_agg) == ("dr_grpo", True, 0.0, "token-mean")


def test_new_registry_names_and_params_pass_the_config_checks():
    check_config(RunConfig(algorithm=AlgorithmConfig(kl_estimator="k3+", loss_agg="token-sum", kl_clamp=None,
                                                     kl_ratio_weighted=True, loss_agg_seq_count="all")))
    check_config(RunConfig(algorithm=AlgorithmConfig(loss="gmpo", gmpo_log_clip_high=0.3)))
    with pytest.raises(ConfigError, match="loss 'gpg' does not use \\['sapo_tau_pos'\\]"):
        check_config(RunConfig(algorithm=AlgorithmConfig(loss="gpg", sapo_tau_pos=2.0)))
    assert trainer_module.loss_params(AlgorithmConfig(loss="sapo", sapo_tau_neg=2.0)) == {
        "sapo_tau_pos": 1.0, "sapo_tau_neg": 2.0}


# Trainer wiring ---------------------------------------------------------------------------------------------------

def four_rows(vocab: int):
    """Completions of 3, 1, 2, 2 tokens with advantages 1, -0.5, 0.8, -1.2; the second row's mask is zeroed."""
    g = torch.Generator().manual_seed(0)
    rows = [Row.sampled(torch.randint(3, vocab, (3,), generator=g).tolist(),
                        torch.randint(3, vocab, (n,), generator=g).tolist(), [-1.0] * n) for n in (3, 1, 2, 2)]
    batch = build_batch(rows, torch.tensor([1.0, -0.5, 0.8, -1.2]), pad_id=2)
    batch.mask[1] = 0
    return batch


def trainer(algo: dict, max_new_tokens: int | None = 4, **kwargs) -> PolicyTrainer:
    model = build_tiny_model(len(build_char_tokenizer()), seed=3)
    return PolicyTrainer(model, TrainConfig(lr=1e-3, micro_batch_size=2), AlgorithmConfig(**algo),
                         max_new_tokens=max_new_tokens, **kwargs)


# Single pass, so r = 1 and the ppo_clip token loss is -A: on the valid rows 0, 2, 3 (n = 3, 2, 2; A = 1, 0.8, -1.2)
# sum(m * l) = -(3 * 1 + 2 * 0.8 - 2 * 1.2) = -2.2 over T = 7 tokens, N = 3 non-empty rows of 4.
@pytest.mark.parametrize("algo,expected", [
    ({"loss_agg": "token-mean"}, -2.2 / 7),
    ({"loss_agg": "token-sum"}, -2.2),
    ({"loss_agg": "seq-mean-token-sum"}, -2.2 / 3),
    ({"loss_agg": "seq-mean-token-sum", "loss_agg_seq_count": "all"}, -2.2 / 4),
    ({"loss_agg": "seq-mean-token-mean", "loss_agg_seq_count": "all"}, -(1 + 0.8 - 1.2) / 4),
    ({"loss_agg": "seq-mean-token-sum-norm"}, -2.2 / 4),  # L_norm = max_new_tokens
    ({"loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm_length": 10}, -2.2 / 10),
    ({"loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm_by_seqs": True}, -2.2 / (4 * 3)),
    ({"loss_agg": "token-mean", "gpg_rescale": True}, -2.2 / 7 * 4 / 3),  # alpha = 4 rows / 3 valid
])
def test_trainer_loss_follows_the_aggregation_options(algo, expected):
    t = trainer(algo)
    batch = four_rows(len(build_char_tokenizer()))
    assert t.step(batch)["loss"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("algo,max_new_tokens", [
    ({"loss_agg": "token-sum"}, 4),
    ({"loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm_by_seqs": True, "loss_agg_seq_count": "all"}, 4),
    ({"loss_agg": "seq-mean-token-mean", "loss_agg_seq_count": "all"}, 4),
    ({"name": "gpg"}, 4),
    ({"name": "sapo", "loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm_length": 6}, None),
    ({"name": "gmpo"}, 4),
])
def test_streamed_update_matches_step_with_the_new_options(algo, max_new_tokens):
    plain, streamed = trainer(algo, max_new_tokens), trainer(algo, max_new_tokens)
    batch = four_rows(len(build_char_tokenizer()))
    expected = plain.step(batch)
    streamed.begin_stream()
    for rows in ([0], [1, 2], [3]):
        streamed.add(batch.select(torch.tensor(rows)))
    got = streamed.finish_stream()
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(streamed.model.parameters(), plain.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True])
def test_trainer_passes_mask_clamp_and_ratio_weighting_to_the_kl_term(monkeypatch, weighted):
    seen = {"estimate": [], "weighted": 0}
    estimate, weigh = trainer_module.kl_estimate, trainer_module.importance_weighted_kl

    def spy_estimate(*args):
        seen["estimate"].append(args)
        return estimate(*args)

    def spy_weigh(*args):
        seen["weighted"] += 1
        return weigh(*args)

    monkeypatch.setattr(trainer_module, "kl_estimate", spy_estimate)
    monkeypatch.setattr(trainer_module, "importance_weighted_kl", spy_weigh)
    tok = build_char_tokenizer()
    t = trainer({"kl_coef": 0.1, "kl_clamp": 5.0, "kl_ratio_weighted": weighted, "kl_estimator": "k3+"},
                ref_model=build_tiny_model(len(tok), seed=4))
    batch = four_rows(len(tok))
    assert math.isfinite(t.step(batch)["kl"])
    masks = [args[3] for args in seen["estimate"]]
    assert torch.equal(torch.cat(masks), batch.mask) and all(args[4] == 5.0 for args in seen["estimate"])
    assert seen["weighted"] == (2 if weighted else 0)  # once per micro-batch
