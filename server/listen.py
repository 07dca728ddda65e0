"""Bind the server's listening sockets before anything slow happens.

uvicorn binds only after the app's startup, which is when the worker begins
loading the model: a busy port then failed in the middle of a model load. The
CLI binds here first and hands the sockets to uvicorn (``Server.run(sockets=)``),
so a port that cannot be had is one line on stderr, before any model work.
"""

from __future__ import annotations

import errno
import socket


class BindError(OSError):
    """The server cannot listen on the requested address (a one-line reason)."""


def _reason(exc: OSError, host: str, port: int) -> str:
    """Return a one-line explanation of a failed bind, naming the flag to change."""
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (is another server running?); "
                "stop it or choose another port with --port")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"no permission to listen on port {port} on {host}; "
                "choose a port above 1023 with --port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"address {host} is not available on this machine; check --host"
    detail = exc.strerror or str(exc)
    return f"cannot listen on {host} port {port}: {detail} (check --host and --port)"


def bind_listeners(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to.

    Args:
        host: Name or address to bind (``127.0.0.1``, ``::``, ``localhost``...).
        port: TCP port; 0 picks a free one (all addresses then share it).
        backlog: Listen backlog (uvicorn's default).

    Returns:
        The listening sockets, ready for ``uvicorn.Server.run(sockets=...)``.

    Raises:
        BindError: The port is in use, not permitted, or the host is unknown.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve host {host!r}: {exc.strerror}; check --host") from None
    socks: list[socket.socket] = []
    seen: set = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[:2]) in seen:
                continue
            seen.add((family, addr[:2]))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            # Like uvicorn: a restart may rebind while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Keep the IPv6 socket from also claiming the IPv4 port bound beside it.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                sock.bind(addr)
            except OSError as exc:
                raise BindError(_reason(exc, host, addr[1] or port)) from None
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def listen_urls(socks: list[socket.socket]) -> list[str]:
    """Return ``http://host:port`` for each listening socket (the real port for port 0)."""
    urls = []
    for sock in socks:
        host, port = sock.getsockname()[:2]
        urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return urls
