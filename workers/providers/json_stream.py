"""Reading a JSON answer as it arrives with its long strings (base64 images) set aside as raw bytes: the
answer is never held whole, neither as bytes nor as text, and no image is ever parsed into a Python string
alongside its raw bytes."""

from __future__ import annotations

import json
import secrets
from typing import Any

# strings at least this long (base64 images, not messages or URLs) are kept out of the parsed answer
LONG_STRING = 64 * 1024
# past this many strings, the rest of the answer is kept as it comes: each string costs a turn of a Python
# loop, and an answer of millions of tiny strings must not cost more than parsing it does
MAX_SPLIT_STRINGS = 10_000
QUOTE, BACKSLASH = b'"', 0x5C


class RawString:
    """A long string of the answer, as the raw bytes between its quotes, handed over once by `take`."""

    def __init__(self, raw: bytes) -> None:
        self._raw: bytes | None = raw

    def take(self) -> bytes:
        """The string's value in UTF-8, with no copy unless it has JSON escapes; the bytes are let go, so an
        answer kept for its other fields holds no image."""
        raw, self._raw = self._raw, None
        if raw is None:
            raise RuntimeError("a long answer string was taken twice")
        if BACKSLASH in raw:  # JSON escapes (`\/` from some encoders): decode as the JSON parser would
            value: str = json.loads(b'"' + raw + b'"')
            return value.encode()
        return raw


class JsonSplitter:
    """Fed the answer's bytes chunk by chunk: short strings and everything around them build a small JSON
    text, each long string becomes a placeholder for its `RawString`. Quotes are found with `bytes.find`,
    so a 50 MB answer costs a few hundred C-speed scans."""

    def __init__(self) -> None:
        self.small = bytearray()
        self.long: dict[str, RawString] = {}
        self.mark = f"\0{secrets.token_hex(8)}:"  # an answer cannot forge it: random, and \0 is never raw JSON
        self.size = 0
        self._strings = 0
        self._inside = False  # within a string
        self._pieces: list[memoryview] = []  # the current string's bytes so far, not copied until it ends
        self._odd_backslashes = False  # the current string so far ends in an odd run of backslashes

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        view = memoryview(chunk)
        pos = 0
        while pos < len(chunk):
            if not self._inside:
                quote = chunk.find(QUOTE, pos) if self._strings < MAX_SPLIT_STRINGS else -1
                if quote < 0:
                    self.small += chunk[pos:]
                    return
                self.small += chunk[pos:quote]
                self._inside, self._pieces, self._odd_backslashes = True, [], False
                pos = quote + 1
                continue
            quote = self._closing_quote(chunk, pos)
            if quote < 0:
                self._add(view[pos:])
                return
            self._add(view[pos:quote])
            self._end_string()
            pos = quote + 1

    def keep(self, body: bytes) -> None:
        """A whole answer shorter than `LONG_STRING`: none of its strings can be long, so it is kept without the
        scan `feed` makes (a turn of a Python loop per string, which costs more than parsing a small answer)."""
        if self.size or len(body) >= LONG_STRING:
            raise ValueError("keep takes a whole answer shorter than LONG_STRING")
        self.small += body
        self.size = len(body)

    def _closing_quote(self, chunk: bytes, start: int) -> int:
        """The first quote from `start` that no backslash escapes; -1 when the string goes on past the chunk."""
        quote = chunk.find(QUOTE, start)
        while quote >= 0:
            first = quote
            while first > start and chunk[first - 1] == BACKSLASH:
                first -= 1
            backslashes = quote - first + (self._odd_backslashes if first == start else 0)
            if backslashes % 2 == 0:
                return quote
            quote = chunk.find(QUOTE, quote + 1)
        return -1

    def _add(self, piece: memoryview) -> None:
        if not piece:
            return
        run = 0
        while run < len(piece) and piece[-1 - run] == BACKSLASH:
            run += 1
        self._odd_backslashes = (run + (self._odd_backslashes if run == len(piece) else 0)) % 2 == 1
        self._pieces.append(piece)

    def _end_string(self) -> None:
        raw = b"".join(self._pieces)
        self._inside, self._pieces = False, []
        self._strings += 1
        if len(raw) < LONG_STRING:
            self.small += b'"' + raw + b'"'
            return
        name = f"{self.mark}{len(self.long)}"
        self.long[name] = RawString(raw)
        self.small += json.dumps(name).encode()

    def text(self) -> str:
        """The answer without its long strings, for messages; a string still open is left as it came."""
        tail = b'"' + b"".join(self._pieces) if self._inside else b""
        return (bytes(self.small) + tail).decode("utf-8", "replace")

    def parse(self, raw_keys: frozenset[str] = frozenset()) -> Any:
        """The parsed answer (ValueError if it is not JSON): a long string that is the value of a key in
        `raw_keys` stays a `RawString`, the others are put back as they were."""
        if self._inside:
            raise ValueError("the answer ends inside a string")
        parsed = json.loads(self.small)
        return self._restore(parsed, raw_keys, None) if self.long else parsed

    def _restore(self, value: Any, raw_keys: frozenset[str], key: str | None) -> Any:
        if isinstance(value, str) and value.startswith(self.mark):
            raw = self.long[value]
            return raw if key in raw_keys else raw.take().decode()
        if isinstance(value, dict):
            return {name: self._restore(item, raw_keys, name) for name, item in value.items()}
        if isinstance(value, list):
            return [self._restore(item, raw_keys, None) for item in value]
        return value
