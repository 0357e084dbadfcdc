"""Real IMAP servers for the tests and benchmarks: a throwaway Dovecot and pymap.

Each server runs as a child process of the test run on a free loopback port, with all of
its files (config, users, mail, sockets, logs) under its own temporary directory, and is
stopped by PID. Nothing here touches the system Dovecot configuration.

Plain stdlib only (subprocess, socket, time; no threads), so that it works the same with
or without gevent's monkey-patching. pytest is imported lazily, only by require_dovecot().
"""
from __future__ import annotations

import atexit
import email.utils
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Tuple

__all__ = ['free_port', 'dovecot_binary', 'require_dovecot', 'sha512_crypt',
           'make_message', 'NO_AUTH_PENALTY_CONF', 'TLS_HOST', 'parse_login_line',
           'Dovecot', 'Pymap']

START_TIMEOUT = 15.0        # seconds to wait for a server's greeting
STOP_TIMEOUT = 10.0         # seconds to wait for a server to exit after SIGTERM
START_ATTEMPTS = 5          # ports tried when the chosen one turns out to be taken

# extra_conf for tests that make failed logins on purpose and must stay fast. By default
# Dovecot answers a failed login after ~2 s (auth_failure_delay), and the anvil "auth
# penalty" then delays every later authentication from the same IP, good ones too: by
# 4 s after one failure, growing to 15 s with more. All test traffic comes from
# 127.0.0.1, so one failed login slows the tests that follow it. This turns both off
# (a failure is then answered in ~0.5 s). Measured with 2.3.19: login_trusted_networks
# = 127.0.0.0/8 does NOT skip the penalty, although the Dovecot docs say it does.
NO_AUTH_PENALTY_CONF = """\
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""

# The loopback address a Dovecot with TLS listens on by default. Dovecot treats a client
# whose address equals the server's local address as "secured" (like TLS): from
# 127.0.0.1 to 127.0.0.1 it would accept plaintext LOGIN despite ssl = required. Clients
# connecting to 127.0.0.2 come from 127.0.0.1 (the loopback route's source address), so
# they are not secured and must use TLS. (Clients in login_trusted_networks are "secured"
# too, whatever the addresses: see Dovecot(trusted_networks=...).)
TLS_HOST = '127.0.0.2'

# Successful Dovecot logins: "... imap-login: Info: Login: user=<user1>, method=PLAIN, ..."
_DOVECOT_LOGIN_RE = re.compile(r'imap-login: (?:Info: )?Login: user=<([^>]*)>')
# One "key=value" (value possibly <bracketed>, may contain ", ") or bare-word field.
_LOGIN_FIELD_RE = re.compile(r'(\w[\w-]*)(?:=(<[^>]*>|[^,]*))?(?:, |$)')

# pymap --debug lines: "DEBUG:pymap.imap:<conn> -->| TAG LOGIN ..." (from the client) and
# "DEBUG:pymap.imap:<conn> <--| TAG OK ..." (to the client).
_PYMAP_LINE_RE = re.compile(r'pymap\.imap:(\S+) (-->|<--)\| (\S+) (\S+)')


# Servers started and not yet stopped, stopped at interpreter exit as a safety net (a
# test run that crashes past its fixtures' teardown must not leave daemons behind).
_running: 'set[_Server]' = set()


@atexit.register
def _stop_running() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:
            pass


def free_port(host: str = '127.0.0.1') -> int:
    """Return a TCP port that was free on `host` a moment ago (bind port 0, read, close).

    Another process may take it before the caller binds it; the server classes retry.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def dovecot_binary() -> Optional[str]:
    """Return the path of the dovecot master binary, or None if Dovecot is not installed."""
    path = shutil.which('dovecot')
    if path:
        return path
    for path in ('/usr/sbin/dovecot', '/usr/local/sbin/dovecot'):
        if os.access(path, os.X_OK):
            return path
    return None


def require_dovecot() -> str:
    """Return the dovecot binary for a test that needs it.

    If Dovecot is missing the test is skipped (pytest.skip), or failed (pytest.fail) when
    the environment sets GIMAPPROXY_REQUIRE_DOVECOT=1, so CI cannot pass by skipping.
    """
    path = dovecot_binary()
    if path is not None:
        return path
    import pytest  # lazily: this module must import without pytest
    reason = ('dovecot is not installed (apt-get install dovecot-imapd); '
              'no dovecot binary on PATH or in /usr/sbin')
    if os.environ.get('GIMAPPROXY_REQUIRE_DOVECOT') == '1':
        pytest.fail(reason + ' and GIMAPPROXY_REQUIRE_DOVECOT=1', pytrace=False)
    pytest.skip(reason)
    raise AssertionError('unreachable')


def sha512_crypt(password: str) -> str:
    """Return `password` hashed as Dovecot's {SHA512-CRYPT} (glibc $6$, 5000 rounds).

    Uses Python's crypt module where there is one (deprecated in 3.11, gone in 3.13; its
    warning is silenced), else `doveadm -O pw` (-O: read no Dovecot config).
    Raises RuntimeError if neither works.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            import crypt
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))
        if hashed and hashed.startswith('$6$'):
            return '{SHA512-CRYPT}' + hashed
    except ImportError:
        pass
    doveadm = shutil.which('doveadm') or '/usr/bin/doveadm'
    try:
        out = subprocess.run([doveadm, '-O', 'pw', '-s', 'SHA512-CRYPT', '-p', password],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError('cannot hash a password: no crypt module and no doveadm: %s'
                           % e) from e
    hashed = out.stdout.strip()
    if out.returncode != 0 or not hashed.startswith('{SHA512-CRYPT}$6$'):
        raise RuntimeError('doveadm pw failed (rc %s): %s'
                           % (out.returncode, out.stderr.strip()))
    return hashed


def make_message(user: str, i: int) -> bytes:
    """Return a small RFC 822 message (LF line ends, as stored in a Maildir).

    Message `i` of `user` has its own From, Subject, Date and Message-ID, so that
    FETCH (ENVELOPE) returns distinct data per message.
    """
    date = datetime(2024, 1, 1, 8, 0, tzinfo=timezone.utc) + timedelta(hours=i)
    lines = [
        'Return-Path: <sender%d@example.org>' % i,
        'From: Sender %d <sender%d@example.org>' % (i, i),
        'To: %s <%s@example.com>' % (user, user),
        'Subject: Test message %d for %s' % (i, user),
        'Date: %s' % email.utils.format_datetime(date),
        'Message-ID: <%d.%s@gimapproxy.test>' % (i, user),
        'MIME-Version: 1.0',
        'Content-Type: text/plain; charset=us-ascii',
        '',
        'Hello %s,' % user,
        '',
        'this is test message number %d.' % i,
        '',
    ]
    return '\n'.join(lines).encode('ascii')


def _tail(path: str, lines: int = 30) -> str:
    """Return the last `lines` lines of a text file, or '' if it cannot be read."""
    try:
        with open(path, 'r', errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


def _read_text(path: str) -> str:
    """Return the whole text of a file, or '' if it does not exist (yet)."""
    try:
        with open(path, 'r', errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def _read_greeting(host: str, port: int, timeout: float) -> Optional[bytes]:
    """Connect and return the server's first line, or None if nobody accepts yet."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        data = b''
        while b'\n' not in data and len(data) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data
    except OSError:
        return None
    finally:
        s.close()


def _session_processes(sid: int) -> List[int]:
    """Return the PIDs of live (non-zombie) processes in session `sid`.

    Servers are started with start_new_session=True, so the session id is the server's
    PID and every process it forks (Dovecot's imap, auth, log... children) stays in it
    even after being re-parented. Dovecot renames its children's titles ("dovecot/imap"),
    so this is more reliable than looking for the work dir in command lines.
    """
    pids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..."; comm may contain spaces and ')'.
        fields = stat[stat.rfind(')') + 2:].split()
        if len(fields) >= 4 and fields[0] != 'Z' and int(fields[3]) == sid:
            pids.append(int(name))
    return pids


def _kill_session(sid: int, timeout: float = 5.0) -> List[int]:
    """SIGKILL, by PID, every process left in session `sid`; return the PIDs found.

    Raises RuntimeError if some of them are still alive after `timeout` seconds.
    """
    found = _session_processes(sid)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while _session_processes(sid):
        if time.monotonic() > deadline:
            raise RuntimeError('processes of session %d survive SIGKILL: %s'
                               % (sid, _session_processes(sid)))
        time.sleep(0.02)
    return found


def parse_login_line(line: str) -> Dict[str, object]:
    """Return the fields of a Dovecot "imap-login: Login:" line as a dict.

    "... Login: user=<u>, method=PLAIN, rip=192.0.2.7, lip=127.0.0.2, mpid=42, TLS,
    session=<abc>" gives {'user': 'u', 'method': 'PLAIN', 'rip': '192.0.2.7',
    'lip': '127.0.0.2', 'mpid': '42', 'TLS': True, 'session': 'abc'}: <brackets> are
    stripped, bare words (TLS, secured, ...) map to True. Raises ValueError if `line` is
    not a login line.
    """
    m = _DOVECOT_LOGIN_RE.search(line)
    if m is None:
        raise ValueError('not a Dovecot login line: %r' % line)
    rest = line[line.index('Login: ', m.start()) + len('Login: '):].rstrip('\r\n')
    fields: Dict[str, object] = {}
    for fm in _LOGIN_FIELD_RE.finditer(rest):
        key, value = fm.group(1), fm.group(2)
        if value is None:
            fields[key] = True
        else:
            if value.startswith('<') and value.endswith('>'):
                value = value[1:-1]
            fields[key] = value
    return fields


class _Server:
    """Common process handling: start on a free port, wait for the greeting, stop."""

    name = 'server'
    host = '127.0.0.1'

    def __init__(self) -> None:
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = ''
        self.stderr_path = ''
        # PIDs that outlived the main process and had to be signalled by stop().
        self.leftovers: List[int] = []
        # Why earlier start attempts failed (e.g. the chosen port was taken meanwhile).
        self.start_errors: List[str] = []

    @property
    def pid(self) -> int:
        """PID of the server's main process (raises RuntimeError if not started)."""
        if self.proc is None:
            raise RuntimeError('%s is not running' % self.name)
        return self.proc.pid

    # Subclasses fill these in.
    def _command(self) -> List[str]:
        raise NotImplementedError

    def _prepare_port(self) -> None:
        """Write whatever depends on self.port (e.g. a config file) before a start."""

    def _listening(self) -> bool:
        """Return True if the child says it has bound its port (if it says so at all)."""
        return self.proc is not None and self.proc.poll() is None

    def _diagnostics(self) -> str:
        return _tail(self.stderr_path)

    def _spawn(self) -> None:
        """Start on a free port and wait for the greeting; retry if the port was taken.

        Raises RuntimeError (with the server's own output) if it does not come up.
        """
        for _ in range(START_ATTEMPTS):
            self.port = free_port(self.host)
            # Start each attempt with empty logs (so old lines don't fool the checks).
            for path in {self.log_path, self.stderr_path}:
                open(path, 'wb').close()
            self._prepare_port()
            with open(self.stderr_path, 'ab') as err:
                # Own session: stop() finds every process the server forked by its sid.
                self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=subprocess.STDOUT,
                                             start_new_session=True, close_fds=True)
            _running.add(self)
            error = self._wait_ready()
            if error is None:
                return
            self._terminate()
            self.start_errors.append(error)
            if 'address already in use' not in error.lower():
                break
        raise RuntimeError('%s did not start: %s' % (self.name, self.start_errors[-1]))

    def _wait_ready(self) -> Optional[str]:
        """Return None once the server greets with "* OK", else a description of why not."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                return 'exited with status %s on port %d:\n%s' % (
                    self.proc.returncode, self.port, self._diagnostics())
            line = _read_greeting(self.host, self.port, timeout=2.0)
            # The greeting might come from another process that took the port between
            # free_port() and the child's bind(): then the child exits soon ("Address
            # already in use", retried by _spawn) and _listening() stays False.
            if line and line.startswith(b'* OK') and self._listening():
                return None
            if time.monotonic() > deadline:
                return 'no greeting on port %d within %.0f s:\n%s' % (
                    self.port, START_TIMEOUT, self._diagnostics())
            time.sleep(0.05)

    def _terminate(self) -> None:
        """Stop the main process and everything it forked, by PID.

        SIGTERM the main process, SIGKILL it if it lingers, reap it. Then SIGTERM the
        processes of its session that outlived it (their PIDs go to self.leftovers),
        and SIGKILL those still there after 2 s. Dovecot's master needs this: on SIGTERM
        it waits ~1 s and exits, but leaves running every imap process that still has a
        client connected, plus the stats and log processes serving them (seen with
        2.3.19, shutdown_clients = yes notwithstanding).
        Raises RuntimeError if a process survives SIGKILL.
        """
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        left = _session_processes(proc.pid)
        self.leftovers += left
        for pid in left:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_session(proc.pid)

    def stop(self) -> None:
        """Stop the server by PID and remove its work dir. Safe to call twice or after a
        failed start.

        SIGTERMs the main process (Dovecot's master stops its idle children itself),
        SIGKILLs it after 10 s; then SIGTERMs, and after 2 s SIGKILLs, any process of its
        session still alive (Dovecot imap processes with a client still connected; their
        PIDs are added to self.leftovers). Dovecot takes ~1.1 s: its master waits a
        second for its children. Raises RuntimeError if some process cannot be killed.
        """
        try:
            self._terminate()
        finally:
            if self.workdir and os.path.isdir(self.workdir):
                shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        """Return the server's log so far ('' if there is none yet)."""
        return _read_text(self.log_path)

    def login_count(self, user: Optional[str] = None) -> int:
        """Return the number of successful logins (of `user`, if given) logged so far."""
        raise NotImplementedError

    def wait_login_count(self, n: int, timeout: float = 5.0,
                         user: Optional[str] = None) -> int:
        """Poll the log until login_count(user) >= n or `timeout` seconds pass.

        Returns the last count seen (which is < n on timeout; the caller asserts).
        """
        deadline = time.monotonic() + timeout
        while True:
            count = self.login_count(user)
            if count >= n or time.monotonic() >= deadline:
                return count
            time.sleep(0.02)

    def settled_login_count(self, quiet: float = 0.25, timeout: float = 5.0) -> int:
        """login_count() once the log has not grown for `quiet` seconds: the server writes
        it late (Dovecot through its log process), after the client has its OK."""
        count = self.login_count()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet)
            again = self.login_count()
            if again == count:
                break
            count = again
        return count

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Dovecot(_Server):
    """A throwaway Dovecot on a free loopback port with its own config, users and mail,
    under a temp dir."""

    name = 'dovecot'

    def __init__(self, users: Optional[Dict[str, str]] = None, messages: int = 20,
                 extra_conf: str = '', workdir: Optional[str] = None, *,
                 tls: Optional[Tuple[str, str]] = None,
                 trusted_networks: Optional[str] = None,
                 host: Optional[str] = None,
                 tls_resumption: bool = False) -> None:
        """Describe the server; nothing is written or started before start().

        users: user name -> password (default user1..user20 / secret1..secret20).
        messages: messages pre-loaded into each user's INBOX.
        extra_conf: Dovecot settings appended to the end of the generated config.
        workdir: directory to use (it is removed by stop()); default a new
        /tmp/gimap-dc-XXXXXXXX (short, since Dovecot's socket paths must stay
        below ~100 characters).
        tls: (cert_file, key_file), PEM; cert_file holds the leaf then its chain. Turns
        on TLS: "ssl = required" and "disable_plaintext_auth = yes" (no LOGIN or
        AUTHENTICATE before STARTTLS: LOGINDISABLED, no AUTH= in the capabilities),
        STARTTLS offered on .port, and an implicit-TLS (imaps) listener on a second
        free port, .tls_port. The files are copied into <workdir>/ssl at start().
        The server then listens on TLS_HOST (127.0.0.2) unless `host` says otherwise:
        Dovecot counts a client whose IP equals the server's as secured, and would let
        127.0.0.1 -> 127.0.0.1 log in without TLS. Login lines show "TLS" (STARTTLS
        and imaps alike).
        trusted_networks: e.g. '127.0.0.0/8', for login_trusted_networks. Dovecot then
        believes the ID fields a client in those networks sends before logging in
        ("x-originating-ip", "x-originating-port", "x-session-id", ...), so its login
        line shows rip=<forwarded IP> (and lip/session likewise when forwarded). A
        trusted client also counts as "secured": ssl = required does NOT stop it
        logging in without TLS (its login line then says "secured", not "TLS").
        host: the loopback address to listen on (default 127.0.0.1, or TLS_HOST with
        tls).
        tls_resumption: run one long-lived imap-login process for all connections
        (service_count = 0, process_min_avail = 1) instead of one per connection, so
        that TLS sessions can be resumed. By default Dovecot 2.3 does issue TLS 1.3/1.2
        session tickets, but every connection gets a new login process with its own
        ticket key and session cache, so resumption never succeeds (session_reused is
        False).
        """
        super().__init__()
        if tls is not None:
            cert_file, key_file = tls
            for path in (cert_file, key_file):
                if not os.path.isfile(path):
                    raise FileNotFoundError('Dovecot(tls=...): no such file: %s' % path)
            self.tls: Optional[Tuple[str, str]] = (os.path.abspath(cert_file),
                                                   os.path.abspath(key_file))
        else:
            self.tls = None
        self.trusted_networks = trusted_networks
        self.tls_resumption = tls_resumption
        self.host = host or (TLS_HOST if tls is not None else _Server.host)
        # Port of the implicit-TLS (imaps) listener; 0 without tls.
        self.tls_port = 0
        # The copies of the TLS files that the config names (set by start()).
        self.tls_cert_path = ''
        self.tls_key_path = ''
        if users is None:
            users = {'user%d' % i: 'secret%d' % i for i in range(1, 21)}
        self.users = dict(users)
        self.messages = messages
        self.extra_conf = extra_conf
        self._workdir_arg = workdir
        self.workdir = ''
        self.conf_path = ''
        self.passwd_path = ''
        self._msg_seq = 0
        self._hashes: Dict[str, str] = {}
        self._is_root = os.geteuid() == 0
        if self._is_root:
            # Mail processes must not run as root, nor as Dovecot's internal users.
            try:
                pw = pwd.getpwnam('nobody')
                self.mail_uid = pw.pw_uid
                self.mail_gid = pw.pw_gid
            except KeyError:
                self.mail_uid = self.mail_gid = 65534
            self.login_user = 'dovenull'
            self.internal_user = 'dovecot'
        else:
            # Unprivileged: everything runs as ourselves (Dovecot cannot switch users).
            self.mail_uid = os.getuid()
            self.mail_gid = os.getgid()
            self.login_user = self.internal_user = pwd.getpwuid(os.getuid()).pw_name
        self.internal_group = self._internal_group()

    def _internal_group(self) -> str:
        """Return the primary group name of Dovecot's internal user."""
        try:
            gid = pwd.getpwnam(self.internal_user).pw_gid
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return self.internal_user

    # --- files -----------------------------------------------------------------------

    def home(self, user: str) -> str:
        """Return the home directory of `user` (its mail is in <home>/Maildir)."""
        return os.path.join(self.workdir, 'home', user)

    def _chown(self, path: str, uid: int, gid: int) -> None:
        if self._is_root:
            os.chown(path, uid, gid)

    def _write_passwd(self) -> None:
        """Atomically (re)write the passwd-file that serves as passdb and userdb.

        Dovecot's auth process re-reads the file when its mtime (whole seconds) or size
        changes, so the new file gets an mtime that differs from the old one.
        """
        lines = []
        for user in sorted(self.users):
            # user:password:uid:gid:gecos:home:shell:extra_fields
            lines.append('%s:%s:%d:%d::%s::\n' % (user, self._hashes[user], self.mail_uid,
                                                 self.mail_gid, self.home(user)))
        old_mtime = None
        try:
            old_mtime = int(os.stat(self.passwd_path).st_mtime)
        except FileNotFoundError:
            pass
        tmp = self.passwd_path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(lines)
        # Readable by the auth process (runs as the internal user), not by mail users.
        os.chmod(tmp, 0o640)
        if self._is_root:
            os.chown(tmp, 0, grp.getgrnam(self.internal_group).gr_gid)
        if old_mtime is not None and int(os.stat(tmp).st_mtime) == old_mtime:
            new_mtime = old_mtime + 1
            os.utime(tmp, (new_mtime, new_mtime))
        os.replace(tmp, self.passwd_path)

    def _write_maildir_message(self, user: str, data: bytes, subdir: str,
                               flags: str = '') -> str:
        """Write one message file into <home>/Maildir/<subdir>; return its path.

        The file is written under tmp/ and renamed, as the Maildir spec wants, and owned
        by the mail user. Files in cur/ carry ":2,<flags>" in their name.
        """
        maildir = os.path.join(self.home(user), 'Maildir')
        self._msg_seq += 1
        # Base name: seconds, then a unique part; Dovecot assigns UIDs in name order.
        base = '%d.M%06dP%d.gimap,S=%d' % (int(time.time()), self._msg_seq, os.getpid(),
                                          len(data))
        tmp = os.path.join(maildir, 'tmp', base)
        with open(tmp, 'wb') as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        self._chown(tmp, self.mail_uid, self.mail_gid)
        final = os.path.join(maildir, subdir, base + (':2,' + flags if subdir == 'cur'
                                                       else ''))
        os.rename(tmp, final)
        return final

    def _make_mail(self, user: str) -> None:
        """Create the user's home and Maildir with self.messages messages in cur/."""
        home = self.home(user)
        maildir = os.path.join(home, 'Maildir')
        for d in (home, maildir, os.path.join(maildir, 'cur'),
                  os.path.join(maildir, 'new'), os.path.join(maildir, 'tmp')):
            os.mkdir(d, 0o700)
            self._chown(d, self.mail_uid, self.mail_gid)
        for i in range(1, self.messages + 1):
            # Every third message is already read, so FLAGS are not all the same.
            self._write_maildir_message(user, make_message(user, i), 'cur',
                                        'S' if i % 3 == 0 else '')

    def config_text(self) -> str:
        """Return the dovecot.conf for the current port and work dir."""
        wd = self.workdir
        lines = [
            '# Generated by tests/backends.py: a throwaway Dovecot for gimapproxy tests.',
            '# Nothing is read from /etc/dovecot.',
            'protocols = imap',
            'listen = %s' % self.host,
            'base_dir = %s/run' % wd,
            'state_dir = %s/state' % wd,
            'instance_name = gimap-dc-%d' % self.port,
            '',
            'log_path = %s/dovecot.log' % wd,
            'info_log_path = %s/dovecot.log' % wd,
            'debug_log_path = %s/dovecot.log' % wd,
            'auth_verbose = yes',
            '',
        ]
        if self.tls is None:
            lines += [
                'ssl = no',
                'disable_plaintext_auth = no',
            ]
        else:
            lines += [
                'ssl = required',
                'disable_plaintext_auth = yes',
                'ssl_cert = <%s' % self.tls_cert_path,
                'ssl_key = <%s' % self.tls_key_path,
            ]
        if self.trusted_networks:
            lines.append('login_trusted_networks = %s' % self.trusted_networks)
        lines += [
            'auth_mechanisms = plain login',
            '',
            'default_login_user = %s' % self.login_user,
            'default_internal_user = %s' % self.internal_user,
            'default_internal_group = %s' % self.internal_group,
            'first_valid_uid = %d' % self.mail_uid,
            # Up to 400 imap (and imap-login) processes; more would make Dovecot warn,
            # with ulimit -n 1024, that anvil's client_limit (1000) is too low.
            'default_process_limit = 400',
            'mail_max_userip_connections = 50',
            'mail_location = maildir:~/Maildir',
            '',
            'passdb {',
            '  driver = passwd-file',
            '  args = scheme=SHA512-CRYPT %s' % self.passwd_path,
            '}',
            'userdb {',
            '  driver = passwd-file',
            '  args = %s' % self.passwd_path,
            '}',
            '',
            'service imap-login {',
            '  inet_listener imap {',
            '    address = %s' % self.host,
            '    port = %d' % self.port,
            '  }',
            '  inet_listener imaps {',
        ]
        if self.tls is None:
            lines.append('    port = 0')
        else:
            lines += [
                '    address = %s' % self.host,
                '    port = %d' % self.tls_port,
                '    ssl = yes',
            ]
        lines.append('  }')
        if self.tls_resumption:
            # One login process serves every connection (Dovecot's "high-performance
            # mode"), so its ticket key and session cache see all of them.
            lines += [
                '  service_count = 0',
                '  process_min_avail = 1',
            ]
        if not self._is_root:
            lines.append('  chroot =')
        lines.append('}')
        if not self._is_root:
            # Without root Dovecot can neither chroot nor change users.
            lines += [
                'service anvil {',
                '  chroot =',
                '}',
                'service auth-worker {',
                '  user = $default_internal_user',
                '}',
                'service imap {',
                '  extra_groups =',
                '}',
            ]
        text = '\n'.join(lines) + '\n'
        if self.extra_conf:
            text += '\n# extra_conf\n' + self.extra_conf.rstrip('\n') + '\n'
        return text

    # --- process ---------------------------------------------------------------------

    def _command(self) -> List[str]:
        # -F: stay in the foreground, so the Popen PID is the master's PID.
        return [self._binary, '-F', '-c', self.conf_path]

    def _prepare_port(self) -> None:
        if self.tls is not None:
            # A second free port for imaps; if it is taken by the time Dovecot binds it,
            # Dovecot exits with "Address already in use" and _spawn() retries both.
            self.tls_port = free_port(self.host)
            while self.tls_port == self.port:
                self.tls_port = free_port(self.host)
        with open(self.conf_path, 'w') as f:
            f.write(self.config_text())

    def _copy_tls_files(self) -> None:
        """Copy the tls=(cert, key) files into <workdir>/ssl (root-only when root).

        Dovecot's config process reads ssl_cert/ssl_key (as root, before dropping
        privileges) and hands their contents to the login processes, so the originals
        would do wherever root can read them; the copies keep the work dir complete
        and independent of the caller's files (which a fixture may remove first).
        """
        ssl_dir = os.path.join(self.workdir, 'ssl')
        os.mkdir(ssl_dir, 0o700)
        self.tls_cert_path = os.path.join(ssl_dir, 'cert.pem')
        self.tls_key_path = os.path.join(ssl_dir, 'key.pem')
        shutil.copyfile(self.tls[0], self.tls_cert_path)
        shutil.copyfile(self.tls[1], self.tls_key_path)
        os.chmod(self.tls_cert_path, 0o644)
        os.chmod(self.tls_key_path, 0o600)

    def _listening(self) -> bool:
        # The master logs "starting up" only once all its listeners are bound.
        return super()._listening() and 'starting up for imap' in self.log_text()

    def _diagnostics(self) -> str:
        # Config errors (doveconf) go to stderr; errors once running go to the log file.
        out = []
        stderr = _tail(self.stderr_path).strip()
        if stderr:
            out.append('--- dovecot stderr ---\n' + stderr)
        log = _tail(self.log_path).strip()
        if log:
            out.append('--- %s ---\n%s' % (self.log_path, log))
        return '\n'.join(out) or '(no output)'

    def start(self) -> 'Dovecot':
        """Write config, users and mail, start `dovecot -F` and wait for its greeting.

        Returns self. Raises RuntimeError (with the tail of Dovecot's stderr and log) if
        dovecot is not installed, does not start or does not greet within 15 s; the work
        dir is removed in that case.
        """
        if self.proc is not None:
            raise RuntimeError('dovecot already started (pid %d)' % self.proc.pid)
        binary = dovecot_binary()
        if binary is None:
            raise RuntimeError('dovecot is not installed')
        self._binary = binary
        if self._workdir_arg:
            os.makedirs(self._workdir_arg, exist_ok=True)
            self.workdir = os.path.abspath(self._workdir_arg)
        else:
            self.workdir = tempfile.mkdtemp(prefix='gimap-dc-', dir='/tmp')
        try:
            # mkdtemp makes 0700; the mail processes (mail uid) and the auth process
            # (internal user) must be able to traverse it, not to list it.
            os.chmod(self.workdir, 0o711)
            self.conf_path = os.path.join(self.workdir, 'dovecot.conf')
            self.passwd_path = os.path.join(self.workdir, 'passwd')
            self.log_path = os.path.join(self.workdir, 'dovecot.log')
            self.stderr_path = os.path.join(self.workdir, 'stderr.log')
            os.mkdir(os.path.join(self.workdir, 'state'), 0o755)
            os.mkdir(os.path.join(self.workdir, 'home'), 0o711)
            if self.tls is not None:
                self._copy_tls_files()
            for user, password in self.users.items():
                self._hashes[user] = sha512_crypt(password)
                self._make_mail(user)
            self._write_passwd()
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    # --- observation and changes -----------------------------------------------------

    def login_count(self, user: Optional[str] = None) -> int:
        """Return the number of "imap-login: Login:" lines (successful logins) in the
        log so far, only those of `user` if given. Dovecot's log process writes them
        a little after the client saw OK: use wait_login_count() to wait for one."""
        return sum(1 for m in _DOVECOT_LOGIN_RE.finditer(self.log_text())
                   if user is None or m.group(1) == user)

    def login_lines(self, user: Optional[str] = None) -> List[str]:
        """Return the "imap-login: Info: Login: ..." lines (successful logins; of
        `user` if given) logged so far, whole and without their line end, e.g.

          Nov 28 16:28:47 imap-login: Info: Login: user=<u>, method=PLAIN,
          rip=127.0.0.1, lip=127.0.0.2, mpid=5829, TLS, session=<OXrGq1hhpOR/AAAB>

        (one line). After the addresses come "TLS" for a TLS connection (STARTTLS or
        imaps), else "secured" if Dovecot counts the client as secure anyway (trusted
        network, or same IP as the server), else nothing. rip= is the forwarded
        x-originating-ip for a trusted client that sent ID before logging in.
        parse_login_line() turns a line into a dict. Like login_count(), a login shows
        up a little after the client saw OK: wait_login_count() first.
        """
        out = []
        for line in self.log_text().splitlines():
            m = _DOVECOT_LOGIN_RE.search(line)
            if m is not None and (user is None or m.group(1) == user):
                out.append(line)
        return out

    def set_password(self, user: str, password: str) -> None:
        """Change (or add) `user`'s password; returns once Dovecot uses the new one.

        Dovecot's auth process checks the passwd-file's mtime and size at most once per
        second (and mtime in whole seconds), so this waits until the wall clock has
        passed into the next second after the write: up to ~1 s.
        A new user gets a home and Maildir (with self.messages messages).
        """
        if user not in self.users:
            self._make_mail(user)
        self.users[user] = password
        self._hashes[user] = sha512_crypt(password)
        self._write_passwd()
        written = max(int(time.time()), int(os.stat(self.passwd_path).st_mtime))
        while time.time() < written + 1.05:
            time.sleep(0.05)

    def add_message(self, user: str, data: bytes) -> None:
        """Drop a message into `user`'s Maildir/new (owned by the mail user); Dovecot sees
        it at the next mailbox sync (NOOP, SELECT, ...). Raises KeyError for an unknown
        user."""
        if user not in self.users:
            raise KeyError(user)
        self._write_maildir_message(user, data, 'new')


class Pymap(_Server):
    """pymap's in-memory demo server (no UNSELECT) on a free loopback port, with --debug
    logging to a file."""

    name = 'pymap'

    def __init__(self, user: str = 'demouser', password: str = 'demopass') -> None:
        """Describe the server (one user); nothing is started before start()."""
        super().__init__()
        self.user = user
        self.password = password
        self.workdir = ''

    def _command(self) -> List[str]:
        exe = os.path.join(os.path.dirname(sys.executable), 'pymap')
        if os.access(exe, os.X_OK):
            cmd = [exe]
        else:
            cmd = [sys.executable, '-m', 'pymap']
        return cmd + ['--debug', '--host', self.host, '--port', str(self.port),
                      'dict', '--demo-data', '--demo-user', self.user,
                      '--demo-password', self.password]

    def _listening(self) -> bool:
        # pymap --debug logs each accepted connection ("+++| <SocketInfoLocal ...
        # sockname='[127.0.0.1]:PORT'>") before greeting it: our probe must be there.
        return (super()._listening() and
                "sockname='[%s]:%d'" % (self.host, self.port) in self.log_text())

    def _diagnostics(self) -> str:
        return _tail(self.log_path) or '(no output)'

    def start(self) -> 'Pymap':
        """Start pymap and wait for its greeting. Returns self.

        Raises RuntimeError (with the tail of pymap's output) if it does not greet within
        15 s.
        """
        if self.proc is not None:
            raise RuntimeError('pymap already started (pid %d)' % self.proc.pid)
        if sys.version_info < (3, 11) or os.environ.get('GIMAPPROXY_SKIP_PYMAP') == '1':
            # pymap needs Python 3.11; the compatibility matrix leaves it out on every
            # Python, where Dovecot is the backend.
            import pytest  # lazily: this module must import without pytest
            pytest.skip('pymap left out (Python < 3.11 or GIMAPPROXY_SKIP_PYMAP=1)')
        self.workdir = tempfile.mkdtemp(prefix='gimap-pm-', dir='/tmp')
        # pymap logs to stderr; stdout and stderr both go to the log file.
        self.log_path = self.stderr_path = os.path.join(self.workdir, 'pymap.log')
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def login_count(self, user: Optional[str] = None) -> int:
        """Return the number of successful LOGIN/AUTHENTICATE commands in the debug log.

        A command counts when the same connection's tagged response to it is OK.
        `user` is accepted for symmetry with Dovecot; pymap has a single user.
        """
        if user is not None and user != self.user:
            return 0
        pending = set()
        count = 0
        for m in _PYMAP_LINE_RE.finditer(self.log_text()):
            conn, direction, tag, word = m.groups()
            if direction == '-->' and word.upper() in ('LOGIN', 'AUTHENTICATE'):
                pending.add((conn, tag))
            elif direction == '<--' and (conn, tag) in pending:
                pending.discard((conn, tag))
                if word.upper() == 'OK':
                    count += 1
        return count
