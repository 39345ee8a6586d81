"""The bytes of service frames on the socket, after the handshake: ``multiprocessing.connection``
framing read in bulk (``FrameReader``, the reader threads of both sides), and a server frame,
or a batch of them, framed for one write (the server connection's writer thread). Imported by
both sides; no thread of its own."""

from __future__ import annotations

import pickle

from taskorch._errors import SerializationError
from taskorch._service.codec import encode_service_frame
from taskorch._service.protocol import (
    O_ERROR,
    S_BATCH,
    SERVICE_MAX_FRAME,
    Done,
    ServerFrame,
    done_frame,
)
from taskorch._service.values import encode_service_error
from taskorch._wire import PROTOCOL


class FrameReader:

    """Reads ``multiprocessing.connection`` frames from a blocking fd, many per ``read()``
    (the reader threads of both sides, after the handshake, which reads exactly its own
    frames). ``Connection.recv_bytes`` costs two reads per frame; a burst of small frames
    here costs one read for all of them. A length over ``maxlength`` raises
    ``OSError("bad message length")``, as ``recv_bytes`` does, before the body is read."""

    CHUNK = 256 * 1024

    def __init__(self, fd: int, maxlength: int = SERVICE_MAX_FRAME) -> None:
        self._fd = fd
        self._maxlength = maxlength
        self._buf = bytearray()
        self._pos = 0  # start of the first unread byte in _buf

    def read(self) -> bytes:
        import os
        import struct

        while True:
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            need = 4
            if avail >= 4:
                (size,) = struct.unpack_from("!i", buf, pos)
                if size < 0 or size > self._maxlength:
                    raise OSError("bad message length")
                need = 4 + size
                if avail >= need:
                    self._pos = pos + need
                    return bytes(buf[pos + 4:pos + need])
            if pos:
                del buf[:pos]  # drop what was consumed before reading more
                self._pos = 0
            chunk = os.read(self._fd, max(self.CHUNK, need - avail))
            if not chunk:
                raise EOFError
            buf += chunk


def frame_bytes(message: ServerFrame) -> bytes:
    """``message`` encoded and framed as ``Connection.send_bytes`` would (frames < 2 GiB). An
    S_DONE over SERVICE_MAX_FRAME becomes an O_ERROR outcome (SerializationError) for its
    caller; any other frame over it raises SerializationError."""
    import struct

    body = encode_service_frame(message)
    if len(body) > SERVICE_MAX_FRAME:
        return _oversized(message, len(body))
    return struct.pack("!i", len(body)) + body


def _oversized(message: ServerFrame, size: int) -> bytes:
    error = SerializationError(
        f"the task's outcome is {size / 2**20:.1f} MiB pickled, over taskorch serve's "
        f"{SERVICE_MAX_FRAME // 2**20} MiB frame limit; return large data in a file and pass "
        "its path")
    if not isinstance(message, Done):
        raise error
    return frame_bytes(done_frame(message.req, O_ERROR, message.attempts, message.seconds,
                                  encode_service_error(error)))


def frame_batch(messages: list[ServerFrame]) -> bytes | None:
    """Several server messages as one framed S_BATCH (one pickle for all: a writer that finds
    hundreds of S_ACCEPTED and S_DONE queued spends one ``dumps`` and the client one
    ``loads``); None if the batch would exceed SERVICE_MAX_FRAME (send them one by one)."""
    import struct

    body = pickle.dumps((S_BATCH, tuple(map(tuple, messages))), PROTOCOL)
    if len(body) > SERVICE_MAX_FRAME:
        return None
    return struct.pack("!i", len(body)) + body
