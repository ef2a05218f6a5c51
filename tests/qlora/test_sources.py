"""Every kind of source `data.path` names, loaded through `datasets` into the same examples: a
saved dataset folder (and a split of a saved DatasetDict), a dataset repository folder, a hub id
from a pre-filled datasets cache with the hub offline, and a file on S3 (moto's server)."""

from __future__ import annotations

import json
import shutil

import pytest

from qlora import data as qdata
from qlora.config import DataSpec
from qlora.data import DataError, load_data, validate_data_file
from qlora.tiny import build_tokenizer
from tests.support.servers import MotoS3

ROWS = [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    qdata._MEMORY.clear()
    yield
    qdata._MEMORY.clear()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _texts(tok, got) -> list[str]:
    return sorted(tok.decode(ex.input_ids) for ex in [*got.train, *got.eval])


def test_saved_folder_and_a_split_of_a_saved_dict(tok, tmp_path):
    import datasets

    reference = load_data(DataSpec(path=str(_jsonl(tmp_path / "rows.jsonl", ROWS))), tok)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    got = load_data(DataSpec(path=str(tmp_path / "saved")), tok)
    assert _texts(tok, got) == _texts(tok, reference)
    assert (got.stats["n_train"], got.stats["n_eval"], got.stats["format"]) == (36, 4, "alpaca")

    other = [{"instruction": f"Twice {i}.", "output": str(2 * i)} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(other)}
                         ).save_to_disk(str(tmp_path / "dict"))
    test = load_data(DataSpec(path=str(tmp_path / "dict"), split="test"), tok)
    assert test.stats["n_rows"] == 10 and "Twice 3." in " ".join(_texts(tok, test))
    with pytest.raises(DataError, match=r"dict: no split 'dev'; data.split is one of "
                                        r"\['test', 'train'\]$"):
        load_data(DataSpec(path=str(tmp_path / "dict"), split="dev"), tok)


def test_a_bad_row_of_a_dataset_is_named_by_row(tmp_path):
    import datasets

    rows = [*ROWS[:5], {"instruction": "No answer.", "output": ""}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as e:
        validate_data_file(str(tmp_path / "saved"))
    assert str(e.value) == f"{tmp_path / 'saved'}: row 6: field 'output' is empty (no response " \
                           "to learn)"


def test_repository_folder_then_the_same_set_by_hub_id_from_the_cache(tok, tmp_path,
                                                                       monkeypatch):
    import datasets

    repo = tmp_path / "repos" / "echoes"
    _jsonl(repo / "data" / "train.jsonl", ROWS)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# echoes\n")
    local = load_data(DataSpec(path=str(repo)), tok)
    assert local.stats["n_rows"] == 40 and local.stats["format"] == "alpaca"

    # The cache a hub download of `someone/echoes` leaves has the same layout under
    # someone___echoes/: move the local load's cache there, then ask for the id offline.
    cache = datasets.config.HF_DATASETS_CACHE
    shutil.move(cache / "echoes", cache / "someone___echoes")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = load_data(DataSpec(path="someone/echoes"), tok)
    assert _texts(tok, hub) == _texts(tok, local)
    with pytest.raises(DataError, match=r"^someone/absent: not in the local datasets cache "
                                        r"\(HF_HUB_OFFLINE is set\)"):
        load_data(DataSpec(path="someone/absent"), tok)


def test_a_file_on_s3_is_streamed_and_hashed_as_its_bytes(tok, tmp_path, monkeypatch):
    local = _jsonl(tmp_path / "rows.jsonl", ROWS)
    bad = _jsonl(tmp_path / "bad.jsonl", [*ROWS[:2], {"instruction": "x"}])
    (tmp_path / "moto").mkdir()
    with MotoS3(tmp_path / "moto") as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        fs = s3.fs()
        fs.mkdir("data-bucket")
        fs.put(str(local), "data-bucket/train.jsonl")
        fs.put(str(bad), "data-bucket/bad.jsonl")
        remote = load_data(DataSpec(path="s3://data-bucket/train.jsonl"), tok)
        with pytest.raises(DataError) as e:
            validate_data_file("s3://data-bucket/bad.jsonl")
        with pytest.raises(DataError, match=r"^s3://data-bucket/none.jsonl: no such file"):
            validate_data_file("s3://data-bucket/none.jsonl")
    assert str(e.value) == "s3://data-bucket/bad.jsonl: line 3: field 'output' is missing " \
                           "(alpaca rows need 'instruction' and 'output')"
    qdata._MEMORY.clear()
    here = load_data(DataSpec(path=str(local)), tok)
    assert remote.data_hash == here.data_hash  # the same bytes: the same split, the same runs
    assert [ex.input_ids for ex in remote.eval] == [ex.input_ids for ex in here.eval]
    with pytest.raises(DataError, match=r"^s3://\*\*\*@data-bucket/x.jsonl: credentials"):
        validate_data_file("s3://AKIA:hunter2@data-bucket/x.jsonl")
