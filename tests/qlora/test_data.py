"""The data pipeline: exact tokens per format, truncation, bad rows, readers, split, cache and
the bundled dataset."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from qlora import data as qdata
from qlora.config import DataSpec
from qlora.data import (
    DataError,
    bundled_path,
    detect_format,
    load_data,
    read_records,
    tokenize_example,
    validate_data_file,
)
from qlora.tiny import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, M = 1, 2, -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    qdata._MEMORY.clear()
    yield
    qdata._MEMORY.clear()


def ids(tok, text: str) -> list[int]:
    """Character ids, independently of the tokenizer's own splitting; '</s>' is the eos token."""
    out: list[int] = []
    for i, piece in enumerate(text.split("</s>")):
        if i:
            out.append(EOS)
        out += tok.convert_tokens_to_ids(list(piece))
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def only_example(path: Path, tok, **spec):
    got = load_data(DataSpec(path=str(path), eval_fraction=0.0, **spec), tok)
    assert len(got.train) == 1 and got.eval == []
    return got.train[0]


# -------------------------------------------------------------------------- one test per format

ALPACA = {"instruction": "Add.", "input": "1 + 2", "output": "3"}
# The tiny tokenizer has a chat template, so alpaca rows are rendered as one user turn and one
# assistant turn in it (the turn closes with eos itself); "### Instruction" is for tokenizers
# without one (test_alpaca_without_chat_template).
FORMAT_CASES = {
    "alpaca": (ALPACA, "user: Add.\n\n1 + 2\nassistant: ", "3</s>\n"),
    "alpaca-no-input": ({"instruction": "Say hi.", "input": "", "output": "hi"},
                        "user: Say hi.\nassistant: ", "hi</s>\n"),
    "alpaca-input-absent": ({"instruction": "Say hi.", "output": "hi"},
                            "user: Say hi.\nassistant: ", "hi</s>\n"),
    "prompt_completion": ({"prompt": "Q: 2+2\nA:", "completion": " 4"}, "Q: 2+2\nA:", " 4"),
    "text": ({"text": "just text"}, "", "just text"),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_format_tokens_exact(case, tok, tmp_path):
    row, prompt, response = FORMAT_CASES[case]
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    tail = [] if "</s>" in response else [EOS]
    expected = [BOS] + ids(tok, prompt) + ids(tok, response) + tail

    ex = only_example(path, tok)
    assert ex.input_ids == expected
    assert ex.labels == [M] * (1 + len(ids(tok, prompt))) + ids(tok, response) + tail

    ex = only_example(path, tok, train_on_prompt=True)
    assert ex.input_ids == expected and ex.labels == expected


@pytest.mark.parametrize("row,prompt", [
    (ALPACA, "### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n"),
    ({"instruction": "Say hi.", "input": " ", "output": "3"},
     "### Instruction:\nSay hi.\n\n### Response:\n"),
])
def test_alpaca_without_chat_template(row, prompt, tok, tmp_path):
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    ex = only_example(write_jsonl(tmp_path / "d.jsonl", [row]), tok)
    assert ex.input_ids == [BOS] + ids(tok, prompt) + ids(tok, row["output"]) + [EOS]
    assert ex.labels == [M] * (1 + len(prompt)) + ids(tok, row["output"]) + [EOS]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hey"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.mark.parametrize("template", ["tokenizer", "default"])
def test_chat_tokens_exact(template, tok, tmp_path):
    # The default template is the tiny one, so both paths must give the same tokens; the template
    # closes the assistant turn with eos itself, so no second eos is appended.
    if template == "default":
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    prompt = "system: Be brief.\nuser: hi\nassistant: hey</s>\nuser: 2+2?\nassistant: "
    response = "4</s>\n"
    ex = only_example(path, tok)
    assert ex.input_ids == [BOS] + ids(tok, prompt) + ids(tok, response)
    assert ex.labels == [M] * (1 + len(ids(tok, prompt))) + ids(tok, response)

    ex = only_example(path, tok, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_chat_trailing_user_turn_is_dropped_and_assistant_run_trained(tok, tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"}, {"role": "user", "content": "ignored"}]
    ex = only_example(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok)
    prompt, response = "user: a\nassistant: ", "b</s>\nassistant: c</s>\n"
    assert ex.input_ids == [BOS] + ids(tok, prompt) + ids(tok, response)
    assert ex.labels == [M] * (1 + len(prompt)) + ids(tok, response)


def test_tokenize_example_bos_eos(tok):
    ex, truncated = tokenize_example("ab", "cd", tok, seq_len=8, train_on_prompt=False)
    assert ex.input_ids == [BOS] + ids(tok, "abcd") + [EOS] and not truncated
    assert ex.labels == [M, M, M] + ids(tok, "cd") + [EOS]
    ex, truncated = tokenize_example("ab", "cdefgh", tok, seq_len=8, train_on_prompt=False)
    assert ex.input_ids == [BOS] + ids(tok, "abcdefg") and truncated


# ---------------------------------------------------------------------------------- truncation

def test_truncation_counted_and_empty_examples_dropped(tok, tmp_path):
    rows = [
        {"prompt": "ab", "completion": "cdefghijkl"},  # cut inside the response: kept
        {"prompt": "abcdefghij", "completion": "x"},  # response cut away entirely: dropped
        {"prompt": "abcdef", "completion": "x"},  # only eos cut: kept
        {"prompt": "a", "completion": "b"},  # fits
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    got = load_data(DataSpec(path=str(path), seq_len=8, eval_fraction=0.0), tok)
    assert got.stats["n_truncated"] == 3 and got.stats["n_dropped"] == 1
    assert got.stats["n_train"] == 3 and got.stats["n_rows"] == 4
    assert [ex.input_ids for ex in got.train] == [
        [BOS] + ids(tok, "abcdefg"),
        [BOS] + ids(tok, "abcdefx"),
        [BOS] + ids(tok, "ab") + [EOS],
    ]
    assert got.train[0].labels == [M, M, M] + ids(tok, "cdefg")


def test_all_examples_dropped_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x" * 20, "completion": "y"}])
    with pytest.raises(DataError, match="no training examples left"):
        load_data(DataSpec(path=str(path), seq_len=8, eval_fraction=0.0), tok)


# -------------------------------------------------------------------------------------- bad rows

GOOD = json.dumps(ALPACA)
NEEDS = "(alpaca rows need 'instruction' and 'output')"
BAD_JSONL = {
    "missing field": ([GOOD, json.dumps({"instruction": "x"}), GOOD],
                      f"line 2: field 'output' is missing {NEEDS}"),
    "wrong type": ([GOOD, GOOD, json.dumps({"instruction": "x", "output": 3})],
                   "line 3: field 'output' must be a string, got int"),
    "empty response": ([GOOD, json.dumps({"instruction": "x", "output": ""})],
                       "line 2: field 'output' is empty (no response to learn)"),
    "malformed JSON": ([GOOD, "", '{"instruction": "x", "output": '],  # blank line 2 counts
                       "line 3: malformed JSON (Expecting value at column 32)"),
    "not an object": ([GOOD, "[1, 2]"], "line 2: expected a JSON object, got list"),
    "bad chat role": ([json.dumps({"messages": [{"role": "bot", "content": "x"}]})],
                      "line 1: messages[0]: role must be one of ['system', 'user', 'assistant'], "
                      "got 'bot'"),
    "no assistant turn": ([json.dumps({"messages": [{"role": "user", "content": "x"}]})],
                          "line 1: field 'messages' has no assistant turn (no response to learn)"),
}


@pytest.mark.parametrize("kind", list(BAD_JSONL))
def test_bad_jsonl_row_names_file_and_line(kind, tmp_path):
    lines, message = BAD_JSONL[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value) == f"{path}: {message}"
    with pytest.raises(DataError, match="line"):
        validate_data_file(str(path))


def test_csv_empty_cell_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('instruction,input,output\nA,,x\n"multi\nline",,y\nB,,\nC,,z\n')
    with pytest.raises(DataError) as e:
        read_records(path)
    # the quoted cell spans lines 3-4, so the empty 'output' is on line 5
    assert str(e.value) == f"{path}: line 5: field 'output' is empty"


def test_skip_invalid_counts(tok, tmp_path):
    lines = [GOOD, json.dumps({"instruction": "x"}), "{oops", GOOD,
             json.dumps({"instruction": "x", "output": 3})]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    records, fmt, skipped = read_records(path, skip_invalid=True)
    assert (len(records), fmt, skipped) == (2, "alpaca", 3)
    assert validate_data_file(str(path), skip_invalid=True) == {
        "rows": 2, "format": "alpaca", "skipped": 3}
    got = load_data(DataSpec(path=str(path), skip_invalid=True, eval_fraction=0.0), tok)
    assert got.stats["n_skipped"] == 3 and got.stats["n_train"] == 2


@pytest.mark.parametrize("name,content,message", [
    ("e.jsonl", "", "file is empty"),
    ("e.jsonl", "\n  \n", "file is empty"),
    ("e.csv", "instruction,output\n", "no rows"),
    ("e.json", "[]", "no rows"),
    ("e.json", '{"instruction": "x"}', 'expected a list of objects or {"data": [...]}, got dict'),
    ("e.txt", "hello", "unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"),
])
def test_file_level_errors(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value) == f"{path}: {message}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        validate_data_file(str(path))
    assert str(e.value) == f"{path}: no such file"


def test_format_override_names_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    with pytest.raises(DataError, match="column 'prompt' is missing"):
        read_records(path, format="prompt_completion")
    records, fmt, _ = read_records(path, format="alpaca")
    assert fmt == "alpaca" and records == [ALPACA]


def test_detect_format():
    assert detect_format(["messages", "id"]) == "chat"
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(["question", "answer"])


# ------------------------------------------------------------------------------- other readers

ROWS = [ALPACA, {"instruction": "Say hi.", "input": "", "output": "hi, \"you\"\n!"}]


def test_csv_json_parquet_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = read_records(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert expected == (ROWS, "alpaca", 0)

    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("d.csv", "d.json", "w.json", "d.parquet"):
        assert read_records(tmp_path / name) == expected, name


def test_json_and_parquet_rows_named_by_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ALPACA, {"instruction": "x", "output": None}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        with pytest.raises(DataError) as e:
            read_records(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: row 2: field 'output' is empty"


def test_chat_from_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), tmp_path / "c.parquet")
    cell = '"' + json.dumps(CHAT).replace('"', '""') + '"'
    (tmp_path / "c.csv").write_text(f"messages\n{cell}\n")
    for name in ("c.parquet", "c.csv"):
        assert read_records(tmp_path / name) == ([{"messages": CHAT}], "chat", 0), name


# ---------------------------------------------------------------------------- eval split, cache

def _rows(n: int, tag: str = "") -> list[dict]:
    return [{"instruction": f"Echo {i}{tag}.", "output": f"{i}"} for i in range(n)]


def _texts(tok, examples) -> list[str]:
    return [tok.decode(ex.input_ids) for ex in examples]


def test_eval_split_depends_only_on_the_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(50))
    base = load_data(DataSpec(path=str(path)), tok)
    assert (base.stats["n_train"], base.stats["n_eval"]) == (45, 5)
    assert sorted(_texts(tok, [*base.train, *base.eval])) == sorted(
        _texts(tok, load_data(DataSpec(path=str(path), eval_fraction=0.0), tok).train))

    copy_path = tmp_path / "elsewhere" / "other-name.jsonl"
    copy_path.parent.mkdir()
    shutil.copy(path, copy_path)
    for spec in (DataSpec(path=str(path), train_on_prompt=True, seq_len=64),
                 DataSpec(path=str(copy_path))):
        other = load_data(spec, tok)
        assert _texts(tok, other.eval) == _texts(tok, base.eval)
        assert other.data_hash == base.data_hash
    qdata._MEMORY.clear()
    assert _texts(tok, load_data(DataSpec(path=str(path)), tok).eval) == _texts(tok, base.eval)

    capped = load_data(DataSpec(path=str(path), max_eval_examples=2), tok)
    assert _texts(tok, capped.eval) == _texts(tok, base.eval)[:2]
    assert _texts(tok, capped.train) == _texts(tok, base.train)  # the cap does not move rows

    changed = write_jsonl(tmp_path / "e.jsonl", _rows(50, tag="!"))
    assert load_data(DataSpec(path=str(changed)), tok).data_hash != base.data_hash


def test_eval_file(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(10))
    evalf = write_jsonl(tmp_path / "eval.jsonl", _rows(4, tag="?"))
    got = load_data(DataSpec(path=str(train), eval_path=str(evalf)), tok)
    assert (got.stats["n_train"], got.stats["n_eval"], got.stats["n_rows"]) == (10, 4, 14)
    assert _texts(tok, got.eval)[0] == "<s>user: Echo 0?.\nassistant: 0</s>\n"
    alone = load_data(DataSpec(path=str(train)), tok)
    assert got.data_hash != alone.data_hash


def test_cache_hit_returns_equal_data(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(20))
    spec = DataSpec(path=str(path))
    first = load_data(spec, tok)
    with pytest.raises(TypeError):  # the examples are read in place: a caller cannot change them
        first.train[0] = first.train[1]
    second = load_data(spec, tok)
    assert len(second.train) == 18
    entries = list((tmp_path / "cache" / "data").glob("*/meta.json"))
    assert len(entries) == 1 and list(entries[0].parent.glob("tokens*.arrow"))
    qdata._MEMORY.clear()
    from_disk = load_data(spec, tok)
    assert from_disk == second and list(from_disk.train) == list(first.train)
    load_data(DataSpec(path=str(path), seq_len=64), tok)  # another spec, another entry
    assert len(list((tmp_path / "cache" / "data").glob("*/meta.json"))) == 2


def test_packed_split_keeps_eval_unpacked(tok):
    plain = load_data(DataSpec(seq_len=512), tok)
    packed = load_data(DataSpec(seq_len=512, packing="pack"), tok)
    assert packed.eval == plain.eval
    assert packed.stats["n_train_rows"] == len(packed.train) < len(plain.train)
    assert all(ex.position_ids is not None for ex in packed.train)


# ------------------------------------------------------------------------------------- bundled

def test_bundled_dataset(tok):
    path = bundled_path()
    assert path == REPO / "data" / "bundled" / "train.jsonl"
    assert path.stat().st_size < 1_000_000
    assert validate_data_file(str(path)) == {"rows": 3000, "format": "alpaca", "skipped": 0}
    got = load_data(DataSpec(), tok)  # path None = the bundled dataset
    assert got.stats["n_truncated"] == 0 and got.stats["n_eval"] == 128
    assert max(len(ex.input_ids) for ex in [*got.train, *got.eval]) < 128


def test_generator_reproduces_bundled_file(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_bundled",
                                                  REPO / "data" / "generate_bundled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "train.jsonl"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == bundled_path().read_bytes()
