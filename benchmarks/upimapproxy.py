"""Debian's up-imapproxy (package imapproxy, daemon imapproxyd) as a benchmark peer.

perf.py starts it in the foreground with a throwaway configuration on a free loopback
port, optionally with benchmarks/tools/nodelay.c preloaded (TCP_NODELAY on every socket,
which the daemon never sets itself), and stops it by its PID like everything else.

Plain stdlib only, like benchmarks/common.py.
"""
import grp
import os
import pwd
import shutil
import subprocess

from benchmarks.common import HOST, free_port, stop_process, wait_greeting

PACKAGE = 'imapproxy'
DAEMON = 'imapproxyd'


def binary():
    """Return the path of imapproxyd, or None when the package is not installed."""
    return shutil.which(DAEMON) or next(
        (p for p in ('/usr/sbin/' + DAEMON,) if os.access(p, os.X_OK)), None)


def missing():
    """A phrase naming what is missing and the Debian package, or '' when it is there."""
    if binary():
        return ''
    return 'up-imapproxy (%s), for the up-imapproxy columns (apt-get install %s)' % (
        DAEMON, PACKAGE)


def _run_as():
    """(user, group) for proc_username / proc_groupname: the daemon refuses to keep
    uid 0, so as root it becomes nobody; otherwise it stays who it is."""
    if os.geteuid() == 0:
        try:
            return 'nobody', grp.getgrgid(pwd.getpwnam('nobody').pw_gid).gr_name
        except KeyError:
            return 'nobody', 'nogroup'
    user = pwd.getpwuid(os.getuid())
    return user.pw_name, grp.getgrgid(user.pw_gid).gr_name


def start(workdir, server_host, server_port, shim=None, force_tls=False, ca_file=None):
    """Start imapproxyd on a free port of HOST in front of `server_host`:`server_port`.

    shim: the path of nodelay.so to preload, or None for the daemon as Debian ships it.
    force_tls: STARTTLS towards the server (`force_tls yes`), verifying its certificate
    with `ca_file` (the daemon checks the chain only, never the host name).
    Returns (Popen, port, log path) once it greets; raises RuntimeError with the end of
    its output when it does not within 15 s.
    """
    port = free_port()
    name = os.path.join(workdir, 'up-imapproxy-%d' % port)
    user, group = _run_as()
    settings = [
        ('server_hostname', server_host), ('server_port', server_port),
        ('listen_address', HOST), ('listen_port', port),
        ('connect_retries', 2), ('connect_delay', 1),
        # Active plus cached server connections; as many as the comparisons need.
        ('cache_size', 3072), ('cache_expiration_time', 3600),
        ('proc_username', user), ('proc_groupname', group),
        ('stat_filename', name + '.stats'), ('protocol_log_filename', name + '.trace'),
        ('syslog_prioritymask', 'LOG_WARNING'), ('send_tcp_keepalives', 'no'),
        ('enable_select_cache', 'no'), ('foreground_mode', 'yes'),
        ('force_tls', 'yes' if force_tls else 'no'),
    ]
    if ca_file:
        settings += [('tls_ca_file', ca_file), ('tls_verify_server', 'yes')]
    with open(name + '.conf', 'w') as f:
        f.write(''.join('%s %s\n' % kv for kv in settings))
    env = dict(os.environ)
    if shim:
        env['LD_PRELOAD'] = shim
    log_path = name + '.log'
    with open(log_path, 'wb') as out:
        proc = subprocess.Popen([binary(), '-f', name + '.conf'], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, env=env)
    if wait_greeting(port, proc):
        return proc, port, log_path
    stop_process(proc)
    with open(log_path, errors='replace') as f:
        raise RuntimeError('up-imapproxy did not start on port %d:\n%s' % (port, f.read()[-2000:]))
