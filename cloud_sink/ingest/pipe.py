"""The socketpair between the sink's receiving process and its writer process: framed pickles.

Rules of this file:

- A frame is a 4-byte big-endian length, then a pickle. Three kinds go over the pair:
  the receiver's hello ``(store url, Policy, log level)``, once, first; a batch
  ``(batch_id, [(topic, payload), ...])``; and the writer's answer after its commit
  ``(batch_id, (stored, repeated, dead, flagged), [(site, device, upto), ...], gaps_opened,
  {"dead": {reason: n}, "open_gaps": n})``. A batch whose list is ``ANNOUNCE`` asks for the
  acknowledgement of every device the store knows (answered in the same shape, counts 0).
- Pickle is safe here: both ends are this checkout's own processes, on a socketpair nobody
  else holds; what came from the network travels inside as plain bytes.
- No I/O policy: the blocking reads are for the writer (one batch at a time); the receiver
  does its own non-blocking send/recv in its select() loop and parses with take_frames().
"""

import pickle
import socket
import struct
from typing import Any

HEAD = struct.Struct("!I")
ANNOUNCE = "announce"  # in place of a batch's items: every known device's acknowledgement


def frame(obj: Any) -> bytes:
    """obj -> one frame, ready to send."""
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEAD.pack(len(body)) + body


def take_frames(buf: bytearray) -> list[Any]:
    """The objects of the whole frames at the head of `buf`, removed from it; a partial frame
    stays for the next read."""
    out: list[Any] = []
    while len(buf) >= HEAD.size:
        (n,) = HEAD.unpack_from(buf)
        if len(buf) < HEAD.size + n:
            break
        out.append(pickle.loads(buf[HEAD.size:HEAD.size + n]))
        del buf[:HEAD.size + n]
    return out


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from a blocking socket; EOFError when the other end closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> Any:
    """The next frame's object from a blocking socket; EOFError at the end."""
    (n,) = HEAD.unpack(recv_exact(sock, HEAD.size))
    return pickle.loads(recv_exact(sock, n))
