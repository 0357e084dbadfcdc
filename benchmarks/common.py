"""Helpers shared by the benchmarks: processes (the proxy, the C tools) and /proc readings.
(Dovecot's settled login count is tests.backends' `settled_login_count`.)

Plain stdlib only, no gevent: the benchmarks run their load in other processes.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from tests.backends import Dovecot, free_port  # noqa: E402,F401  (re-exported)

HOST = '127.0.0.1'
# The C instruments (imapbench.c, relay.c) live beside the checkout, in ../shared/tools;
# $GIMAPPROXY_TOOLS names another folder that holds them.
TOOLS_DIR = os.environ.get('GIMAPPROXY_TOOLS') or os.path.join(REPO, '..', 'shared', 'tools')


def log(msg):
    """Progress goes to stderr, so that --json keeps stdout clean."""
    print(msg, file=sys.stderr, flush=True)


def on_signal(signum, frame):
    """Turn SIGTERM/SIGINT into SystemExit, so that the finally blocks stop everything."""
    raise SystemExit('interrupted by signal %d' % signum)


def fmt(value, spec):
    """Format a number, or '-' when it is missing."""
    return '-' if value is None else format(value, spec)


# --- processes ---------------------------------------------------------------------

def wait_greeting(port, proc, timeout=15.0):
    """Return True once something on `port` greets with '* OK', False if `proc` exits or
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(1024).startswith(b'* OK'):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def start_proxy(workdir, server_port, settings):
    """Start bin/gimapproxy on a free port in front of 127.0.0.1:`server_port`.

    `settings` (key -> value) are added to the ini; everything else keeps the proxy's
    defaults, except log_level = warning, cache_expiration_time = 3600 and
    shutdown_timeout = 2. Returns (Popen, port, log path) once the proxy greets; raises
    RuntimeError with the end of its log if it does not within 15 s.
    """
    port = free_port()
    ini = os.path.join(workdir, 'proxy-%d.ini' % port)
    values = {'listen_address': HOST, 'listen_port': port, 'server_hostname': HOST,
              'server_port': server_port, 'cache_expiration_time': 3600,
              'shutdown_timeout': 2, 'log_level': 'warning'}
    values.update(settings)
    with open(ini, 'w') as f:
        f.write('[gimapproxy]\n' + ''.join('%s = %s\n' % kv for kv in values.items()))
    log_path = ini[:-4] + '.log'
    with open(log_path, 'wb') as out:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'bin', 'gimapproxy'),
                                 '-c', ini], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if wait_greeting(port, proc):
        return proc, port, log_path
    stop_process(proc)
    with open(log_path, errors='replace') as f:
        raise RuntimeError('gimapproxy did not start on port %d:\n%s' % (port, f.read()[-2000:]))


def stop_process(proc):
    """SIGTERM a process we started, by PID; SIGKILL it if it has not exited after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def build_tool(name, libs=()):
    """Return the path of the C tool `name` (imapbench, relay), or None.

    $<NAME> (e.g. $IMAPBENCH) may name a prebuilt binary. Otherwise ../shared/tools/<name>.c
    is built with gcc -O2 into $TMPDIR/gimapproxy-bench-<uid>/, again only when the source
    is newer than the binary.
    """
    path = os.environ.get(name.upper())
    if path:
        if os.access(path, os.X_OK):
            return path
        log('%s=%s is not an executable; trying to build %s' % (name.upper(), path, name))
    src, gcc = os.path.abspath(os.path.join(TOOLS_DIR, name + '.c')), shutil.which('gcc')
    if not os.path.exists(src) or gcc is None:
        log('cannot build %s: %s' % (name, 'no gcc' if gcc is None else 'no ' + src))
        return None
    cache = os.path.join(tempfile.gettempdir(), 'gimapproxy-bench-%d' % os.getuid())
    binary = os.path.join(cache, name)
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(src):
        return binary
    os.makedirs(cache, exist_ok=True)
    tmp = '%s.%d' % (binary, os.getpid())     # then renamed: parallel builds don't clash
    out = subprocess.run([gcc, '-O2', '-o', tmp, src] + list(libs),
                         capture_output=True, text=True)
    if out.returncode != 0:
        log('building %s failed:\n%s' % (name, out.stderr[-1500:]))
        return None
    os.replace(tmp, binary)
    return binary


def find_imapbench():
    """Return the path of an imapbench binary ($IMAPBENCH, else built with gcc), or None."""
    return build_tool('imapbench', ['-lssl', '-lcrypto'])


def start_imapbench(binary, mode, port, options, pid=None):
    """Start `imapbench MODE --json` against `port` with `options`; return the Popen.
    With `pid` it also reports that process's CPU (proxy_cpu_s, in 10 ms ticks) and RSS
    (proxy_rss_kb: [at start, after idle sessions opened, at the end])."""
    cmd = [binary, mode, '--host', HOST, '--port', str(port), '--json']
    cmd += [str(o) for o in options] + (['--proxy-pid', str(pid)] if pid else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_imapbench(proc):
    """Wait for an imapbench; return its JSON result as a dict. Raises RuntimeError if it
    failed."""
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        stop_process(proc)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError('imapbench failed (rc %s): %s' % (proc.returncode, err[-1000:]))
    return json.loads(out)


# --- readings ----------------------------------------------------------------------

def proc_cpu_rss(pid):
    """Return (CPU seconds, RSS kB) of a process from /proc (threads included)."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    with open('/proc/%d/status' % pid) as f:
        rss = [int(line.split()[1]) for line in f if line.startswith('VmRSS:')]
    return cpu, (rss[0] if rss else 0)


def task_cpu(pid):
    """Return the CPU seconds used so far by all threads of `pid`, from
    /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts 10 ms ticks, too
    coarse for the relay), or from /proc/PID/stat where schedstat is missing."""
    total, task_dir = 0, '/proc/%d/task' % pid
    for tid in os.listdir(task_dir):
        try:
            with open(os.path.join(task_dir, tid, 'schedstat')) as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            return proc_cpu_rss(pid)[0]
    return total / 1e9
