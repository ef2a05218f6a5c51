"""Record and file formats: which fields a row needs, how a file splits into rows, and how a row
becomes (prompt, response) text.

Four formats, detected from the columns (first match wins, in this order):

- `chat`              : `messages`, a list of `{"role": system|user|assistant, "content": str}`;
                        the loss is taken on the final assistant turn(s).
- `alpaca`            : `instruction` and `output` (non-empty strings), optional `input`.
- `prompt_completion` : `prompt` (may be empty) and `completion` (non-empty).
- `text`              : `text` (non-empty); everything is response, nothing is masked.

Rendering templates (fixed, so a data hash and a template determine the tokens):

    alpaca    with the tokenizer's chat template when it has one: a conversation of one user turn
              "{instruction}" (+ "\\n\\n{input}" when input is not blank) and one assistant
              turn "{output}", split as chat below; without a chat template:
              "### Instruction:\\n{instruction}\\n\\n"
              "### Input:\\n{input}\\n\\n"          (omitted when input is empty or blank)
              "### Response:\\n"                   -> prompt;  response = output
    chat      the tokenizer's chat template when it has one, else the default below, which is
              the tiny model's template:
                  "{role}: {content}\\n" per system/user turn,
                  "assistant: {content}{eos_token}\\n" per assistant turn,
                  generation prompt "assistant: ".
              prompt = the conversation before the final assistant turn(s), with the generation
              prompt; response = the rest of the rendered conversation.

Files: `read_rows` splits a file's bytes into (location, row) pairs, one reader per extension:
JSONL (an object per physical line), JSON (a list, or {"data": [...]}), CSV (header = line 1;
empty cells are missing; a chat conversation is a cell of JSON text) and Parquet. Everything here
raises `DataError` without the file's name; `qlora.data` prefixes it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")

ALPACA_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ALPACA_RESPONSE = "### Response:\n"
DEFAULT_GENERATION_PROMPT = "assistant: "

# Per format: (required string fields, optional string fields, the field that is the response).
_FIELDS = {
    "alpaca": (("instruction", "output"), ("input",), "output"),
    "prompt_completion": (("prompt", "completion"), (), "completion"),
    "text": (("text",), (), "text"),
    "chat": (("messages",), (), None),
}
_MAY_BE_EMPTY = {"prompt"}


class DataError(ValueError):
    """A bad data file. str(e) is one line: 'FILE: line N: what is wrong' or
    'FILE: what is wrong'."""


def _needs(fmt: str) -> str:
    req = _FIELDS[fmt][0]
    return f"{fmt} rows need " + " and ".join(f"'{f}'" for f in req)


def detect_format(columns) -> str:
    """The format whose required columns are all in `columns`: chat, alpaca, prompt_completion, text
    (first match in that order). Raises DataError naming the expected columns when none fits."""
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(
        f"cannot tell the format from the columns {sorted(cols)}: expected 'messages' (chat), "
        "'instruction' + 'output' (alpaca), 'prompt' + 'completion' (prompt_completion) or "
        "'text' (text); or set data.format"
    )


def required_columns(fmt: str) -> tuple[str, ...]:
    """The columns every row of format `fmt` must have."""
    return _FIELDS[fmt][0]


def read_rows(suffix: str, raw: bytes) -> list[tuple[str, dict | DataError]]:
    """(location, row) pairs of a file's bytes; see `iter_rows`."""
    return list(iter_rows(suffix, io.BytesIO(raw)))


def iter_rows(suffix: str, f) -> Iterator[tuple[str, dict | DataError]]:
    """(location, row) pairs read from a binary file object, location 'line N' (JSONL, CSV) or
    'row N' (JSON, Parquet), 1-based; a row that cannot be parsed is a DataError in place of the
    dict. Raises DataError for a file that cannot be read at all. JSONL, CSV and Parquet are read
    a line or a batch at a time (memory bounded by the longest row); a JSON document is parsed
    whole, as JSON has no row boundary to stop at."""
    return _READERS[suffix](f)


def _jsonl_rows(f) -> Iterator[tuple[str, dict | DataError]]:
    for n, line in enumerate(f, start=1):
        if line.endswith(b"\n"):
            line = line[:-1]
        if not line.strip():
            continue
        loc = f"line {n}"
        try:
            obj = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError:
            yield loc, DataError("not UTF-8 text")
            continue
        except json.JSONDecodeError as e:
            yield loc, DataError(f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield loc, _object_or_error(obj)


def _json_rows(f) -> Iterator[tuple[str, dict | DataError]]:
    try:
        obj = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        hint = "; one object per line belongs in a .jsonl file" if e.msg == "Extra data" else ""
        raise DataError(f"line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}){hint}") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError('expected a list of objects or {"data": [...]}, '
                        f"got {type(obj).__name__}")
    for i in range(len(obj)):
        row, obj[i] = obj[i], None  # let each row go once it is read
        yield f"row {i + 1}", _object_or_error(row)


def _csv_rows(f) -> Iterator[tuple[str, dict | DataError]]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        try:
            header = next(reader)
        except StopIteration:
            return
        end = reader.line_num  # a quoted cell may span lines: a row starts after the previous end
        for cells in reader:
            loc, end = f"line {end + 1}", reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                yield loc, DataError(f"{len(cells)} cells, the header has {len(header)}")
                continue
            # An empty cell is a missing value, as pandas reads it (NaN).
            yield loc, {h: (c if c != "" else None) for h, c in zip(header, cells, strict=True)}
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"line {reader.line_num}: malformed CSV ({e})") from None
    finally:
        text.detach()  # the caller closes the file


def _parquet_rows(f) -> Iterator[tuple[str, dict | DataError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})") from None


def _object_or_error(obj) -> dict | DataError:
    if isinstance(obj, dict):
        return obj
    return DataError(f"expected a JSON object, got {type(obj).__name__}")


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows,
            ".parquet": _parquet_rows}
EXTENSIONS = tuple(_READERS)


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def normalize(row: dict, fmt: str) -> dict:
    """The row reduced to its format's fields (alpaca `input` defaults to ""), validated.
    Raises DataError (no location) for a missing field, a wrong type or an empty response."""
    required, optional, _ = _FIELDS[fmt]
    out: dict = {}
    for name in required + optional:
        if name not in row:
            if name in optional:
                out[name] = ""
                continue
            raise DataError(f"field '{name}' is missing ({_needs(fmt)})")
        value = row[name]
        if name == "messages":
            out[name] = _messages(value)
            continue
        if _is_null(value):
            if name in optional or name in _MAY_BE_EMPTY:
                out[name] = ""
                continue
            raise DataError(f"field '{name}' is empty")
        if not isinstance(value, str):
            raise DataError(f"field '{name}' must be a string, got {type(value).__name__}")
        if not value and name in required and name not in _MAY_BE_EMPTY:
            what = " (no response to learn)" if name == _FIELDS[fmt][2] else ""
            raise DataError(f"field '{name}' is empty{what}")
        out[name] = value
    return out


def _messages(value) -> list[dict]:
    if isinstance(value, str):  # CSV cannot hold a list: a conversation is a cell of JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"field 'messages' is not valid JSON ({e.msg})") from None
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(
            f"field 'messages' must be a non-empty list of {{role, content}}, got {got}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"messages[{i}]: role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}]: field 'content' must be a string, "
                            f"got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    last = _last_assistant(messages)
    if last is None:
        raise DataError("field 'messages' has no assistant turn (no response to learn)")
    if not messages[last]["content"]:
        raise DataError(
            f"messages[{last}]: the last assistant turn is empty (no response to learn)")
    return messages


def _last_assistant(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    return None


def render(record: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """(prompt_text, response_text) of a normalized record, by the templates in the module doc.
    The tokenizer matters only for chat (its chat template and eos token)."""
    if fmt == "alpaca" and getattr(tokenizer, "chat_template", None):
        # A model tuned on chat answers best in its own template (SmolLM2-Instruct, Llama-3-Instruct).
        user = record["instruction"]
        if record.get("input", "").strip():
            user += "\n\n" + record["input"]
        return _render_chat([{"role": "user", "content": user},
                             {"role": "assistant", "content": record["output"]}], tokenizer)
    if fmt == "alpaca":
        prompt = ALPACA_INSTRUCTION.format(instruction=record["instruction"])
        if record.get("input", "").strip():
            prompt += ALPACA_INPUT.format(input=record["input"])
        return prompt + ALPACA_RESPONSE, record["output"]
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if fmt == "text":
        return "", record["text"]
    if fmt == "chat":
        return _render_chat(record["messages"], tokenizer)
    raise DataError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, str]:
    # Turns after the last assistant one carry no loss, so they are dropped; the trained span is the
    # final run of consecutive assistant turns.
    end = _last_assistant(messages) + 1
    start = end
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    convo, context = messages[:end], messages[:start]
    if getattr(tokenizer, "chat_template", None):
        def apply(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    else:
        eos = getattr(tokenizer, "eos_token", None) or ""

        def apply(msgs, gen):
            return default_chat_template(msgs, eos, gen)
    try:
        full = apply(convo, False)
    except Exception as e:  # a template's own checks (e.g. roles must alternate) reject the row
        raise DataError(f"the chat template rejects this conversation: {e}") from e
    if not context:
        return "", full
    # Some templates render the last turn differently with a generation prompt; fall back to the
    # plain rendering of the context, and give up if neither is a prefix of the whole.
    for gen in (True, False):
        try:
            prompt = apply(context, gen)
        except Exception as e:
            raise DataError(f"the chat template rejects this conversation: {e}") from e
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    raise DataError("the chat template does not render the turns before the final assistant turn "
                    "as a prefix of the whole conversation; use format prompt_completion instead")


def default_chat_template(messages: list[dict], eos_token: str,
                          add_generation_prompt: bool) -> str:
    """The chat rendering used when a tokenizer has no chat template (same as the tiny model's)."""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"assistant: {m['content']}{eos_token}\n")
        else:
            parts.append(f"{m['role']}: {m['content']}\n")
    if add_generation_prompt:
        parts.append(DEFAULT_GENERATION_PROMPT)
    return "".join(parts)
