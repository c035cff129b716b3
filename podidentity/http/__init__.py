"""HTTP/1.1 server on httptools: keep-alive, pipelining, limits, deadlines, graceful shutdown.

See docs/server-behavior.md for the contract.
"""

from podidentity.http.handler import Handler, RejectHook, ResponseHook
from podidentity.http.request import Request
from podidentity.http.response import STATUS_LINES, Response, imds_error, json_response, text_response
from podidentity.http.server import HttpServer

__all__ = [
    "STATUS_LINES",
    "Handler",
    "HttpServer",
    "RejectHook",
    "Request",
    "Response",
    "ResponseHook",
    "imds_error",
    "json_response",
    "text_response",
]
