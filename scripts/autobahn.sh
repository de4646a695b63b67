#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client against a WebSocket echo server that the
# caller has already started, and fails unless every case in groups 1-7, 9, 10, 12 and 13
# passes (12 and 13 are permessage-deflate: start the server with --deflate on).
#
#   scripts/autobahn.sh URL [OUTDIR]     e.g. scripts/autobahn.sh ws://127.0.0.1:9001 target/autobahn
#
# Autobahn|Testsuite only runs on Python 2, so it is installed with pyenv's 2.7.18 into a
# private --target folder (cached in $AUTOBAHN_HOME, default ~/.cache/tunegate/autobahn)
# with every dependency pinned to the last release that still works on 2.7.
# The last output line is "N passed, M failed" (read by CI); exit 0 only when M is 0.
set -euo pipefail

PYTHON2_VERSION=2.7.18
AUTOBAHN_HOME=${AUTOBAHN_HOME:-$HOME/.cache/tunegate/autobahn}
SITE_DIR=$AUTOBAHN_HOME/site
RUN_TIMEOUT=${AUTOBAHN_TIMEOUT:-1200}
# Groups 1-7, 9 and 10 hold 301 cases in 0.8.2, 12 and 13 another 216; fewer means part
# of the run is missing (an empty or truncated report must not pass).
MIN_CASES=${AUTOBAHN_MIN_CASES:-516}
# The groups to run (AUTOBAHN_CASES, space-separated, to run fewer while developing).
read -ra CASES <<<"${AUTOBAHN_CASES:-1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.* 12.* 13.*}"

die() { echo "autobahn: $*" >&2; exit 1; }

(($# >= 1 && $# <= 2)) || die "usage: $0 URL [OUTDIR]   (e.g. $0 ws://127.0.0.1:9001 target/autobahn)"
URL=$1
OUTDIR=$(realpath -m -- "${2:-target/autobahn}")

command -v python3 >/dev/null || die "python3 not found (needed to check the URL and parse the report)"
command -v timeout >/dev/null || die "timeout not found (coreutils)"

# The fuzzer sends heavy traffic: only ever point it at this machine's loopback.
python3 - "$URL" <<'EOF' || die "URL must be ws://HOST:PORT[/path] with HOST on loopback (127.0.0.0/8, localhost, [::1]); got '$URL'"
import ipaddress, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
host = u.hostname or ""
if u.scheme not in ("ws", "wss") or not host or u.port is None:
    sys.exit(1)
if host != "localhost":
    try:
        if not ipaddress.ip_address(host).is_loopback:
            sys.exit(1)
    except ValueError:  # a name other than localhost: may resolve off this machine
        sys.exit(1)
EOF

# --- Python 2.7 -----------------------------------------------------------------------
find_python2() {
    if [[ -n ${AUTOBAHN_PYTHON2:-} ]]; then
        echo "$AUTOBAHN_PYTHON2"
        return
    fi
    # pyenv is often not on PATH in non-interactive shells (CI): fall back to its home.
    local pyenv
    pyenv=$(command -v pyenv || true)
    if [[ -z $pyenv && -x $HOME/.pyenv/bin/pyenv ]]; then
        pyenv=$HOME/.pyenv/bin/pyenv
    fi
    [[ -n $pyenv ]] ||
        die "pyenv not found on PATH nor at \$HOME/.pyenv/bin/pyenv (Autobahn|Testsuite needs Python $PYTHON2_VERSION; or set AUTOBAHN_PYTHON2)"
    local prefix
    prefix=$("$pyenv" prefix "$PYTHON2_VERSION" 2>/dev/null) ||
        die "pyenv has no Python $PYTHON2_VERSION (run: $pyenv install $PYTHON2_VERSION)"
    echo "$prefix/bin/python2.7"
}
PY2=$(find_python2)
[[ -x $PY2 ]] || die "Python 2 interpreter not executable: $PY2"

# --- Autobahn|Testsuite install (cached) ------------------------------------------------
# Every package pinned: unpinned, pip picks releases that dropped Python 2. These are the
# versions pip 19.2 (bundled with 2.7.18) resolves for autobahntestsuite 0.8.2, checked
# to install and run the fuzzing client. autobahn 0.10.9 is the API the suite was written
# against. zope.interface, PyHamcrest, txaio, autobahn and wsaccel build from source
# (wsaccel has C code, so gcc is needed).
REQUIREMENTS='autobahntestsuite==0.8.2
autobahn==0.10.9
txaio==2.1.0
Twisted==20.3.0
zope.interface==5.5.2
Automat==22.10.0
attrs==21.4.0
constantly==15.1.0
hyperlink==21.0.0
idna==2.10
incremental==22.10.0
PyHamcrest==1.10.1
typing==3.10.0.0
six==1.17.0
setuptools==44.1.1
klein==20.6.0
Tubes==0.2.1
Werkzeug==1.0.1
enum34==1.1.10
argparse==1.4.0
unittest2==1.1.0
traceback2==1.4.0
linecache2==1.0.0
Jinja2==2.11.3
MarkupSafe==1.1.1
pyOpenSSL==21.0.0
cryptography==3.3.2
cffi==1.15.1
pycparser==2.21
ipaddress==1.0.23
service-identity==21.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
ujson==2.0.3
wsaccel==0.6.6'
STAMP=$SITE_DIR/.tunegate-requirements

installed() {
    [[ -f $STAMP ]] && [[ $(cat "$STAMP") == "$REQUIREMENTS" ]] &&
        "$PY2" -c 'import site, sys; site.addsitedir(sys.argv[1]); import autobahntestsuite.wstest, autobahn, twisted, wsaccel' \
            "$SITE_DIR" >/dev/null 2>&1
}

if ! installed; then
    echo "autobahn: installing Autobahn|Testsuite 0.8.2 for Python 2.7 into $SITE_DIR"
    if ! "$PY2" -m pip --version >/dev/null 2>&1; then
        "$PY2" -m ensurepip >/dev/null || die "pip for $PY2 is missing and ensurepip failed"
    fi
    command -v gcc >/dev/null || die "gcc not found (wsaccel and zope.interface build C extensions)"
    mkdir -p "$AUTOBAHN_HOME"
    # Install beside the live folder and swap it in only on success, so an interrupted
    # install is never taken for a good one.
    staging=$AUTOBAHN_HOME/site.new
    rm -rf "$staging"
    printf '%s\n' "$REQUIREMENTS" >"$AUTOBAHN_HOME/requirements.txt"
    # --no-cache-dir: keep the old pip 19 out of the pip cache shared with python3's newer
    # pip (its cache format differs); the whole install is cached in $SITE_DIR anyway.
    PYTHONWARNINGS=ignore "$PY2" -m pip install --no-cache-dir --disable-pip-version-check -q \
        --target "$staging" -r "$AUTOBAHN_HOME/requirements.txt" ||
        die "pip install of Autobahn|Testsuite failed (see pip output above)"
    printf '%s' "$REQUIREMENTS" >"$staging/.tunegate-requirements"
    rm -rf "$SITE_DIR"
    mv "$staging" "$SITE_DIR"
    installed || die "Autobahn|Testsuite installed into $SITE_DIR but does not import with $PY2"
fi

# The package's console script is "wstest = autobahntestsuite.wstest:run"; this launcher
# calls the same function after putting the private site folder (and its .pth files,
# needed for the zope namespace package) on the path.
LAUNCHER=$AUTOBAHN_HOME/wstest.py
cat >"$LAUNCHER" <<'EOF'
import os, site, sys, warnings
# cryptography warns on every start that Python 2 is deprecated: known, not actionable.
warnings.filterwarnings("ignore", message=".*Python 2 is no longer supported.*")
site.addsitedir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "site"))
from autobahntestsuite.wstest import run
sys.argv[0] = "wstest"
run()
EOF

# --- Run the fuzzing client -------------------------------------------------------------
# Fail fast with a clear message when nothing listens: otherwise wstest records a
# connection failure and writes a near-empty report.
python3 - "$URL" <<'EOF' || die "nothing accepts connections at $URL (start the echo server first)"
import socket, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
try:
    socket.create_connection((u.hostname, u.port), timeout=5).close()
except OSError as e:
    sys.exit("autobahn: %s" % e)
EOF

REPORTS=$OUTDIR/reports
# A stale index.json from an earlier run must never be read as this run's result.
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
SPEC=$OUTDIR/fuzzingclient.json
python3 - "$URL" "$REPORTS" "${CASES[@]}" >"$SPEC" <<'EOF'
import json, sys
json.dump({
    "outdir": sys.argv[2],
    "servers": [{"agent": "tunegate", "url": sys.argv[1]}],
    "cases": sys.argv[3:],
    "exclude-cases": [],
    "exclude-agent-cases": {},
}, sys.stdout, indent=2)
EOF

LOG=$OUTDIR/wstest.log
echo "autobahn: fuzzing $URL (log: $LOG, reports: $REPORTS/index.html)"
started=$SECONDS
rc=0
(cd "$OUTDIR" && timeout "$RUN_TIMEOUT" "$PY2" "$LAUNCHER" -m fuzzingclient -s "$SPEC") >"$LOG" 2>&1 || rc=$?
if ((rc == 124)); then
    tail -n 20 "$LOG" >&2
    die "wstest did not finish within ${RUN_TIMEOUT}s"
elif ((rc != 0)); then
    tail -n 20 "$LOG" >&2
    die "wstest exited with status $rc"
fi
echo "autobahn: wstest finished in $((SECONDS - started))s"
if grep -q '^Connection to .* failed' "$LOG"; then
    grep '^Connection to .* failed' "$LOG" >&2
    die "wstest lost its connection to the server; the run is incomplete"
fi

# --- Judge the report -------------------------------------------------------------------
python3 - "$REPORTS/index.json" "$LOG" "$MIN_CASES" <<'EOF'
import json, re, sys

index_path, log_path, min_cases = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    with open(index_path) as f:
        index = json.load(f)
except (OSError, ValueError) as e:
    sys.exit("autobahn: cannot read report %s: %s" % (index_path, e))
if "tunegate" not in index:
    sys.exit("autobahn: report has no results for agent 'tunegate'")
cases = index["tunegate"]

# wstest prints how many cases the spec selected; every one must be in the report.
m = re.search(r"will run (\d+) test cases", open(log_path).read())
expected = int(m.group(1)) if m else None
if expected is None:
    sys.exit("autobahn: wstest log does not say how many cases it meant to run")
if expected <= min_cases or len(cases) != expected:
    sys.exit("autobahn: implausible run: %d cases in report, %s selected (need > %d)"
             % (len(cases), expected, min_cases))

OK_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL"}
OK_CLOSE = {"OK", "INFORMATIONAL", "NON-STRICT"}
passed = failed = 0
for case_id in sorted(cases, key=lambda c: [int(p) for p in c.split(".")]):
    r = cases[case_id]
    behavior, close = r.get("behavior"), r.get("behaviorClose")
    good = behavior in OK_BEHAVIOR and close in OK_CLOSE
    if good:
        passed += 1
    else:
        failed += 1
    if (behavior, close) != ("OK", "OK"):
        print("%-4s %-8s behavior=%-13s behaviorClose=%s"
              % ("ok" if good else "FAIL", case_id, behavior, close))
print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
EOF
