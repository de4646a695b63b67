"""Load for the saturation watch's tests: plain TCP connections (the kernel's view is what is
watched, so no WebSocket is needed), bounded in count and time.

    saturation.py hold HOST PORT N SECONDS
        Opens N connections to HOST:PORT and holds them SECONDS, then closes them. The server
        holds one descriptor per connection it accepted.

    saturation.py burst HOST PORT N
        Starts N non-blocking connects at once (the server is stopped, so its accept queue
        fills and the kernel counts overflows), waits 2 s, closes them all.

    saturation.py churn HOST PORT N
        Opens N connections one after the other and closes each at once from this side, so
        each leaves its local port in TIME_WAIT for 60 s; then waits 3 s.

Prints "saturation: ok ..." and exits 0.
"""

import socket
import sys
import time


def hold(host, port, n, seconds):
    held = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        held.append(s)
    time.sleep(seconds)
    for s in held:
        s.close()
    print(f"saturation: ok hold ({n} connections for {seconds} s)")


def burst(host, port, n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks.append(s)
    time.sleep(2)
    for s in socks:
        s.close()
    print(f"saturation: ok burst ({n} connects)")


def churn(host, port, n):
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.close()
    time.sleep(3)
    print(f"saturation: ok churn ({n} connections opened and closed)")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "hold":
        hold(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "churn":
        churn(args[0], int(args[1]), int(args[2]))
    elif cmd == "burst":
        burst(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
