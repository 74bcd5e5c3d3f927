"""Reading JSONL datasets and recognising the record format (the three TRL formats).

Every error names the file and line (``data.jsonl:17: ...``) because the user's next step is to
open that line; a record that fits no format lists the fields each format expects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NoReturn

from lora_jax.data.config import DEFAULT_MAX_RECORD_BYTES
from lora_jax.errors import DataError

__all__ = ["FORMATS", "read_jsonl", "read_jsonl_lines", "detect_format", "detect_file_format"]

FORMATS = ("text", "prompt_completion", "messages")

_EXPECTED = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'


def read_jsonl_lines(
    path: str | os.PathLike, max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES
) -> list[tuple[int, dict]]:
    """``(line_number, record)`` per non-blank line (1-based), so later errors can name the line.

    The file is read line by line, and a line longer than ``max_record_bytes`` (``None``: no limit)
    is refused before it is decoded or parsed, having read at most that many bytes of it, so memory
    is bounded by the limit and not by the file. Lines are decoded one by one (a UTF-8 BOM on the
    first is dropped) so that an encoding error, too, points at its line rather than a byte offset.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check the path (relative paths are from {os.getcwd()})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give a JSONL file (one JSON object per line)")
    records: list[tuple[int, dict]] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in _raw_lines(f, path, max_record_bytes):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                record = _parse_line(raw, path, lineno)
                if record is not None:
                    records.append((lineno, record))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from None
    if not records:
        raise DataError(
            f"{path}: no records (empty file or only blank lines); add one JSON object per line, such as {_EXPECTED}"
        )
    return records


def read_jsonl(path: str | os.PathLike, max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> list[dict]:
    """The records of a JSONL file, in order; `DataError` for a missing, malformed or empty file,
    or a line longer than ``max_record_bytes``."""
    return [record for _, record in read_jsonl_lines(path, max_record_bytes)]


_MEASURE_AT_MOST = 1 << 30  # an over-long line is measured up to here for the message, no further


def _raw_lines(f: BinaryIO, path: str, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes without the line break)``, reading at most ``limit`` + 2 bytes of a line.

    Line breaks are "\\n", "\\r\\n" and a lone "\\r" (as ``bytes.splitlines``); the limit applies to
    the bytes between two "\\n"."""
    lineno = 0
    while True:
        raw = f.readline(-1 if limit is None else limit + 2)  # + 2: room for a "\\r\\n" at the end
        if not raw:
            return
        whole = raw.endswith(b"\n")
        line = raw[:-1] if whole else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if limit is not None and len(line) > limit:
            size = len(line) if whole else _drain(f, len(line), min(max(limit, 1 << 16), 1 << 20))
            _too_long(path, lineno + 1, size, limit)
        for piece in line.split(b"\r") if b"\r" in line else (line,):
            lineno += 1
            yield lineno, piece


def _drain(f: BinaryIO, seen: int, chunk_bytes: int) -> int:
    """Skip to the end of the current line, a chunk at a time; its length (capped) in bytes."""
    while seen <= _MEASURE_AT_MOST:
        chunk = f.readline(chunk_bytes)
        if not chunk:
            break
        if chunk.endswith(b"\n"):
            return seen + len(chunk.rstrip(b"\r\n"))
        seen += len(chunk)
    return seen


def _too_long(path: str, lineno: int, size: int, limit: int) -> NoReturn:
    over = "more than " if size > _MEASURE_AT_MOST else ""
    fits = 1 << max(size - 1, 1).bit_length()
    raise DataError(
        f"{path}:{lineno}: record is {over}{size} bytes ({_human(size)}), over "
        f"data.max_record_bytes={limit} ({_human(limit)}), so it is refused before "
        "tokenizing; split it into smaller records, or raise the limit if records this "
        f"long are meant (e.g. --set data.max_record_bytes={fits})"
    )


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _parse_line(raw: bytes, path: str, lineno: int) -> dict | None:
    """The record on one line; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the line or remove it"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{lineno}: record is a JSON {_json_type(record)}, expected an "
            f"object such as {_EXPECTED}; write one JSON object per line"
        )
    return record


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """ "text", "prompt_completion" or "messages", after checking the fields' types.

    ``where`` (``"data.jsonl:17"``) prefixes every error. Extra fields (``id``, ``meta``) are
    ignored; fields of two formats at once are refused, since silently preferring one would train
    on something other than what the user meant.
    """
    families = [
        name
        for name, keys in (
            ("text", ("text",)),
            ("prompt_completion", ("prompt", "completion")),
            ("messages", ("messages",)),
        )
        if any(k in record for k in keys)
    ]
    if not families:
        raise DataError(f"{where}: record has fields {sorted(record)}; expected {_EXPECTED}")
    if len(families) > 1:
        raise DataError(
            f"{where}: record has fields of several formats ({', '.join(families)}); "
            f"keep the fields of one: {_EXPECTED}"
        )
    fmt = families[0]
    if fmt == "text":
        _check_str(record, "text", where)
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                other = "completion" if key == "prompt" else "prompt"
                raise DataError(
                    f"{where}: record has '{other}' but no '{key}'; a "
                    "prompt/completion record needs both: "
                    '{"prompt": ..., "completion": ...}'
                )
            if not isinstance(record[key], str):
                raise DataError(
                    f"{where}: '{key}' is a JSON {_json_type(record[key])}, expected a string "
                    '(for conversations use {"messages": [{"role": ..., "content": ...}, ...]})'
                )
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
            raise DataError(
                f"{path}:{lineno}: record is in '{other}' format but line {first_line} "
                f"is '{fmt}'; every record of a file must use one format"
            )
    return fmt


def _check_str(record: Mapping[str, Any], key: str, where: str) -> None:
    if not isinstance(record[key], str):
        raise DataError(f"{where}: '{key}' is a JSON {_json_type(record[key])}, expected a string")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: messages[{i}] is a JSON {_json_type(message)}; each message "
                'must be an object {"role": ..., "content": ...}'
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataError(
                    f'{where}: messages[{i}] has no \'{key}\'; each message needs {{"role": ..., "content": ...}}'
                )
            if not isinstance(message[key], str):
                raise DataError(f"{where}: messages[{i}].{key} is a JSON {_json_type(message[key])}, expected a string")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
