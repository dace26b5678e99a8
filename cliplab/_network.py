"""Network checks that let downloads fail within seconds, offline or unreachable, instead of retrying for minutes."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def is_offline() -> bool:
    """True when the user asked for no network (``CLIPLAB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in ("CLIPLAB_OFFLINE", "HF_HUB_OFFLINE"))


def ensure_reachable(url: str, *, what: str, how: str, timeout: float = 3.0) -> None:
    """Fail within seconds, with an actionable message, when ``url`` cannot be reached.

    Download helpers retry for minutes when there is no network; one TCP connection with a short
    timeout tells us first whether trying makes sense at all.
    """
    problem = "offline mode is set (CLIPLAB_OFFLINE / HF_HUB_OFFLINE)" if is_offline() else None
    if problem is None:
        host = urlparse(url).hostname
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return
        except OSError as error:
            problem = f"{host} is unreachable ({error})"
    raise FileNotFoundError(f"{what} is not available locally and {problem}. To fix: {how}.")
