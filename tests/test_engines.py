"""The fast engine's parts (decoder, caches, continuous batching, prefix reuse), engine selection,
weight sync and the train/inference consistency check."""

import logging
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from rollmill.config import RolloutConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.rollout import GenericHFEngine, HFEngine, SamplingParams, WeightSyncError, build_engine, sync_weights
from rollmill.rollout.decoder import Decoder
from rollmill.rollout.kv import PrefixStore
from rollmill.train import build_batch, engine_logprob_gap
from rollmill.train.consistency import LogprobMismatchError, check_logprob_gap
from rollmill.types import Row


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def gqa_model(tok):
    return build_tiny_model(len(tok), num_heads=4, num_kv_heads=2, seed=3).eval()


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def tiny_qwen2(vocab):
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2"])
def test_decoder_prefill_and_decode_match_the_transformers_forward(tok, gqa_model, arch):
    model = gqa_model if arch == "llama_gqa" else tiny_qwen2(len(tok))
    decoder = Decoder(model)
    kv = decoder.new_cache(slots=5, capacity=40)
    kv.k.fill_(float("nan"))  # what fresh memory may hold: masked-but-read positions must be cleaned first
    kv.v.fill_(float("nan"))
    ids = torch.randint(3, 90, (3, 12))
    lengths = torch.tensor([12, 5, 9])
    rows = [4, 1, 2]  # not contiguous: the gather path
    logits = decoder.forward(kv, rows, ids, torch.zeros(3, dtype=torch.long), lengths - 1)
    nxt = torch.randint(3, 90, (3, 1))
    step = decoder.forward(kv, rows, nxt, lengths, torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        for b in range(3):
            prompt = ids[b : b + 1, : lengths[b]]
            assert torch.allclose(logits[b], model(prompt).logits[0, -1], atol=1e-5)
            assert torch.allclose(step[b], model(torch.cat([prompt, nxt[b : b + 1]], 1)).logits[0, -1], atol=1e-5)


def test_decoder_continues_a_row_from_its_cached_prefix(tok, gqa_model):
    decoder = Decoder(gqa_model)
    kv = decoder.new_cache(slots=2, capacity=32)
    ids = torch.randint(3, 90, (1, 10))
    decoder.forward(kv, [0], ids[:, :6], torch.tensor([0]), torch.tensor([5]))
    fresh = decoder.new_cache(slots=2, capacity=32)  # a prefix moves into a cache that never saw it
    fresh.k.fill_(float("nan"))
    fresh.v.fill_(float("nan"))
    fresh.load(1, kv.export(0, 6))
    rest = decoder.forward(fresh, [1], ids[:, 6:], torch.tensor([6]), torch.tensor([3]))
    with torch.no_grad():
        assert torch.allclose(rest[0], gqa_model(ids).logits[0, -1], atol=1e-5)


def test_prefix_store_finds_the_longest_stored_prefix_and_evicts_lru():
    kv = lambda n: torch.zeros(2, 1, 1, n, 4)  # noqa: E731  [2, layers, heads, n, dim]: 32 bytes per token
    store = PrefixStore(max_bytes=32 * 10)
    store.put([1, 2, 3], kv(3))
    store.put([1, 2, 3, 4, 5], kv(5))
    assert store.longest_prefix([1, 2, 3, 4, 5, 6], limit=6)[0] == 5
    assert store.longest_prefix([1, 2, 3, 4, 5, 6], limit=4)[0] == 3  # a row must keep tokens to feed
    assert store.longest_prefix([1, 2, 9], limit=3)[0] == 0
    store.longest_prefix([1, 2, 3, 7], limit=4)  # touch [1, 2, 3]: now the most recently used
    store.put([7, 8, 9], kv(3))  # 11 tokens > 10: the least recently used entry goes
    assert store.longest_prefix([1, 2, 3, 4, 5, 6], limit=6)[0] == 3
    assert store.nbytes == 32 * 6 and len(store) == 2
    store.clear()
    assert store.longest_prefix([1, 2, 3, 4], limit=4) == (0, None) and store.nbytes == 0


def test_continuous_batching_gives_the_results_of_one_sequence_at_a_time(tok, gqa_model):
    # 3 prompts x 3 samples through 4 rows: groups wait, finished rows are refilled and packed
    prompts = encode(tok, ["abc", "what is 3+4?", "xyz xyz x"])
    sp = SamplingParams(temperature=0.0, max_new_tokens=14, n=3, stop=("ccc", "xxxxx"))  # greedy repeats the last char
    packed = HFEngine(gqa_model, tok, batch_size=4, prefix_cache_mb=0).generate(prompts, sp)
    alone = HFEngine(gqa_model, tok, batch_size=1, prefix_cache_mb=0)
    reference = [c for p in prompts for c in alone.generate([p], sp)]
    assert len({len(c.token_ids) for c in packed}) > 1, "rows should finish at different times"
    assert [c.prompt_index for c in packed] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in packed] == [c.token_ids for c in reference]
    assert [c.finish_reason for c in packed] == [c.finish_reason for c in reference]
    for x, y in zip(packed, reference):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_identical_prompts_are_prefilled_once(tok, gqa_model):
    engine = HFEngine(gqa_model, tok, prefix_cache_mb=0)
    prompt = encode(tok, ["the same start of an episode"])[0]
    out = engine.generate([prompt] * 4, SamplingParams(max_new_tokens=5, n=2), seed=0)
    assert engine.stats.prefill_tokens == len(prompt)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_next_turn_reuses_the_cached_conversation_and_matches_a_full_prefill(tok, gqa_model):
    cached = HFEngine(gqa_model, tok, prefix_cache_mb=64)
    plain = HFEngine(gqa_model, tok, prefix_cache_mb=0)
    contexts = encode(tok, ["turn one: hello", "another episode"])
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    for turn in range(3):
        a, b = cached.generate(contexts, sp), plain.generate(contexts, sp)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)
        observation = encode(tok, [f" obs {turn}: " + "ok. " * 30])[0]  # long: the cache regrows past 256
        contexts = [ctx + c.token_ids + observation for ctx, c in zip(contexts, a)]
    assert cached._kv.capacity > 256  # a reused prefix was loaded into a regrown cache
    # each later turn prefilled only the last reply token and the observation
    assert cached.stats.prefill_tokens + cached.stats.reused_tokens == plain.stats.prefill_tokens
    assert cached.stats.reused_tokens > 2 * len(observation)


def test_weight_update_then_generate_equals_a_fresh_engine_with_those_weights(tok):
    old = build_tiny_model(len(tok), num_kv_heads=2, seed=3).eval()
    new_weights = build_tiny_model(len(tok), num_kv_heads=2, seed=11).state_dict()
    updated = HFEngine(old, tok)
    prompts = encode(tok, ["hello", "a longer prompt here"])
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, n=2)
    first = updated.generate(prompts, sp, seed=5)  # fills the prefix store with old-weight K/V
    continued = [p + c.token_ids for p, c in zip(prompts, first[::2])]
    updated.update_weights(new_weights, version=1)
    fresh = HFEngine(build_tiny_model(len(tok), num_kv_heads=2, seed=11).eval(), tok, version=1)
    for batch in (prompts, continued):  # `continued` would hit stale K/V if the update kept them
        a, b = updated.generate(batch, sp, seed=9), fresh.generate(batch, sp, seed=9)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.logprobs for c in a] == [c.logprobs for c in b]
        assert all(c.policy_version == 1 for c in a)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fast_engine_logprobs_match_the_trainer(tok, gqa_model, temperature):
    engine = HFEngine(gqa_model, tok)
    prompts = encode(tok, ["What is 2 + 2?", "Which is larger, 3 or 9?", "x"])
    out = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, n=3), seed=0)
    gap = engine_logprob_gap(gqa_model, out, tok.pad_token_id, temperature=temperature)
    mean, peak = gap["mean"], gap["max"]
    assert peak < 1e-4 and mean < 1e-5


def test_build_engine_picks_fast_generic_and_falls_back(tok, gqa_model):
    assert isinstance(build_engine(RolloutConfig(), gqa_model, tok), HFEngine)
    assert isinstance(build_engine(RolloutConfig(engine="hf_generic"), gqa_model, tok), GenericHFEngine)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    engine = build_engine(RolloutConfig(), gpt2, tok)
    assert isinstance(engine, GenericHFEngine)
    assert len(engine.generate(encode(tok, ["hi"]), SamplingParams(max_new_tokens=3), seed=0)[0].token_ids) <= 3
    with pytest.raises(ValueError, match="gpt2"):
        HFEngine(gpt2, tok)


def test_bf16_engine_samples_in_bf16_and_reports_its_own_logprobs(tok, gqa_model):
    engine = build_engine(RolloutConfig(dtype="bfloat16"), gqa_model, tok)
    assert engine.decoder.dtype == torch.bfloat16 and engine.decoder.qkv[0].weight.dtype == torch.bfloat16
    prompts = encode(tok, ["What is 2 + 2?", "Which is larger, 3 or 9?"])
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, n=3), seed=0)
    assert engine._kv.k.dtype == torch.bfloat16
    gap = engine_logprob_gap(gqa_model, out, tok.pad_token_id)
    # really a different (rounded) policy, yet the same one: a bf16-sized gap, not a wrong-weights one
    assert 1e-5 < gap["mean"] < 5e-2
    fp32 = HFEngine(gqa_model, tok).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12), seed=0)
    bf16 = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12), seed=0)
    assert [c.token_ids[:3] for c in bf16] == [c.token_ids[:3] for c in fp32]


class _SlowEngine:
    name = "slow"
    version = 0

    def __init__(self, delay=None, error=None):
        self.delay, self.error = delay, error
        self.release = threading.Event()

    def update_weights(self, state, version):
        if self.error:
            raise self.error
        self.release.wait(self.delay)
        self.version = version


def test_weight_sync_times_out_loudly_naming_the_engine():
    engine = _SlowEngine(delay=30)
    with pytest.raises(WeightSyncError, match="slow engine: weight update to version 3 did not finish within 0.2s"):
        sync_weights(engine, {}, 3, timeout_s=0.2)
    engine.release.set()
    with pytest.raises(WeightSyncError, match="failed: boom") as info:
        sync_weights(_SlowEngine(error=RuntimeError("boom")), {}, 4, timeout_s=5)
    assert isinstance(info.value.__cause__, RuntimeError)
    ok = _SlowEngine(delay=0)
    sync_weights(ok, {}, 5, timeout_s=5)
    assert ok.version == 5


def test_logprob_gap_check_warns_raises_or_stays_quiet(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_logprob_gap(0.05, "hf", tolerance=1e-3, action="warn")
    assert "hf engine" in caplog.text and "1.00e-03" not in caplog.text and "5.00e-02" in caplog.text
    with pytest.raises(LogprobMismatchError, match="vllm engine"):
        check_logprob_gap(0.05, "vllm", tolerance=1e-3, action="error")
    assert not check_logprob_gap(1e-6, "hf", tolerance=1e-3, action="error")
    assert not check_logprob_gap(0.05, "hf", tolerance=1e-3, action="off")
    assert not check_logprob_gap(0.05, "hf", tolerance=1e-3, action="error", top_p=0.9)


def test_trainer_reports_the_largest_token_gap(tok, gqa_model):
    from rollmill.config import AlgorithmConfig, TrainConfig
    from rollmill.train import PolicyTrainer

    import copy

    model = copy.deepcopy(gqa_model)
    out = HFEngine(model, tok).generate(encode(tok, ["ab", "cd"]), SamplingParams(max_new_tokens=6, n=2), seed=0)
    out[1].logprobs[2] -= 0.5  # one token's engine log-prob off by 0.5
    batch = build_batch([Row.sampled(c.prompt_ids, c.token_ids, c.logprobs) for c in out], torch.tensor([1.0, -1.0, 0.5, -0.5]), tok.pad_token_id)
    metrics = PolicyTrainer(model, TrainConfig(lr=1e-6), AlgorithmConfig()).step(batch)
    assert metrics["logprob_mismatch_max"] == pytest.approx(0.5, abs=1e-4)
    tokens = sum(len(c.token_ids) for c in out)
    assert metrics["logprob_mismatch"] == pytest.approx(0.5 / tokens, abs=1e-4)


def test_shared_model_changes_reach_the_engine_only_through_update_weights(tok):
    # the single-machine default: the trainer steps the engine's own module in place
    model = build_tiny_model(len(tok), num_kv_heads=2, seed=3).eval()
    engine = HFEngine(model, tok)
    prompts = encode(tok, ["hello", "abc"])
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = [c.logprobs for c in engine.generate(prompts, sp)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert [c.logprobs for c in engine.generate(prompts, sp)] == before  # still serving version 0
    engine.update_weights(model.state_dict(), version=1)
    after = engine.generate(prompts, sp)
    assert [c.logprobs for c in after] != before and all(c.policy_version == 1 for c in after)
    assert engine_logprob_gap(model, after, tok.pad_token_id)["max"] < 1e-4


# -- request-level API: per-sample seeds, streaming, abort and continue ------------------------------


def _requests(tok, texts, sp, seeds):
    from rollmill.rollout.engine import Request

    return [Request(tuple(p), sp, s, id=k) for k, (p, s) in enumerate(zip(encode(tok, texts), seeds))]


@pytest.mark.parametrize("make", [lambda m, t: HFEngine(m, t, prefix_cache_mb=0), lambda m, t: GenericHFEngine(m, t)],
                         ids=["hf", "hf_generic"])
def test_a_sample_depends_on_its_seed_not_on_its_batch(tok, gqa_model, make):
    """Counter-based draws: the same request gives the same tokens alone, in a crowd, on either engine."""
    engine = make(gqa_model, tok)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10)
    alone = engine.run(_requests(tok, ["what is 3+4?"], sp, [123]))[0]
    crowd = engine.run(_requests(tok, ["hello", "what is 3+4?", "a much longer prompt here", "what is 3+4?"], sp,
                                 [5, 123, 6, 7]))
    assert crowd[1].token_ids == alone.token_ids
    assert crowd[3].token_ids != alone.token_ids  # same prompt, other seed
    other = HFEngine(gqa_model, tok).run(_requests(tok, ["what is 3+4?"], sp, [123]))[0]
    assert other.token_ids == alone.token_ids


def test_streamed_requests_join_a_running_batch_and_finish_with_the_same_tokens(tok, gqa_model):
    engine = HFEngine(gqa_model, tok, prefix_cache_mb=0)
    sp = SamplingParams(temperature=1.0, max_new_tokens=12)
    first, late = _requests(tok, ["first prompt", "late arrival"], sp, [1, 2])
    engine.submit([first])
    done = engine.step() + engine.step()  # first is decoding when the second arrives
    engine.submit([late])
    while engine.busy:
        done += engine.step()
    by_id = {c.request_id: c for c in done}
    ref = HFEngine(gqa_model, tok, prefix_cache_mb=0).run([first, late])
    assert [by_id[0].token_ids, by_id[1].token_ids] == [c.token_ids for c in ref]


def test_abort_returns_partial_tokens_and_a_continuation_finishes_them_identically(tok, gqa_model):
    """A partial rollout: stopped after 4 tokens, continued (prompt + partial, offset 4) by a fresh
    engine, it yields exactly the tokens an uninterrupted generation gives."""
    from dataclasses import replace

    sp = SamplingParams(temperature=1.0, max_new_tokens=12)
    (req,) = _requests(tok, ["continue me"], sp, [77])
    whole = HFEngine(gqa_model, tok).run([req])[0]
    engine = HFEngine(gqa_model, tok)
    engine.submit([req])
    for _ in range(4):
        engine.step()
    (part,) = engine.abort()
    assert part.finish_reason == "abort" and part.token_ids == whole.token_ids[:4] and not engine.busy
    rest = replace(req, prompt_ids=req.prompt_ids + tuple(part.token_ids), offset=4,
                   sampling=replace(sp, max_new_tokens=12 - 4))
    tail = HFEngine(gqa_model, tok).run([rest])[0]
    assert part.token_ids + tail.token_ids == whole.token_ids
    assert torch.allclose(torch.tensor(part.logprobs + tail.logprobs), torch.tensor(whole.logprobs), atol=1e-5)


def test_abort_of_some_rows_keeps_the_others_running_unchanged(tok, gqa_model):
    engine = HFEngine(gqa_model, tok, prefix_cache_mb=0)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10)
    reqs = _requests(tok, ["one", "two two", "three three three"], sp, [1, 2, 3])
    engine.submit(reqs)
    engine.step()
    stopped = engine.abort({0, 1})
    assert sorted(c.request_id for c in stopped) == [0, 1]
    rest = []
    while engine.busy:
        rest += engine.step()
    ref = HFEngine(gqa_model, tok, prefix_cache_mb=0).run(reqs)
    assert [c.request_id for c in rest] == [2] and rest[0].token_ids == ref[2].token_ids


def test_update_weights_refuses_while_rows_are_running(tok, gqa_model):
    engine = HFEngine(gqa_model, tok)
    engine.submit(_requests(tok, ["busy"], SamplingParams(max_new_tokens=8), [1]))
    engine.step()
    with pytest.raises(RuntimeError, match="rows running"):
        engine.update_weights(gqa_model.state_dict(), 1)


def test_driver_truncate_ends_a_tagged_request_with_the_tokens_and_logprobs_it_sampled(tok, gqa_model):
    """A time limit on the tail: `truncate` ends the tagged request at the next engine step with what it
    sampled (finish reason "length"), a prefix of the uninterrupted run; the untagged one runs on."""
    import asyncio

    from rollmill.rollout.driver import EngineDriver

    sp = SamplingParams(temperature=1.0, max_new_tokens=60)
    reqs = _requests(tok, ["the long tail", "another one"], sp, [11, 12])
    whole = HFEngine(gqa_model, tok).run(reqs)
    assert all(len(c.token_ids) > 10 for c in whole)

    async def play():
        driver = EngineDriver(HFEngine(gqa_model, tok))
        runs = [asyncio.ensure_future(driver.generate(r, tag=tag)) for r, tag in zip(reqs, ["cut", "keep"])]
        while driver.stats.steps < 5:
            await asyncio.sleep(0.005)
        driver.truncate({"cut"})
        out = await asyncio.gather(*runs)
        await driver.close()
        return out

    cut, kept = asyncio.run(play())
    assert cut.finish_reason == "length" and 5 <= len(cut.token_ids) < len(whole[0].token_ids)
    n = len(cut.token_ids)
    assert cut.token_ids == whole[0].token_ids[:n]
    assert torch.allclose(torch.tensor(cut.logprobs), torch.tensor(whole[0].logprobs[:n]), atol=1e-5)
    assert kept.token_ids == whole[1].token_ids and kept.finish_reason == whole[1].finish_reason
