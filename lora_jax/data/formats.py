"""Reading JSONL datasets and recognising the record format (the three TRL formats).

Every error names the file and line (``data.jsonl:17: ...``) because the user's next step is to
open that line; a record that fits no format lists the fields each format expects.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from lora_jax.errors import DataError

__all__ = ["FORMATS", "read_jsonl", "read_jsonl_lines", "detect_format", "detect_file_format"]

FORMATS = ("text", "prompt_completion", "messages")

_EXPECTED = ('{"text": ...}, {"prompt": ..., "completion": ...} or '
             '{"messages": [{"role": ..., "content": ...}, ...]}')


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line_number, record)`` per non-blank line (1-based), so later errors can name the line.

    Lines are decoded one by one (a UTF-8 BOM on the first is dropped) so that an encoding error,
    too, points at its line rather than a byte offset.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check the path (relative paths are from "
                        f"{os.getcwd()})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give a JSONL file (one JSON object per line)")
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from None
    records: list[tuple[int, dict]] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                            "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                            "fix the line or remove it") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: record is a JSON {_json_type(record)}, expected an "
                            f"object such as {_EXPECTED}; write one JSON object per line")
        records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no records (empty file or only blank lines); add one JSON "
                        f"object per line, such as {_EXPECTED}")
    return records


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, in order; `DataError` for a missing, malformed or empty file."""
    return [record for _, record in read_jsonl_lines(path)]


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """"text", "prompt_completion" or "messages", after checking the fields' types.

    ``where`` (``"data.jsonl:17"``) prefixes every error. Extra fields (``id``, ``meta``) are
    ignored; fields of two formats at once are refused, since silently preferring one would train
    on something other than what the user meant.
    """
    families = [name for name, keys in (("text", ("text",)),
                                         ("prompt_completion", ("prompt", "completion")),
                                         ("messages", ("messages",)))
                if any(k in record for k in keys)]
    if not families:
        raise DataError(f"{where}: record has fields {sorted(record)}; expected {_EXPECTED}")
    if len(families) > 1:
        raise DataError(f"{where}: record has fields of several formats ({', '.join(families)}); "
                        f"keep the fields of one: {_EXPECTED}")
    fmt = families[0]
    if fmt == "text":
        _check_str(record, "text", where)
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                other = "completion" if key == "prompt" else "prompt"
                raise DataError(f"{where}: record has '{other}' but no '{key}'; a "
                                'prompt/completion record needs both: '
                                '{"prompt": ..., "completion": ...}')
            if not isinstance(record[key], str):
                raise DataError(
                    f"{where}: '{key}' is a JSON {_json_type(record[key])}, expected a string "
                    '(for conversations use {"messages": [{"role": ..., "content": ...}, ...]})')
    else:
        _check_messages(record["messages"], where)
    return fmt


def detect_file_format(records: list[tuple[int, dict]], path: str) -> str:
    """The one format shared by every record of a file; a mix is refused, naming the first odd line.

    One format per file keeps the loss masking uniform and catches a stray line from another
    dataset concatenated by mistake.
    """
    first_line, first = records[0]
    fmt = detect_format(first, f"{path}:{first_line}")
    for lineno, record in records[1:]:
        other = detect_format(record, f"{path}:{lineno}")
        if other != fmt:
            raise DataError(f"{path}:{lineno}: record is in '{other}' format but line {first_line} "
                            f"is '{fmt}'; every record of a file must use one format")
    return fmt


def _check_str(record: Mapping[str, Any], key: str, where: str) -> None:
    if not isinstance(record[key], str):
        raise DataError(f"{where}: '{key}' is a JSON {_json_type(record[key])}, expected a string")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        '{"role": ..., "content": ...} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is a JSON {_json_type(message)}; each message "
                            'must be an object {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: messages[{i}] has no '{key}'; each message needs "
                                '{"role": ..., "content": ...}')
            if not isinstance(message[key], str):
                raise DataError(f"{where}: messages[{i}].{key} is a JSON "
                                f"{_json_type(message[key])}, expected a string")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
