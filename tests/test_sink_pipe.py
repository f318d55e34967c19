"""The framing between the sink's receiving and writer processes (cloud_sink.ingest.pipe):
whatever way the byte stream is cut into reads, the frames come out whole, in order, once."""

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sink.ingest.pipe import frame, read_frame, take_frames

# what goes over the pipe: (batch_id, [(topic, payload)]) and the writer's answers
MESSAGES = st.lists(st.tuples(
    st.integers(min_value=0, max_value=2**31),
    st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=300)), max_size=5)), max_size=8)


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_frames_survive_any_cut_of_the_stream(messages: list[object], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    buf, got, pos, i = bytearray(), [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        buf += stream[pos:pos + step]
        pos, i = pos + step, i + 1
        got += take_frames(buf)
    assert got == messages
    assert buf == bytearray()  # nothing left over, no partial frame taken


def test_a_partial_frame_waits_for_the_rest() -> None:
    whole = frame((7, [("t", b"\x00" * 100)]))
    buf = bytearray(whole[:-1])
    assert take_frames(buf) == []
    assert bytes(buf) == whole[:-1]
    buf += whole[-1:]
    assert take_frames(buf) == [(7, [("t", b"\x00" * 100)])]


def test_read_frame_on_a_real_socketpair_then_eof() -> None:
    a, b = socket.socketpair()
    big = (1, [("s/d/touch", bytes(range(256)) * 2000)])  # larger than one socket buffer
    sender = threading.Thread(target=lambda: (a.sendall(frame(big) + frame("end")), a.close()))
    sender.start()
    try:
        assert read_frame(b) == big
        assert read_frame(b) == "end"
        with pytest.raises(EOFError):
            read_frame(b)
    finally:
        sender.join(5)
        b.close()
