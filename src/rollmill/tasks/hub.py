"""Hugging Face Hub datasets that are already on this machine, read offline (`task.source: hub`).

rollmill never downloads data: `task.name` ("org/dataset") is looked up in the two local caches,
in this order, with the Hub switched off for the lookup:

1. the `datasets` cache (`HF_DATASETS_CACHE`, default `~/.cache/huggingface/datasets`), which
   `datasets.load_dataset(name)` filled when it last ran with network;
2. the Hub file cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`), which
   `huggingface-cli download --repo-type dataset NAME` or `snapshot_download` filled; its files are
   read the way `datasets` reads a local folder (split names from the file names, subsets from the
   README's YAML `configs`).

Rows are then checked exactly like a local file's (rollmill.tasks.files).
"""

from __future__ import annotations

from contextlib import contextmanager

from rollmill.config import TaskConfig
from rollmill.tasks import DataError, Example
from rollmill.tasks.files import split_rows, table_rows, to_examples


@contextmanager
def _hub_off():
    # `datasets` and `huggingface_hub` read HF_HUB_OFFLINE once, at import; an earlier import in this
    # process (transformers, trl) would make an environment variable set now too late.
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_cached(name: str, subset: str | None):
    """The DatasetDict of hub dataset `name` (its `subset`) from a local cache; DataError if neither
    cache has it, saying where it looked and how to fill them."""
    import datasets
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    with _hub_off():
        try:
            return datasets.load_dataset(name, subset)
        except Exception as err:  # noqa: BLE001 - any failure here means "not in the datasets cache"
            processed_error = f"{type(err).__name__}: {err}"
        try:
            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise DataError(
                f"task.name {name!r}: not in the local Hugging Face caches (datasets cache "
                f"{datasets.config.HF_DATASETS_CACHE}: {processed_error}; hub cache {constants.HF_HUB_CACHE}: no "
                "snapshot). rollmill reads hub datasets offline: fetch it once where there is network with "
                f"`huggingface-cli download --repo-type dataset {name}`, or point HF_HOME at a cache that has it"
            ) from None
        try:
            return datasets.load_dataset(folder, subset)
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
            raise DataError(f"task.name {name!r}: the cached snapshot {folder} cannot be read as a dataset "
                            f"(task.subset={subset!r}): {type(err).__name__}: {err}") from None


def load_hub(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) from hub dataset `cfg.name`: split `cfg.split`, eval from `cfg.eval_split` or a
    seeded hold-out of `cfg.eval_size` rows."""
    data = load_cached(cfg.name, cfg.subset)
    splits = {cfg.split: "task.split", **({cfg.eval_split: "task.eval_split"} if cfg.eval_split else {})}
    for split, knob in splits.items():
        if split not in data:
            raise DataError(f"{knob} {split!r}: dataset {cfg.name!r} has no such split (splits: {sorted(data)})")
    where = f"{cfg.name} split {cfg.split}"
    rows = table_rows(data[cfg.split], where, cfg)
    eval_rows = table_rows(data[cfg.eval_split], f"{cfg.name} split {cfg.eval_split}", cfg) if cfg.eval_split else None
    train_rows, eval_rows = split_rows(rows, eval_rows, cfg, where, "task.eval_split")
    short = cfg.name.split("/")[-1]
    eval_split = cfg.eval_split or cfg.split
    return (to_examples(train_rows, short, "train", {"dataset": cfg.name, "split": cfg.split}, cfg),
            to_examples(eval_rows, short, "eval", {"dataset": cfg.name, "split": eval_split}, cfg))
