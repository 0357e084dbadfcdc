"""TLS on both sides and the client's address at the server, against a real Dovecot.

Certificates are made by tests/tlsutil.py (trustme) in a temp dir, never checked in. The
TLS Dovecot listens on 127.0.0.2 with ssl = required: the proxy connects from 127.0.0.1,
so Dovecot refuses it plaintext logins (it counts same-address clients as secured).
"""
import imaplib
import re

import pytest

from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, require_dovecot
from tests.conftest import Backend, start_proxy
from tests.fakeimap import FakeImap
from tests.wire import Client

USERS = [('user%d' % i, 'secret%d' % i) for i in range(1, 21)]


@pytest.fixture(scope='module')
def tls_dovecot(pki):
    require_dovecot()
    # Dovecot resumes TLS sessions only when one imap-login process serves many
    # connections ("performance mode"); in its default one-process-per-connection mode
    # every ticket is new to the next process.
    with Dovecot(tls=pki.server_tls, extra_conf=NO_AUTH_PENALTY_CONF,
                 tls_resumption=True) as server:
        yield server


@pytest.fixture(scope='module')
def rip_dovecot():
    """A Dovecot that trusts the proxy's address, so it honours x-originating-ip."""
    require_dovecot()
    with Dovecot(trusted_networks='127.0.0.1/32', extra_conf=NO_AUTH_PENALTY_CONF) as server:
        yield server


@pytest.fixture
def proxies():
    started = []

    def make(server, **settings):
        started.append(start_proxy(Backend('dovecot', server, USERS), **settings))
        return started[-1]
    yield make
    for proxy in started:
        proxy.stop(2)


def login_lines(server, user, count):
    """The last `count` Dovecot login lines of `user`, waiting for them to be logged."""
    server.wait_login_count(count, user=user)
    return server.login_lines(user)[-count:]


# -- TLS towards the server -------------------------------------------------------------

@pytest.mark.parametrize('mode', ['implicit', 'starttls'])
def test_backend_tls_logins(tls_dovecot, pki, proxies, proxy_log, mode):
    proxy = proxies(tls_dovecot, server_hostname=tls_dovecot.host, server_tls=mode,
                    server_port=tls_dovecot.tls_port if mode == 'implicit' else
                    tls_dovecot.port, tls_ca_file=pki.ca_file)
    user, password = USERS[0] if mode == 'implicit' else USERS[1]
    before = tls_dovecot.login_count(user)
    for _ in range(2):
        with Client(proxy.server_port) as client:
            assert client.login(user, password).startswith(b'L1 OK [CAPABILITY ')
            assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
            client.logout()
    line = login_lines(tls_dovecot, user, before + 1)[-1]
    assert 'TLS' in line, line
    assert tls_dovecot.login_count(user) == before + 1        # the second one was reused


def test_backend_tls_session_is_resumed(tls_dovecot, pki, proxies, proxy_log):
    proxy = proxies(tls_dovecot, server_hostname=tls_dovecot.host, server_tls='implicit',
                    server_port=tls_dovecot.tls_port, tls_ca_file=pki.ca_file)
    for user, password in USERS[2:5]:         # three users: three new connections
        with Client(proxy.server_port) as client:
            assert client.login(user, password).startswith(b'L1 OK')
    resumed = re.findall('backend TLS: .* resumed=(yes|no)', '\n'.join(proxy_log.lines))
    assert resumed[0] == 'no' and 'yes' in resumed[1:], resumed


def test_plaintext_to_a_tls_only_server_is_refused(tls_dovecot, proxies, proxy_log):
    proxy = proxies(tls_dovecot, server_hostname=tls_dovecot.host)
    with Client(proxy.server_port) as client:
        assert client.login(*USERS[5]) == \
            b'L1 NO [UNAVAILABLE] Server unavailable, try again later.\r\n'
    assert any('LOGINDISABLED' in line for line in proxy_log.lines)


@pytest.mark.parametrize('setting, check', [
    ({'tls_ca_file': 'other'}, 'certificate check failed'),
    ({'tls_server_name': 'wrong.test'}, 'Hostname mismatch'),
], ids=['wrong-ca', 'wrong-hostname'])
def test_certificate_that_does_not_verify_refuses_the_login(tls_dovecot, pki, proxies,
                                                           proxy_log, setting, check):
    settings = {'tls_ca_file': pki.ca_file}
    settings.update(setting)
    if settings['tls_ca_file'] == 'other':
        settings['tls_ca_file'] = pki.other_ca_file
    proxy = proxies(tls_dovecot, server_hostname=tls_dovecot.host, server_tls='implicit',
                    server_port=tls_dovecot.tls_port, **settings)
    before = tls_dovecot.login_count()
    with Client(proxy.server_port) as client:
        assert client.login(*USERS[6]) == \
            b'L1 NO [UNAVAILABLE] Server unavailable, try again later.\r\n'
    failure = [line for line in proxy_log.lines if line.startswith('login failed:')]
    assert failure and check in failure[0], failure
    assert tls_dovecot.login_count() == before


def test_verification_off_only_when_configured(tls_dovecot, pki, proxies):
    proxy = proxies(tls_dovecot, server_hostname=tls_dovecot.host, server_tls='implicit',
                    server_port=tls_dovecot.tls_port, tls_ca_file=pki.other_ca_file,
                    tls_verify_server='no')
    with Client(proxy.server_port) as client:
        assert client.login(*USERS[7]).startswith(b'L1 OK')


@pytest.mark.parametrize('greeting, replies, reason', [
    (None, {}, 'server offers no STARTTLS'),                    # a STARTTLS strip
    (b'* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n',
     {b'STARTTLS': lambda tag: tag + b' NO not today\r\n'}, 'server refused STARTTLS'),
    (b'* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] welcome, whoever\r\n', {},
     'server greeted with PREAUTH'),
], ids=['strip', 'refused', 'preauth'])
def test_starttls_fails_closed(proxy_log, greeting, replies, reason):
    fake = FakeImap(replies, **({'greeting': greeting} if greeting else {})).start()
    proxy = start_proxy(Backend('fake', fake), server_tls='starttls')
    try:
        with Client(proxy.server_port) as client:
            assert client.login('someone', 'pw') == \
                b'L1 NO [UNAVAILABLE] Server unavailable, try again later.\r\n'
        assert fake.logins == 0, 'a password went out without TLS'
        assert any(reason in line for line in proxy_log.lines if 'login failed' in line)
    finally:
        proxy.stop(2)
        fake.stop()


# -- TLS towards clients ----------------------------------------------------------------

@pytest.fixture
def tls_proxy(pki, pymap, proxies):
    def make(**settings):
        return proxies(pymap.server, client_tls_cert_file=pki.server_cert_file,
                       client_tls_key_file=pki.server_key_file, **settings)
    return make


def test_client_implicit_tls_with_imaplib(tls_proxy, pki, free_tls_port):
    proxy = tls_proxy(listen_tls_port=free_tls_port)
    imap = imaplib.IMAP4_SSL('127.0.0.1', free_tls_port, ssl_context=pki.client_context())
    assert b'STARTTLS' not in imap.welcome
    assert imap.login('demouser', 'demopass')[0] == 'OK'
    assert imap.select('INBOX')[0] == 'OK'
    imap.logout()
    assert proxy.counters['login_new'] + proxy.counters['login_reused'] == 1


def test_client_starttls_with_imaplib(tls_proxy, pki):
    proxy = tls_proxy()
    imap = imaplib.IMAP4('127.0.0.1', proxy.server_port)
    assert 'STARTTLS' in imap.capabilities
    assert imap.starttls(ssl_context=pki.client_context())[0] == 'OK'
    assert 'STARTTLS' not in imap.capabilities
    assert imap.login('demouser', 'demopass')[0] == 'OK'
    imap.logout()


def test_bytes_pipelined_after_starttls_are_discarded(tls_proxy, pki):
    proxy = tls_proxy()
    with Client(proxy.server_port) as client:
        client.send(b'a STARTTLS\r\nb LOGIN demouser demopass\r\n')
        assert client.readline() == b'a OK Begin TLS negotiation now.\r\n'
        client.starttls(pki.client_context())
        lines, tagged = client.command(b'c', b'NOOP')
        assert lines == [] and tagged == b'c OK NOOP completed.\r\n'   # no reply to "b"
    assert proxy.cache.total == 0


def test_require_client_tls(tls_proxy, pki):
    proxy = tls_proxy(require_client_tls='yes')
    with Client(proxy.server_port) as client:
        caps = client.greeting.split(b']')[0].split()[3:]
        assert b'LOGINDISABLED' in caps and b'STARTTLS' in caps
        assert not [cap for cap in caps if cap.startswith(b'AUTH=')]
        assert client.login('demouser', 'demopass').startswith(b'L1 NO [PRIVACYREQUIRED]')
        assert proxy.cache.total == 0
        assert client.command(b'a', b'STARTTLS')[1].startswith(b'a OK')
        client.starttls(pki.client_context())
        lines, tagged = client.command(b'b', b'CAPABILITY')
        assert b'LOGINDISABLED' not in lines[0] and b'AUTH=PLAIN' in lines[0]
        assert client.login('demouser', 'demopass', b'c').startswith(b'c OK')


@pytest.fixture
def free_tls_port():
    from tests.backends import free_port
    return free_port()


# -- the client's address at the server -------------------------------------------------

def test_client_address_reaches_the_server(rip_dovecot, proxies, proxy_log):
    proxy = proxies(rip_dovecot)
    user, password = USERS[8]
    with Client(proxy.server_port, source='127.0.0.3') as client:
        assert client.login(user, password).startswith(b'L1 OK')
    line = login_lines(rip_dovecot, user, 1)[-1]
    assert 'rip=127.0.0.3' in line, line
    session = re.search(r'session=<([^>]*)>', line).group(1)
    ours = [entry for entry in proxy_log.lines if entry.startswith('login: ')][-1]
    assert 'peer=127.0.0.3:' in ours and 'session=' in ours
    assert re.search('session=(\\w+)', ours).group(1) in session   # one id, both logs


@pytest.mark.parametrize('trusted', [False, True])
def test_forged_originating_ip(rip_dovecot, proxies, trusted):
    settings = {'trusted_networks': '127.0.0.3/32'} if trusted else {}
    proxy = proxies(rip_dovecot, **settings)
    user, password = USERS[9] if trusted else USERS[10]
    with Client(proxy.server_port, source='127.0.0.3') as client:
        client.command(b'i', b'ID ("name" "webmail" "x-originating-ip" "192.0.2.7")')
        assert client.login(user, password).startswith(b'L1 OK')
    line = login_lines(rip_dovecot, user, 1)[-1]
    if trusted:
        assert 'rip=192.0.2.7' in line, line        # a trusted webmail host may say so
    else:
        assert 'rip=127.0.0.3' in line and '192.0.2.7' not in line, line


def test_cache_per_client_ip(rip_dovecot, proxies):
    proxy = proxies(rip_dovecot, cache_per_client_ip='yes')
    user, password = USERS[11]
    for source in ('127.0.0.3', '127.0.0.4', '127.0.0.3'):
        with Client(proxy.server_port, source=source) as client:
            assert client.login(user, password).startswith(b'L1 OK')
            client.logout()
    assert (proxy.counters['login_new'], proxy.counters['login_reused']) == (2, 1)
