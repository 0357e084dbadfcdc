"""Issue 11's attacks, each against a real Dovecot: directly and through the proxy.

A client with a valid password tries to leave state behind on its server connection for
the same user's next session, or to make the proxy answer differently from the server.
Each test runs the same bytes directly against Dovecot and through the proxy and compares
what the client receives (tests/transcript.py normalizes Dovecot's timing text and the
like). Where the attack is about isolation, the user's next session through the proxy
runs a fixed probe, and its transcript must equal a fresh direct login's running the same
probe: whether the proxy reused the connection (it framed the bytes as Dovecot did) or
dropped it (it could not be sure), the next session cannot tell.

The module has a Dovecot of its own, with a user per test.
"""
import re
import socket
import time

import pytest

from gimapproxy import make_config
from gimapproxy.tls import BackendTLS
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, require_dovecot
from tests.transcript import (Session, account_fixture, diff, login_results,
                              module_fixtures, probe, wait_settled)
from tests.wire import Client

USERS = 60


server, proxy = module_fixtures('atk', USERS)


account = account_fixture('atk')


def assert_same(got, want, what):
    assert got == want, '%s differs:\n%s' % (what, diff(got, want))


def run(port, user, password, steps, timeout=3.0):
    """Log in; for each (data, tags) of `steps` send `data` in one write and read the
    replies to `tags` in order; then LOGOUT (each reply within `timeout`). Returns the
    transcript after login."""
    with Session(port, timeout=timeout) as s:
        s.login(user, password)
        for data, tags in steps:
            s.send(data)
            for tag in tags:
                s.expect(tag)
        s.command(b'Z9', b'LOGOUT')
        return s.lines


def both(server, proxy, user, password, steps, warm=False):
    """`run` directly, then through the proxy; return (direct, proxied) transcripts.

    With `warm`, run the steps directly once before, unrecorded: Dovecot keeps some
    effects in the mailbox (once CONDSTORE was used on a mailbox, every SELECT of it
    reports HIGHESTMODSEQ), so the run to compare with must start from the same state."""
    if warm:
        run(server.port, user, password, steps)
    direct = run(server.port, user, password, steps)
    proxied = run(proxy.server_port, user, password, steps)
    return direct, proxied


def assert_next_session_fresh(server, proxy, user, password, log):
    """The user's next session through the proxy answers the probe as a fresh direct
    login does."""
    wait_settled(proxy, user)
    through = probe(proxy.server_port, user, password)
    fresh = probe(server.port, user, password)
    logins = ', '.join(login_results(log.lines, user))
    assert_same(through, fresh, "the next session's probe (the proxy's logins of %s: %s)"
                % (user, logins))


def test_control_a_plain_session_is_reused_and_the_probe_agrees(server, proxy, account,
                                                                proxy_log):
    """The comparison itself: after a plain webmail session the connection is reused,
    and the probe through it equals a fresh login's."""
    user, password = account
    steps = [(b'x1 SELECT INBOX\r\nx2 FETCH 1:3 (FLAGS)\r\n', [b'x1', b'x2']),
             (b'x3 STORE 2 +FLAGS (\\Seen)\r\nx4 STORE 2 -FLAGS (\\Seen)\r\n',
              [b'x3', b'x4'])]
    direct, proxied = both(server, proxy, user, password, steps)
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)
    assert login_results(proxy_log.lines, user) == ['new', 'reused']


# -- 1. literal sizes as Dovecot reads them ---------------------------------------------
#
# A hidden command needs two disagreements: the proxy counts a literal that Dovecot does
# not read (so Dovecot runs a command the proxy takes for literal data), and Dovecot reads
# a literal that the proxy does not count (so the proxy sees a harmless command, with the
# hidden one's tag, that Dovecot takes for literal data). Tags and replies then match one
# to one: x1, x2, x3 on both sides, but Dovecot's x2 is the payload.

def _hide(opener: bytes, payload: bytes, digits: int) -> bytes:
    """x1 `opener` announcing len(payload), the payload line, then an x3 whose literal of
    9 bytes, written with `digits` digits, holds the proxy's x2 NOOP."""
    size = b'{%s+}' % str(9).zfill(digits).encode()
    return (b'x1 ' + opener % len(payload) + b'\r\n' + payload
            + b'x3 LIST "" ' + size + b'\r\nx2 NOOP\r\nx3 NOOP\r\n')


# The proxy counts a literal that Dovecot does not read:
OPENERS = {
    # RFC 3501 section 4.3: a quoted string cannot hold CR or LF, so Dovecot answers BAD
    # (missing '"') and reads the next line as a new command.
    'quoted': b'LIST "" "{%d+}',
    # RFC 3516 section 4.3: literal8 only in APPEND (and BINARY replies); elsewhere
    # Dovecot answers BAD and reads on from the next line.
    'literal8': b'LIST "" ~{%d+}',
    # NOOP takes no arguments: Dovecot never parses the rest of its line, literal or not.
    'no-arguments': b'NOOP {%d+}',
}
# RFC 3501 section 9: number = 1*DIGIT. Dovecot reads any number of digits, leading
# zeros included; the proxy took 1 to 10.
DIGITS = {'quoted': 11, 'literal8': 11, 'no-arguments': 24}
PAYLOADS = {
    'select': (b'x2 SELECT INBOX\r\n', b'x2 OK [READ-WRITE]'),
    'enable-qresync': (b'x2 ENABLE QRESYNC\r\n', b'* ENABLED QRESYNC'),
    'notify-none': (b'x2 NOTIFY NONE\r\n', b'x2 OK NOTIFY completed'),
}


@pytest.mark.parametrize('payload', sorted(PAYLOADS))
@pytest.mark.parametrize('form', sorted(OPENERS))
def test_literal_mismatch_leaves_nothing_behind(server, proxy, account, proxy_log, form,
                                                 payload):
    user, password = account
    line, proof = PAYLOADS[payload]
    data = _hide(OPENERS[form], line, DIGITS[form])
    direct, proxied = both(server, proxy, user, password, [(data, [b'x1', b'x2', b'x3'])])
    # Dovecot really ran the hidden command: the attack is live.
    assert any(reply.startswith(proof) for reply in direct), direct
    assert_same(proxied, direct, 'session 1')
    assert login_results(proxy_log.lines, user) == ['new']
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- 2. a tag reused while in flight ----------------------------------------------------
#
# The server sees the proxy's own tags, one per command: each reply goes back under the
# client's tag, in order, and the bookkeeping is not confused.

@pytest.mark.parametrize('data, results', [
    (b'a SELECT INBOX\r\na NOOP\r\n', ['new', 'reused']),
    # The ENABLE sets CONDSTORE: the next, plain, session does not get that connection.
    (b'a NOOP\r\na ENABLE CONDSTORE\r\n', ['new', 'new'])])
def test_reused_tag_is_answered_as_dovecot_does(server, proxy, account, proxy_log, data,
                                                results):
    user, password = account
    steps = [(data + b'b NOOP\r\n', [b'b'])]
    direct, proxied = both(server, proxy, user, password, steps)
    assert len([line for line in direct if line.startswith(b'a ')]) == 2
    # Every reply reaches the client, and the session goes on to its LOGOUT.
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)
    assert login_results(proxy_log.lines, user) == results


# -- 3. implicit CONDSTORE --------------------------------------------------------------

@pytest.mark.parametrize('steps', [
    [b'x1 STATUS {5+}\r\nINBOX (MESSAGES HIGHESTMODSEQ)\r\n'],
    [b'x1 EXAMINE {5+}\r\nINBOX (CONDSTORE)\r\n', b'x2 UNSELECT\r\n'],
    [b'x1 EXAMINE INBOX ( CONDSTORE)\r\n', b'x2 UNSELECT\r\n'],
    [b'x1 SELECT INBOX\r\n', b'x2 SEARCH CHARSET {5+}\r\nUTF-8 MODSEQ 1\r\n',
     b'x3 UNSELECT\r\n'],
], ids=['status-literal', 'examine-literal', 'examine-space', 'search-literal'])
def test_implicit_condstore_is_not_inherited(server, proxy, account, proxy_log, steps):
    user, password = account
    direct, proxied = both(server, proxy, user, password,
                           [(data, [data[:2]]) for data in steps], warm=True)
    # RFC 7162 section 3.1: Dovecot did turn CONDSTORE on.
    assert any(b'MODSEQ' in line for line in direct), direct
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- 4. deep nesting before login -------------------------------------------------------

@pytest.mark.parametrize('data', [b'a ID ' + b'(' * 8000 + b'\r\n',
                                  b'a LOGIN ' + b'(' * 8000 + b' x\r\n',
                                  b'a ID ' + b'(' * 600 + b'\r\n'],
                         ids=['id-8000', 'login-8000', 'id-600'])
def test_deep_nesting_before_login(server, proxy, account, proxy_log, data):
    user, password = account

    def exchange(port):
        with Client(port, timeout=5) as client:
            client.send(data)
            first = client.readline()
            # Dovecot: "a BAD Too many '('"; after a line of 8,000 it also says BYE
            # ("Input buffer full"), but it keeps a session whose line was shorter.
            assert first.startswith(b'a BAD ') or first.startswith(b'* BYE '), first
            assert b'Internal error' not in first, first
            if len(data) < 1000:
                assert first.startswith(b'a BAD '), first
            if first.startswith(b'a BAD ') and len(data) < 2000:
                assert client.login(user, password).startswith(b'L1 OK'), 'not usable'
                client.logout()
    exchange(server.port)
    exchange(proxy.server_port)
    text = '\n'.join(proxy_log.lines)
    assert 'Traceback' not in text and 'RecursionError' not in text
    # The proxy still serves (a bug did not take it down).
    with Client(proxy.server_port, timeout=5) as client:
        assert client.login(user, password).startswith(b'L1 OK')
        client.logout()


# -- 5. a late DONE after IDLE ----------------------------------------------------------

def test_stray_done_after_idle_is_answered_as_dovecot_does(server, proxy, account,
                                                           proxy_log):
    user, password = account

    def script(port):
        with Session(port) as s:
            s.login(user, password)
            s.send(b'a IDLE\r\n')
            s.readline()                     # "+ idling"
            s.send(b'DONE\r\n')
            s.expect(b'a')
            s.send(b'DONE\r\n')              # too late: a line of its own
            s.command(b'z', b'NOOP')
            s.command(b'Z9', b'LOGOUT')
            return s.lines
    direct = script(server.port)
    assert direct[:2] == [b'+ idling\r\n', b'a OK Idle completed.\r\n'], direct
    assert direct[2].startswith(b'DONE BAD '), direct
    proxied = script(proxy.server_port)
    assert not [line for line in proxied[:-2] if line.startswith(b'* BYE')], proxied
    assert_same(proxied, direct, 'session')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- 6. a tag Dovecot refuses -----------------------------------------------------------

@pytest.mark.parametrize('tag', [b'a]', b'\xc3\xa9t'], ids=['bracket', '8-bit'])
def test_refused_tag_does_not_hang_and_is_not_reused(server, proxy, account, proxy_log,
                                                     tag):
    user, password = account

    def script(port):
        with Session(port, timeout=3) as s:
            s.login(user, password)
            s.send(tag + b' NOOP\r\n')
            s.readline()
            started = time.monotonic()
            s.command(b'Z9', b'LOGOUT')
            return s.lines, time.monotonic() - started
    direct, _ = script(server.port)
    assert direct[0].startswith(b'* BAD '), direct
    proxied, took = script(proxy.server_port)
    assert_same(proxied, direct, 'session 1')
    assert took < 2.5, 'LOGOUT took %.1fs' % took
    wait_settled(proxy, user)
    assert_next_session_fresh(server, proxy, user, password, proxy_log)
    assert login_results(proxy_log.lines, user) == ['new', 'new'], \
        'a connection that saw an untagged BAD must not be reused'


# -- 7. literal8 in a pre-login LOGIN ----------------------------------------------------

@pytest.mark.parametrize('sync', [False, True], ids=['non-sync', 'sync'])
def test_literal8_in_login_is_refused(server, proxy, account, proxy_log, sync):
    user, password = account
    marker = b'~{%d}' % len(password) if sync else b'~{%d+}' % len(password)
    line = b'a LOGIN %s %s\r\n' % (user.encode(), marker)

    def script(port):
        with Client(port, timeout=5) as client:
            client.send(line if sync else line + password.encode() + b'\r\n')
            first = client.readline()
            if not first.startswith(b'a BAD '):
                return first, None          # "+": the literal was accepted
            lines, tagged = client.command(b'b', b'NOOP')
            return first, tagged
    before = server.settled_login_count()
    direct = script(server.port)
    assert direct[0].startswith(b'a BAD ') and direct[1].startswith(b'b OK'), direct
    proxied = script(proxy.server_port)
    assert proxied[0].startswith(b'a BAD '), proxied
    assert proxied[1].startswith(b'b OK'), proxied
    assert login_results(proxy_log.lines, user) == []
    assert server.settled_login_count() == before, 'a login happened'


# -- 9. pre-login limits at least the server's -------------------------------------------

def _id_command(pairs: int, size: int) -> bytes:
    """An ID with `pairs` fields, each value `size` octets (RFC 2971 section 3.3 allows
    30 fields of up to 1024 octets: ~30 KB)."""
    fields = b' '.join(b'"field%02d" "%s"' % (i, b'v' * size) for i in range(pairs))
    return b'i ID (' + fields + b')\r\n'


@pytest.mark.parametrize('pairs, size', [(30, 1000), (40, 750)],
                         ids=['30-fields-of-1000', '40-fields-of-750'])
def test_thirty_kilobyte_id_is_accepted(server, proxy, account, pairs, size):
    """30 fields of 1000 octets is what RFC 2971 allows at most; 40 fields is more than
    it allows a client to send, but Dovecot accepts it, so the proxy must too. (Dovecot
    refuses one value of a few KB: "Input buffer full".)"""
    user, password = account
    data = _id_command(pairs, size)
    assert 30000 < len(data) < 31000
    for port in (server.port, proxy.server_port):
        with Client(port, timeout=5) as client:
            client.send(data)
            try:
                lines, tagged = client.read_until_tagged(b'i')
            except EOFError as exc:
                pytest.fail('port %d: %s' % (port, str(exc)[:200]))
            assert tagged.startswith(b'i OK'), (port, lines, tagged)
            assert client.login(user, password).startswith(b'L1 OK')
            client.logout()


def test_ninety_kilobyte_id_is_refused(server, proxy):
    data = _id_command(30, 3000)
    assert 90000 < len(data) < 91000
    answers = []
    for port in (server.port, proxy.server_port):
        with Client(port, timeout=5) as client:
            try:
                client.send(data)
            except OSError:
                pass                    # refused while still being sent
            try:
                answers.append(client.readline())
            except (EOFError, OSError):
                answers.append(b'<closed>')
    # Dovecot: "* BYE Input buffer full, aborting", then it closes.
    assert answers[0].startswith(b'* BYE '), answers
    assert answers[1].startswith((b'* BYE ', b'i BAD ', b'<closed>')), answers


# -- 8. TLS sessions per server and name -------------------------------------------------

class _Offers:
    """Stands in for BackendTLS.context and records the session each wrap offers."""

    def __init__(self, context):
        self.context = context
        self.offered = []

    def wrap_socket(self, sock, **kw):
        self.offered.append((kw.get('server_hostname'), kw.get('session')))
        return self.context.wrap_socket(sock, **kw)

    def __getattr__(self, name):
        return getattr(self.context, name)


@pytest.fixture(scope='module')
def two_tls_servers(pki):
    """Two TLS Dovecots that resume sessions (one login process each): one on
    127.0.0.1, reachable as "localhost" or "127.0.0.1", one on 127.0.0.2."""
    require_dovecot()
    first = Dovecot(tls=pki.server_tls, host='127.0.0.1', messages=0,
                    extra_conf=NO_AUTH_PENALTY_CONF, tls_resumption=True,
                    users={'tls1': 'pw-tls1'})
    second = Dovecot(tls=pki.server_tls, messages=0, extra_conf=NO_AUTH_PENALTY_CONF,
                     tls_resumption=True, users={'tls1': 'pw-tls1'})
    with first, second:
        yield first, second


def _connect(tls, host, address):
    """Connect to `address`, wrap as `host`, read the greeting (TLS 1.3 tickets come
    after the handshake), remember the session; return session_reused."""
    sock = socket.create_connection(address, timeout=5)
    try:
        wrapped = tls.wrap(sock, host)
        data = b''
        while not data.endswith(b'\r\n'):
            chunk = wrapped.recv(4096)
            assert chunk, 'no greeting'
            data += chunk
        assert data.startswith(b'* OK'), data
        tls.remember(wrapped)
        reused = wrapped.session_reused
        wrapped.close()
        return reused
    finally:
        sock.close()


def test_tls_session_is_offered_only_to_its_server_and_name(two_tls_servers, pki):
    first, second = two_tls_servers
    tls = BackendTLS(make_config({'server_hostname': 'localhost',
                                  'server_tls': 'implicit', 'tls_ca_file': pki.ca_file}))
    offers = tls.context = _Offers(tls.context)
    a = ('127.0.0.1', first.tls_port)
    b = ('127.0.0.2', second.tls_port)
    assert _connect(tls, 'localhost', a) is False          # nothing to offer yet
    assert _connect(tls, 'localhost', a) is True           # same server, same name
    assert offers.offered[1][1] is not None
    # Another server: no session of the first is offered; a full handshake.
    assert _connect(tls, '127.0.0.2', b) is False
    assert offers.offered[2] == ('127.0.0.2', None), offers.offered[2]
    # The same server under another name: OpenSSL would resume without checking the
    # new name against the certificate, so nothing may be offered either.
    assert _connect(tls, '127.0.0.1', a) is False
    assert offers.offered[3] == ('127.0.0.1', None), offers.offered[3]
    # Each still resumes its own.
    assert _connect(tls, '127.0.0.2', b) is True
    assert _connect(tls, 'localhost', a) is True


class _FakeTLSSocket:
    def __init__(self, session):
        self.session = session
        self.session_reused = False


class _FakeContext:
    """Hands out fake TLS sockets, each with a session of its own, and records offers."""

    def __init__(self):
        self.offered = []

    def wrap_socket(self, sock, server_hostname=None, session=None):
        self.offered.append((server_hostname, session))
        return _FakeTLSSocket(object())


def test_tls_sessions_kept_are_bounded():
    from gimapproxy.tls import MAX_SESSIONS
    tls = BackendTLS(make_config({'server_hostname': 'localhost',
                                  'server_tls': 'implicit'}))
    context = tls.context = _FakeContext()
    hosts = ['host%d.test' % i for i in range(MAX_SESSIONS + 5)]
    for host in hosts:
        tls.remember(tls.wrap(None, host))
    assert len(tls._sessions) == MAX_SESSIONS
    tls.wrap(None, hosts[0])                   # the oldest was dropped
    tls.wrap(None, hosts[-1])                  # the newest is kept
    assert context.offered[-2] == (hosts[0], None)
    assert context.offered[-1][1] is not None
