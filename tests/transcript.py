"""Differential isolation checks: the same script directly against Dovecot and through the
proxy, and a reused connection compared with a fresh login.

A transcript is the list of response lines a client received, with the values that
differ between two equivalent sessions normalized (Dovecot's timing text, RECENT counts,
UIDs and mod-sequences of messages the probe itself appends). What a session must not
inherit (a selected mailbox, CONDSTORE or QRESYNC, NOTIFY) still shows: a FETCH that is
not BAD, a MODSEQ, a VANISHED, a missing untagged FETCH.

Used by tests/test_attacks.py and tests/test_differential.py.
"""
from __future__ import annotations

import difflib
import itertools
import re
import socket
import time
from typing import Optional

import pytest

from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot
from tests.conftest import wait_until
from tests.wire import Client

# Each user gets this many messages: FETCH 1:3 needs three, and a small INBOX keeps the
# server's start quick.
MESSAGES = 5

_VOLATILE = [
    # Dovecot's timing text: "(0.001 + 0.000 secs)", "(0.004 + 0.000 + 0.003 secs)".
    (re.compile(rb' \(\d+\.\d+(?: \+ \d+\.\d+)* secs\)'), b''),
    # The first session to select a mailbox takes its \Recent messages.
    (re.compile(rb'^\* \d+ RECENT', re.M), b'* n RECENT'),
    (re.compile(rb'\\Recent ?'), b''),
    (re.compile(rb' (?=\))'), b''),
    # The probe appends (and expunges) a message of its own each time.
    (re.compile(rb'UIDNEXT \d+'), b'UIDNEXT n'),
    (re.compile(rb'APPENDUID (\d+) \d+'), rb'APPENDUID \1 n'),
    (re.compile(rb'^\* VANISHED \d+', re.M), b'* VANISHED n'),
    # Mod-sequences grow with every change; their presence is what matters.
    (re.compile(rb'(HIGHESTMODSEQ|MODSEQ) \(?\d+\)?'), rb'\1 n'),
]


def normalize(line: bytes) -> bytes:
    """Return a response line with the values that differ between equivalent sessions
    replaced by placeholders."""
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    return line


def diff(got: list, want: list, got_name: str = 'through the proxy',
         want_name: str = 'direct Dovecot') -> str:
    """Two transcripts as a unified diff, for an assertion message."""
    return '\n'.join(difflib.unified_diff(
        [line.decode('latin-1').rstrip('\r\n') for line in want],
        [line.decode('latin-1').rstrip('\r\n') for line in got],
        want_name, got_name, lineterm=''))


def start_dovecot(prefix: str, count: int) -> Dovecot:
    """A Dovecot of its own for one test module: users <prefix>1..<prefix><count>, each
    with password pw-<prefix><n> and MESSAGES messages. The caller stops it."""
    users = {'%s%d' % (prefix, i): 'pw-%s%d' % (prefix, i) for i in range(1, count + 1)}
    return Dovecot(users=users, messages=MESSAGES,
                   extra_conf=NO_AUTH_PENALTY_CONF).start()


class Session:
    """One client session that records every line it receives, normalized.

    `send` writes raw bytes; `expect(tag)` reads until the tagged reply of `tag` (or a
    timeout or EOF, recorded as `<timeout>` or `<eof>`). The transcript is `lines`.
    """

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.client = Client(port, timeout=timeout)
        self.timeout = timeout
        self.lines: list[bytes] = []
        self.last_raw = b''          # the last line read, before normalizing
        self.ended = False           # EOF or timeout seen: the session is over

    def login(self, user: str, password: str) -> bytes:
        """Log in with LOGIN (not recorded: the proxy's capability list differs)."""
        tagged = self.client.login(user, password)
        assert tagged.startswith(b'L1 OK'), tagged
        return tagged

    def send(self, data: bytes) -> bool:
        """Write `data`; False (and `<send failed>` recorded) when the peer is gone."""
        try:
            self.client.send(data)
            return True
        except OSError:
            self.lines.append(b'<send failed>')
            self.ended = True
            return False

    def readline(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """Return the next response (normalized, recorded), or None at EOF or timeout."""
        if self.ended:
            return None
        self.client.sock.settimeout(timeout or self.timeout)
        try:
            line = self.client.readline()
        except (socket.timeout, TimeoutError):
            self.lines.append(b'<timeout>')
            self.ended = True
            return None
        except (EOFError, OSError):
            self.lines.append(b'<eof>')
            self.ended = True
            return None
        self.last_raw = line
        line = normalize(line)
        self.lines.append(line)
        return line

    def expect(self, tag: bytes, timeout: Optional[float] = None) -> Optional[bytes]:
        """Read up to the tagged reply of `tag`; return it, or None at EOF or timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            line = self.readline(max(0.05, deadline - time.monotonic()))
            if line is None or line.startswith(tag + b' '):
                return line

    def command(self, tag: bytes, text: bytes, timeout: Optional[float] = None
                ) -> Optional[bytes]:
        if not self.send(tag + b' ' + text + b'\r\n'):
            return None
        return self.expect(tag, timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> 'Session':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PROBE_MESSAGE = (b'From: probe@example.org\r\nSubject: probe\r\n\r\n'
                  b'A message the probe appends and expunges again.\r\n')
_APPENDUID = re.compile(rb'\[APPENDUID \d+ (\d+)\]')


def module_fixtures(prefix: str, users):
    """The module-scoped `server` (a Dovecot of its own, see start_dovecot) and `proxy`
    fixtures; a test module assigns both: `server, proxy = module_fixtures(...)`."""
    from tests.backends import require_dovecot
    from tests.conftest import Backend, start_proxy

    @pytest.fixture(scope='module')
    def server():
        require_dovecot()
        dovecot = start_dovecot(prefix, users)
        try:
            yield dovecot
        finally:
            dovecot.stop()

    @pytest.fixture(scope='module')
    def proxy(server):
        proxy = start_proxy(Backend('dovecot', server, list(server.users.items())))
        yield proxy
        proxy.stop(2)

    return server, proxy


def account_fixture(prefix: str):
    """The `account` fixture of a module whose users module_fixtures(prefix, ...) made:
    a user no other test of the module touches, (name, password); no password of theirs
    may reach the proxy's log."""
    numbers = itertools.count(1)

    @pytest.fixture
    def account(server, proxy_log):
        user = '%s%d' % (prefix, next(numbers))
        assert user in server.users, "raise the module's number of users"
        yield user, server.users[user]
        assert 'pw-' + prefix not in '\n'.join(proxy_log.lines), 'a password reached the log'
    return account


def probe(port: int, user: str, password: str, prelude: tuple = (),
          opening: tuple = ()) -> list[bytes]:
    """Run the fixed probe as a new session of `user`; return its transcript.

    `prelude` (command texts) runs first, unrecorded: tests of the probe itself use it
    to leave a session in the state a proxy must not hand on. `opening` (command texts,
    sent as o1, o2, ...) runs next and is recorded with its replies: a session that its
    first command moves to another connection (a profile switch) shows it there, in the
    words its ENABLE is answered with, and in the probe's SELECT and STORE replies.

    A fresh login answers: FETCH BAD (nothing selected); SELECT without HIGHESTMODSEQ
    (no CONDSTORE); STORE with its untagged FETCH (no NOTIFY NONE) and no MODSEQ; an
    EXPUNGE as `* n EXPUNGE`, not VANISHED (no QRESYNC). The mailbox is left as found:
    the flag comes off again, and the appended message is expunged by UID.
    """
    with Session(port) as s:
        s.login(user, password)
        for i, text in enumerate(prelude):
            s.command(b'q%d' % i, text)
        del s.lines[:]
        for i, text in enumerate(opening, 1):
            s.command(b'o%d' % i, text)
        s.command(b'p1', b'FETCH 1:2 (FLAGS)')
        s.command(b'p2', b'SELECT INBOX')
        s.command(b'p3', b'STORE 1 +FLAGS (\\Flagged)')
        s.command(b'p4', b'FETCH 1:3 (FLAGS)')
        s.command(b'p5', b'STORE 1 -FLAGS (\\Flagged)')
        s.command(b'p6', b'APPEND INBOX (\\Deleted) {%d+}\r\n%s'
                  % (len(_PROBE_MESSAGE), _PROBE_MESSAGE))
        uid = _APPENDUID.search(s.last_raw)
        if uid is not None:
            s.command(b'p7', b'UID EXPUNGE ' + uid.group(1))
        s.command(b'p8', b'NOOP')
        s.command(b'p9', b'LOGOUT')
        return s.lines


def busy(proxy, user: str) -> int:
    """How many connections of `user` the proxy has in use (not cached)."""
    return sum(row['active'] for row in proxy.cache.listing() if row['user'] == user)


def wait_settled(proxy, user: str, timeout: float = 5.0, baseline: int = 0) -> None:
    """Wait until at most `baseline` connections of `user` are in use: its last
    session's connection is cached or closed, whatever the proxy decided.

    Raises AssertionError after `timeout` seconds."""
    wait_until(lambda: busy(proxy, user) <= baseline,
               "%s's connections to be cached or closed" % user, timeout)


_LOGIN_RESULT = re.compile(r'login: id=(\S+) user=(\S+) .*result=(\w+)')


def login_results(lines: list[str], user: str) -> list[str]:
    """The `result=` of each proxy login of `user` in the log, in order."""
    out = []
    for line in lines:
        match = _LOGIN_RESULT.search(line)
        if match and match.group(2) == user:
            out.append(match.group(3))
    return out


def closes_of(lines: list[str]) -> list[str]:
    """The reasons of the backend closes in the log, in order (without the age)."""
    return [re.sub(r' age=\S+$', '', line.split('reason=', 1)[1]) for line in lines
            if line.startswith('backend closed:') and 'reason=' in line]
