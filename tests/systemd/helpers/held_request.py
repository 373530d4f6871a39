#!/usr/bin/python3
"""A request held in flight on purpose, for tests/systemd/lib.sh (held_request_start/_release).

    held_request.py HOST PORT PATH DIR [TIMEOUT_S]

Connects to HOST:PORT and sends the head of `GET PATH HTTP/1.1` without its final empty line, so
the server has a request in progress that it cannot answer yet. Then writes DIR/sent (the
client's local port, so the server side of the connection can be found with ss) and waits until
DIR/go exists. Then it sends the final CRLF, reads the response until the server closes the
connection (or TIMEOUT_S, default 30, runs out) and writes it to DIR/response.
Exits 0 when a complete response head was received, 1 otherwise (the reason is in DIR/error).
"""

import os
import socket
import sys
import time


def main():
    host, port, path, d = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    deadline = time.monotonic() + timeout
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-held-request\r\n".encode())
        with open(os.path.join(d, "sent.tmp"), "w") as f:
            f.write(f"{s.getsockname()[1]}\n")
        os.rename(os.path.join(d, "sent.tmp"), os.path.join(d, "sent"))
        go = os.path.join(d, "go")
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.01)
        s.sendall(b"\r\n")
        data = b""
        while True:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except Exception as e:  # noqa: BLE001 - any failure is the test's result
        with open(os.path.join(d, "error"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n")
        data = locals().get("data", b"")
        with open(os.path.join(d, "response"), "wb") as f:
            f.write(data)
        return 1
    with open(os.path.join(d, "response"), "wb") as f:
        f.write(data)
    if b"\r\n\r\n" not in data:
        with open(os.path.join(d, "error"), "w") as f:
            f.write("connection closed before a complete response head\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
