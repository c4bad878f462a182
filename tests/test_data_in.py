"""A user's data as they have it: chat-format prompts, extra columns that reach rewards and samples,
`datasets` folders, no instruction appended to their prompts unless asked; and the example project
(its own reward file, env module and chat-format parquet) trained from YAML alone."""

from __future__ import annotations

import json
import socket
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


def mix_config(tiny_cfg):
    return tiny_cfg(task={"mix": [{"source": "arithmetic", "name": "add_1digit", "weight": 3, "eval_size": 4, "train_size": 40},
                                  {"source": "arithmetic", "name": "double", "label": "dbl", "eval_size": 4, "train_size": 20}]})


def test_a_mix_draws_sources_by_weight_and_resumes_exactly(tiny_cfg):
    from rollmill.pipelines.rlvr import PromptSource

    cfg = mix_config(tiny_cfg)
    source = PromptSource(cfg)
    assert {e.meta["source"] for e in source.eval} == {"add_1digit", "dbl"} and len(source.train) == 60
    first = source.next_groups(400, 1)
    share = sum(g.payload.meta["source"] == "add_1digit" for g in first) / len(first)
    assert 0.68 < share < 0.82  # weights 3:1
    saved = source.state()
    expected = [(g.group_id, g.payload.id) for g in source.next_groups(50, 1)]
    again = PromptSource(cfg)
    again.load_state(saved)
    assert [(g.group_id, g.payload.id) for g in again.next_groups(50, 1)] == expected


def test_a_mix_run_reports_every_source(tiny_cfg, tmp_path):
    from rollmill.runtime import train

    cfg = mix_config(tiny_cfg).model_copy(update={"train": tiny_cfg().train.model_copy(update={"steps": 2})})
    train(cfg, tmp_path / "run")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"eval/accuracy/add_1digit", "eval/accuracy/dbl"} <= set(last)
    assert sum(v for k, v in last.items() if k.startswith("rollout/samples/")) == last["rollout/samples"]


def test_mix_items_are_single_sources_with_distinct_labels(tiny_cfg):
    from rollmill.config import ConfigError

    with pytest.raises(ConfigError, match="distinct labels"):
        tiny_cfg(task={"mix": [{"name": "double"}, {"name": "double"}]})
    with pytest.raises(ConfigError, match="may not have a mix"):
        tiny_cfg(task={"mix": [{"mix": [{"name": "double"}]}]})


@pytest.fixture
def hf_caches(tmp_path, monkeypatch):
    """Empty `datasets` and Hub caches in tmp_path, in place of ~/.cache/huggingface; the Hub left
    switched on (as a user's process would have it) and every connection attempt recorded and refused."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield tmp_path
    assert attempts == [], f"a cached hub dataset reached for the network: {attempts}"
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == (False, False)  # restored


def units_rows(n: int) -> list[dict]:
    return [{"question": f"How many units in {i}?", "solution": i, "level": i % 3} for i in range(n)]


def fill_datasets_cache(root: Path, repo: str, splits: dict[str, list[dict]]) -> None:
    """The folder `datasets.load_dataset(repo)` leaves in HF_DATASETS_CACHE after an online load:
    <org>___<name>/default/0.0.0/<commit>/ with one Arrow file per split and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    files = {split: write_jsonl(root / f"{split}.jsonl", rows) for split, rows in splits.items()}
    org, name = repo.split("/")
    builder = Json(cache_dir=str(root / "stage"), dataset_name=name, data_files={k: [v] for k, v in files.items()},
                   hash="5f1c0ffee")
    builder.download_and_prepare()
    # The builder named its config after these local files; an online load names it "default".
    target = root / "datasets" / f"{org}___{name}" / "default"
    target.parent.mkdir(parents=True)
    Path(builder.cache_dir).parent.parent.rename(target)


def fill_hub_cache(root: Path, repo: str, splits: dict[str, list[dict]]) -> None:
    """What `huggingface-cli download --repo-type dataset repo` leaves in HF_HUB_CACHE: blobs, a
    snapshot of symlinks to them named by the commit, and refs/main naming that commit."""
    datasets = pytest.importorskip("datasets")
    repo_dir = root / "hub" / ("datasets--" + repo.replace("/", "--"))
    commit = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    for split, rows in splits.items():
        blob = repo_dir / "blobs" / f"blob-{split}"
        datasets.Dataset.from_list(rows).to_parquet(str(blob))
        link = repo_dir / "snapshots" / commit / "data" / f"{split}-00000-of-00001.parquet"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../../..") / "blobs" / blob.name)


def test_a_hub_dataset_from_the_datasets_cache_offline(hf_caches):
    fill_datasets_cache(hf_caches, "acme/units", {"train": units_rows(8), "test": units_rows(11)[8:]})
    cfg = TaskConfig(source="hub", name="acme/units", prompt_field="question", answer_field="solution",
                     eval_split="test")
    train, held_out = load_task(cfg)
    assert [e.answer for e in train] == [str(i) for i in range(8)] and [e.answer for e in held_out] == ["8", "9", "10"]
    assert train[3].prompt == "How many units in 3?"  # a user's data gets no instruction by default
    assert train[3].meta == {"level": 0, "dataset": "acme/units", "split": "train", "row": "row index 3"}
    assert held_out[0].id == "units/eval/0" and held_out[0].meta["split"] == "test"
    with pytest.raises(DataError, match=r"task.eval_split 'validation': dataset 'acme/units' has no such split "
                                        r"\(splits: \['test', 'train'\]\)"):
        load_task(cfg.model_copy(update={"eval_split": "validation"}))


def test_a_hub_dataset_from_the_hub_file_cache_offline(hf_caches):
    fill_hub_cache(hf_caches, "acme/calc", {"train": units_rows(12)})
    train, held_out = load_task(TaskConfig(source="hub", name="acme/calc", prompt_field="question",
                                           answer_field="solution", eval_size=4, train_size=5))
    assert len(train) == 5 and len(held_out) == 4
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert {e.meta["dataset"] for e in train + held_out} == {"acme/calc"}


def test_a_hub_dataset_missing_from_both_caches_says_where_it_looked(hf_caches):
    with pytest.raises(DataError, match=r"task.name 'acme/absent': not in the local Hugging Face caches "
                                        r"\(datasets cache .*datasets.*hub cache .*hub: no snapshot\).*huggingface-cli "
                                        r"download --repo-type dataset acme/absent"):
        load_task(TaskConfig(source="hub", name="acme/absent"))


def test_hub_settings_are_checked_at_load():
    with pytest.raises(ValueError, match="task.eval_split applies only to task.source 'hub'"):
        TaskConfig(source="file", path="x.jsonl", eval_split="test")
    saved = TaskConfig(source="file", path="x.jsonl").model_dump()  # every key, as run_dir/config.yaml has it
    assert TaskConfig(**saved).split == "train"
