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
- start_writer() and stop_writer() are the one way a sink (MQTT or JetStream) starts and ends
  its writer process: a fresh interpreter (not multiprocessing: that re-imports the caller's
  __main__) with the socket as its fd; it ends on EOF, so it never outlives its sink for long.
"""

import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
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


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_writer(url: str, policy: Any) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start `cloud_sink.ingest.writer` for the store `url`; -> (process, our end of the pair),
    the hello already sent (store url, Policy, this process's log level)."""
    parent, child = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cloud_sink.ingest.writer import main; main()",
         str(child.fileno())], pass_fds=[child.fileno()], env=env)
    child.close()
    parent.sendall(frame((url, policy, logging.getLogger().level)))
    return proc, parent


def stop_writer(proc: subprocess.Popen[bytes] | None, sock: socket.socket | None) -> None:
    """Close our end (the writer ends on EOF after its batch) and reap it; terminate it only if
    it has not ended within 10 s."""
    if sock is not None:
        sock.close()
    if proc is not None:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(5)
