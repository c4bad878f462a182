"""Distillation (`pipeline: distill`): the divergences and DDK's update against hand-computed numbers, layer
pruning of the student, the job on tiny models (each mode moves the student toward the teacher, teacher
replies are generated once, exact resume with the DDK weights), and config errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rollmill.algos.distill import ddk_update, token_kl, topk_forward_kl
from rollmill.config import ConfigError, ModelConfig, config_from_dict
from rollmill.distill import reply_example, reply_logits
from rollmill.models import build_char_tokenizer, build_tiny_model, load_model
from rollmill.models.load import ModelLoadError, keep_layers, kept_layer_indices
from rollmill.runtime import train
from rollmill.sft import collate, token_nll
from rollmill.track import read_jsonl
from conftest import tiny_config_dict


def _logits(probs: list[list[float]], shift: float = 3.0) -> torch.Tensor:
    """Logits of these distributions, shifted by a constant (which a softmax must not notice)."""
    return torch.tensor(probs, dtype=torch.float64).log() + shift


# -- the math ------------------------------------------------------------------------------------------
def test_token_kl_matches_hand_computed_values_in_both_directions():
    p, q = _logits([[0.7, 0.2, 0.1]]), _logits([[0.4, 0.4, 0.2]], shift=-1.0)
    # KL(P||Q) = 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2);  KL(Q||P) = 0.4 ln(4/7) + 0.4 ln 2 + 0.2 ln 2
    torch.testing.assert_close(token_kl(p, q), torch.tensor([0.1837869], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(token_kl(q, p), torch.tensor([0.1920420], dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(token_kl(p, p)) == pytest.approx(0.0, abs=1e-12)


def test_topk_forward_kl_renormalises_the_teachers_top_k_and_drops_its_tail():
    teacher = _logits([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    student = _logits([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]], shift=0.0).requires_grad_(True)
    # top-2 renormalised: (0.625, 0.375) on tokens (0, 1) and on tokens (3, 2)
    # row 0: 0.625 ln(0.625/0.25) + 0.375 ln(0.375/0.25); row 1: 0.625 ln(0.625/0.4) + 0.375 ln(0.375/0.3)
    kl = topk_forward_kl(teacher, student, k=2)
    torch.testing.assert_close(kl, torch.tensor([0.7247311, 0.3626083], dtype=torch.float64), atol=1e-6, rtol=0)
    # d/d student logits = softmax(student) - renormalised teacher (0 outside the top k): the tail is pushed down
    kl[0].backward()
    torch.testing.assert_close(student.grad[0], torch.tensor([-0.375, -0.125, 0.25, 0.25], dtype=torch.float64))
    # with k at least the vocabulary it is the exact forward KL
    torch.testing.assert_close(topk_forward_kl(teacher, student.detach(), k=10), token_kl(teacher, student.detach()))


def test_ddk_update_moves_weights_toward_positive_gaps_with_smoothing():
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    gaps = torch.tensor([0.6, 0.2, -0.1], dtype=torch.float64)
    # normalised positive gaps (0.75, 0.25, 0); new = 0.5 * old + 0.5 * that
    torch.testing.assert_close(ddk_update(weights, gaps, 0.5), torch.tensor([0.625, 0.275, 0.1], dtype=torch.float64))
    torch.testing.assert_close(ddk_update(weights, gaps, 1.0), torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ddk_update(weights, -gaps.abs(), 0.5), weights)  # no positive gap: unchanged
    with pytest.raises(ValueError, match="alpha must be in"):
        ddk_update(weights, gaps, 0.0)


# -- the student: a layer subset ------------------------------------------------------------------------
def test_kept_layers_are_evenly_spaced_with_first_and_last():
    assert kept_layer_indices(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert kept_layer_indices(4, 2) == [0, 3]
    assert kept_layer_indices(5, 3) == [0, 2, 4]
    assert kept_layer_indices(3, 1) == [0]
    assert kept_layer_indices(3, 3) == [0, 1, 2]
    with pytest.raises(ModelLoadError, match="model.keep_layers=5: the model has 4 decoder layers"):
        kept_layer_indices(4, 5)


def test_a_pruned_model_keeps_the_chosen_layers_embeddings_and_head_and_reloads(tmp_path):
    tok = build_char_tokenizer()
    full = build_tiny_model(len(tok), num_layers=4, seed=3, eos_token_id=tok.eos_token_id)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    pruned = keep_layers(full, 2)
    state = pruned.state_dict()
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in state)
    for name, value in state.items():  # layer 1 of the pruned model is layer 3 of the full one
        source = name.replace("model.layers.1.", "model.layers.3.")
        assert torch.equal(value, before[source]), name
    assert pruned.get_output_embeddings().weight.data_ptr() == pruned.get_input_embeddings().weight.data_ptr()
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]  # KV cache slots renumbered
    ids = torch.tensor([tok("<|im_start|>user\n1+2=", add_special_tokens=False)["input_ids"]])
    greedy = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)  # uses the cache
    pruned.save_pretrained(tmp_path / "pruned")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert again.config.num_hidden_layers == 2
    torch.testing.assert_close(again(ids).logits, pruned(ids).logits)
    assert torch.equal(again.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id), greedy)


def test_load_model_applies_keep_layers():
    model, _ = load_model(ModelConfig(source="tiny", tiny={"num_layers": 4}, keep_layers=3))
    assert len(model.model.layers) == 3


def test_reply_logits_read_the_reply_tokens_that_token_nll_scores():
    model = build_tiny_model(100, seed=1)
    examples = [reply_example([5, 6, 7], [8, 9]), reply_example([10, 11], [12, 13, 14])]
    batch = collate([examples], pad_id=2)
    with torch.no_grad():
        logits, labels = reply_logits(model, batch)
        assert labels.tolist() == [8, 9, 12, 13, 14]
        torch.testing.assert_close(F.cross_entropy(logits, labels, reduction="none"), token_nll(model, batch))


# -- the job on tiny models -----------------------------------------------------------------------------
def _teacher_dir(tmp_path, extra_token: bool = False):
    """A tiny 3-layer teacher folder whose final norm is scaled up, so its next-token distributions are sharp
    (a random model's are nearly uniform, and any student is close to those already)."""
    tok = build_char_tokenizer()
    if extra_token:
        tok.add_tokens(["<extra>"])
    model = build_tiny_model(len(tok), num_layers=3, seed=1, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    path = tmp_path / ("teacher-extra" if extra_token else "teacher")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _distill_cfg(tmp_path, distill=None, **sections):
    teacher = {"source": "hf_dir", "path": str(_teacher_dir(tmp_path))}
    data = tiny_config_dict(tmp_path, model={"keep_layers": 1}, **sections)
    data["distill"] = {"teacher": teacher, **(distill or {})}
    return config_from_dict({**data, "name": "tiny-distill", "pipeline": "distill"})


@pytest.mark.parametrize("mode", ["forward_kl", "reverse_kl", "sft"])
def test_each_mode_moves_the_student_toward_the_teacher(tmp_path, mode):
    cfg = _distill_cfg(tmp_path, {"mode": mode}, train={"steps": 6, "lr": 1e-2},
                       eval={"every": 0, "before": True}, checkpoint={"every": 0})
    result = train(cfg, tmp_path / "run")
    before, after = result.eval_before, result.eval_after
    assert after["eval/kl"] < 0.7 * before["eval/kl"]
    assert after["eval/loss"] < before["eval/loss"]
    assert after["eval/teacher_loss"] == pytest.approx(before["eval/teacher_loss"])  # the teacher never trains
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 6 and all(r["tokens"] > 0 and math.isfinite(r["loss"]) for r in records)
    assert {"eval/accuracy", "eval/teacher_accuracy"} <= after.keys()


def test_teacher_replies_are_generated_once_per_prompt(tmp_path):
    cfg = _distill_cfg(tmp_path, {"mode": "sft"}, task={"train_size": 4}, train={"steps": 4},
                       eval={"every": 0, "before": False})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # 2 prompts a step, 4 replies each: the second epoch over the 4 prompts reuses the first one's replies
    assert [r["distill/teacher_replies_new"] for r in records] == [8, 8, 0, 0]
    kept = json.loads((tmp_path / "run" / "checkpoints" / "step_000004" / "teacher_replies.json").read_text())
    assert sorted(k for k in kept if k.startswith("train/")) == ["train/0", "train/1", "train/2", "train/3"]
    assert all(len(replies) == 4 for key, replies in kept.items() if key.startswith("train/"))


def test_ddk_weights_follow_the_gaps_and_resume_exactly(tmp_path, straight_and_resumed):
    mix = [{"source": "arithmetic", "name": "add_1digit", "train_size": 16, "eval_size": 4},
           {"source": "arithmetic", "name": "larger_of_two", "train_size": 16, "eval_size": 4, "weight": 3.0}]
    cfg = _distill_cfg(tmp_path, {"mode": "forward_kl", "ddk_every": 1, "ddk_alpha": 0.5}, task={"mix": mix},
                       train={"steps": 4, "lr": 1e-2})
    straight, resumed = straight_and_resumed(cfg)
    assert straight == resumed
    steps = [r for r in straight if "loss" in r]
    labels = ["add_1digit", "larger_of_two"]
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)  # task.mix's weights, normalised
    for record in steps:
        gaps = torch.tensor([record[f"ddk/gap/{d}"] for d in labels], dtype=torch.float64)
        weights = ddk_update(weights, gaps, 0.5)
        assert [record[f"ddk/weight/{d}"] for d in labels] == pytest.approx(weights.tolist())
        assert sum(record[f"distill/prompts/{d}"] for d in labels) == 2
    last = straight[-1]
    assert {f"eval/accuracy/{d}" for d in labels} | {f"eval/kl/{d}" for d in labels} <= last.keys()
    # the gap DDK uses is the held-out KL the eval reports at the same weights
    assert steps[2][f"ddk/gap/{labels[0]}"] == pytest.approx(straight[2][f"eval/kl/{labels[0]}"])
    assert (tmp_path / "straight" / "ddk_weights.png").is_file()
    saved = json.loads((tmp_path / "split" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert saved["ddk_weights"] == pytest.approx(weights.tolist())


# -- config errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"distill": {"teacher": None}}, "pipeline 'distill' needs distill.teacher"),
    ({"distill": {"mode": "kd"}}, "distill.mode = 'kd'"),
    ({"distill": {"top_k": 0}}, "distill.top_k"),
    ({"distill": {"ddk_alpha": 0}}, "distill.ddk_alpha"),
    ({"distill": {"ddk_every": 5}}, "distill.ddk_every=5 weighs domains, the sources of task.mix"),
    ({"distill": {"teacher": {"source": "tiny", "lora": {"rank": 4}}}}, "distill.teacher.lora"),
    ({"distill": {"temperature": 2.0}}, "unknown key 'distill.temperature'"),
    ({"runtime": {"backend": "ray"}}, "runtime.backend must be 'local'"),
    ({"model": {"keep_layers": 0}}, "model.keep_layers"),
    ({"algorithm": {"kl_coef": 0.1}}, "pipeline 'distill' does not use it (set here: algorithm.kl_coef"),
])
def test_distill_config_errors_name_the_key(tmp_path, change, message):
    data = {**tiny_config_dict(tmp_path), "pipeline": "distill", "distill": {"teacher": {"source": "tiny"}}}
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(data)


def test_a_distill_section_on_another_pipeline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="applies only to pipeline 'distill'"):
        config_from_dict(tiny_config_dict(tmp_path, distill={"mode": "sft"}))


def test_a_teacher_with_another_vocabulary_is_refused_before_any_model_loads(tmp_path):
    cfg = _distill_cfg(tmp_path)
    other = cfg.distill.model_copy(update={"teacher": ModelConfig(source="hf_dir",
                                                                  path=str(_teacher_dir(tmp_path, extra_token=True)))})
    with pytest.raises(ConfigError, match=r"distill.teacher \(source 'hf_dir'\) has a tokenizer of 101 tokens that is "
                                          r"not the student's \(100 tokens"):
        train(cfg.model_copy(update={"distill": other}), tmp_path / "run")
    missing = cfg.distill.model_copy(update={"teacher": ModelConfig(source="hf_dir", path=str(tmp_path / "nowhere"))})
    with pytest.raises(ConfigError, match="distill.teacher.path = .*does not exist"):
        train(cfg.model_copy(update={"distill": missing}), tmp_path / "run2")
