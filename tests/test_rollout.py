import pytest
import torch

from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.rollout import HFEngine, SamplingParams
from rollmill.rollout.sampling import filter_top_p, sample_tokens
from rollmill.train import build_batch, completion_logprobs
from rollmill.types import Row


@pytest.fixture(scope="module")
def engine():
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=1).eval()
    return HFEngine(model, tok, batch_size=16)


def encode(engine, texts):
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    kept = torch.isfinite(filter_top_p(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]


def test_sampled_logprob_is_under_the_scaled_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tok, lp = sample_tokens(logits, temperature=0.5, top_p=0.8, draws=torch.tensor([0.37], dtype=torch.float64))
    expected = filter_top_p(logits / 0.5, 0.8).log_softmax(-1)[0, tok]
    assert torch.allclose(lp, expected)


def test_generate_shapes_groups_and_versions(engine):
    prompts = encode(engine, ["What is 1 + 2?", "Hi"])
    out = engine.generate(prompts, SamplingParams(max_new_tokens=5, n=3), seed=0)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert all(c.prompt_ids == prompts[c.prompt_index] for c in out)
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 5 for c in out)
    assert all(c.policy_version == 0 for c in out)
    assert all(lp <= 0 for c in out for lp in c.logprobs)


def test_same_seed_same_samples_and_different_seed_differs(engine):
    prompts = encode(engine, ["abc", "hello there"])
    sp = SamplingParams(max_new_tokens=8, n=4)
    a, b = engine.generate(prompts, sp, seed=3), engine.generate(prompts, sp, seed=3)
    c = engine.generate(prompts, sp, seed=4)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_batched_greedy_equals_one_by_one(engine):
    # Left padding, shared prefill and sequences leaving the batch must not change the result.
    prompts = encode(engine, ["a", "what is 3+4?", "xyz xyz"])
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, n=2)
    together = engine.generate(prompts, sp)
    alone = [c for p in prompts for c in engine.generate([p], sp)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for x, y in zip(together, alone):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


def test_stop_string_ends_completion(engine):
    prompts = encode(engine, ["1 2 3 4 5 6 7 8 9"])
    free = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    stop = free.text[2:4]
    cut = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop in cut.text
    assert cut.text == free.text[: free.text.index(stop) + len(stop)]


def test_engine_logprobs_match_trainer_recompute(engine):
    prompts = encode(engine, ["What is 2 + 2?", "Which is larger, 3 or 9?"])
    for temperature in (1.0, 0.7):
        out = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=8, n=4), seed=0)
        batch = build_batch([Row.sampled(c.prompt_ids, c.token_ids, c.logprobs) for c in out], torch.zeros(len(out)), engine.tokenizer.pad_token_id)
        with torch.no_grad():
            logp, _ = completion_logprobs(engine.model, batch, temperature=temperature)
        diff = ((logp - batch.behaviour_logprobs).abs() * batch.mask).max()
        assert diff < 1e-4, f"engine vs trainer log-prob mismatch {diff} at temperature {temperature}"


def test_update_weights_copies_foreign_state_and_sets_version(engine):
    tok = engine.tokenizer
    other = build_tiny_model(len(tok), seed=7)
    fresh = HFEngine(build_tiny_model(len(tok), seed=1), tok)
    fresh.update_weights(other.state_dict(), version=5)
    assert fresh.version == 5
    p = encode(engine, ["hello"])
    sp = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert fresh.generate(p, sp)[0].token_ids == HFEngine(other, tok).generate(p, sp)[0].token_ids
    assert fresh.generate(p, sp)[0].policy_version == 5
    with pytest.raises(ValueError, match="does not have"):
        fresh.update_weights({"lm_head.weight.typo": other.lm_head.weight}, version=6)
    with pytest.raises(ValueError, match="shape"):
        fresh.update_weights({"lm_head.weight": other.lm_head.weight[:1]}, version=6)


def test_update_weights_takes_a_subset_and_leaves_the_rest(engine):
    """An update that sends only what changed (LoRA's adapted layers) copies those tensors alone."""
    tok = engine.tokenizer
    fresh = HFEngine(build_tiny_model(len(tok), seed=1), tok)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    new = torch.full_like(before[name], 0.5)
    fresh.update_weights({name: new}, version=2)
    after = fresh.model.state_dict()
    assert torch.equal(after[name], new)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != name)
    assert fresh.version == 2


def test_empty_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_zero_mass():
    from rollmill.rollout.sampling import sample_inverse_cdf

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = sample_inverse_cdf(probs.expand(20000, -1), torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens (e.g. top-p filtered) never come up
    assert torch.allclose(freq, probs, atol=0.015)  # 3+ standard errors at n=20000


def test_inverse_cdf_sampling_across_blocks_matches_the_distribution():
    from rollmill.rollout.sampling import BLOCK, sample_inverse_cdf

    vocab, n = 2 * BLOCK + 90, 200_000  # two full blocks and a short tail
    weights = torch.rand(vocab, generator=torch.Generator().manual_seed(1))
    weights[BLOCK : 2 * BLOCK] = 0  # a whole block without mass
    weights[::7] = 0
    weights[-1] = 0
    weights[3] = 50.0  # one heavy token: blocks must not be picked uniformly
    probs = weights / weights.sum()
    draws = sample_inverse_cdf(weights.expand(n, -1), torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))  # unnormalized input
    freq = torch.bincount(draws, minlength=vocab).double() / n
    assert freq[probs == 0].sum() == 0
    tolerance = 5 * (probs.double() * (1 - probs.double()) / n).sqrt() + 1e-5
    assert ((freq - probs.double()).abs() <= tolerance).all()
