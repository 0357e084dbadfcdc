"""Tests of the TLS parts of the test harness: tests/tlsutil.py's PKI and a Dovecot with
tls=... / trusted_networks=... from tests/backends.py, driven with plain imaplib and
sockets (no proxy)."""
import imaplib
import socket
import ssl

import pytest

from tests.backends import (NO_AUTH_PENALTY_CONF, TLS_HOST, Dovecot, parse_login_line,
                            require_dovecot)
from tests.tlsutil import CLIENT_NAME, SERVER_HOSTNAME

USERS = {'alice': 'alice-pw', 'bob': 'bob-pw', 'carol': 'carol-pw', 'dave': 'dave-pw',
         'erin': 'erin-pw'}


@pytest.fixture(scope='module')
def tls_dovecot(pki):
    """TLS required (STARTTLS on .port, imaps on .tls_port); no trusted networks."""
    require_dovecot()
    with Dovecot(users=USERS, messages=2, extra_conf=NO_AUTH_PENALTY_CONF,
                 tls=pki.server_tls) as server:
        yield server


@pytest.fixture(scope='module')
def trusted_dovecot(pki):
    """TLS as above, and 127.0.0.0/8 (so every test client) is a trusted network."""
    require_dovecot()
    with Dovecot(users=USERS, messages=2, extra_conf=NO_AUTH_PENALTY_CONF,
                 tls=pki.server_tls, trusted_networks='127.0.0.0/8') as server:
        yield server


def _last_login(server, user, count=1):
    """Wait for `count` logins of `user`; return the fields of the last login line."""
    assert server.wait_login_count(count, user=user) == count
    lines = server.login_lines(user)
    assert len(lines) == count
    return parse_login_line(lines[-1])


def _close(client):
    """Close an imaplib client whatever its state (logout() has closed it already)."""
    try:
        client.shutdown()
    except OSError:
        pass


def _send_id(client, *pairs):
    """Send ID ("k" "v" ...) on an imaplib client (imaplib has no ID command; this
    avoids registering one in imaplib.Commands for the whole test run). Returns the
    tagged response line."""
    fields = ' '.join('"%s" "%s"' % kv for kv in pairs)
    tag = client._new_tag()
    client.send(tag + b' ID (' + fields.encode('ascii') + b')\r\n')
    while True:
        line = client.readline()
        assert line, 'connection closed during ID'
        if line.startswith(tag + b' '):
            return line


# --- tlsutil ---------------------------------------------------------------------------

def _handshake(client_ctx, server_ctx, server_hostname):
    """TLS handshake in memory (no sockets, so no gevent involvement); return the
    client's and the server's SSLObject."""
    objs = []
    for ctx, server_side, name in ((client_ctx, False, server_hostname),
                                   (server_ctx, True, None)):
        bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(bio_in, bio_out, server_side=server_side, server_hostname=name)
        objs.append((obj, bio_in, bio_out))
    (cli, cli_in, cli_out), (srv, srv_in, srv_out) = objs
    done = [False, False]
    for _ in range(50):
        for i, obj in enumerate((cli, srv)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        moved = False
        for src, dst in ((cli_out, srv_in), (srv_out, cli_in)):
            data = src.read()
            if data:
                dst.write(data)
                moved = True
        if all(done) and not moved:
            return cli, srv
    raise AssertionError('TLS handshake did not finish')


def test_pki_files(pki):
    for name in ('ca_file', 'server_cert_file', 'server_key_file', 'client_cert_file',
                 'client_key_file', 'other_ca_file'):
        path = getattr(pki, name)
        with open(path) as f:
            text = f.read()
        assert text.startswith('-----BEGIN '), name
    assert pki.server_tls == (pki.server_cert_file, pki.server_key_file)
    with open(pki.ca_file) as f, open(pki.other_ca_file) as g:
        assert f.read() != g.read()


@pytest.mark.parametrize('name', ['localhost', '127.0.0.1', SERVER_HOSTNAME, TLS_HOST])
def test_pki_server_names(pki, name):
    cli, srv = _handshake(pki.client_context(), pki.server_context(), name)
    assert cli.version() and srv.version()


def test_pki_wrong_name_or_ca_fails(pki):
    with pytest.raises(ssl.SSLCertVerificationError, match='mismatch'):
        _handshake(pki.client_context(), pki.server_context(), 'wrong.test')
    with pytest.raises(ssl.SSLCertVerificationError, match='unable to get local issuer'):
        _handshake(pki.wrong_ca_context(), pki.server_context(), SERVER_HOSTNAME)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki.client_context(cafile=pki.other_ca_file), pki.server_context(),
                   SERVER_HOSTNAME)
    # Without a name check the certificate chain is still verified.
    cli, _ = _handshake(pki.client_context(check_hostname=False), pki.server_context(),
                        None)
    assert cli.getpeercert()


def test_pki_client_certificate(pki):
    cli, srv = _handshake(pki.client_context(client_cert=True),
                          pki.server_context(require_client_cert=True), SERVER_HOSTNAME)
    # TLS 1.3 sends the client certificate after the client considers the handshake
    # done; _handshake() pumps until both sides are finished.
    subject = dict(x[0] for x in srv.getpeercert()['subject'])
    assert subject['commonName'] == CLIENT_NAME
    assert ('DNS', CLIENT_NAME) in srv.getpeercert()['subjectAltName']
    with pytest.raises(ssl.SSLError):
        _handshake(pki.client_context(), pki.server_context(require_client_cert=True),
                   SERVER_HOSTNAME)


# --- Dovecot with TLS ------------------------------------------------------------------

def test_default_config_is_unchanged():
    server = Dovecot()
    assert server.host == '127.0.0.1' and server.tls is None and server.tls_port == 0
    text = server.config_text()
    assert 'ssl = no\n' in text and 'disable_plaintext_auth = no\n' in text
    assert 'inet_listener imaps {\n    port = 0\n  }' in text
    assert 'ssl_cert' not in text and 'login_trusted_networks' not in text
    assert 'service_count' not in text


def test_tls_dovecot_config(tls_dovecot, pki):
    assert tls_dovecot.host == TLS_HOST
    assert tls_dovecot.tls_port not in (0, tls_dovecot.port)
    text = tls_dovecot.config_text()
    for line in ('ssl = required', 'disable_plaintext_auth = yes',
                 'ssl_cert = <%s' % tls_dovecot.tls_cert_path,
                 'ssl_key = <%s' % tls_dovecot.tls_key_path,
                 '    port = %d' % tls_dovecot.tls_port):
        assert line + '\n' in text
    assert tls_dovecot.tls_cert_path.startswith(tls_dovecot.workdir + '/')
    with open(tls_dovecot.tls_cert_path) as f, open(pki.server_cert_file) as g:
        assert f.read() == g.read()
    log = tls_dovecot.log_text()
    assert 'starting up for imap' in log
    assert 'Error' not in log and 'Warning' not in log


def test_tls_dovecot_refuses_plaintext_login(tls_dovecot):
    client = imaplib.IMAP4(tls_dovecot.host, tls_dovecot.port)
    try:
        assert 'STARTTLS' in client.capabilities
        assert 'LOGINDISABLED' in client.capabilities
        assert not any(c.startswith('AUTH=') for c in client.capabilities)
        with pytest.raises(imaplib.IMAP4.error, match='PRIVACYREQUIRED'):
            client.login('alice', 'alice-pw')
        typ, data = client._simple_command('AUTHENTICATE', 'PLAIN', 'AGFsaWNlAGFsaWNlLXB3')
        assert typ == 'NO' and b'PRIVACYREQUIRED' in data[0]
    finally:
        _close(client)
    assert tls_dovecot.login_count('alice') == 0


def test_tls_dovecot_starttls_login(tls_dovecot, pki):
    client = imaplib.IMAP4(tls_dovecot.host, tls_dovecot.port)
    try:
        client.starttls(ssl_context=pki.client_context())
        assert 'LOGINDISABLED' not in client.capabilities
        assert 'AUTH=PLAIN' in client.capabilities
        assert client.login('bob', 'bob-pw')[0] == 'OK'
        assert client.select('INBOX', readonly=True) == ('OK', [b'2'])
        client.logout()
    finally:
        _close(client)
    fields = _last_login(tls_dovecot, 'bob')
    assert fields['TLS'] is True and 'secured' not in fields
    assert fields['rip'] == '127.0.0.1' and fields['lip'] == TLS_HOST
    assert fields['method'] == 'PLAIN' and fields['session']


def test_tls_dovecot_imaps_login(tls_dovecot, pki):
    client = imaplib.IMAP4_SSL(tls_dovecot.host, tls_dovecot.tls_port,
                               ssl_context=pki.client_context())
    try:
        assert client.sock.version() in ('TLSv1.2', 'TLSv1.3')
        assert 'AUTH=PLAIN' in client.capabilities
        assert client.login('carol', 'carol-pw')[0] == 'OK'
        client.logout()
    finally:
        _close(client)
    fields = _last_login(tls_dovecot, 'carol')
    assert fields['TLS'] is True, tls_dovecot.login_lines('carol')


def test_tls_dovecot_certificate_names(tls_dovecot, pki):
    ctx = pki.client_context()
    for name in (SERVER_HOSTNAME, TLS_HOST, 'localhost'):
        with socket.create_connection((tls_dovecot.host, tls_dovecot.tls_port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(4096).startswith(b'* OK')
    with socket.create_connection((tls_dovecot.host, tls_dovecot.tls_port), 5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match='mismatch'):
            ctx.wrap_socket(raw, server_hostname='wrong.test')


def test_tls_dovecot_wrong_ca_fails(tls_dovecot, pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(tls_dovecot.host, tls_dovecot.tls_port,
                          ssl_context=pki.wrong_ca_context())
    client = imaplib.IMAP4(tls_dovecot.host, tls_dovecot.port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(ssl_context=pki.wrong_ca_context())
    finally:
        _close(client)


def test_untrusted_id_is_ignored(tls_dovecot, pki):
    client = imaplib.IMAP4(tls_dovecot.host, tls_dovecot.port)
    try:
        client.starttls(ssl_context=pki.client_context())
        assert b' OK ' in _send_id(client, ('x-originating-ip', '192.0.2.7'))
        client.login('dave', 'dave-pw')
        client.logout()
    finally:
        _close(client)
    fields = _last_login(tls_dovecot, 'dave')
    assert fields['rip'] == '127.0.0.1'


def test_tls_session_not_resumed_by_default(tls_dovecot, pki):
    """Dovecot issues session tickets, but each connection has its own login process
    (with its own ticket key): resumption fails. See tls_resumption."""
    ctx = pki.client_context()
    reused = []
    session = None
    for _ in range(2):
        with socket.create_connection((tls_dovecot.host, tls_dovecot.tls_port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname=SERVER_HOSTNAME,
                                 session=session) as tls:
                tls.recv(4096)   # TLS 1.3 tickets arrive after the handshake
                reused.append(tls.session_reused)
                session = tls.session
    assert session is not None and session.has_ticket
    assert reused == [False, False]


# --- trusted networks ------------------------------------------------------------------

def test_trusted_id_sets_rip(trusted_dovecot, pki):
    assert 'login_trusted_networks = 127.0.0.0/8\n' in trusted_dovecot.config_text()
    client = imaplib.IMAP4(trusted_dovecot.host, trusted_dovecot.port)
    try:
        client.starttls(ssl_context=pki.client_context())
        assert b' OK ' in _send_id(client, ('x-originating-ip', '192.0.2.7'),
                                   ('x-originating-port', '4711'))
        client.login('alice', 'alice-pw')
        client.logout()
    finally:
        _close(client)
    fields = _last_login(trusted_dovecot, 'alice')
    assert fields['rip'] == '192.0.2.7'
    assert fields['TLS'] is True


def test_trusted_id_session_id(trusted_dovecot, pki):
    client = imaplib.IMAP4_SSL(trusted_dovecot.host, trusted_dovecot.tls_port,
                               ssl_context=pki.client_context())
    try:
        _send_id(client, ('x-originating-ip', '198.51.100.9'),
                 ('x-session-ext-id', 'gimap-test-1'))
        client.login('bob', 'bob-pw')
        client.logout()
    finally:
        _close(client)
    fields = _last_login(trusted_dovecot, 'bob')
    assert fields['rip'] == '198.51.100.9'
    assert fields['session'] == 'gimap-test-1'


def test_trusted_client_may_skip_tls(trusted_dovecot):
    """A trusted client counts as secured: ssl = required does not apply to it."""
    client = imaplib.IMAP4(trusted_dovecot.host, trusted_dovecot.port)
    try:
        assert 'LOGINDISABLED' not in client.capabilities
        client.login('carol', 'carol-pw')
        client.logout()
    finally:
        _close(client)
    fields = _last_login(trusted_dovecot, 'carol')
    assert fields['secured'] is True and 'TLS' not in fields
    assert fields['rip'] == '127.0.0.1'


# --- TLS session resumption ------------------------------------------------------------

def test_tls_resumption(pki):
    require_dovecot()
    with Dovecot(users={'u': 'p'}, messages=0, tls=pki.server_tls,
                 tls_resumption=True) as server:
        assert 'service_count = 0\n' in server.config_text()
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = pki.client_context()
            ctx.minimum_version = ctx.maximum_version = version
            reused = []
            session = None
            for _ in range(3):
                with socket.create_connection((server.host, server.tls_port), 5) as raw:
                    with ctx.wrap_socket(raw, server_hostname=SERVER_HOSTNAME,
                                         session=session) as tls:
                        assert tls.version() == version.name.replace('_', '.')
                        tls.recv(4096)   # TLS 1.3 tickets arrive after the handshake
                        reused.append(tls.session_reused)
                        session = tls.session
            assert reused == [False, True, True], version
