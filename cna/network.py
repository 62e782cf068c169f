"""Whether a server answers, asked in seconds before anything slow starts (the model hub, W&B, a judge server)."""

from __future__ import annotations

import socket
import threading
import urllib.request
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def server_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host and port, or to the HTTPS proxy in front of it, opens within
    `timeout`."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxied.hostname:
            host, port = proxied.hostname, proxied.port or (443 if proxied.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:  # in a thread: a hanging DNS lookup ignores socket timeouts
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(opened)
