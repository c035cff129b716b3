"""Stand-in HTTP server for IMDS or NMI: fixed JSON answers, one JSON line per hit in ``--hits``.

Prints ``READY <port>`` once listening so callers wait for an event instead of sleeping.
Keep-alive (HTTP/1.1) is supported so tests can hold a connection open across rule changes.
"""

from __future__ import annotations

import argparse
import json
import socketserver
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which waits for DNS timeouts
        # inside an isolated namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True)
    parser.add_argument("--hits", required=True)
    args = parser.parse_args()
    hits = open(args.hits, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            client, client_port = self.client_address[:2]
            record = {"server": args.name, "client": client, "client_port": client_port, "path": self.path}
            # Recorded before answering: once the client has its answer, the hit is on disk.
            hits.write(json.dumps(record) + "\n")
            hits.flush()
            body = json.dumps({"server": args.name, "client": client}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            pass

    server = _Server((args.host, args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
