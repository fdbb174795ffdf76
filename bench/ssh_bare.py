"""A bare asyncssh tunnel server: the floor any asyncssh-based gateway is measured against.

One process on the same event loop as the gatewayd it is compared with, the algorithms the
OpenSSH client negotiates with gatewayd (curve25519 key exchange, the AEAD ciphers, no
compression), gatewayd's default window and packet size, public-key login from one
authorized key, and asyncssh's own ``direct-tcpip`` forwarding (``connection_requested``
returns True: asyncssh connects and relays with its own forwarder). No policy, sessions,
audit, metrics or byte accounting. ``bench_ssh.py --bare`` adds it as a third server; the
difference between its row and gatewayd's is what gatewayd's own work costs, and the
difference between it and OpenSSH is what asyncssh (pure-Python framing over OpenSSL's
AEAD) costs.

Run as ``python bench/ssh_bare.py PORT HOST_KEY AUTHORIZED_KEYS WINDOW MAX_PKTSIZE LOOP``
(LOOP ``asyncio`` or ``default``: uvloop when installed, like ``gatewayd run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import asyncssh

ENCRYPTION = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
              "aes256-gcm@openssh.com")
KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org")


class ForwardOnly(asyncssh.SSHServer):
    """Every local forward is allowed; asyncssh connects and relays by itself."""

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        return True


async def serve(port: int, host_key: str, authorized_keys: str, window: int,
                max_pktsize: int) -> None:
    await asyncssh.listen(
        "127.0.0.1", port, server_factory=ForwardOnly, server_host_keys=[host_key],
        authorized_client_keys=authorized_keys, encryption_algs=ENCRYPTION, kex_algs=KEX,
        compression_algs=["none"], allow_pty=False, agent_forwarding=False,
        x11_forwarding=False, window=window, max_pktsize=max_pktsize)
    await asyncio.Event().wait()


def main() -> None:
    port, host_key, authorized_keys = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    window, max_pktsize, loop = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    if loop != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415 - optional speed-up, as in gatewayd

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(port, host_key, authorized_keys, window, max_pktsize))


if __name__ == "__main__":
    main()
