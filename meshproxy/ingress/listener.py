"""Listening sockets that are bound when the proxy starts and take connections only once it has
a table, as Envoy warms its listeners.

Binding first means a busy port fails at startup and port 0 gets its number then. Taking
connections later means none reaches a proxy that would answer 404 for want of a table. With
SO_REUSEPORT, the kernel sends connections only to the workers whose sockets are listening.
"""

from __future__ import annotations

import socket

BACKLOG = 2048


def bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, non-listening sockets for every address `host` resolves to, all on one port (with
    port 0, the one the first socket got). Raises OSError when one cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # "::" must not take the IPv4 port too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:  # the others join the first one's port
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            # Linux lets two SO_REUSEADDR sockets bind one port while neither listens: clear
            # it, so that while this one waits to listen, no other server takes the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen(sockets: list[socket.socket]) -> None:
    """Take connections from now on: they wait in the backlog until an accept loop starts."""
    for sock in sockets:
        sock.listen(BACKLOG)
