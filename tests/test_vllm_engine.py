"""The vLLM engine behind rollmill's interface (run with `make test-vllm`; skipped where vllm is absent)."""

import asyncio
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from rollmill.models import build_char_tokenizer, build_tiny_model  # noqa: E402
from rollmill.rollout import SamplingParams  # noqa: E402
from rollmill.rollout.driver import EngineDriver  # noqa: E402
from rollmill.rollout.engine import Request  # noqa: E402
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


# -- request-level API: submit / step / abort with partial output --------------------------------------


def requests(tok, texts, sp, seeds=None):
    seeds = seeds or list(range(len(texts)))
    return [Request(tuple(p), sp, s, id=k) for k, (p, s) in enumerate(zip(encode(tok, texts), seeds))]


def step_until_idle(engine, limit=200):
    done = []
    for _ in range(limit):
        if not engine.busy:
            return {c.request_id: c for c in done}
        done += engine.step()
    raise AssertionError(f"engine still busy after {limit} steps")


def test_streamed_requests_finish_as_generate_and_samples_do_not_depend_on_their_batch(tok, served):
    _, engine = served
    texts = ["hello there", "abc", "a longer prompt here"]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    ref = engine.generate(encode(tok, texts), greedy)
    first, second, late = requests(tok, texts, greedy)
    engine.submit([first, second])
    done = engine.step() + engine.step()  # the first two are decoding when the third arrives
    engine.submit([late])
    by_id = {c.request_id: c for c in done} | step_until_idle(engine)
    assert [by_id[k].token_ids for k in range(3)] == [c.token_ids for c in ref]
    for k, c in enumerate(ref):
        assert by_id[k].logprobs == pytest.approx(c.logprobs, abs=1e-5)
    assert all(by_id[k].finish_reason == c.finish_reason for k, c in enumerate(ref))
    sampled = SamplingParams(temperature=1.0, max_new_tokens=10)
    alone = engine.run(requests(tok, ["what is 3+4?"], sampled, [123]))[0]
    crowd = engine.run(requests(tok, ["hello", "what is 3+4?", "x y z", "what is 3+4?"], sampled, [5, 123, 6, 7]))
    assert crowd[1].token_ids == alone.token_ids  # per-request seeds: same seed, same sample, any batch
    assert crowd[3].token_ids != alone.token_ids


def test_abort_returns_the_prefix_of_an_uninterrupted_run(tok, served):
    _, engine = served
    (req,) = requests(tok, ["continue me"], SamplingParams(temperature=0, max_new_tokens=16))
    whole = engine.run([req])[0]
    assert whole.finish_reason == "length"  # long enough that 4 steps are mid-generation
    engine.submit([req])
    for _ in range(4):
        assert engine.step() == []
    (part,) = engine.abort()
    assert part.finish_reason == "abort" and part.request_id == req.id
    assert part.token_ids == whole.token_ids[:4]
    assert part.logprobs == pytest.approx(whole.logprobs[:4], abs=1e-5)


def test_after_an_abort_the_engine_is_idle_and_the_other_requests_run_unchanged(tok, served):
    _, engine = served
    sp = SamplingParams(temperature=1.0, max_new_tokens=10)
    reqs = requests(tok, ["one", "two two", "three three three"], sp, [1, 2, 3])
    ref = engine.run(reqs)
    engine.submit(reqs[:2])
    engine.step()
    engine.submit(reqs[2:])
    stopped = engine.abort({0, 2})  # 0 is running, 2 only queued
    assert {c.request_id: len(c.token_ids) for c in stopped} == {0: 1, 2: 0}
    assert step_until_idle(engine)[1].token_ids == ref[1].token_ids
    assert not engine.busy and not engine.llm.llm_engine.has_unfinished_requests()
    engine.submit(reqs)
    engine.step()
    assert len(engine.abort()) == 3 and not engine.busy
    assert [c.token_ids for c in engine.run(reqs)] == [c.token_ids for c in ref]


def test_a_stop_string_that_began_in_the_earlier_sampled_tokens_ends_a_continuation(tok, served):
    _, engine = served
    prompt = encode(tok, ["count: ab"])[0]
    first = engine.run(requests(tok, ["count: ab"], SamplingParams(temperature=0, max_new_tokens=1)))[0]
    assert first.finish_reason == "length"  # a character, not eos
    stop = tok.decode(prompt[-1:] + first.token_ids)  # the last prompt character + the first reply character
    sp = SamplingParams(temperature=0, max_new_tokens=8, stop=(stop,))
    fresh, continued = Request(tuple(prompt), sp, 0, id="fresh"), Request(tuple(prompt), sp, 0, id="cont", offset=1)
    out = engine.run([fresh, continued])
    assert out[0].token_ids[:1] == first.token_ids and len(out[0].token_ids) > 1  # the prompt is not the reply
    assert out[1].token_ids == first.token_ids and out[1].finish_reason == "stop"


def test_update_weights_refuses_while_requests_are_in_flight(tok, served):
    model, engine = served
    engine.submit(requests(tok, ["busy"], SamplingParams(max_new_tokens=8)))
    engine.step()
    with pytest.raises(RuntimeError, match="in flight"):
        engine.update_weights(model.state_dict(), engine.version + 1)
    engine.abort()


@pytest.mark.parametrize("mode", ["continue", "finish"])
def test_a_generation_in_flight_when_weights_arrive_continues_or_finishes(tok, served, mode, monkeypatch):
    """The driver's partial rollouts on vLLM: `continue` aborts the request, loads the weights and
    continues it from its partial output; `finish` lets it end under the old weights first."""
    _, engine = served
    sp = SamplingParams(temperature=1.0, max_new_tokens=24)
    (request,) = requests(tok, ["hello there"], sp, [5])
    reference = engine.run([request])[0]
    assert reference.finish_reason == "length"  # still running when the update lands, a few steps in
    old, new = engine.version, engine.version + 1
    steps = []
    real_step = engine.step

    def counted():
        steps.append(1)
        return real_step()

    monkeypatch.setattr(engine, "step", counted)

    async def play():
        driver = EngineDriver(engine, partial=mode)
        pending = asyncio.ensure_future(driver.generate(request))
        while len(steps) < 5 and not pending.done():  # a failed engine step ends the wait too
            await asyncio.sleep(0.001)
        await driver.update_weights(tiny(tok, seed=new + 100).state_dict(), new)
        out = await pending
        await driver.close()
        return out, driver.stats

    out, stats = asyncio.run(play())
    assert engine.version == new and len(out.versions) == len(out.token_ids) == len(out.logprobs)
    if mode == "finish":
        assert out.versions == [old] * len(out.token_ids) and out.token_ids == reference.token_ids
        return
    cut = out.versions.index(new)
    assert out.versions == [old] * cut + [new] * (len(out.token_ids) - cut) and cut >= 5 and stats.continued == 1
    assert out.token_ids[:cut] == reference.token_ids[:cut]  # what was sampled before the update is kept
    assert out.logprobs[:cut] == pytest.approx(reference.logprobs[:cut], abs=1e-5)
    rest = replace(request, prompt_ids=request.prompt_ids + tuple(out.token_ids[:cut]), offset=cut,
                   sampling=replace(sp, max_new_tokens=24 - cut))
    assert engine.run([rest])[0].token_ids == out.token_ids[cut:]  # and the rest is the continuation's


# Last: the second engine's shutdown tears down vLLM's process-wide parallel state, which the
# module's engine needs for every later step.
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
