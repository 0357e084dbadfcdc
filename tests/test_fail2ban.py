"""etc/fail2ban: Debian's fail2ban-regex, with the shipped filter, on a log that
bin/gimapproxy really wrote in front of the real Dovecot, finds exactly the refused
logins, each with the address of the client that made it (IPv4 and IPv6)."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.backends import free_port
from tests.conftest import REPO, wait_until

FILTER = os.path.join(REPO, 'etc', 'fail2ban', 'filter.d', 'gimapproxy.conf')
JAIL = os.path.join(REPO, 'etc', 'fail2ban', 'jail.d', 'gimapproxy.conf.example')
BIN = os.path.join(REPO, 'bin', 'gimapproxy')


def fail2ban_regex():
    path = shutil.which('fail2ban-regex')
    if path is None:
        pytest.skip('fail2ban-regex is missing (Debian package fail2ban; scripts/test '
                    'installs it as root)')
    return path


def start_proxy(tmp_path, listen_address, backend_port):
    """bin/gimapproxy on `listen_address`, its stderr (the log) going to a file, as under
    supervisord. Returns (process, port, log path) once it accepts."""
    port = free_port()
    ini = tmp_path / ('proxy-%d.ini' % port)
    ini.write_text('[gimapproxy]\nlisten_address = %s\nlisten_port = %d\n'
                   'server_hostname = 127.0.0.1\nserver_port = %d\nshutdown_timeout = 2\n'
                   % (listen_address, port, backend_port))
    log_path = tmp_path / ('proxy-%d.log' % port)
    with open(log_path, 'wb') as log:
        process = subprocess.Popen([sys.executable, BIN, '-c', str(ini)], cwd=REPO,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def listening() -> bool:
        return ' listening: ' in log_path.read_text()
    try:
        wait_until(lambda: process.poll() is not None or listening(),
                   'the proxy to log that it listens', 15)
        assert process.poll() is None, 'exited with status %d' % process.returncode
    except AssertionError as exc:
        process.kill()
        raise RuntimeError('proxy did not start: %s\n%s'
                           % (exc, log_path.read_text())) from None
    return process, port, log_path


def login(listen_address, port, source, user, password):
    """Connect from `source` (an address of this host), LOGIN, LOGOUT; return the tagged
    LOGIN reply."""
    family = socket.AF_INET6 if ':' in listen_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((listen_address, port))
        f = sock.makefile('rb')
        assert f.readline().startswith(b'* OK')
        sock.sendall(b'a LOGIN %s %s\r\n' % (user.encode(), password.encode()))
        while True:
            line = f.readline()
            assert line, 'connection closed before the LOGIN reply'
            if line.startswith(b'a '):
                break
        sock.sendall(b'b LOGOUT\r\n')
        while f.readline().startswith(b'* '):
            pass
        return line


def matched_addresses(log_path):
    """fail2ban-regex's answer: the address of each matched line, in order."""
    result = subprocess.run([fail2ban_regex(), '--out', 'ip', str(log_path), FILTER],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


@pytest.mark.parametrize('listen_address, refused_from, accepted_from', [
    ('127.0.0.1', '127.0.0.5', '127.0.0.6'),
    ('::1', '::1', None),
])
def test_fail2ban_finds_the_refused_logins(tmp_path, dovecot, listen_address, refused_from,
                                           accepted_from):
    fail2ban_regex()
    process, port, log_path = start_proxy(tmp_path, listen_address, dovecot.port)
    user, password = dovecot.users[0]
    try:
        for _ in range(3):
            assert login(listen_address, port, refused_from, user, 'wrongpass').startswith(
                b'a NO')
        if accepted_from:
            # Logins that work, from another address: never matched.
            for _ in range(2):
                assert login(listen_address, port, accepted_from, user, password).startswith(
                    b'a OK')
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    text = log_path.read_text()
    failed = [line for line in text.splitlines() if ' login failed: ' in line]
    assert len(failed) == 3, text
    assert 'wrongpass' not in text and password not in text
    assert matched_addresses(log_path) == [refused_from] * 3, text


def test_the_filter_leaves_other_lines_alone(tmp_path):
    """Lines of the same log that are not a refusal by the server: a server that is
    down, a full cache, a client's own bytes in a trace, a good login."""
    lines = [
        'WARNING login failed: id=c6 user=bob reason=server unavailable peer=192.0.2.9:1',
        'WARNING login failed: id=c7 user=bob reason=cache full (1000 connections) '
        'peer=192.0.2.9:2',
        'DEBUG trace: id=c8 C: a x login failed: id=c2 user=bob backend=b3 status=NO '
        'code=- peer=192.0.2.9:3',
        'INFO login: id=c9 user=bob method=LOGIN backend=b1 result=new peer=192.0.2.9:4',
        'INFO login failed: id=c10 user=peer=192.0.2.9:5 backend=b3 status=NO code=- '
        'peer=192.0.2.10:6',
        'INFO login failed: id=c11 user=bob backend=b3 status=NO code=- peer=2001:db8::7:7',
        'INFO login failed: id=c12 user=bob backend=b3 status=NO code=- '
        'peer=[2001:db8::8]:8',
    ]
    log_path = tmp_path / 'proxy.log'
    log_path.write_text(''.join('2026-01-02 03:04:%02d,000 %s\n' % (i, line)
                                for i, line in enumerate(lines)))
    fail2ban_regex()
    assert matched_addresses(log_path) == ['192.0.2.10', '2001:db8::7', '2001:db8::8']


def test_fail2ban_client_accepts_the_jail(tmp_path):
    """fail2ban's own configuration check takes the jail example and the filter, in a
    copy of Debian's /etc/fail2ban with only this jail (the log path made a file that
    exists here)."""
    client = shutil.which('fail2ban-client')
    if client is None or not os.path.isdir('/etc/fail2ban'):
        pytest.skip('fail2ban is not installed (Debian package fail2ban)')
    conf = tmp_path / 'fail2ban'
    shutil.copytree('/etc/fail2ban', conf)
    for name in os.listdir(conf / 'jail.d'):       # Debian enables sshd there
        os.remove(conf / 'jail.d' / name)
    shutil.copy(FILTER, conf / 'filter.d' / 'gimapproxy.conf')
    log = tmp_path / 'gimapproxy.log'
    log.write_text('')
    jail = open(JAIL).read()
    assert '\nlogpath  = /var/log/gimapproxy.log\n' in jail
    (conf / 'jail.d' / 'gimapproxy.conf').write_text(
        jail.replace('/var/log/gimapproxy.log', str(log)))
    result = subprocess.run([client, '-c', str(conf), '-t'], capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and 'configuration test is successful' in output, output
    # Like systemd-analyze, it only warns about a bad value: none may be about this jail.
    assert not [line for line in output.splitlines()
                if 'gimapproxy' in line and ('WARNING' in line or 'ERROR' in line)], output
    dump = subprocess.run([client, '-c', str(conf), '-d'], capture_output=True, text=True,
                          timeout=60).stdout
    assert "['add', 'gimapproxy', 'auto']" in dump
    assert "['set', 'gimapproxy', 'maxretry', 5]" in dump
    assert "['set', 'gimapproxy', 'addlogpath', '%s', 'head']" % log in dump, dump
