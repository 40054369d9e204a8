"""Streams the records of a JSON list or a JSON-lines file without loading the file.

LLaVA ships its data as one big JSON list (``llava_v1_5_mix665k.json`` is ~1 GB), so the list is
parsed one element at a time with ``json.JSONDecoder.raw_decode`` over a sliding text buffer:
memory stays at one chunk plus one record. Bytes that are not UTF-8 are kept as lone
surrogates (``errors="surrogateescape"``) so that one bad caption costs one record, not the file;
:func:`find_bad_text` finds them afterwards.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_BYTES = 1 << 20
MAX_RECORD_CHARS = 64 << 20  # a "record" this long is a broken file, not a record
WHITESPACE = " \t\n\r"
_STRUCTURE = re.compile(r'[][{}"]')  # what changes the nesting outside a string
_STRING_END = re.compile(r'["\\]')  # inside a string: its end or an escape


@dataclass(frozen=True)
class Entry:
    """One element of the input.

    Attributes:
        index: position in the input (0-based), the key of the sample it becomes.
        value: the parsed JSON value, or None when it could not be parsed.
        error: why it could not be parsed (JSON lines only; a broken list stops the read).
        offset: input bytes read so far (for progress bars).
    """

    index: int
    value: Any
    error: str | None
    offset: int


def file_sha256(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def iter_records(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Entry]:
    """Entries of a JSON list (``[{...}, ...]``) or of JSON lines (one value a line).

    Raises:
        ValueError: for a file that is neither, or a JSON list that is broken (the message says
            where; a JSON-lines file instead reports a bad line as an entry with ``error``).
    """
    with open(path, "rb") as f:
        first = _first_char(f)
        f.seek(0)
        if first == b"[":
            yield from _JsonList(f, str(path), chunk_bytes)
        elif first == b"{":
            yield from _json_lines(f, str(path))
        else:
            raise ValueError(
                f"{path}: expected a JSON list ('[') or JSON lines ('{{' on every line), found {first!r}"
            )


def find_bad_text(value: Any) -> str | None:
    """The first string in a JSON value that holds undecodable bytes (lone surrogates), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        bad = find_bad_text(key) if isinstance(key, str) else None
        bad = bad or find_bad_text(item)
        if bad is not None:
            return bad
    return None


def _first_char(f: BinaryIO) -> bytes:
    """The first non-whitespace byte (after a UTF-8 BOM), or b"" for an empty file."""
    head = f.read(4096).lstrip(codecs.BOM_UTF8)
    while head and not head.lstrip():
        head = f.read(4096)
    return head.lstrip()[:1]


def _json_lines(f: BinaryIO, path: str) -> Iterator[Entry]:
    """Entries of a JSON-lines file; a line that does not parse becomes an entry with an error."""
    index, offset = 0, 0
    for raw in f:
        offset += len(raw)
        line = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            yield Entry(index, json.loads(line), None, offset)
        except json.JSONDecodeError as exn:
            problem = f"record {index} ({path}) is not JSON: {exn.msg} at column {exn.colno}"
            yield Entry(index, None, problem, offset)
        except RecursionError:  # valid JSON nested deeper than the parser goes: one bad record
            yield Entry(index, None, f"record {index} ({path}) is nested too deeply to parse", offset)
        index += 1


class _JsonList:
    """Iterates the elements of a top-level JSON list, reading ``chunk_bytes`` at a time."""

    def __init__(self, f: BinaryIO, path: str, chunk_bytes: int):
        self.f, self.path, self.chunk_bytes = f, path, chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.parse = json.JSONDecoder().raw_decode
        self.buf, self.pos, self.eof, self.offset = "", 0, False, 0

    def __iter__(self) -> Iterator[Entry]:
        if self._next_char() != "[":
            raise self._error("the file does not start with '['", 0)
        self.pos += 1
        index = 0
        while True:
            char = self._next_char()
            if char is None:
                raise self._error("the file ends before the closing ']' (was it cut short?)", index)
            if char == "]":
                self.pos += 1
                if self._next_char() is not None:
                    raise self._error("text after the closing ']'", index)
                return
            if index > 0:
                if char != ",":
                    raise self._error(f"expected ',' or ']' after record {index - 1}, found {char!r}", index)
                self.pos += 1
                self._next_char()
            try:
                value, error = self._value(index), None
            except _Unparsable as exn:  # a record the parser cannot take, skipped over: the rest reads on
                value, error = None, str(exn)
            yield Entry(index, value, error, self.offset)
            index += 1

    def _more(self) -> bool:
        """Reads the next chunk into the buffer (dropping what was parsed); False at the end."""
        block = self.f.read(self.chunk_bytes)
        self.offset += len(block)
        self.eof = not block
        self.buf = self.buf[self.pos :] + self.decoder.decode(block, final=self.eof)
        self.pos = 0
        return not self.eof

    def _next_char(self) -> str | None:
        """Skips whitespace; the next character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return None

    def _value(self, index: int) -> Any:
        """Parses the value at the cursor, reading more while it is (or may be) incomplete."""
        while True:
            too_long = len(self.buf) - self.pos > MAX_RECORD_CHARS
            try:
                value, end = self.parse(self.buf, self.pos)
            except RecursionError:
                self._skip_value(index)
                raise _Unparsable(f"record {index} ({self.path}) is nested too deeply to parse") from None
            except json.JSONDecodeError as exn:
                if self.eof or too_long:
                    raise self._error(f"{exn.msg} (record {index} is not valid JSON)", index) from None
                self._more()
                continue
            # A number or literal may go on in the next chunk: complete only before a delimiter.
            complete = end < len(self.buf) and self.buf[end] in ",]" + WHITESPACE
            if complete or self.eof or too_long:
                self.pos = end
                return value
            self._more()

    def _skip_value(self, index: int) -> None:
        """Moves the cursor past the array or object at it by matching brackets (strings respected).

        Raises:
            ValueError: the file ends inside it, or it is longer than :data:`MAX_RECORD_CHARS`.
        """
        depth, in_string, scanned = 0, False, 0
        while True:
            match = (_STRING_END if in_string else _STRUCTURE).search(self.buf, self.pos)
            if match is None:
                scanned += len(self.buf) - self.pos
                self.pos = len(self.buf)
                if scanned > MAX_RECORD_CHARS or not self._more():
                    raise self._error(f"record {index} does not end", index)
                continue
            char, self.pos = match.group(), match.end()
            if in_string:
                if char == "\\":  # skip the escaped character, which may start the next chunk
                    if self.pos >= len(self.buf) and not self._more():
                        raise self._error(f"record {index} does not end", index)
                    self.pos += 1
                else:
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return

    def _error(self, message: str, index: int) -> ValueError:
        return ValueError(
            f"{self.path}: broken JSON list near record {index} (byte ~{self.offset}): {message}. "
            f"Fix the file (python -m json.tool {self.path} shows where) or convert it to JSON lines"
        )


class _Unparsable(Exception):
    """A list element the parser cannot take (skipped over; the entry carries the reason)."""
