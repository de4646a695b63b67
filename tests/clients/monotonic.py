"""Counters on the bundled server's /metrics never go down, whichever worker answers and while
a worker is killed and restarted.

    monotonic.py HOST PORT SECONDS PID KILL_AT
        For SECONDS: GET /healthz (traffic every worker counts) and GET /metrics, every 50 ms,
        each on a new connection (so the kernel spreads them over the workers); every sample
        of every counter (a `# TYPE ... counter` family) must be at least what the previous
        scrape showed. At KILL_AT seconds, SIGKILL to PID (a worker). Prints how many scrapes
        and series it compared; raises on the first counter that went down.
"""

import os
import signal
import sys
import time
import urllib.request


def scrape(base):
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    counters, values = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            counters.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            family = name.split("{", 1)[0]
            if family in counters:
                values[name] = float(value)
    return values


def main():
    host, port, seconds, pid, kill_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    base = f"http://{host}:{port}"
    start = time.monotonic()
    killed = False
    last = {}
    scrapes = 0
    while time.monotonic() - start < seconds:
        if not killed and time.monotonic() - start >= kill_at:
            os.kill(pid, signal.SIGKILL)
            killed = True
        try:
            urllib.request.urlopen(base + "/healthz", timeout=5).read()
            now = scrape(base)
        except OSError:
            time.sleep(0.05)  # the worker that held this connection was just killed
            continue
        for series, v in now.items():
            before = last.get(series)
            assert before is None or v >= before, \
                f"{series} went down from {before} to {v} after {time.monotonic() - start:.1f} s"
        last.update(now)
        scrapes += 1
        time.sleep(0.05)
    assert killed and scrapes > 50, (killed, scrapes)
    print(f"monotonic: ok ({scrapes} scrapes, {len(last)} counter series, worker {pid} killed)")


if __name__ == "__main__":
    main()
