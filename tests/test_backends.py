"""Tests of the test harness itself: the real Dovecot and pymap servers of tests/backends.py,
driven with plain imaplib (no proxy)."""
import imaplib
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests import backends
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, Pymap, require_dovecot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _login(server, user, password):
    """Return a logged-in IMAP4 client (raises imaplib.IMAP4.error on NO)."""
    client = imaplib.IMAP4(server.host, server.port)
    try:
        client.login(user, password)
    except BaseException:
        client.shutdown()
        raise
    return client


def _login_fails(server, user, password):
    """Return True if LOGIN is refused with NO."""
    client = imaplib.IMAP4(server.host, server.port)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error:
        return True
    finally:
        client.shutdown()
    return False


def _our_processes(marker):
    """Return (pid, cmdline) of the processes whose command line contains `marker`."""
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(name), cmdline))
    return found


@pytest.fixture(scope='module')
def dovecot():
    """The default server: user1..user20, 20 messages each, production auth delays."""
    require_dovecot()
    with Dovecot() as server:
        yield server


@pytest.fixture(scope='module')
def fast_dovecot():
    """A small server without the auth failure delay and penalty, for failed logins."""
    require_dovecot()
    users = {'alice': 'alice-pw', 'bob': 'bob-pw', 'carol': 'carol-pw'}
    with Dovecot(users=users, messages=3, extra_conf=NO_AUTH_PENALTY_CONF) as server:
        yield server


@pytest.fixture(scope='module')
def pymap():
    with Pymap() as server:
        yield server


# --- Dovecot -------------------------------------------------------------------------

def test_dovecot_greets(dovecot):
    with socket.create_connection((dovecot.host, dovecot.port), timeout=5) as s:
        greeting = s.recv(4096)
    assert greeting.startswith(b'* OK'), greeting
    assert b'Dovecot' in greeting
    assert dovecot.host == '127.0.0.1'
    assert os.path.dirname(dovecot.log_path) == dovecot.workdir
    assert 'starting up for imap' in dovecot.log_text()
    # Not a single warning or error while starting (e.g. about permissions).
    assert 'Error' not in dovecot.log_text()
    assert 'Warning' not in dovecot.log_text()


def test_dovecot_login_is_counted(dovecot):
    # user1 is used by this test only, so its count starts at 0 whatever ran before.
    assert dovecot.login_count('user1') == 0
    before = dovecot.login_count()
    client = _login(dovecot, 'user1', 'secret1')
    client.logout()
    assert dovecot.wait_login_count(before + 1) == before + 1
    assert dovecot.login_count('user1') == 1


def test_dovecot_mailbox_is_populated(dovecot):
    client = _login(dovecot, 'user2', 'secret2')
    try:
        typ, data = client.select('INBOX')
        assert typ == 'OK' and data == [b'20']
        typ, data = client.fetch('1:10', '(FLAGS ENVELOPE)')
        assert typ == 'OK'
        assert len(data) == 10
        subjects = [item.split(b'"')[3] for item in data]
        assert subjects[0] == b'Test message 1 for user2'
        assert len(set(subjects)) == 10
        assert b'\\Seen' in data[2] and b'\\Seen' not in data[0]
    finally:
        client.logout()


def test_dovecot_add_message(dovecot):
    client = _login(dovecot, 'user3', 'secret3')
    try:
        assert client.select('INBOX') == ('OK', [b'20'])
        dovecot.add_message('user3', b'From: x@example.org\nSubject: late arrival\n\nhi\n')
        client.noop()
        typ, data = client.fetch('21', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        assert typ == 'OK'
        assert b'late arrival' in data[0][1]
    finally:
        client.logout()


def test_dovecot_allows_many_connections_per_user(dovecot):
    clients = [_login(dovecot, 'user4', 'secret4') for _ in range(12)]
    for client in clients:
        assert client.select('INBOX', readonly=True)[0] == 'OK'
        client.logout()


def test_dovecot_wrong_password_is_not_counted(fast_dovecot):
    assert _login_fails(fast_dovecot, 'alice', 'wrong')
    # The log is written asynchronously: wait for a later login to show up, then the
    # failed one would have shown up too.
    before = fast_dovecot.login_count()
    _login(fast_dovecot, 'bob', 'bob-pw').logout()
    assert fast_dovecot.wait_login_count(before + 1) == before + 1
    assert fast_dovecot.login_count('alice') == 0
    assert 'Password mismatch' in fast_dovecot.log_text()


def test_dovecot_set_password(fast_dovecot):
    _login(fast_dovecot, 'carol', 'carol-pw').logout()
    fast_dovecot.set_password('carol', 'carol-new')
    assert _login_fails(fast_dovecot, 'carol', 'carol-pw')
    _login(fast_dovecot, 'carol', 'carol-new').logout()
    # A second change right away works too (the passwd-file mtime must change).
    fast_dovecot.set_password('carol', 'carol-pw')
    assert _login_fails(fast_dovecot, 'carol', 'carol-new')
    _login(fast_dovecot, 'carol', 'carol-pw').logout()


def test_dovecot_stop_leaves_nothing_behind():
    require_dovecot()
    server = Dovecot(users={'user1': 'secret1'}, messages=2).start()
    workdir, pid, port = server.workdir, server.pid, server.port
    # A client that stays logged in keeps its imap process alive past the master.
    client = _login(server, 'user1', 'secret1')
    assert _our_processes(workdir)
    server.stop()
    client.shutdown()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _our_processes(workdir) == []
    # Dovecot's children are titled "dovecot-<instance_name>/<service>".
    assert _our_processes('gimap-dc-%d/' % port) == []
    assert not os.path.exists(workdir)
    server.stop()   # idempotent


def test_dovecot_config_error_is_reported():
    require_dovecot()
    server = Dovecot(users={'user1': 'secret1'}, messages=0, extra_conf='no_such_setting = 1')
    with pytest.raises(RuntimeError, match='no_such_setting'):
        server.start()
    assert not os.path.exists(server.workdir)


def test_dovecot_retries_when_port_is_taken(monkeypatch):
    require_dovecot()
    # Bound but not listening: Dovecot's bind() fails, connects are refused at once.
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    ports = [taken.getsockname()[1]]
    real_free_port = backends.free_port
    monkeypatch.setattr(backends, 'free_port',
                        lambda host='127.0.0.1': ports.pop() if ports else real_free_port(host))
    try:
        with Dovecot(users={'user1': 'secret1'}, messages=1) as server:
            assert server.port != taken.getsockname()[1]
            _login(server, 'user1', 'secret1').logout()
            assert len(server.start_errors) == 1
            assert 'Address already in use' in server.start_errors[0]
    finally:
        taken.close()


def test_dovecot_works_with_gevent_monkey_patching():
    require_dovecot()
    pytest.importorskip('gevent')
    script = textwrap.dedent('''
        from gevent import monkey
        monkey.patch_all()
        import imaplib
        from tests.backends import Dovecot
        with Dovecot(users={'u': 'p'}, messages=2) as server:
            client = imaplib.IMAP4(server.host, server.port)
            client.login('u', 'p')
            assert client.select('INBOX') == ('OK', [b'2'])
            client.logout()
            assert server.wait_login_count(1) == 1
        print('OK')
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'OK'


def test_require_dovecot_skips_or_fails(monkeypatch):
    monkeypatch.setattr(backends, 'dovecot_binary', lambda: None)
    monkeypatch.delenv('GIMAPPROXY_REQUIRE_DOVECOT', raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_dovecot()
    monkeypatch.setenv('GIMAPPROXY_REQUIRE_DOVECOT', '1')
    with pytest.raises(pytest.fail.Exception):
        require_dovecot()


# --- pymap ---------------------------------------------------------------------------

def test_pymap_login_is_counted(pymap):
    with socket.create_connection((pymap.host, pymap.port), timeout=5) as s:
        assert s.recv(4096).startswith(b'* OK')
    assert pymap.login_count() == 0
    assert _login_fails(pymap, 'demouser', 'wrong')
    client = _login(pymap, 'demouser', 'demopass')
    try:
        assert client.select('INBOX')[0] == 'OK'
    finally:
        client.logout()
    assert pymap.wait_login_count(1) == 1
    assert pymap.login_count() == 1     # the failed LOGIN is not counted


def test_pymap_stop():
    server = Pymap().start()
    pid, workdir = server.pid, server.workdir
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(workdir)


def test_pymap_retries_when_port_is_taken(monkeypatch):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    ports = [taken.getsockname()[1]]
    real_free_port = backends.free_port
    monkeypatch.setattr(backends, 'free_port',
                        lambda host='127.0.0.1': ports.pop() if ports else real_free_port(host))
    try:
        with Pymap() as server:
            assert server.port != taken.getsockname()[1]
            assert len(server.start_errors) == 1
            assert 'address already in use' in server.start_errors[0]
            _login(server, 'demouser', 'demopass').logout()
    finally:
        taken.close()
