"""A user's data as they have it: chat-format prompts, extra columns that reach rewards and samples,
`datasets` folders, no instruction appended to their prompts unless asked; and the example project
(its own reward file, env module and chat-format parquet) trained from YAML alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollmill.cli import main
from rollmill.config import TaskConfig
from rollmill.pipelines.common import encode_prompt
from rollmill.tasks import DataError, load_task

ROOT = Path(__file__).parent.parent
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


class RecordingTokenizer:
    """Just enough of a tokenizer to see which messages reach the chat template."""

    chat_template = "yes"

    def __init__(self):
        self.seen = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.seen.append(messages)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_prompts_and_extra_columns_from_jsonl(tmp_path):
    rows = [{"prompt": CHAT[:1] + [{"role": "user", "content": f"What is {i}+3?"}], "answer": str(i + 3), "level": i % 2}
            for i in range(6)]
    train, held_out = load_task(TaskConfig(source="file", path=write_jsonl(tmp_path / "d.jsonl", rows), eval_size=2))
    example = train[0]
    assert example.messages[0] == CHAT[0] and example.prompt == example.messages[-1]["content"]
    assert example.prompt.endswith("+3?")  # no instruction appended to a user's file by default
    assert set(example.meta) == {"level", "file", "row"}
    tokenizer = RecordingTokenizer()
    ids = encode_prompt(tokenizer, example, TaskConfig(source="file", path="x", system_prompt="ignored: the chat has one"))
    assert tokenizer.seen[-1] == list(example.messages) and ids
    encode_prompt(tokenizer, train[1], TaskConfig(source="file", path="x", instruction="Be exact."))
    asked = load_task(TaskConfig(source="file", path=str(tmp_path / "d.jsonl"), eval_size=2, instruction="Be exact."))[0]
    assert asked[0].messages[-1]["content"].endswith("+3? Be exact.")


def test_bad_chat_prompts_name_the_row(tmp_path):
    for prompt, message in [([{"role": "robot", "content": "hi"}], "message 0 must be"),
                            ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "a chat prompt must end with a user message")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "1"}, {"prompt": prompt, "answer": "1"}] * 3)
        with pytest.raises(DataError, match=f"line 2: field 'prompt': {message}"):
            load_task(TaskConfig(source="file", path=path, eval_size=1))


def test_a_datasets_folder_with_train_and_test_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "answer": str(i), "topic": "t"} for i in range(10)]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:7]),
                          "test": datasets.Dataset.from_list(rows[7:])}).save_to_disk(str(folder))
    train, held_out = load_task(TaskConfig(source="file", path=str(folder), eval_path=str(folder)))
    assert [e.prompt for e in train] == [f"q{i}" for i in range(7)] and [e.answer for e in held_out] == ["7", "8", "9"]
    assert held_out[0].meta["topic"] == "t"
    with pytest.raises(DataError, match="not a folder written by datasets"):
        load_task(TaskConfig(source="file", path=str(tmp_path)))


def test_the_arithmetic_default_instruction_is_unchanged():
    train, _ = load_task(TaskConfig(train_size=4, eval_size=2))
    assert train[0].prompt.endswith("Answer with just the number.")


@pytest.mark.parametrize("config", ["own_project.yaml", "own_project_env.yaml"])
def test_the_example_project_trains_from_yaml_alone(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    code = main(["train", f"examples/{config}", "--run-dir", str(run), "--set", "model.source=tiny",
                 "--set", "train.steps=2", "--set", "eval.every=0", "--set", "log.progress=false"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r][-1] == 2
    if config == "own_project.yaml":  # the sample's reward is what the project's functions give it
        from rollmill.plugins import load_reference

        right_amount = load_reference("examples/own_project/rewards.py:right_amount", "reward function")
        short = load_reference("examples/own_project/rewards.py:short", "reward function")
        for line in (run / "samples.jsonl").read_text().splitlines():
            sample = json.loads(line)
            assert sample["columns"]["unit"] in {"m", "cm", "g", "min", "s"}
            expected = right_amount([sample["prompt"]], [sample["completion"]], [sample["answer"]], [sample["columns"]["unit"]])[0]
            assert sample["reward"] == pytest.approx(expected + 0.1 * short(sample["completion"], None))
