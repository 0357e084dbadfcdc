"""Helpers shared by the benchmarks: processes (the proxy, the C tools in
benchmarks/tools) and /proc readings.
(Dovecot's settled login count is tests.backends' `settled_login_count`.)

Plain stdlib only, no gevent: the benchmarks run their load in other processes.
"""
import hashlib
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
# The C instruments, imapload (the load generator) and relay (the plain relay that the
# proxy is compared with), are built from here with gcc.
TOOLS_DIR = os.path.join(REPO, 'benchmarks', 'tools')


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


def start_proxy(workdir, server_port, settings, tree=None):
    """Start bin/gimapproxy on a free port in front of 127.0.0.1:`server_port`; with
    `tree`, the one of that source tree (another revision, see export_revision).

    `settings` (key -> value) are added to the ini (listen_port and server_hostname
    too, when given there); everything else keeps the proxy's
    defaults, except log_level = warning, cache_expiration_time = 3600 and
    shutdown_timeout = 2. Returns (Popen, port, log path) once the proxy greets; raises
    RuntimeError with the end of its log if it does not within 15 s.
    """
    port = int(settings.get('listen_port') or free_port())
    ini, n = os.path.join(workdir, 'proxy-%d.ini' % port), 1
    while os.path.exists(ini):                  # another process on the port (reuse_port)
        ini, n = os.path.join(workdir, 'proxy-%d-%d.ini' % (port, n)), n + 1
    values = {'listen_address': HOST, 'listen_port': port, 'server_hostname': HOST,
              'server_port': server_port, 'cache_expiration_time': 3600,
              'shutdown_timeout': 2, 'log_level': 'warning'}
    values.update(settings)
    with open(ini, 'w') as f:
        f.write('[gimapproxy]\n' + ''.join('%s = %s\n' % kv for kv in values.items()))
    log_path = ini[:-4] + '.log'
    env = dict(os.environ, PYTHONPATH=tree) if tree else None
    with open(log_path, 'wb') as out:
        proc = subprocess.Popen([sys.executable, os.path.join(tree or REPO, 'bin', 'gimapproxy'),
                                 '-c', ini], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env)
    if wait_greeting(port, proc):
        return proc, port, log_path
    stop_process(proc)
    with open(log_path, errors='replace') as f:
        raise RuntimeError('gimapproxy did not start on port %d:\n%s' % (port, f.read()[-2000:]))


def export_revision(revision, directory):
    """Write the repository's tree as of git `revision` into `directory` (made anew);
    return it. Raises RuntimeError when git cannot (no git, no repository, no such
    revision)."""
    os.makedirs(directory)
    try:
        archive = subprocess.run(['git', '-C', REPO, 'archive', '--format=tar', revision],
                                 capture_output=True, timeout=60)
        if archive.returncode == 0:
            subprocess.run(['tar', '-x', '-C', directory], input=archive.stdout, check=True,
                           capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError('cannot export revision %s: %s' % (revision, exc)) from None
    if archive.returncode != 0:
        raise RuntimeError('cannot export revision %s: %s' % (
            revision, archive.stderr.decode(errors='replace').strip()))
    return directory


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


def build_tool(name, shared=False):
    """Return the path of the C tool `name` (imapload, relay; with `shared`, the
    LD_PRELOAD library nodelay), or None after logging why not (no gcc, or it did not
    compile).

    benchmarks/tools/<name>.c is built with gcc -O2 into $TMPDIR/gimapproxy-bench-<uid>/,
    under a name that carries a hash of the source, so a changed source is built again
    and an unchanged one only once.
    """
    src = os.path.join(TOOLS_DIR, name + '.c')
    gcc = shutil.which('gcc')
    if gcc is None:
        log('cannot build %s: gcc is missing (Debian: apt-get install gcc)' % name)
        return None
    with open(src, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = os.path.join(tempfile.gettempdir(), 'gimapproxy-bench-%d' % os.getuid())
    binary = os.path.join(cache, '%s-%s%s' % (name, digest, '.so' if shared else ''))
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(cache, exist_ok=True)
    tmp = '%s.%d' % (binary, os.getpid())     # then renamed: parallel builds don't clash
    flags = ['-shared', '-fPIC'] if shared else []
    out = subprocess.run([gcc, '-O2'] + flags + ['-o', tmp, src] + (['-ldl'] if shared else []),
                         capture_output=True, text=True)
    if out.returncode != 0:
        log('building %s failed:\n%s' % (name, out.stderr[-1500:]))
        return None
    os.replace(tmp, binary)
    return binary


def missing_for_benchmark():
    """What perf.py needs and this machine lacks, as phrases naming the Debian package
    ('gcc (apt-get install gcc)'); empty when nothing is missing."""
    from tests.backends import dovecot_binary
    missing = []
    if shutil.which('gcc') is None:
        missing.append('gcc, to build benchmarks/tools (apt-get install gcc)')
    if not dovecot_binary():
        missing.append('Dovecot (apt-get install dovecot-imapd)')
    return missing


def find_imapload():
    """Return the path of the imapload binary (built with gcc), or None."""
    return build_tool('imapload')


def start_imapload(binary, mode, port, options, pid=None):
    """Start `imapload MODE --json` against `port` with `options`; return the Popen.
    With `pid` it also reports that process's CPU (proxy_cpu_s, in 10 ms ticks) and RSS
    (proxy_rss_kb: [at start, after idle sessions opened, at the end])."""
    cmd = [binary, mode, '--host', HOST, '--port', str(port), '--json']
    cmd += [str(o) for o in options] + (['--proxy-pid', str(pid)] if pid else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_imapload(proc):
    """Wait for an imapload; return its JSON result as a dict. Raises RuntimeError if it
    failed."""
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        stop_process(proc)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError('imapload failed (rc %s): %s' % (proc.returncode, err[-1000:]))
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


def schedstat(pid, field):
    """Return the sum of field `field` of /proc/PID/task/*/schedstat over the threads
    of `pid` alive now, in seconds (0: on a CPU, 1: runnable but waiting for one), or
    None where schedstat is missing."""
    total, task_dir = 0, '/proc/%d/task' % pid
    for tid in os.listdir(task_dir):
        try:
            with open(os.path.join(task_dir, tid, 'schedstat')) as f:
                total += int(f.read().split()[field])
        except FileNotFoundError:
            return None
    return total / 1e9


def task_wait(pid):
    """Return the seconds that the threads of `pid` have spent runnable but waiting for
    a CPU, or None where schedstat is missing."""
    return schedstat(pid, 1)


def task_cpu(pid):
    """Return the CPU seconds used so far by all threads of `pid`, from
    /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts 10 ms ticks, too
    coarse for the relay), or from /proc/PID/stat where schedstat is missing."""
    cpu = schedstat(pid, 0)
    return proc_cpu_rss(pid)[0] if cpu is None else cpu
