"""The proxy end to end, over real sockets, in front of a real Dovecot and a real pymap."""
import base64
import re

import gevent
import pytest

from tests.conftest import start_proxy, wait_cached, wait_until
from tests.transcript import wait_settled
from tests.wire import Client


def user_of(backend, index=0):
    return backend.users[index]


def connect(proxy) -> Client:
    return Client(proxy.server_port)


def test_greeting_and_prelogin_capability(proxy):
    with connect(proxy) as client:
        assert client.greeting.startswith(b'* OK [CAPABILITY IMAP4rev1 ')
        caps = client.greeting.split(b']')[0].split()[3:]
        assert b'AUTH=PLAIN' in caps and b'AUTH=LOGIN' in caps and b'SASL-IR' in caps
        assert not (b'LITERAL+' in caps and b'LITERAL-' in caps)           # RFC 7888 section 5
        lines, tagged = client.command(b'a', b'CAPABILITY')
        assert lines == [b'* CAPABILITY ' + b' '.join(caps) + b'\r\n']
        assert tagged == b'a OK Capability completed.\r\n'


def test_login_select_fetch_logout(backend, proxy):
    user, password = user_of(backend)
    with connect(proxy) as client:
        tagged = client.login(user, password)
        assert tagged.startswith(b'L1 OK [CAPABILITY IMAP4rev1 ')
        caps = tagged.split(b']')[0].split()[3:]
        # The post-login list, filtered.
        assert not [cap for cap in caps if cap.upper().startswith((b'AUTH=', b'COMPRESS'))]
        assert not {b'STARTTLS', b'SASL-IR', b'LOGINDISABLED'} & {c.upper() for c in caps}
        if backend.name == 'dovecot':
            assert b'UNSELECT' in caps
        lines, tagged = client.command(b'a2', b'SELECT INBOX')
        assert tagged.startswith(b'a2 OK [READ-WRITE]')
        assert any(re.match(rb'\* \d+ EXISTS', line) for line in lines)
        lines, tagged = client.command(b'a3', b'FETCH 1:2 (FLAGS ENVELOPE)')
        assert tagged.startswith(b'a3 OK') and len(lines) == 2
        assert client.logout() == [b'* BYE Logging out\r\n']
        assert client.read_eof() == b''


def test_second_login_reuses_the_server_connection(backend, proxy, proxy_log):
    user, password = user_of(backend)
    before = backend.settled_logins()
    for _ in range(5):
        with connect(proxy) as client:
            assert client.login(user, password).startswith(b'L1 OK [CAPABILITY ')
            assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
            client.logout()
    assert backend.wait_logins(before + 1) == before + 1
    assert backend.settled_logins() == before + 1, 'the server saw more than one login'
    results = [line for line in proxy_log.lines if line.startswith('login: ')]
    assert [re.search('result=(\\w+)', line).group(1) for line in results] == \
        ['new'] + ['reused'] * 4


def test_wrong_password_gets_the_servers_no_and_keeps_the_cache(backend, proxy):
    user, password = user_of(backend)
    with connect(proxy) as client:
        client.login(user, password)
        client.logout()
    wait_cached(proxy)
    before = backend.settled_logins()
    with connect(proxy) as client:
        tagged = client.login(user, 'wrongpass')
        assert tagged == b'L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n'
        # Still not logged in: the session goes on in the not-authenticated state.
        assert client.command(b'b', b'SELECT INBOX')[1].startswith(b'b BAD')
        assert client.login(user, password, b'c').startswith(b'c OK')    # reuse
        client.logout()
    assert backend.settled_logins() == before


def test_concurrent_logins_get_different_connections(backend, proxy, proxy_log):
    user, password = user_of(backend)
    before = backend.settled_logins()
    with connect(proxy) as one, connect(proxy) as two:
        assert one.login(user, password).startswith(b'L1 OK')
        assert two.login(user, password).startswith(b'L1 OK')
        assert one.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
        # The second session is not inside the first one's mailbox.
        assert two.command(b'b', b'FETCH 1 FLAGS')[1].startswith(b'b BAD')
        assert one.command(b'c', b'FETCH 1 FLAGS')[1].startswith(b'c OK')
        one.logout()
        two.logout()
    assert backend.wait_logins(before + 2) == before + 2
    backends = re.findall('login: .* backend=(b\\d+)', '\n'.join(proxy_log.lines))
    assert len(set(backends)) == 2


@pytest.mark.parametrize('leave', ['logout', 'eof'])
def test_selected_mailbox_does_not_follow_into_the_next_session(backend, proxy, leave):
    user, password = user_of(backend)
    with connect(proxy) as client:
        client.login(user, password)
        assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
        if leave == 'logout':
            client.logout()
    wait_settled(proxy, user)
    before = backend.settled_logins()
    with connect(proxy) as client:
        client.login(user, password)
        lines, tagged = client.command(b'b', b'FETCH 1 FLAGS')
        assert tagged.startswith(b'b BAD') and lines == []
        client.logout()
    assert backend.logins() == before, 'the connection should have been reused'


def test_nothing_but_prelogin_commands_reach_the_server(backend, proxy):
    before = backend.settled_logins()
    with connect(proxy) as client:
        assert client.command(b'a', b'NOOP')[1] == b'a OK NOOP completed.\r\n'
        lines, tagged = client.command(b'b', b'ID ("name" "test")')
        assert lines == [b'* ID NIL\r\n'] and tagged == b'b OK ID completed.\r\n'
        assert client.command(b'c', b'SELECT INBOX')[1].startswith(b'c BAD')
        assert client.command(b'd', b'STARTTLS')[1].startswith(b'd BAD')
        lines, tagged = client.command(b'e', b'LOGOUT')
        assert lines == [b'* BYE Logging out\r\n'] and tagged.startswith(b'e OK')
    assert proxy.cache.total == 0
    assert backend.logins() == before


def test_prelogin_pipelining_is_all_answered(proxy):
    with connect(proxy) as client:
        client.send(b'a NOOP\r\nb CAPABILITY\r\nc ID NIL\r\nd LOGOUT\r\n')
        data = client.read_eof()
    assert re.findall(rb'^(\S+) OK', data, re.M) == [b'a', b'b', b'c', b'd']


def test_three_bad_commands_end_the_session(proxy):
    with connect(proxy) as client:
        client.send(b'a FOO\r\nb BAR\r\nc BAZ\r\nd NOOP\r\n')
        data = client.read_eof()
    assert data == (b'a BAD Command not allowed before login.\r\n'
                    b'b BAD Command not allowed before login.\r\n'
                    b'* BYE Too many invalid commands.\r\n')


@pytest.mark.parametrize('encode', [
    lambda u, p: b'x LOGIN %s %s\r\n' % (u, p),                                   # atoms
    lambda u, p: b'x LOGIN "%s" "%s"\r\n' % (u, p),                               # quoted
    lambda u, p: b'x LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n' % (len(u), u, len(p), p),  # LITERAL+
], ids=['atom', 'quoted', 'literal+'])
def test_login_encodings_share_one_cache_key(backend, proxy, encode):
    user, password = (value.encode() for value in user_of(backend))
    for _ in range(2):
        with connect(proxy) as client:
            client.send(encode(user, password))
            assert client.read_until_tagged(b'x')[1].startswith(b'x OK [CAPABILITY')
            client.logout()
    assert proxy.counters['login_new'] == 1 and proxy.counters['login_reused'] == 1


def test_login_with_synchronizing_literals(backend, proxy):
    user, password = (value.encode() for value in user_of(backend))
    with connect(proxy) as client:
        client.send(b'x LOGIN {%d}\r\n' % len(user))
        assert client.readline() == b'+ OK\r\n'
        client.send(user + b' {%d}\r\n' % len(password))
        assert client.readline() == b'+ OK\r\n'
        client.send(password + b'\r\n')
        assert client.read_until_tagged(b'x')[1].startswith(b'x OK')


@pytest.mark.parametrize('style', ['sasl-ir', 'empty-challenge', 'login'])
def test_authenticate(backend, proxy, proxy_log, style):
    user, password = (value.encode() for value in user_of(backend))
    plain = base64.b64encode(b'\0' + user + b'\0' + password)
    with connect(proxy) as client:
        if style == 'sasl-ir':
            client.send(b'x AUTHENTICATE PLAIN ' + plain + b'\r\n')
        elif style == 'empty-challenge':
            client.send(b'x AUTHENTICATE PLAIN\r\n')
            assert client.readline() == b'+ \r\n'
            client.send(plain + b'\r\n')
        else:
            client.send(b'x AUTHENTICATE LOGIN\r\n')
            assert client.readline() == b'+ VXNlcm5hbWU6\r\n'
            client.send(base64.b64encode(user) + b'\r\n')
            assert client.readline() == b'+ UGFzc3dvcmQ6\r\n'
            client.send(base64.b64encode(password) + b'\r\n')
        assert client.read_until_tagged(b'x')[1].startswith(b'x OK [CAPABILITY')
        assert client.command(b'y', b'SELECT INBOX')[1].startswith(b'y OK')
    text = '\n'.join(proxy_log.lines)
    assert plain.decode() not in text and base64.b64encode(password).decode() not in text


def test_authenticate_cancel_and_bad_base64(proxy):
    with connect(proxy) as client:
        client.send(b'x AUTHENTICATE PLAIN\r\n')
        assert client.readline() == b'+ \r\n'
        client.send(b'*\r\n')
        assert client.readline() == b'x BAD Authentication aborted.\r\n'
        client.send(b'y AUTHENTICATE PLAIN !!!notbase64\r\n')
        assert client.readline() == b'y BAD Invalid base64 data.\r\n'
        assert client.command(b'z', b'NOOP')[1] == b'z OK NOOP completed.\r\n'
    assert proxy.cache.total == 0


def test_commands_pipelined_after_login_and_before_logout(backend, proxy):
    user, password = (value.encode() for value in user_of(backend))
    with connect(proxy) as client:
        client.send(b'a LOGIN "%s" "%s"\r\nb SELECT INBOX\r\nc NOOP\r\n' % (user, password))
        assert client.read_until_tagged(b'a')[1].startswith(b'a OK')
        assert client.read_until_tagged(b'b')[1].startswith(b'b OK')
        assert client.read_until_tagged(b'c')[1].startswith(b'c OK')
        client.send(b'd FETCH 1:3 (FLAGS)\r\ne NOOP\r\nf LOGOUT\r\n')
        lines, tagged = client.read_until_tagged(b'd')
        assert tagged.startswith(b'd OK') and len(lines) == 3
        assert client.read_until_tagged(b'e')[1].startswith(b'e OK')
        lines, tagged = client.read_until_tagged(b'f')
        assert lines == [b'* BYE Logging out\r\n'] and tagged == b'f OK Logout completed.\r\n'


def test_logout_is_recognized_exactly(backend, proxy):
    user, password = user_of(backend)
    with connect(proxy) as client:
        client.login(user, password)
        assert client.command(b'a', b'LOGOUTNOW')[1].startswith(b'a BAD')   # the server's
        assert client.command(b'b', b'NOOP')[1].startswith(b'b OK')


def test_literals_are_relayed_by_count_never_scanned(backend, proxy):
    user, password = user_of(backend)
    body = (b'Subject: literal test\r\n\r\n' + b'x LOGOUT\r\nz OK fake\r\n' * 50000
            + b'end\r\n')                                   # ~1.2 MB of IMAP look-alikes
    with connect(proxy) as client:
        client.login(user, password)
        client.send(b'a APPEND INBOX {%d}\r\n' % len(body))
        assert client.readline().startswith(b'+')
        client.send(body + b'\r\n')
        assert client.read_until_tagged(b'a')[1].startswith(b'a OK')
        lines, tagged = client.command(b'b', b'SELECT INBOX')
        count = int([line for line in lines if line.endswith(b'EXISTS\r\n')][0].split()[1])
        lines, tagged = client.command(b'c', b'FETCH %d BODY.PEEK[]' % count)
        assert tagged.startswith(b'c OK')
        assert body in lines[0]
        # Leave the mailbox as it was for the other tests.
        client.command(b'd', b'STORE %d +FLAGS.SILENT (\\Deleted)' % count)
        assert client.command(b'e', b'EXPUNGE')[1].startswith(b'e OK')


def test_refused_synchronizing_literal(backend, proxy):
    user, password = user_of(backend)
    with connect(proxy) as client:
        client.login(user, password)
        client.send(b'a APPEND no-such-mailbox-here {5}\r\n')
        reply = client.readline()
        if reply.startswith(b'+'):        # this server asks for the literal first
            client.send(b'hello\r\n')
            reply = client.read_until_tagged(b'a')[1]
        assert reply.startswith(b'a NO')
        assert client.command(b'b', b'NOOP')[1].startswith(b'b OK')


def test_expiry_closes_idle_connections(backend, make_proxy):
    proxy = make_proxy(expiry_interval=0.2, cache_expiration_time=0.5)
    user, password = user_of(backend)
    before = backend.settled_logins()
    with connect(proxy) as client:
        client.login(user, password)
        client.logout()
    wait_cached(proxy, 1)
    wait_until(lambda: not proxy.cache.total, 'the cached connection to expire')
    assert proxy.counters['expired'] == 1
    with connect(proxy) as client:
        assert client.login(user, password).startswith(b'L1 OK')
    assert backend.wait_logins(before + 2) == before + 2


def test_cache_size_is_enforced(dovecot):
    proxy = start_proxy(dovecot, cache_size=1, busy_timeout=0.3)
    try:
        (user1, pw1), (user2, pw2) = dovecot.users[:2]
        with connect(proxy) as client:
            client.login(user1, pw1)
            client.logout()
        wait_cached(proxy)           # the LOGOUT is answered before the reset ends
        with connect(proxy) as one:
            # The cached connection of user1 makes room for user2 (least recently used).
            assert one.login(user2, pw2).startswith(b'L1 OK')
            assert proxy.cache.total == 1
            with connect(proxy) as two:
                assert two.login(user1, pw1) == \
                    b'L1 NO [UNAVAILABLE] Too many connections, try again later.\r\n'
    finally:
        proxy.stop(2)


def test_backend_down_gives_unavailable(backend):
    from tests.backends import free_port
    proxy = start_proxy(backend, server_port=free_port(), connect_timeout=2)
    try:
        with connect(proxy) as client:
            user, password = user_of(backend)
            assert client.login(user, password) == \
                b'L1 NO [UNAVAILABLE] Server unavailable, try again later.\r\n'
            assert client.command(b'a', b'NOOP')[1] == b'a OK NOOP completed.\r\n'
        assert proxy.cache.total == 0
    finally:
        proxy.stop(2)


@pytest.mark.parametrize('leave_with', [
    b'a APPEND INBOX {100}\r\nhalf of the literal',     # mid-literal
    b'a LANGUAGE\r\nb NOOP\r\n',                         # sticky, and rare
], ids=['literal', 'language'])
def test_doubtful_connections_are_closed_not_cached(dovecot, proxy_log, leave_with):
    proxy = start_proxy(dovecot)
    try:
        user, password = dovecot.users[2]
        with connect(proxy) as client:
            client.login(user, password)
            client.send(leave_with)
            if b'NOOP' in leave_with:
                client.read_until_tagged(b'b')
            else:
                client.readline()                        # "+ OK" / "+ idling"
        wait_until(lambda: not proxy.cache.total, 'the connection to be closed')
        assert any('backend closed:' in line and 'not reusable' in line
                   for line in proxy_log.lines)
        with connect(proxy) as client:                   # the next login starts fresh
            client.login(user, password)
            assert client.command(b'c', b'SELECT INBOX')[1].startswith(b'c OK')
            # With CONDSTORE on (RFC 7162 section 3.1), a flag change reports MODSEQ.
            lines = client.command(b'd', b'STORE 1 +FLAGS (\\Flagged)')[0]
            lines += client.command(b'e', b'STORE 1 -FLAGS (\\Flagged)')[0]
            assert lines and not any(b'MODSEQ' in line for line in lines)
    finally:
        proxy.stop(2)


def test_compress_is_refused(backend, proxy):
    user, password = user_of(backend)
    with connect(proxy) as client:
        client.login(user, password)
        assert client.command(b'a', b'COMPRESS DEFLATE')[1] == \
            b'a NO Compression is not available.\r\n'
        assert client.command(b'b', b'NOOP')[1].startswith(b'b OK')


def test_cached_connection_dropped_when_server_goes_away():
    from tests.backends import Pymap
    from tests.conftest import Backend
    with Pymap() as server:
        backend = Backend('pymap', server, [('demouser', 'demopass')])
        proxy = start_proxy(backend)
        try:
            with connect(proxy) as client:
                client.login('demouser', 'demopass')
                client.logout()
            wait_cached(proxy, 1)
            server.stop()                                # EOF on the cached connection
            wait_until(lambda: not proxy.cache.total, 'the dead connection to be closed')
            assert proxy.counters['cached_died'] == 1
        finally:
            proxy.stop(2)


def test_server_gone_mid_session_gives_bye():
    from tests.backends import Pymap
    from tests.conftest import Backend
    with Pymap() as server:
        proxy = start_proxy(Backend('pymap', server))
        try:
            with connect(proxy) as client:
                client.login('demouser', 'demopass')
                client.command(b'a', b'SELECT INBOX')
                server.stop()
                with gevent.Timeout(5):
                    data = client.read_eof()
                assert data.startswith(b'* BYE ') and data.endswith(b'\r\n')
            assert proxy.cache.total == 0
        finally:
            proxy.stop(2)


def test_implicit_condstore_is_cached_under_its_profile(dovecot, proxy_log):
    """RFC 7162 section 3.1: SELECT ... (CONDSTORE) turns CONDSTORE on. That connection
    is cached for sessions that ask for CONDSTORE, never handed to a plain one."""
    proxy = start_proxy(dovecot)
    try:
        user, password = dovecot.users[2]
        with connect(proxy) as client:
            client.login(user, password)
            client.send(b'a SELECT INBOX (CONDSTORE)\r\nb NOOP\r\n')
            client.read_until_tagged(b'b')
        wait_cached(proxy)
        assert [entry.profile for entries in proxy.cache._entries.values()
                for entry in entries] == [frozenset((b'CONDSTORE',))]
        with connect(proxy) as client:                   # a plain login starts fresh
            assert client.login(user, password).startswith(b'L1 OK')
            assert client.command(b'c', b'SELECT INBOX')[1].startswith(b'c OK')
            lines = client.command(b'd', b'STORE 1 +FLAGS (\\Flagged)')[0]
            lines += client.command(b'e', b'STORE 1 -FLAGS (\\Flagged)')[0]
            assert lines and not any(b'MODSEQ' in line for line in lines)
        assert [line.split('result=')[1].split()[0] for line in proxy_log.lines
                if line.startswith('login:')] == ['new', 'new']
    finally:
        proxy.stop(2)
