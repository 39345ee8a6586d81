"""``taskorch run``'s input, as lines (CLI, the "taskorch-cli-reader" thread).

stdin and ``--input`` are read the same way: as bytes, split at ``\\n``, ``\\r\\n`` or a lone
``\\r`` (as text files are in Python's universal-newlines mode), each line then decoded on its
own. So a line that is not UTF-8 costs that line alone (``decode_line`` says which line and
where), and the lines around it are read as usual. Reading returns what the stream has
(``read1``), so lines are handed on as they arrive from a pipe that stays open.
"""

from __future__ import annotations

import re
from typing import BinaryIO, Iterator

#: Bytes asked of the stream per read: big enough for few system calls on a file, and a read
#: from a pipe returns whatever is there without waiting to fill it.
CHUNK = 64 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")


class LineError(ValueError):
    """An input line that cannot be read (not UTF-8): the line is skipped with an error record."""


def numbered_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """``(line number, the line's bytes without its ending)``; numbers start at 1 and count
    every line, empty ones included."""
    read = stream.read1 if hasattr(stream, "read1") else stream.read
    buffer = bytearray()
    scan = 0  # buffer[:scan] holds no line end: searching resumes here (no rescans of a long line)
    number = 0
    while True:
        chunk = read(CHUNK)
        at_eof = not chunk
        buffer += chunk
        start = 0  # where the next line begins
        while True:
            match = _LINE_END.search(buffer, scan)
            if match is None:
                scan = len(buffer)
                break
            if match.group() == b"\r" and match.end() == len(buffer) and not at_eof:
                scan = match.start()  # maybe the first half of a \r\n split across two reads
                break
            number += 1
            yield number, bytes(buffer[start:match.start()])
            start = scan = match.end()
        del buffer[:start]
        scan -= start
        if at_eof:
            if buffer:
                yield number + 1, bytes(buffer)
            return


def decode_line(raw: bytes, number: int) -> str:
    """The line as text; LineError naming the line and the column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.end]
        raise LineError(
            f"input line {number}: not valid UTF-8 (byte 0x{bad[0]:02x} at column {exc.start + 1}: "
            f"{exc.reason}); the line was skipped. Convert the input to UTF-8 (e.g. iconv)"
        ) from None
