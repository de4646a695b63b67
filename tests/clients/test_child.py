"""A child for the daemon tests: does what it is told, and writes down what happens to it.

Usage: test_child.py MODE [PORT]
  listen       listen on 127.0.0.1:PORT; exit 0 on SIGTERM
  slow-listen  wait 1 s first (readiness must wait for the listen, not the start)
  ignore-term  listen, and ignore SIGTERM (the daemon must SIGKILL it)
  crash        exit 3 at once
  crash-twice  exit 3 the first two times (counted in $CHILD_DIR/starts), then listen
  exit-clean   listen for 0.5 s, then exit 0
  hang         never listen, never exit (the daemon's ready timeout must catch it)
Events (started, listening, signals) are appended to $CHILD_DIR/events as "time event" lines.
Bounded: it exits by itself after 120 s whatever happens.
"""

import os
import signal
import socket
import sys
import time

DIR = os.environ["CHILD_DIR"]


def event(what):
    with open(os.path.join(DIR, "events"), "a") as f:
        f.write(f"{time.time():.6f} {what} {os.getpid()}\n")


def main():
    mode = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    starts_file = os.path.join(DIR, "starts")
    starts = int(open(starts_file).read()) if os.path.exists(starts_file) else 0
    with open(starts_file, "w") as f:
        f.write(str(starts + 1))
    event(f"started {mode}")
    signal.signal(signal.SIGHUP, lambda *_: event("SIGHUP"))
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, lambda *_: event("SIGTERM-ignored"))
    else:
        signal.signal(signal.SIGTERM, lambda *_: (event("SIGTERM"), sys.exit(0)))
    if mode == "crash" or (mode == "crash-twice" and starts < 2):
        event("crashing")
        sys.exit(3)
    if mode == "hang":
        event("hanging")
        time.sleep(120)
        sys.exit(0)
    if mode == "slow-listen":
        time.sleep(1.0)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    event("listening")
    s.listen(511)
    deadline = time.time() + (0.5 if mode == "exit-clean" else 120)
    while time.time() < deadline:
        time.sleep(0.05)
    event("exiting")


if __name__ == "__main__":
    main()
