"""The vLLM engine behind rollmill's interface (run with `make test-vllm`; skipped where vllm is absent)."""

import pytest

pytest.importorskip("vllm")

from rollmill.models import build_char_tokenizer, build_tiny_model  # noqa: E402
from rollmill.rollout import SamplingParams  # noqa: E402
from rollmill.rollout.vllm import VLLMEngine  # noqa: E402
from rollmill.train import engine_logprob_gap  # noqa: E402

pytestmark = pytest.mark.vllm


def tiny(tok, seed):
    # head_dim 64: vLLM's CPU attention kernels do not take the default tiny model's 16
    return build_tiny_model(len(tok), hidden_size=128, num_heads=2, num_kv_heads=1, seed=seed).eval()


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    model = tiny(tok, seed=1)
    return model, VLLMEngine.from_model(model, tok, kv_cache_gib=1)


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_generate_orders_samples_by_prompt_and_reports_finish(tok, served):
    _, engine = served
    prompts = encode(tok, ["hello there", "abc"])
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, n=3), seed=0)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 6 and c.finish_reason in ("stop", "length") for c in out)
    again = engine.generate(prompts, SamplingParams(max_new_tokens=6, n=3), seed=0)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_the_trainer(tok, served, temperature):
    model, engine = served
    prompts = encode(tok, ["What is 2 + 2?", "Which is larger, 3 or 9?", "x"])
    out = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, n=4), seed=1)
    gap = engine_logprob_gap(model, out, tok.pad_token_id, temperature=temperature)
    mean, peak = gap["mean"], gap["max"]
    print(f"vllm vs trainer at temperature {temperature}: mean {mean:.2e} max {peak:.2e}")
    assert mean < 1e-4 and peak < 1e-3


def test_weight_update_then_generate_equals_a_fresh_engine(tok, served):
    _, engine = served
    new = tiny(tok, seed=7)
    prompts = encode(tok, ["hello", "a longer prompt"])
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, n=2)
    engine.generate(prompts, sp, seed=3)  # fills vLLM's prefix cache with old-weight K/V
    engine.update_weights(new.state_dict(), version=4)
    fresh = VLLMEngine.from_model(new, tok, kv_cache_gib=1, version=4)
    a, b = engine.generate(prompts, sp, seed=3), fresh.generate(prompts, sp, seed=3)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(c.policy_version == 4 for c in a)
