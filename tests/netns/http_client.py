"""Minimal HTTP client run inside a namespace; prints one JSON result line per request.

One-shot by default. With ``--interactive`` it keeps one connection and sends a request for
every line read on stdin, so a test can change rules between requests on the same flow.
``--uid`` drops to that uid before connecting (owner-match tests).
"""

from __future__ import annotations

import argparse
import encodings.idna  # noqa: F401 - imported lazily by getaddrinfo, unreadable after --uid
import http.client
import json
import os
import sys


def request(conn: http.client.HTTPConnection, path: str) -> dict[str, object]:
    try:
        conn.request("GET", path, headers={"Metadata": "true"})
        response = conn.getresponse()
        raw = response.read().decode(errors="replace")
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = raw
        return {"ok": True, "status": response.status, "body": body, "error": None}
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return {"ok": False, "status": None, "body": None, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/metadata/identity/oauth2/token")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--uid", type=int)
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args()
    if args.uid is not None:
        os.setuid(args.uid)
    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    if not args.interactive:
        print(json.dumps(request(conn, args.path)), flush=True)
        return
    conn.connect()
    print(json.dumps({"connected": conn.sock.getsockname()[1]}), flush=True)
    for _ in sys.stdin:
        # A closed connection must not silently reconnect: the test is about one flow.
        if conn.sock is None:
            result: dict[str, object] = {"ok": False, "status": None, "body": None, "error": "closed"}
        else:
            result = request(conn, args.path)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
