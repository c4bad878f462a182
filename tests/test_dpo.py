"""DPO (pipeline: dpo): on the policy's own samples (verifier-picked pairs, a preference step, the run) and on
a preference file (reply masks, bad rows, the cached reference, held-out metrics, exact resume)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_dict

from rollmill.algos.preference import preference_loss
from rollmill.config import (AlgorithmConfig, ConfigError, TaskConfig, TinyModelConfig, TrainConfig, config_from_dict,
                             load_config)
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.pipelines.common import encode_prompt
from rollmill.runtime import dpo_offline, train
from rollmill.runtime.loop import check_run_dir
from rollmill.tasks import DataError, Example
from rollmill.track import read_jsonl
from rollmill.track.metrics import REFERENCE_CACHE
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.preference import pair_batch, preference_metrics, preference_step, verified_pairs
from rollmill.train.trainer import PolicyTrainer
from rollmill.types import Row, Trajectory, Turn

ROOT = Path(__file__).parent.parent


def traj(group: int, index: int, reward: float, failed: bool = False, reply=(5, 6, 7)) -> Trajectory:
    """An RLVR sample: one row, one turn carrying its score."""
    turn = Turn("reply", "reply", "", reward, None, None, False, 0, "stop")
    return Trajectory(group, index, 0, rows=[Row.sampled([3, 4], list(reply), [-1.0] * len(reply))], turns=[turn],
                      failed=failed)


def test_pairs_match_best_with_worst_in_sample_order():
    groups = [[traj(0, 0, 1.0), traj(0, 1, 0.0), traj(0, 2, 1.0), traj(0, 3, 0.0), traj(0, 4, 0.5)],
              [traj(1, 0, 1.0), traj(1, 1, 1.0)],  # no spread: nothing to prefer
              [traj(2, 0, 1.0), traj(2, 1, 0.0, failed=True)],  # a failed score says nothing
              [traj(3, 0, 0.2), traj(3, 1, 0.7), traj(3, 2, 0.2)]]
    pairs = verified_pairs(groups, per_group=2)
    assert [(c.group_id, c.index, r.index) for c, r in pairs] == [(0, 0, 1), (0, 2, 3), (3, 1, 0)]
    assert len(verified_pairs(groups, per_group=1)) == 2


def test_a_preference_step_moves_chosen_up_and_rejected_down():
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=2)
    ref = build_tiny_model(len(tok), seed=2).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    replies = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 3, 5, 2, 3, 4)]
    pairs = [(traj(k, 0, 1.0, reply=replies[2 * k]), traj(k, 1, 0.0, reply=replies[2 * k + 1])) for k in range(3)]
    batch = pair_batch([(c.rows[0], r.rows[0]) for c, r in pairs], pad_id=2)
    trainer = PolicyTrainer(model, TrainConfig(lr=5e-3), AlgorithmConfig(), ref_model=ref)

    def seq_logps():  # (chosen, rejected) sums: pair_batch puts a pair's replies in rows 2i and 2i + 1
        with torch.no_grad():
            sums = (completion_logprobs(model, batch)[0] * batch.mask).sum(-1)
        return sums[0::2], sums[1::2]

    before_c, before_r = seq_logps()
    first = preference_step(trainer, batch, "sigmoid", beta=0.5, label_smoothing=0.0, micro_pairs=2)
    # policy == reference at the start: every margin is 0, so the loss is log 2 and the rewards 0
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5) and first["dpo/reward_margin"] == pytest.approx(0, abs=1e-6)
    assert first["dpo/pairs"] == 3 and first["grad_norm"] > 0
    after_c, after_r = seq_logps()
    assert (after_c - before_c).sum() > 0 and (after_r - before_r).sum() < 0
    second = preference_step(trainer, batch, "sigmoid", beta=0.5, label_smoothing=0.0, micro_pairs=3)
    assert second["dpo/loss"] < first["dpo/loss"] and second["dpo/reward_margin"] > 0


def test_several_epochs_on_a_step_score_the_reference_once():
    tok = build_char_tokenizer()
    model, ref = build_tiny_model(len(tok), seed=3), build_tiny_model(len(tok), seed=3).requires_grad_(False)
    pairs = [(traj(k, 0, 1.0, reply=(5 + k, 6)).rows[0], traj(k, 1, 0.0, reply=(9, 8, 7 + k)).rows[0])
             for k in range(4)]
    batch = pair_batch(pairs, pad_id=2)
    trainer = PolicyTrainer(model, TrainConfig(lr=5e-3, micro_batch_size=8), AlgorithmConfig(), ref_model=ref)
    ref_rows = []
    # completion_logprobs runs the model body, then projects only the positions it needs
    ref.base_model.register_forward_hook(lambda m, args, kwargs, out: ref_rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    out = preference_step(trainer, batch, "dpo_norm", beta=0.5, label_smoothing=0.0, micro_pairs=2, epochs=3)
    assert len(ref_rows) == 1  # one forward of the reference over the 8 replies, not one per epoch
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 3  # three optimizer steps on them
    assert out["dpo/loss"] < math.log(2)  # the mean over epochs: the later ones have learned


def dpo_config(tmp_path, **sections):
    return config_from_dict({**tiny_config_dict(tmp_path, **sections), "pipeline": "dpo"})


def test_a_dpo_run_trains_on_its_own_verified_pairs(tmp_path):
    cfg = dpo_config(tmp_path, dpo={"beta": 0.2}, train={"steps": 3})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 3 and sum(r["dpo/pairs"] for r in records) > 0
    trained = [r for r in records if r["dpo/pairs"] > 0]
    assert all(math.isfinite(r["dpo/loss"]) and r["grad_norm"] > 0 for r in trained)
    assert "eval/accuracy" in records[-1] and (tmp_path / "run" / "checkpoints").is_dir()


def test_the_dpo_section_belongs_to_the_dpo_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="the dpo section applies only to pipeline 'dpo'"):
        config_from_dict(tiny_config_dict(tmp_path, dpo={"beta": 0.2}))
    with pytest.raises(ConfigError, match="dpo.loss"):
        dpo_config(tmp_path, dpo={"loss": "kto"})


def test_dpo_on_a_preference_file_refuses_an_algorithm_section_it_would_ignore(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline dpo with dpo.path does not use it \(set here: algorithm.kl_coef\)"):
        offline_config(tmp_path, algorithm={"kl_coef": 0.1})
    assert dpo_config(tmp_path, algorithm={"kl_coef": 0.1}).algorithm.kl_coef == 0.1  # on-policy DPO samples as RL does


# -- DPO on a preference file -------------------------------------------------------------------------
def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_pairs(count: int) -> list[dict]:
    """Separable pairs: the chosen reply ends in '!', the rejected one in '?' (in every form a row may take)."""
    rows = []
    for n in range(count):
        prompt = f"Echo {n}." if n % 2 else [{"role": "user", "content": f"Echo {n}."}]
        chosen = f"{n}!" if n % 3 else [{"role": "assistant", "content": f"{n}!"}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": {"role": "assistant", "content": f"{n}?"}})
    return rows


def offline_config(tmp_path, data=None, **sections):
    data = data or write_pairs(tmp_path / "pairs.jsonl", toy_pairs(40))
    dpo = {"path": data, "pairs_per_step": 8, "beta": 0.5, **sections.pop("dpo", {})}
    return dpo_config(tmp_path, dpo=dpo, task={"eval_size": 8, **sections.pop("task", {})},
                      train={"steps": 6, "lr": 3e-3, "micro_batch_size": 4, **sections.pop("train", {})}, **sections)


@pytest.fixture
def scored(monkeypatch):
    """How many pairs the reference scores, call by call."""
    calls = []
    real = dpo_offline.score_reference

    def counting(learner, splits):
        calls.append(sum(len(pairs) for pairs in splits.values()))
        return real(learner, splits)

    monkeypatch.setattr(dpo_offline, "score_reference", counting)
    return calls


def test_offline_dpo_learns_the_held_out_preference_scoring_the_reference_once(tmp_path, scored):
    cfg = offline_config(tmp_path)
    train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    before, after = records[0], records[-1]
    # policy == reference before training: every held-out margin is 0 (not above it), the loss log 2
    assert before["eval/preference_accuracy"] == 0 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["step"] == 6 and after["eval/preference_accuracy"] >= 0.875 and after["eval/reward_margin"] > 0
    assert after["eval/loss"] < before["eval/loss"] and all(r["dpo/pairs"] == 8 for r in records[1:])
    # 6 steps x 8 pairs is more than an epoch of the 32 training pairs, yet each pair was scored once
    assert records[-1]["dpo/epoch"] > 1 and scored == [32 + 8]
    cache = tmp_path / "run" / REFERENCE_CACHE
    assert cache.is_file() and (tmp_path / "run" / "checkpoints").is_dir()


def test_the_reference_cache_is_reused_and_invalidated(tmp_path, scored):
    data = tmp_path / "pairs.jsonl"
    cfg = offline_config(tmp_path, data=write_pairs(data, toy_pairs(40)))
    run = tmp_path / "run"

    def reference(config):  # what a job starting in `run` holds (the job scores or reads it as it is built)
        job = dpo_offline.DPOJob(config, run)
        job.close()
        return job.ref

    first = reference(cfg)
    assert scored == [40] and (run / REFERENCE_CACHE).is_file()
    again = reference(cfg)  # model and data unchanged: read back, the same numbers
    assert scored == [40] and all(torch.equal(first[k], again[k]) for k in ("train", "eval"))
    write_pairs(data, toy_pairs(40)[:-1] + [{"prompt": "Echo 39.", "chosen": "39!!", "rejected": "39?"}])
    changed = reference(cfg)  # one reply of the file changed (the settings did not): scored again
    assert scored == [40, 40] and not torch.equal(torch.cat([changed["train"], changed["eval"]]),
                                                  torch.cat([first["train"], first["eval"]]))
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tiny": TinyModelConfig(seed=7)})})
    reference(other)  # the same data, other initial weights: scored again
    assert scored == [40, 40, 40]
    check_run_dir(run, resume=False, overwrite=True)  # --overwrite: the cache goes with the run's other files
    assert not (run / REFERENCE_CACHE).exists()


def test_offline_resume_is_exact_and_reads_the_cache(tmp_path, straight_and_resumed, scored):
    straight, resumed = straight_and_resumed(offline_config(tmp_path, train={"steps": 4}, checkpoint={"every": 1}))
    assert straight == resumed and len(straight) == 5
    assert scored == [40, 40]  # the straight run, and the split run's first half; its resume read the cache
    cache = [(tmp_path / run / REFERENCE_CACHE).read_bytes() for run in ("straight", "split")]
    assert cache[0] == cache[1]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "dpo_norm"])
def test_cached_sums_give_the_token_level_loss(loss):
    g = torch.Generator().manual_seed(1)
    tokens = {k: -torch.rand(3, 5, generator=g) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    masks = {"chosen": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32),
             "rejected": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)}
    want = preference_loss(loss, tokens, masks, beta=0.3)

    def rows(policy: str):  # per-row sums in pair_batch's order: chosen 0, rejected 0, chosen 1, ...
        sums = [(tokens[f"{policy}{side}"] * masks[side]).sum(-1) for side in ("chosen", "rejected")]
        return torch.stack(sums, dim=1).flatten()

    counts = torch.stack([masks["chosen"].sum(-1), masks["rejected"].sum(-1)], dim=1).flatten()
    got = preference_metrics(rows(""), rows("ref_"), counts, loss, beta=0.3, label_smoothing=0.0)
    margin = want.chosen_reward - want.rejected_reward
    assert got["loss"] == pytest.approx(float(want.loss.mean()), rel=1e-6)
    assert got["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-6)
    assert got["preference_accuracy"] == float((margin > 0).float().mean())


def test_reply_masks_cover_exactly_the_reply_and_its_end_of_turn_token():
    tok = build_char_tokenizer()
    prompt = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
              {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"})
    row = dpo_offline.reply_row(tok, prompt, {"role": "assistant", "content": "It is 8."}, max_len=512)
    engine = encode_prompt(tok, Example(id="x", prompt="", answer="", messages=prompt), TaskConfig())
    assert row.prompt_ids == engine  # what the engine is given, the earlier assistant turn included, untrained
    assert [tok.convert_ids_to_tokens(i) for i in row.token_ids] == [*"It is 8.", "<|im_end|>"]
    assert row.mask == [1] * 9
    cut = dpo_offline.reply_row(tok, prompt, {"role": "assistant", "content": "It is 8."}, max_len=len(engine) + 3)
    assert cut.token_ids == row.token_ids[:3] and cut.mask == [1, 1, 1]
    assert dpo_offline.reply_row(tok, prompt, {"role": "assistant", "content": "8"}, max_len=len(engine)) is None


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi.", "chosen": "Hello."}, r"line 1: a preference row needs the fields 'prompt', 'chosen' and "
                                            r"'rejected' \(got \['chosen', 'prompt'\]\)"),
    ({"prompt": "Hi.", "chosen": "Hello.", "rejected": "  "}, "line 1: field 'rejected': the reply is empty"),
    ({"prompt": "Hi.", "chosen": [{"role": "user", "content": "Hello."}], "rejected": "Go."},
     "line 1: field 'chosen': a reply must be text, an assistant message"),
    ({"prompt": "", "chosen": "Hello.", "rejected": "Go."}, "line 1: field 'prompt' must be non-empty text"),
    ({"prompt": [{"role": "robot", "content": "Hi."}], "chosen": "A", "rejected": "B"},
     "line 1: field 'prompt': message 0 must be"),
])
def test_bad_preference_rows_are_named(tmp_path, row, message):
    path = write_pairs(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message):
        dpo_offline.read_preferences(path, "dpo.path")


def test_offline_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="dpo.eval_path belongs to training on a preference file: it needs dpo.path"):
        dpo_config(tmp_path, dpo={"eval_path": "held_out.jsonl"})
    with pytest.raises(ConfigError, match="dpo.path trains on one local process"):
        dpo_config(tmp_path, dpo={"path": "pairs.jsonl"}, runtime={"backend": "ray"})
    with pytest.raises(DataError, match=r"dpo.path = '.*missing.jsonl': file does not exist"):
        dpo_offline.load_preferences(offline_config(tmp_path, data=str(tmp_path / "missing.jsonl")))


def test_the_offline_example_runs_on_a_tiny_model_with_task_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's data path is relative to the repository root
    cfg = load_config("examples/dpo_offline.yaml", ["model.source=tiny", "train.steps=2", "eval.every=0",
                                                    "task.train_size=16", "task.eval_size=8", "log.progress=false",
                                                    f"log.run_root={tmp_path}", "log.trackers=[]"])
    train(cfg, tmp_path / "run")
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == 2 and {"eval/accuracy", "eval/preference_accuracy", "eval/reward_margin"} <= last.keys()
    assert (tmp_path / "run" / "samples.jsonl").is_file()  # the held-out replies the task eval sampled


def test_training_pairs_never_ask_a_held_out_task_question(tmp_path, caplog):
    task = TaskConfig(system_prompt="Be brief.")
    rows = dpo_offline.read_preferences(write_pairs(tmp_path / "p.jsonl", [
        {"prompt": "Is 3 odd?", "chosen": "yes", "rejected": "no"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 4 odd?"}],
         "chosen": "no", "rejected": "yes"},
        {"prompt": "Is 5 odd?", "chosen": "yes", "rejected": "no"}]), "dpo.path")
    asked = [Example(id="a", prompt="Is 4 odd?", answer="no"), Example(id="b", prompt="Is 5 odd?", answer="yes")]
    with caplog.at_level("WARNING", logger="rollmill.runtime.dpo_offline"):
        kept = dpo_offline.without_questions(rows, asked, task)
    assert [r.index for r in kept] == [0]
    assert "2 training pairs ask one of the task's held-out questions and are left out" in caplog.text
