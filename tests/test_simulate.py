"""The scheduling simulator (rollmill.simulate): hand-computable cases for every policy, occupancy,
contention, determinism, and the benchmark and CLI over a synthetic record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollmill.cli import main as cli_main
from rollmill.simulate import (
    EmpiricalLengths,
    FixedLengths,
    LatencyModel,
    LogNormalLengths,
    Policy,
    Workload,
    fit_latency,
    parse_lengths,
    parse_policy,
    policy_from_settings,
    simulate,
)
from rollmill.simulate.core import Sim

ROOT = Path(__file__).resolve().parents[1]


class Cycle:
    """Prompts take the given lengths in turn; all samples of a prompt have its length."""

    def __init__(self, lengths):
        self.lengths, self.next = lengths, 0

    def prompt(self, rng):
        self.next += 1
        return self.lengths[(self.next - 1) % len(self.lengths)]

    def sample(self, prompt, n, rng):
        return [prompt] * n


class PerSample:
    """Every prompt's samples take the given lengths, in order."""

    def __init__(self, lengths):
        self.lengths = lengths

    def prompt(self, rng):
        return None

    def sample(self, prompt, n, rng):
        return self.lengths[:n]


def one_engine(prompts, group_size, batch=64, **kw):
    return Workload(prompts=prompts, group_size=group_size, engines=1, engine_batch_size=batch, **kw)


def test_sync_step_is_prefill_decode_train_and_sync():
    lat = LatencyModel(decode_a=0.5, decode_b=0.25, prefill_s_per_token=0.01, train_c0=2.0, train_c1=0.1, sync_s=0.7)
    w = one_engine(prompts=2, group_size=3, prompt_tokens=10)
    r = simulate(w, lat, FixedLengths(4), Policy("sync"), steps=3)
    # 2 prompts of 10 tokens prefilled once for their 3 samples each (0.2 s), 4 decode steps of 6 rows
    # (4 x 2.0 s), 24 tokens trained
    expected = 0.2 + 4 * (0.5 + 0.25 * 6) + 2.0 + 0.1 * 24 + 0.7
    assert r.step_s == pytest.approx(expected)
    assert r.s_per_sample == pytest.approx(expected / 6)
    assert r.learner_idle == pytest.approx(1 - (2.0 + 2.4 + 0.7) / expected)


def test_continuous_batching_and_occupancy_exact():
    lat = LatencyModel(decode_a=1.0, decode_b=1.0, train_c0=3.0)
    w = one_engine(prompts=1, group_size=2, batch=4)
    r = simulate(w, lat, PerSample([2, 5]), Policy("sync"), steps=2)
    # 2 steps of 2 rows (3 s each), then 3 steps of 1 row (2 s each): 12 s of rollout, 3 s of training
    assert r.step_s == pytest.approx(15.0)
    assert r.rows_per_step == pytest.approx((2 * 2 + 3 * 1) / 5)
    # 2 rows x 6 s + 1 row x 6 s = 18 row-seconds over 4 slots x 15 s
    assert r.occupancy == pytest.approx(18 / (4 * 15))


def test_batch_limit_queues_samples():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0)
    r = simulate(one_engine(prompts=3, group_size=2, batch=2), lat, FixedLengths(5), Policy("sync"), steps=2)
    assert r.step_s == pytest.approx(15.0)  # 6 samples, 2 at a time, 5 steps each
    assert r.occupancy == pytest.approx(1.0)


def test_redundant_samples_keep_the_first_g():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c1=1.0)
    r = simulate(one_engine(prompts=1, group_size=2), lat, PerSample([1, 100, 3]), Policy("sync", redundant=1), steps=2)
    assert r.step_s == pytest.approx(3 + (1 + 3))  # the 100-token sample is cancelled; 4 tokens trained
    # with one row the redundant sample never starts: it is cancelled while it waits
    r = simulate(one_engine(prompts=1, group_size=1, batch=1), lat, PerSample([1, 100]), Policy("sync", redundant=1),
                 steps=3)
    assert r.step_s == pytest.approx(1 + 1)
    # a cancelled row leaves the batch at once: every step is one decode step of 2 rows (3 s)
    lat = LatencyModel(decode_a=1.0, decode_b=1.0)
    r = simulate(one_engine(prompts=1, group_size=1), lat, PerSample([1, 5]), Policy("sync", redundant=1), steps=3)
    assert r.step_s == pytest.approx(3.0)


def test_async_overlaps_train_and_rollout():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=10.0)
    w = one_engine(prompts=2, group_size=2)
    assert simulate(w, lat, FixedLengths(5), Policy("sync"), steps=4).step_s == pytest.approx(15.0)
    # train-bound: rollout (5 s) hides under training (10 s)
    assert simulate(w, lat, FixedLengths(5), Policy("async", k=1), steps=6, warmup=2).step_s == pytest.approx(10.0)
    # rollout-bound: one step's samples fill the engine, so batches decode one after another (10 s) while
    # each 5 s update hides under the next batch's rollout
    w = one_engine(prompts=2, group_size=2, batch=4)
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=5.0)
    assert simulate(w, lat, FixedLengths(10), Policy("async", k=1), steps=8, warmup=3).step_s == pytest.approx(10.0)


def test_stale_groups_are_dropped_when_they_outlive_k():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=1.0)
    w = one_engine(prompts=1, group_size=1)
    lengths = [20] + [1] * 99  # only the first prompt is long: it finishes ~10 updates after it started
    r = simulate(w, lat, Cycle(lengths), Policy("async", k=1), steps=30)
    assert r.stale == 1
    assert simulate(w, lat, Cycle(lengths), Policy("async", k=30), steps=30).stale == 0


def test_tail_batching_long_rounds_and_deferrals_exact():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=1.0)
    w = one_engine(prompts=4, group_size=2)
    # 5 prompts per short round (4 x 1.25), one of every 5 is long: each short round defers exactly one
    policy = Policy("tail", prompt_factor=1.25, sample_factor=1.0)
    r = simulate(w, lat, Cycle([2, 2, 2, 2, 10]), policy, steps=10)
    assert (r.long_rounds, r.deferred) == (2, 8)
    # short rounds: 2 s of rollout + 1 s; long rounds (the 4 deferred prompts): 10 s + 1 s
    assert r.step_s == pytest.approx((8 * 3 + 2 * 11) / 10)


def test_tail_over_provisioned_samples_train_the_first_g():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c1=1.0)
    w = one_engine(prompts=1, group_size=2)
    policy = Policy("tail", prompt_factor=1.0, sample_factor=1.5)  # 3 samples, the first 2 train
    r = simulate(w, lat, PerSample([4, 1, 9]), policy, steps=3)
    assert r.step_s == pytest.approx(4 + (1 + 4))
    assert (r.long_rounds, r.deferred) == (0, 0)


@pytest.mark.parametrize("name", ["tail", "both"])
def test_every_prompt_trains_exactly_once_under_tail_batching(name):
    lat = LatencyModel(decode_a=0.01, decode_b=1e-4, train_c0=1.0, train_c1=1e-4)
    w = Workload(prompts=8, group_size=4, engines=2, engine_batch_size=16)
    sim = Sim(w, lat, LogNormalLengths(median=50, p99=2000, cap=4096, prompt_share=0.8), Policy(name), seed=3)
    r = sim.run(steps=60)
    assert r.long_rounds > 0 and r.deferred > 0
    trained = sim.trained
    assert len(trained) == len(set(trained)) == 60 * 8
    deferred = {p[0] for p in sim.driver.long}
    assert not deferred & set(trained)
    driver = sim.driver
    started = driver.round if name == "tail" else [*driver.inflight.values(), *driver.ready]
    seen = set(trained) | deferred | {g.prompt[0] for g in started}
    assert seen == set(range(max(seen) + 1))  # every prompt handed out is trained, deferred or in flight


def test_both_overlaps_rollout_with_training_and_defers_instead_of_dropping():
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=2.0)
    w = one_engine(prompts=4, group_size=2)
    policy = Policy("both", prompt_factor=1.25, sample_factor=1.0)
    r = simulate(w, lat, Cycle([2, 2, 2, 2, 2]), policy, steps=8, warmup=2)
    # every group takes 2 s and runs while the previous update trains (2 s): updates end at 4, 6, ...,
    # 18 s. Each step launches 5 groups and trains 4; the fifth would be too old for the next update, so
    # it goes to the long-prompt queue (at 6, 8, ..., 16 s: six in the measured updates 3-8), and the
    # first four make a long round (at 14 s)
    assert r.step_s == pytest.approx(2.0)
    assert (r.long_rounds, r.deferred, r.stale) == (1, 6, 0)


def test_shared_cores_contention_and_yield():
    w = one_engine(prompts=1, group_size=1, shared_cores=True)
    lat = LatencyModel(decode_a=1.0, decode_b=0.0, train_c0=4.0, contention=2.0)
    # each update overlaps one group's 2 decode steps: both run at half speed for 4 s (the learner
    # does 2 s of work), then the learner alone finishes its last 2 s
    assert simulate(w, lat, FixedLengths(2), Policy("async", k=1), steps=5, warmup=1).step_s == pytest.approx(6.0)
    alone = Workload(prompts=1, group_size=1)
    assert simulate(alone, lat, FixedLengths(2), Policy("async", k=1), steps=5, warmup=1).step_s == pytest.approx(4.0)
    # sync never overlaps the two, so contention changes nothing
    assert simulate(w, lat, FixedLengths(2), Policy("sync"), steps=3).step_s == pytest.approx(6.0)
    # yielding rollout pauses while the learner works: two groups decode together (2 s), then two
    # updates of 4 s each run while the engine waits: 10 s per 2 steps
    yields = Policy("async", k=1, rollout_yields=True)
    assert simulate(w, lat, FixedLengths(2), yields, steps=9, warmup=3).step_s == pytest.approx(5.0)


def test_deterministic_given_a_seed():
    w = Workload(prompts=16, group_size=8, engines=4, engine_batch_size=32, prompt_tokens=100)
    lat = LatencyModel(decode_a=0.01, decode_b=1e-4, prefill_s_per_token=1e-5, train_c0=1.0, train_c1=1e-4, sync_s=0.5)
    lengths = LogNormalLengths(median=100, p99=3000, cap=4096)
    for name in ("sync", "async", "tail", "both"):
        policy = parse_policy(name)
        a, b = (simulate(w, lat, lengths, policy, steps=8, seed=7) for _ in range(2))
        assert a == b
        assert simulate(w, lat, lengths, policy, steps=8, seed=8) != a


def test_empirical_groups_keep_a_prompts_lengths_together():
    import random

    lengths = EmpiricalLengths(((1, 2, 3), (100, 200, 300)))
    rng = random.Random(0)
    for _ in range(20):
        p = lengths.prompt(rng)
        drawn = lengths.sample(p, 5, rng)
        assert sorted(drawn[:3]) == sorted(lengths.groups[p])  # the recorded group first, then resampled
        assert set(drawn) <= set(lengths.groups[p])


def test_lognormal_median_and_p99():
    import random

    model = LogNormalLengths(median=1000, p99=16000, cap=10**9)
    rng = random.Random(0)
    xs = sorted(x for _ in range(4000) for x in model.sample(model.prompt(rng), 5, rng))
    assert xs[len(xs) // 2] == pytest.approx(1000, rel=0.08)
    assert xs[int(0.99 * len(xs))] == pytest.approx(16000, rel=0.2)
    capped = parse_lengths("lognormal:median=1000,p99=16000,cap=4096")
    assert max(x for _ in range(200) for x in capped.sample(capped.prompt(rng), 5, rng)) == 4096


def test_parsers():
    assert parse_policy("k2") == Policy("async", k=2)
    assert parse_policy("both") == Policy("both") == Policy("both", k=1)
    assert parse_lengths("fixed:7") == FixedLengths(7)
    with pytest.raises(ValueError):
        parse_lengths("lognormal:median=10")
    with pytest.raises(ValueError):
        Policy("async", k=0)
    settings = {"max_staleness": 1, "tail_batching": True, "prompt_factor": 1.5, "sample_factor": 1.0,
                "rollout_yields": True}
    assert policy_from_settings(settings) == Policy("both", k=1, prompt_factor=1.5, sample_factor=1.0,
                                                    rollout_yields=True)


def synthetic_record() -> dict:
    """A record of the shape `benchmarks/long_tail.py --record` writes, with made-up numbers."""
    groups = [[12, 30, 256, 40, 18, 22, 35, 60], [8, 9, 15, 11, 7, 10, 12, 9], [40, 256, 256, 120, 90, 70, 200, 60]] * 4
    modes = {}
    for name, settings, s_per_step in [
        ("sync", {"max_staleness": 0, "tail_batching": False}, 80.0),
        ("tail", {"max_staleness": 0, "tail_batching": True}, 60.0),
        ("k1", {"max_staleness": 1, "tail_batching": False, "rollout_yields": True}, 85.0),
        ("both", {"max_staleness": 1, "tail_batching": True, "rollout_yields": True}, 65.0),
    ]:
        settings = {"prompt_factor": 1.25, "sample_factor": 1.25, "rollout_yields": False, **settings}
        modes[name] = {"settings": settings, "steps": 5, "s_per_step": s_per_step,
                       "s_per_trained_sample": s_per_step / 32, "rows_per_decode_step": 12.0}
    return {
        "workload": {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 256, "prompt_tokens_mean": 60.0,
                     "engines": 1, "engine_batch_size": 64, "cores": 2},
        "groups": groups,
        "decode_step_s": [[1, 500, 32.0], [8, 300, 26.0], [20, 200, 29.0], [32, 100, 19.0]],
        "prefill_s_per_token": 0.0004,
        "train": [[32, 2000, 45.0], [32, 3000, 52.0], [32, 1500, 41.0], [32, None, 47.0]],
        "sync_s": 0.7,
        "modes": modes,
    }


def test_fit_latency_from_a_record():
    record = synthetic_record()
    lat = fit_latency(record)
    assert lat.decode_a == pytest.approx(0.06, abs=0.01) and 0.002 < lat.decode_b < 0.006
    assert lat.train_per_sample  # one update has no token count: fall back to samples
    record["train"] = [[32, 1000, 10.0], [32, 2000, 12.0]]
    lat = fit_latency(record)
    assert (lat.train_c0, lat.train_c1, lat.sync_s) == (pytest.approx(8.0), pytest.approx(0.002), 0.7)


def test_benchmark_runs_on_a_synthetic_record(tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(synthetic_record()))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulate.py"), "--measured", str(path),
                          "--seeds", "2", "--engines", "4", "--steps", "10"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    result = out.strip().splitlines()[-1]
    assert result.startswith("RESULT ")
    fields = dict(item.split("=") for item in result.split()[1:])
    assert {"calib_sync_ratio", "calib_tail_ratio", "calib_k1_ratio", "calib_both_ratio",
            "e4_rollpacker_tail_x_sync"} <= set(fields)
    assert all(float(v) > 0 for v in fields.values())


def test_cli_prints_the_prediction(capsys):
    code = cli_main(["simulate", "--policy", "tail", "--engines", "2", "--prompts", "8", "--group-size", "4",
                     "--lengths", "lognormal:median=100,p99=2000,cap=4096", "--steps", "10"])
    assert code == 0
    out = capsys.readouterr().out
    assert "s per trained sample" in out and "long rounds" in out
