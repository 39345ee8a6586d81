"""What crosses the process boundary: frames split from raw reads of a worker channel, and
calls as run() encodes them and a worker decodes them (``_wire``)."""

from __future__ import annotations

import multiprocessing
import os
import struct
from typing import Callable

import _tasks as t
import pytest

from taskorch._framing import split_frames, write_frame
from taskorch._wire import BY_REFERENCE, decode_call, encode_call

SIZES = [0, 1, 100, 0, 70_000, 3]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_frames_sent_by_a_connection_come_back_whole_from_any_chunking(chunk: int) -> None:
    reader, writer = multiprocessing.Pipe()  # a socketpair, as between parent and worker
    sent = [bytes([i % 251]) * size for i, size in enumerate(SIZES)]
    raw = bytearray()
    try:
        for frame in sent:  # ~70 KiB in all: fits in the socket's buffer
            writer.send_bytes(frame)
        while len(raw) < sum(4 + len(frame) for frame in sent):
            raw += os.read(reader.fileno(), 1 << 20)
    finally:
        reader.close()
        writer.close()
    buffer, got = bytearray(), []
    for start in range(0, len(raw), chunk):
        buffer += raw[start:start + chunk]
        got += split_frames(buffer)
    assert got == sent and buffer == b""


def test_write_frame_writes_what_a_connection_reads() -> None:
    # The workers' events and a service client's requests go out through write_frame; the
    # parent and the server read them as Connection frames (its one write, or two past 16 KiB).
    reader, writer = multiprocessing.Pipe()
    sent = [bytes([i % 251]) * size for i, size in enumerate(SIZES)]
    try:
        for frame in sent:  # ~70 KiB in all: fits in the socket's buffer
            write_frame(writer.fileno(), frame)
        assert [reader.recv_bytes() for _ in sent] == sent
    finally:
        reader.close()
        writer.close()


def test_the_long_length_form_and_a_partial_frame() -> None:
    buffer = bytearray(struct.pack("!i", -1) + struct.pack("!Q", 5) + b"hello")
    buffer += struct.pack("!i", 10) + b"part"  # the rest of this frame has not arrived
    assert split_frames(buffer) == [b"hello"]
    assert bytes(buffer) == struct.pack("!i", 10) + b"part"
    buffer += b"ial..."
    assert split_frames(buffer) == [b"partial..."] and buffer == b""
    buffer += struct.pack("!i", -1) + b"\0\0"  # the long header itself incomplete
    assert split_frames(buffer) == [] and len(buffer) == 6


def test_drain_reads_what_a_dead_worker_sent_even_after_a_failed_send() -> None:
    # A failed send closes the channel for calls (channel_open False), not for reading: the
    # outcomes the worker sent before dying still count when its exit is handled.
    from taskorch._parent.process import WorkerProcess
    from taskorch._wire import Ready, Succeeded, encode_frame, ready, succeeded

    reader, writer = multiprocessing.Pipe()
    worker = object.__new__(WorkerProcess)  # the channel half only: no process needed
    worker.conn, worker._fd, worker._received = reader, reader.fileno(), bytearray()
    worker.eof, worker.last_read, worker.channel_open = False, 0.0, False
    try:
        writer.send_bytes(encode_frame([ready(123)]))
        writer.send_bytes(encode_frame([succeeded(7, 1, 0.01, b"x")]))
        writer.close()
        assert worker.drain() == [Ready(123), Succeeded(7, 1, 0.01, b"x")]
        assert worker.eof and not worker.channel_open
    finally:
        reader.close()


def test_each_message_is_built_in_one_place_and_read_by_name() -> None:
    # What a worker's constructors send comes back as the named type, field for field; a
    # call item likewise; what is none of ours is refused when it arrives through Dask.
    from taskorch import _wire as w

    events = [w.started(1, 2), w.retrying(1, 2, "E: x", 0.5, True),
              w.succeeded(1, 3, 0.25, b"r"), w.failed(1, 3, 0.25, (None, "E", "x", "tb")),
              w.retiring("memory"), w.ready(99), w.recalled([4, 5])]
    decoded = w.decode_events([w.encode_frame(events[:3]), w.encode_frame(events[3:])])
    assert decoded == [
        w.Started(1, 2, None), w.Retrying(1, 2, "E: x", 0.5, True), w.Succeeded(1, 3, 0.25, b"r"),
        w.Failed(1, 3, 0.25, None, "E", "x", "tb"), w.Retiring("memory"), w.Ready(99),
        w.Recalled([4, 5]),
    ]
    assert [type(e) for e in decoded] == [w.Started, w.Retrying, w.Succeeded, w.Failed,
                                          w.Retiring, w.Ready, w.Recalled]
    failed = decoded[3]
    assert isinstance(failed, w.Failed) and failed.error == (None, "E", "x", "tb")
    assert [w.decode_event(list(e)) for e in events] == decoded  # (Dask: lists)
    for junk in ([], [0, 1], [1, 2], [42], ["x"], {"a": 1}):
        with pytest.raises(ValueError):
            w.decode_event(junk)

    class Item:
        task_id, payload, policy_bytes, attempts = 7, b"call", None, 2

    assert w.decode_calls(w.encode_calls([Item()])) == [w.Call(7, b"call", None, 2)]


# -- calls: encode_call in the parent, decode_call in the worker --------------------------------


def _make_closure(shared: list) -> Callable[[list], bool]:
    return lambda arg: arg is shared


def test_a_module_function_is_sent_by_reference_and_its_arguments_each_time() -> None:
    first = encode_call(t.add, (1,), {"b": 2})
    assert first[:1] == BY_REFERENCE  # the cached form
    assert decode_call(first) == (t.add, (1,), {"b": 2})
    nested = encode_call(t.add, ([1, {"x": (2, 3)}],), {"policy": "p"})  # not plain: cloudpickle
    assert decode_call(nested) == (t.add, ([1, {"x": (2, 3)}],), {"policy": "p"})
    assert decode_call(encode_call(t.add, (5,), {}))[1] == (5,)  # never a stale argument


def test_functions_pickled_by_value_keep_one_pickle_with_their_arguments() -> None:
    shared = [1, 2]
    payload = encode_call(_make_closure(shared), (shared,), {})
    assert payload[:1] == b"\x80"  # the general form
    fn, args, kwargs = decode_call(payload)
    assert fn(*args) is True  # the captured list and the argument are still one object
    assert encode_call(lambda: 1, (), {})[:1] == b"\x80"


def test_a_module_registered_for_pickling_by_value_is_not_sent_by_reference() -> None:
    import cloudpickle

    assert encode_call(t.square, (3,), {})[:1] == BY_REFERENCE  # now cached as by reference
    cloudpickle.register_pickle_by_value(t)
    try:
        payload = encode_call(t.square, (3,), {})
        assert payload[:1] == b"\x80"
        fn, args, _ = decode_call(payload)
        assert fn(*args) == 9 and fn is not t.square  # a copy, sent by value
    finally:
        cloudpickle.unregister_pickle_by_value(t)


def test_a_function_no_longer_importable_by_its_name_is_sent_by_value() -> None:
    # cloudpickle decides on every call; so does the cache: a module function replaced in its
    # module, or whose module left sys.modules, goes by value from then on.
    import sys
    import types

    module = types.ModuleType("taskorch_test_dynamic")
    exec("def f(x):\n    return ('v1', x)\n", module.__dict__)
    sys.modules[module.__name__] = module
    original = module.f
    try:
        assert encode_call(original, (1,), {})[:1] == BY_REFERENCE
        exec("def f(x):\n    return ('v2', x)\n", module.__dict__)  # replaced, as by a reload
        payload = encode_call(original, (1,), {})
        assert payload[:1] == b"\x80"
        del sys.modules[module.__name__]  # the worker could not import it: by value still works
        fn, args, _ = decode_call(payload)
        assert fn(*args) == ("v1", 1)
        assert encode_call(module.f, (1,), {})[:1] == b"\x80"
    finally:
        sys.modules.pop(module.__name__, None)


@pytest.mark.parametrize("args", [{"id": 2**70}, {"before_id": -(2**70)}])
def test_an_operators_request_with_an_integer_past_sqlites_range_is_a_bad_request(
        args: dict[str, int]) -> None:
    # As in every other frame: refused at decoding (that request alone), never an
    # OverflowError inside the journal's shared transaction.
    from taskorch._service.codec import decode_client_frame, encode_service_frame
    from taskorch._service.operations import admin_request_frame
    from taskorch._service.protocol import BadRequest, ServiceProtocolError

    assert decode_client_frame(encode_service_frame(admin_request_frame(3, "task", {"id": 5})))
    with pytest.raises(BadRequest):
        decode_client_frame(encode_service_frame(admin_request_frame(3, "tasks", args)))
    with pytest.raises(ServiceProtocolError):  # no request number to answer
        decode_client_frame(encode_service_frame(admin_request_frame(2**70, "task", {"id": 5})))


@pytest.mark.parametrize("field, bad", [
    ("payload", "not bytes"), ("payload", BY_REFERENCE + b"\x00"),  # (cut short)
    ("policy", (b"p", -1, None, 0.0, 0.0, False, False)), ("wait", 1), ("client", b""),
    ("client", b"c" * 65), ("client", "text"), ("retry", None), ("credit", 0),
    ("timing", (0, float("inf"), None)), ("key", ""), ("after", (0,))])
def test_a_submission_with_a_bad_field_is_a_bad_request(field: str, bad: object) -> None:
    # Checked field by field as a submission is decoded (``codec._is_valid``): that request
    # alone is refused, naming the frame.
    from taskorch._service.codec import decode_client_frame, encode_service_frame
    from taskorch._service.protocol import BadRequest, Submit, submit_frame

    good = submit_frame(7, encode_call(t.square, (3,), {}), None, wait=False, client=b"c" * 16,
                        retry=False, credit=True)
    decoded = decode_client_frame(encode_service_frame(good))
    assert decoded == good and type(decoded) is Submit  # (decoded as the named frame)
    with pytest.raises(BadRequest, match="invalid fields in a Submit frame") as refused:
        decode_client_frame(encode_service_frame(good._replace(**{field: bad})))
    assert refused.value.req == 7
