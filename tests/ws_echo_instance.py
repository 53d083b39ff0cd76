"""A real WebSocket echo server for tests: `python tests/ws_echo_instance.py <port> [<instance-id>]`.

Built on the `websockets` library (its threaded server). Every text and binary message is echoed
back as it came; pings are answered by the library. Paths:
- `/` and any other: echo;
- `/hello`: first sends `hello from <instance-id>`, then echoes;
- `/close?code=4000`: closes with that code after echoing the first message.
Plain HTTP (no upgrade): `GET /ping` answers 200 `ok`, `GET /open` JSON with the number of
sockets open now and the close code of the last one to close (so a test sees the instance's side
of a close), anything else 426 like any WebSocket server.
Killed by SIGTERM as it is (no handler): its sockets end without a close frame, as a server's
would when its process dies.
"""
from __future__ import annotations

import json
import sys
import threading
from urllib.parse import parse_qs, urlsplit

from websockets.sync.server import serve

INSTANCE_ID = sys.argv[2] if len(sys.argv) > 2 else "ws"
OPEN: set = set()
LOCK = threading.Lock()
LAST_CLOSE: dict = {"code": None, "reason": None}


def process_request(connection, request):
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = urlsplit(request.path).path
    if path == "/ping":
        response = connection.respond(200, "ok\n")
    elif path == "/open":
        with LOCK:
            response = connection.respond(200, json.dumps({"open": len(OPEN), "last_close_code": LAST_CLOSE["code"],
                                                            "last_close_reason": LAST_CLOSE["reason"]}))
    else:
        response = connection.respond(426, "this is a WebSocket server\n")
    response.headers["X-Instance"] = INSTANCE_ID
    return response


def process_response(connection, request, response):
    if "X-Instance" not in response.headers:
        response.headers["X-Instance"] = INSTANCE_ID
    return response


def handler(ws):
    with LOCK:
        OPEN.add(ws)
    try:
        url = urlsplit(ws.request.path)
        if url.path == "/hello":
            ws.send(f"hello from {INSTANCE_ID}")
        close_code = int(parse_qs(url.query).get("code", ["0"])[0]) if url.path == "/close" else 0
        for message in ws:
            ws.send(message)
            if close_code:
                ws.close(close_code, "closing as asked")
                break
    finally:
        with LOCK:
            OPEN.discard(ws)
            LAST_CLOSE.update(code=ws.close_code, reason=ws.close_reason)


def main() -> None:
    port = int(sys.argv[1])
    with serve(handler, "127.0.0.1", port, process_request=process_request, process_response=process_response,
               max_size=None, ping_interval=None) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
