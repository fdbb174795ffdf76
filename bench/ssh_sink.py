"""The far end of the SSH benchmark's upload: a TCP sink that counts what it is sent.

Each connection is read to EOF (``recv_into`` one reused buffer: the sink must not be what
limits the upload), then the sink answers with the byte count as one ASCII line and closes.
Run as ``python bench/ssh_sink.py PORT`` (loopback only).
"""

from __future__ import annotations

import socket
import socketserver
import sys
import time

CHUNK = 1024 * 1024


class Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        buffer = bytearray(CHUNK)
        total = 0
        while received := conn.recv_into(buffer):
            total += received
        conn.sendall(f"{total}\n".encode("ascii"))


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def upload(port: int, size: int) -> float:
    """Send ``size`` bytes to a sink behind 127.0.0.1:port; MiB/s until the sink has them."""
    block = memoryview(bytes(CHUNK))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
        left = size
        while left:
            left -= conn.send(block[:min(left, CHUNK)])
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    elapsed = time.perf_counter() - started
    if reply.strip() != str(size).encode():
        raise RuntimeError(f"upload through 127.0.0.1:{port}: the sink got {reply!r}, "
                           f"not {size} bytes")
    return size / elapsed / 1024**2


def main() -> None:
    with Server(("127.0.0.1", int(sys.argv[1])), Sink) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
