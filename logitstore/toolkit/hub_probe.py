"""Is the Hugging Face hub reachable from here? (distill-eval's network mode, and
`hub_data.check_hub_data_readable`: can the hub datasets of --data be read before a model
is loaded)."""

from __future__ import annotations

import os

# What huggingface_hub and datasets read as "on" in their *_OFFLINE variables.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def env_flag_set(value: str | None) -> bool:
    """An environment value (e.g. of HF_HUB_OFFLINE) that the Hugging Face libraries take as on."""
    return value is not None and value.strip().upper() in _TRUE_VALUES


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def probe_hub(timeout_s: float = 3.0) -> str | None:
    """None when the hub endpoint answers an HTTP HEAD with a success status within
    timeout_s, else why not. HTTP rather than a bare TCP connect: sandboxes and corporate
    proxies accept connections (or answer 403/404) for hosts they will not forward to."""
    import urllib.error
    import urllib.request

    url = hub_endpoint()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        return f"{url} unreachable (HTTP {exc.code} {exc.reason})"
    except (OSError, ValueError) as exc:  # DNS failure, refused, timeout, bad URL
        cause = getattr(exc, "reason", exc)
        return f"{url} unreachable ({type(cause).__name__}: {cause})"
