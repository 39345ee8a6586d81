"""Frames on a stream: ``multiprocessing.connection.Connection.send_bytes``'s framing, a 4-byte
big-endian signed length, or -1 and then an 8-byte length for a frame of 2 GiB or more, then
the frame. Written by ``write_frame`` (a worker's events, a service client's requests) and
read in bulk by ``split_frames`` (the parent's dispatcher thread, from its workers). Imported by
both sides of the worker channel and by the service's client; no state, no thread.
"""

from __future__ import annotations

import os
import struct

_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
#: A frame up to this size goes out with its length in one write (a copy); a larger one in two.
_ONE_WRITE = 16384


def split_frames(buffer: bytearray) -> list[bytes]:
    """Remove the complete frames at the front of ``buffer`` and return them.

    The parent reads its channels in large chunks and splits them here: one ``read`` for every
    frame that has arrived, where ``recv_bytes`` costs two reads and a poll per frame (about
    one frame per task)."""
    frames: list[bytes] = []
    view = memoryview(buffer)
    pos, end = 0, len(buffer)
    try:
        while end - pos >= 4:
            size = _LENGTH.unpack_from(view, pos)[0]
            head = 4
            if size == -1:
                if end - pos < 12:
                    break
                size = _LONG_LENGTH.unpack_from(view, pos + 4)[0]
                head = 12
            if end - pos - head < size:
                break
            frames.append(bytes(view[pos + head:pos + head + size]))
            pos += head + size
    finally:
        view.release()
    del buffer[:pos]
    return frames


def write_frame(fd: int, frame: bytes) -> None:
    """``Connection.send_bytes(frame)`` on the blocking descriptor ``fd``: the same bytes (the
    framing ``split_frames`` reads), without its Python layers, which cost about as much as
    the system call (a worker sends a frame per task, a service client one per run()). OSError
    as send_bytes raises it; a frame cut short leaves the channel unusable (its user drops it)."""
    size = len(frame)
    head = _LENGTH.pack(size) if size <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    if size <= _ONE_WRITE:
        _write_all(fd, head + frame)
    else:
        _write_all(fd, head)
        _write_all(fd, frame)


def _write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n < len(data):  # (cut short by a send timeout, or a signal: the rest)
        rest = memoryview(data)[n:]
        while rest:
            rest = rest[os.write(fd, rest):]
