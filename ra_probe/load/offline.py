"""The Hugging Face Hub out of reach: offline mode at once (cached files still load), and the one line
that says so when what is asked for is not in the cache."""
from __future__ import annotations

from ra_probe.errors import first_line

NOT_CACHED = "no network and not in the local cache"


def hub_offline_if_unreachable() -> bool:
    """When the Hub cannot be reached, switch huggingface-hub to offline mode so that cached weights
    still load and missing ones fail at once instead of after minutes of retries. True if offline."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.getaddrinfo(urlparse(hub.ENDPOINT).hostname, 443)
    except OSError:
        hub.HF_HUB_OFFLINE = True
        return True
    return False


def why_not_loaded(offline: bool, exc: BaseException) -> str:
    """Why a download failed, in a few words: offline and not cached, or the error's first line."""
    return NOT_CACHED if offline else first_line(exc)
