"""Which route a request path takes: pure, so every variant is easy to test.

The original cleaned paths with a redirect and then forwarded anything that was not a token path
(nmi-spec §2.2). Here a path that does not survive canonicalisation unchanged is refused, and
anything that looks like a token path but is not exactly one is refused too: neither is ever
forwarded to IMDS, where it might be interpreted differently.
"""

from __future__ import annotations

import re
from enum import Enum
from urllib.parse import unquote

from nmi.selectors import has_broken_escape


class Route(Enum):
    TOKEN = "token"
    INVALID_TOKEN = "invalid_token"
    HOST_TOKEN = "host_token"
    INSTANCE = "instance"
    PROXY = "proxy"
    NON_CANONICAL = "non_canonical"


# Case-insensitive throughout, unlike the original, so `/metadata/Identity/oauth2/token` is
# refused instead of forwarded.
_TOKENISH = re.compile(r"/metadata/identity(.*?)oauth2(.*?)token", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN_TAIL = ("/identity/oauth2/token", "/identity/oauth2/token/")


def canonical(path: str) -> str | None:
    """The decoded path if it is already canonical, else ``None``.

    Canonical means: absolute, no empty, ``.`` or ``..`` segments (a trailing slash is allowed),
    no backslashes or control characters, no ``%`` that is not an escape, and no escaped ``/``,
    ``\\`` or ``.`` that would change the segments once decoded.
    """
    if not path.startswith("/") or has_broken_escape(path):
        return None
    decoded = unquote(path, errors="strict") if "%" in path else path
    if "\\" in decoded or _CONTROL.search(decoded):
        return None
    if "%" in path:
        # An escaped separator or dot hides a segment boundary from whoever reads the raw path.
        lowered = path.lower()
        # %25 would survive one decoding as a new escape: whoever decodes again sees another path.
        if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "%25" in lowered:
            return None
    segments = decoded.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()
    for segment in segments:
        if segment in ("", ".", ".."):
            return None
    return decoded


def classify(raw_path: str) -> Route:
    try:
        path = canonical(raw_path)
    except UnicodeDecodeError:
        return Route.NON_CANONICAL
    if path is None:
        # Backslash variants of the token path keep their own answer (nmi-spec §2.2 item 2).
        decoded = unquote(raw_path, errors="replace")
        return Route.INVALID_TOKEN if _TOKENISH.search(decoded) else Route.NON_CANONICAL
    first, sep, rest = path[1:].partition("/")
    if first.casefold() == "metadata" and sep:
        tail = "/" + rest
        if tail in _TOKEN_TAIL:
            return Route.TOKEN
        if _TOKENISH.search(path):
            return Route.INVALID_TOKEN
        if rest.casefold().startswith("instance"):
            return Route.INSTANCE
    elif _TOKENISH.search(path):
        return Route.INVALID_TOKEN
    if path in ("/host/token", "/host/token/"):
        return Route.HOST_TOKEN
    return Route.PROXY
