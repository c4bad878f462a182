"""Task sources: arithmetic generators, reasoning-gym, and validated local files."""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollmill.config import TaskConfig
from rollmill.rewards import REWARDS
from rollmill.tasks import ARITHMETIC_TASKS, DataError, load_task
from rollmill.tasks.arithmetic import QUESTION_COUNTS


def expected_answer(name: str, question: str) -> int:
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if name == "larger_of_two":
        assert len(nums) == 2 and nums[0] != nums[1] and all(10 <= n <= 99 for n in nums)
        return max(nums)
    if name in ("add_1digit", "add_2digit"):
        low, high = (0, 9) if name == "add_1digit" else (10, 99)
        assert " + " in question and all(low <= n <= high for n in nums)
        return nums[0] + nums[1]
    if name == "double":
        assert 1 <= nums[0] <= 50
        return 2 * nums[0]
    if name == "teen_minus_digit":
        assert " - " in question and 11 <= nums[0] <= 19 and 1 <= nums[1] <= 9
        return nums[0] - nums[1]
    assert name == "sequence_next"
    steps = {b - a for a, b in zip(nums, nums[1:])}
    assert len(nums) >= 3 and len(steps) == 1
    return nums[-1] + steps.pop()


def test_arithmetic_registry():
    assert set(ARITHMETIC_TASKS) == {
        "larger_of_two", "add_1digit", "add_2digit", "double", "teen_minus_digit", "sequence_next",
    }


@pytest.mark.parametrize("name", sorted(ARITHMETIC_TASKS))
def test_generator_answers_are_correct(name):
    rng = random.Random(1)
    for _ in range(300):
        question, answer = ARITHMETIC_TASKS[name](rng)
        assert answer == str(expected_answer(name, question)), question


@pytest.mark.parametrize("name", sorted(ARITHMETIC_TASKS))
def test_arithmetic_split_is_held_out(name):
    train, evals = load_task(TaskConfig(name=name, train_size=300, eval_size=20, seed=3))
    assert len(train) == 300 and len(evals) == 20
    eval_prompts = [e.prompt for e in evals]
    assert len(set(eval_prompts)) == 20
    assert not set(eval_prompts) & {t.prompt for t in train}
    assert [t.id for t in train[:2]] == [f"{name}/train/0", f"{name}/train/1"]
    assert evals[-1].id == f"{name}/eval/19"
    for example in train[:50] + evals:
        question = example.prompt.removesuffix(" Answer with just the number.")
        assert question != example.prompt
        assert example.answer == str(expected_answer(name, question))


def test_arithmetic_is_deterministic_for_seed():
    first = load_task(TaskConfig(name="add_2digit", train_size=50, eval_size=10, seed=7))
    again = load_task(TaskConfig(name="add_2digit", train_size=50, eval_size=10, seed=7))
    other = load_task(TaskConfig(name="add_2digit", train_size=50, eval_size=10, seed=8))
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


def test_arithmetic_eval_does_not_depend_on_train_size():
    _, small = load_task(TaskConfig(name="larger_of_two", train_size=10, eval_size=10))
    _, large = load_task(TaskConfig(name="larger_of_two", train_size=500, eval_size=10))
    assert small == large


def test_empty_instruction_leaves_the_bare_question():
    train, _ = load_task(TaskConfig(name="double", train_size=5, eval_size=5, instruction=""))
    assert re.fullmatch(r"What is \d+ doubled\?", train[0].prompt)


@pytest.mark.parametrize("name", sorted(ARITHMETIC_TASKS))
def test_question_counts_match_the_generators(name):
    # The config check refuses eval splits by these counts, so an overstated one would let a run spin
    # and an understated one would refuse a valid config. 15 x count seeded draws reach every question.
    rng = random.Random(0)
    assert len({ARITHMETIC_TASKS[name](rng)[0] for _ in range(15 * QUESTION_COUNTS[name])}) == QUESTION_COUNTS[name]


def test_question_space_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'double' has too few distinct questions.*eval_size=60"):
        load_task(TaskConfig(name="double", train_size=10, eval_size=60))


def test_eval_filling_the_whole_space_leaves_no_train():
    with pytest.raises(ValueError, match="train questions outside the eval split"):
        load_task(TaskConfig(name="double", train_size=10, eval_size=50))


def test_unknown_arithmetic_task():
    with pytest.raises(ValueError, match="unknown arithmetic task 'triple'.*larger_of_two"):
        load_task(TaskConfig(name="triple"))


def test_reasoning_gym_split():
    config = TaskConfig(source="reasoning_gym", name="basic_arithmetic", train_size=30, eval_size=8, instruction="")
    train, evals = load_task(config)
    assert len(train) == 30 and len(evals) == 8
    assert not {e.prompt for e in evals} & {t.prompt for t in train}
    first = train[0]
    assert first.id == "basic_arithmetic/train/0"
    assert first.meta["rg_dataset"] == "basic_arithmetic"
    assert first.prompt == first.meta["entry"]["question"]
    assert first.answer == str(first.meta["entry"]["answer"])
    assert all(REWARDS["reasoning_gym"](e.answer, e) == 1.0 for e in evals)
    assert load_task(config) == (train, evals)


def test_reasoning_gym_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="unknown reasoning_gym dataset 'basic_arithmatic'.*basic_arithmetic"):
        load_task(TaskConfig(source="reasoning_gym", name="basic_arithmatic"))


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def file_cfg(path: str, **kw) -> TaskConfig:
    return TaskConfig(source="file", path=path, instruction=kw.pop("instruction", ""), **kw)


def test_jsonl_happy_path(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "extra": [i]} for i in range(10)]
    rows[1]["answer"], rows[2]["answer"] = 2.0, 2.5
    path = write_jsonl(tmp_path / "data.jsonl", rows[:5] + [""] + rows[5:])  # a blank line is skipped
    train, evals = load_task(file_cfg(path, eval_size=3, train_size=5, instruction="Be brief."))
    assert len(evals) == 3 and len(train) == 5
    assert not {e.prompt for e in evals} & {t.prompt for t in train}
    for e in train + evals:
        index = int(e.prompt.split()[0][1:])
        assert e.prompt == f"q{index} Be brief."
        assert e.answer == {1: "2", 2: "2.5"}.get(index, str(index))
        assert e.id.endswith(f"/{index}") and e.id.startswith("data/")
    assert evals[0].meta["row"].startswith("line ")
    assert load_task(file_cfg(path, eval_size=3, train_size=5, instruction="Be brief.")) == (train, evals)


def test_train_size_caps_train_and_keeps_file_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(20)])
    train, evals = load_task(file_cfg(path, eval_size=4, train_size=6))
    held = {e.prompt for e in evals}
    assert [t.prompt for t in train] == [f"q{i}" for i in range(20) if f"q{i}" not in held][:6]


def test_eval_path_and_duplicate_prompts_are_held_out(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "answer": 1} for p in ["a", "b", "c", "b"]])
    eval_path = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "b", "answer": 1}, {"prompt": "z", "answer": 2}])
    train, evals = load_task(file_cfg(path, eval_path=eval_path, eval_size=1))
    assert [t.prompt for t in train] == ["a", "c"]
    assert [(e.id, e.prompt) for e in evals] == [("test/eval/0", "b"), ("test/eval/1", "z")]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"q": f"x{i}", "a": str(i)} for i in range(6)]))
    train, evals = load_task(file_cfg(str(path), prompt_field="q", answer_field="a", eval_size=2))
    assert len(train) == 4 and len(evals) == 2
    assert sorted(e.answer for e in train + evals) == [str(i) for i in range(6)]


def test_parquet_happy_path(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(8)], "answer": list(range(8))}), path)
    train, evals = load_task(file_cfg(str(path), eval_size=2))
    assert len(train) == 6 and len(evals) == 2
    assert not {e.prompt for e in evals} & {t.prompt for t in train}
    assert all(e.answer == e.prompt[1:] for e in train + evals)
    assert train[0].meta["row"].startswith("row index ")


@pytest.mark.parametrize(
    "bad_line, where, field",
    [
        ({"prompt": "q"}, "line 4", "answer"),
        ({"answer": 1}, "line 4", "prompt"),
        ({"prompt": "   ", "answer": 1}, "line 4", "prompt"),
        ({"prompt": 7, "answer": 1}, "line 4", "prompt"),
        ({"prompt": "q", "answer": [1, 2]}, "line 4", "answer"),
        ({"prompt": "q", "answer": True}, "line 4", "answer"),
        ({"prompt": "q", "answer": None}, "line 4", "answer"),
        ({"prompt": "q", "answer": ""}, "line 4", "answer"),
    ],
)
def test_jsonl_bad_rows_name_file_line_and_field(tmp_path, bad_line, where, field):
    good = {"prompt": "fine", "answer": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, bad_line, good, good])
    with pytest.raises(DataError) as err:
        load_task(file_cfg(path, eval_size=1))
    message = str(err.value)
    assert "bad.jsonl" in message and f"{where}:" in message and repr(field) in message


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "answer": 1}, '{"prompt": "b", "answer": }'])
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_task(file_cfg(path, eval_size=1))


def test_jsonl_line_must_be_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [{"prompt": "a", "answer": 1}, [1, 2]])
    with pytest.raises(DataError, match=r"list\.jsonl: line 2: expected an object with field 'prompt'"):
        load_task(file_cfg(path, eval_size=1))


def test_json_array_bad_row_names_the_row_index(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": {"x": 1}}]))
    with pytest.raises(DataError, match=r"arr\.json: row index 1: field 'answer' must be a string or a number"):
        load_task(file_cfg(str(path), eval_size=1))


@pytest.mark.parametrize(
    "columns, where, field",
    [
        ({"prompt": ["a", "b", "c"]}, "row index 0", "answer"),
        ({"prompt": ["a", None, "c"], "answer": [1, 2, 3]}, "row index 1", "prompt"),
        ({"prompt": ["a", "b", ""], "answer": [1, 2, 3]}, "row index 2", "prompt"),
        ({"prompt": [1, 2, 3], "answer": [1, 2, 3]}, "row index 0", "prompt"),
        ({"prompt": ["a", "b", "c"], "answer": [[1], [2], [3]]}, "row index 0", "answer"),
    ],
)
def test_parquet_bad_rows_name_file_row_and_field(tmp_path, columns, where, field):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError) as err:
        load_task(file_cfg(str(path), eval_size=1))
    message = str(err.value)
    assert "bad.parquet" in message and f"{where}:" in message and repr(field) in message


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: file does not exist"):
        load_task(file_cfg(str(tmp_path / "nothere.jsonl")))
    (tmp_path / "data.csv").write_text("prompt,answer\nq,1\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported extension '\.csv'"):
        load_task(file_cfg(str(tmp_path / "data.csv")))


def test_file_too_small_for_eval_size(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(3)])
    with pytest.raises(DataError, match=r"small\.jsonl: has 3 rows, needs more than task.eval_size=3"):
        load_task(file_cfg(path, eval_size=3))
