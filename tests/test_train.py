import pytest
import torch

from rollmill.config import AlgorithmConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.train import PolicyTrainer, build_batch, completion_logprobs
from rollmill.types import Row


def completion(prompt, tokens, lps=None):
    return Row.sampled(prompt, tokens, lps or [-1.0] * len(tokens))


def test_build_batch_layout():
    batch = build_batch([completion([5, 6, 7], [8, 9]), completion([4], [3, 2, 1])], torch.tensor([1.0, -1.0]), pad_id=0)
    assert batch.prompt_width == 3 and batch.completion_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 4, 3, 2, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids[:, :6].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_build_batch_empty_completion_is_fully_masked():
    batch = build_batch([completion([5], []), completion([5], [])], torch.zeros(2), pad_id=0)
    assert batch.completion_width == 1 and batch.mask.sum() == 0
    with pytest.raises(ValueError, match="advantages"):
        build_batch([completion([5], [1])], torch.zeros(2), pad_id=0)


def random_batch(vocab, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    comps = []
    for i in range(n):
        p = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        comps.append(completion(p, c))
    adv = torch.randn(n, generator=g)
    return build_batch(comps, adv, pad_id=2)


def trained_weights(micro: int, agg: str, epochs: int = 1, mini=None):
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=3)
    trainer = PolicyTrainer(
        model, TrainConfig(lr=1e-2, micro_batch_size=micro, ppo_epochs=epochs, mini_batch_size=mini),
        AlgorithmConfig(loss_agg=agg),
    )
    metrics = trainer.step(random_batch(len(tok)))
    return model, metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_update(agg):
    whole, m1 = trained_weights(micro=6, agg=agg)
    split, m2 = trained_weights(micro=1, agg=agg)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
    # compare gradients, not Adam's sign-like first update (which amplifies float noise near 0)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


def test_step_changes_weights_and_reports_finite_metrics():
    tok = build_char_tokenizer()
    before = {k: v.clone() for k, v in build_tiny_model(len(tok), seed=3).state_dict().items()}
    model, metrics = trained_weights(micro=2, agg="token-mean", epochs=2, mini=3)
    changed = sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed > 0
    for key in ("loss", "entropy", "clip_fraction", "grad_norm", "approx_kl", "lr"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    # later mini-batches see a moved policy: the ratio leaves 1 and some tokens clip at lr 1e-2
    assert metrics["approx_kl"] > 0


def test_kl_to_reference_is_reported_and_penalized():
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=3)
    ref = build_tiny_model(len(tok), seed=4).requires_grad_(False)
    trainer = PolicyTrainer(model, TrainConfig(lr=1e-2), AlgorithmConfig(kl_coef=0.5), ref_model=ref)
    metrics = trainer.step(random_batch(len(tok)))
    assert metrics["kl"] > 0


def tiny_gemma2(vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


# gemma2: eager attention adds the mask to the scores, and its head soft-caps the logits
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_logprobs_and_grads_match_one_plain_forward_per_row(arch):
    # rows sharing a prompt are packed into one sequence; padding is never computed
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=3, num_kv_heads=2) if arch == "llama" else tiny_gemma2(len(tok))
    prompts = [[5, 6, 7], [5, 6, 7], [9, 8], [5, 6, 7], [9, 8], [4]]
    comps = [completion(p, [10 + i, 11, 12 + i, 13][: 1 + i % 4]) for i, p in enumerate(prompts)]
    comps.append(completion([4, 4], []))  # an empty completion: all padding, log-prob 0
    batch = build_batch(comps, torch.ones(len(comps)), pad_id=2)
    packed, entropy = completion_logprobs(model, batch, temperature=0.7, with_entropy=True)
    reference = torch.zeros_like(packed)
    ref_entropy = torch.zeros_like(packed)
    for r, c in enumerate(comps):
        n = len(c.token_ids)
        if n:
            logits = model(torch.tensor([c.prompt_ids + c.token_ids])).logits[0, len(c.prompt_ids) - 1 : -1] / 0.7
            reference[r, :n] = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            ref_entropy[r, :n] = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).detach()
    assert torch.allclose(packed, reference, atol=1e-5)
    assert torch.allclose(entropy, ref_entropy, atol=1e-5)
    assert packed[-1].abs().sum() == 0
    params = list(model.parameters())
    for g1, g2 in zip(torch.autograd.grad(packed.sum(), params), torch.autograd.grad(reference.sum(), params)):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_truncated_is_and_mismatch_filter_use_behaviour_logprobs():
    tok = build_char_tokenizer()
    batch = random_batch(len(tok))  # behaviour log-probs are all -1.0: far from the model's own
    model = build_tiny_model(len(tok), seed=3)
    trainer = PolicyTrainer(model, TrainConfig(lr=1e-2), AlgorithmConfig(mismatch_ratio_bounds=(0.5, 2.0)))
    metrics = trainer.step(batch)
    # the tiny model gives ~1/100 to each token, exp(-4.6 + 1) is far below 0.5: every token is dropped
    assert metrics["mismatch/dropped_tokens"] == float(batch.mask.sum())
    assert metrics["grad_norm"] == 0.0
    capped = PolicyTrainer(build_tiny_model(len(tok), seed=3), TrainConfig(lr=1e-2), AlgorithmConfig(tis_cap=1.0))
    plain = PolicyTrainer(build_tiny_model(len(tok), seed=3), TrainConfig(lr=1e-2), AlgorithmConfig())
    ratio = capped.step(batch)["grad_norm"] / plain.step(batch)["grad_norm"]
    assert 0 < ratio < 0.1  # weights min(exp(logp + 1), 1) ~ 0.03 scale the gradient down


def test_long_completions_split_into_several_packed_sequences(monkeypatch):
    import rollmill.train.logprobs as logprobs

    monkeypatch.setattr(logprobs, "PACK_TOKENS", 8)
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=3)
    comps = [completion([5, 6, 7], [10 + i, 11, 12, 13]) for i in range(3)]
    batch = build_batch(comps, torch.ones(3), pad_id=2)
    ids = logprobs._packed_layout(batch)[0]
    assert ids.shape[0] == 3  # 3 + 4 + 4 > 8: every completion gets its own copy of the prompt
    with torch.no_grad():
        split = completion_logprobs(model, batch)[0]
        monkeypatch.setattr(logprobs, "PACK_TOKENS", 1024)
        assert torch.allclose(split, completion_logprobs(model, batch)[0], atol=1e-5)


def test_truncated_is_in_a_single_pass_costs_no_extra_forward(monkeypatch):
    """TIS weights need the pre-update log-probs, which a single pass already holds (detached): the
    trainer must not recompute them in a separate forward, and must use them (weights below 1 bite)."""
    import rollmill.train.trainer as trainer_module

    tok = build_char_tokenizer()
    calls = []
    forward = trainer_module.completion_logprobs

    def counted(*args, **kwargs):
        calls.append(kwargs.get("with_entropy", False))
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "completion_logprobs", counted)
    losses = {}
    for cap in (None, 0.5):
        model = build_tiny_model(len(tok), seed=0)
        batch = random_batch(len(tok))
        batch.behaviour_logprobs = batch.behaviour_logprobs * 0 - 0.01  # the engine was far more confident
        calls.clear()
        trainer = PolicyTrainer(model, TrainConfig(micro_batch_size=3), AlgorithmConfig(tis_cap=cap))
        losses[cap] = trainer.step(batch)["loss"]
        assert calls == [True, True]  # two micro-batches of the update, no separate old-log-prob forward
    assert losses[0.5] != losses[None]
