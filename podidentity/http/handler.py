"""The contract between the HTTP layer and whoever answers requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from podidentity.http.request import Request
from podidentity.http.response import Response

Handler: TypeAlias = Callable[[Request], Response | Awaitable[Response]]
"""Return a ``Response`` to answer at once, or an awaitable when the answer needs I/O."""

ResponseHook: TypeAlias = Callable[[Request, Response, float], None]
"""Called after each response to a parsed request is written: request, response, seconds taken."""

RejectHook: TypeAlias = Callable[[int], None]
"""Called with the status of each answer sent without a parsed request (400, 408, 414, 431, 503)."""
