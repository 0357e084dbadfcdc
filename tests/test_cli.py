"""bin/gimapproxy as a real process: arguments, exit codes, signals."""
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from gimapproxy import cli, make_config
from tests.conftest import REPO, wait_for_text, wait_until
from tests.backends import free_port
from tests.wire import Client

BIN = os.path.join(REPO, 'bin', 'gimapproxy')


def run(*args, timeout=30):
    return subprocess.run([sys.executable, BIN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_version_and_help():
    result = run('--version')
    assert result.returncode == 0 and result.stdout.startswith('gimapproxy ')
    result = run('-h')
    assert result.returncode == 0 and 'Usage:' in result.stdout
    result = run('--bogus')
    assert result.returncode == 2 and 'Usage:' in result.stderr


def shipped_ini(tmp_path):
    """etc/proxy.ini, or where the system user it runs as (gimapproxy) does not exist
    here, a copy that runs as nobody."""
    shipped = os.path.join(REPO, 'etc', 'proxy.ini')
    try:
        pwd.getpwnam('gimapproxy')
        return shipped
    except KeyError:
        copy = tmp_path / 'shipped.ini'
        copy.write_text(open(shipped).read().replace('proc_username = gimapproxy',
                                                     'proc_username = nobody'))
        return str(copy)


def test_check_without_config_says_what_is_missing():
    for args in (['--check'], [], ['stats'], ['flush', 'bob']):
        result = run(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith('gimapproxy: no configuration file: give it with '
                                        '-c FILE'), (args, result.stderr)
        assert 'Usage:' in result.stderr and 'Warning' not in result.stderr, result.stderr
        assert 'unmatched' not in result.stderr and result.stdout == ''
    result = run('--bogus', '-c', 'x.ini')
    assert result.stderr.startswith('gimapproxy: these arguments match no usage: --bogus')


def test_root_warning_only_as_root_without_proc_username():
    as_root = make_config({'server_hostname': 'imap.example'})
    dropping = make_config({'server_hostname': 'imap.example', 'proc_username': 'nobody'})
    assert 'running as root' in cli.root_warning(as_root, 0)
    assert 'useradd --system' in cli.root_warning(as_root, 0)
    assert cli.root_warning(as_root, 1000) is None
    assert cli.root_warning(dropping, 0) is None


@pytest.mark.skipif(os.geteuid() != 0, reason='the warning is about running as root, and '
                    'this test is not root')
def test_daemon_warns_when_it_serves_as_root(tmp_path, dovecot):
    for settings, warned in (({}, True), ({'proc_username': 'nobody'}, False)):
        process, port = start_daemon(tmp_path, dovecot.port, **settings)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = (tmp_path / 'proxy.log').read_text()
        assert ('WARNING running as root: proc_username is not set' in log) == warned, log
        assert ('privileges dropped: user=nobody' in log) == (not warned), log


def as_nobody():
    """preexec_fn: become nobody, as a service manager's User= would start the proxy."""
    entry = pwd.getpwnam('nobody')
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to start the proxy as nobody')
def test_started_as_proc_username_already(tmp_path, pymap):
    """systemd's User=gimapproxy with proc_username = gimapproxy: nothing to drop."""
    try:
        probe = subprocess.run([sys.executable, '-c', 'import gevent, docopt, gimapproxy.cli'],
                               cwd=REPO, preexec_fn=as_nobody, capture_output=True,
                               timeout=60)
        problem = probe.stderr.decode()[-200:] if probe.returncode else None
    except OSError as exc:               # cannot even start the Python of this checkout
        problem = str(exc)
    if problem:
        pytest.skip('nobody cannot read this checkout or its Python: %s' % problem)
    port = free_port()
    # pytest's tmp_path is root's alone: the file goes where nobody can read it.
    folder = tempfile.mkdtemp(prefix='gimapproxy-nobody-')
    os.chmod(folder, 0o755)
    ini = os.path.join(folder, 'proxy.ini')
    with open(ini, 'w') as handle:
        handle.write('[gimapproxy]\nlisten_port = %d\nserver_hostname = 127.0.0.1\n'
                     'server_port = %d\nproc_username = nobody\n' % (port, pymap.port))
    os.chmod(ini, 0o644)
    process = subprocess.Popen([sys.executable, BIN, '-c', ini], cwd=REPO,
                               preexec_fn=as_nobody, stderr=subprocess.PIPE, text=True)
    try:
        def serves() -> bool:
            try:
                with Client(port) as client:
                    assert client.login('demouser', 'demopass').startswith(b'L1 OK')
            except OSError:
                assert process.poll() is None, process.stderr.read()
                return False
            return True
        wait_until(serves, 'the proxy to serve a login on port %d' % port, 15)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(folder)
    log = process.stderr.read()
    assert 'privileges: already user=nobody uid=65534' in log, log
    assert 'running as root' not in log and 'cannot drop privileges' not in log


def test_check_good_and_bad_config(tmp_path):
    result = run('-c', shipped_ini(tmp_path), '--check')
    assert result.returncode == 0, result.stderr
    bad = tmp_path / 'bad.ini'
    bad.write_text('[gimapproxy]\nserver_hostname = x\ncache_size = lots\n')
    result = run('-c', str(bad), '--check')
    assert result.returncode == 1
    assert result.stderr.strip() == ('gimapproxy: configuration error: %s: [gimapproxy] '
                                     "cache_size: 'lots' is not a whole number" % bad)
    result = run('-c', str(bad))          # without --check too, before binding anything
    assert result.returncode == 1 and 'cache_size' in result.stderr


def accepts(port: int) -> bool:
    """Whether a connection to 127.0.0.1:`port` is accepted and greeted."""
    try:
        Client(port).close()
    except OSError:
        return False
    return True


def start_daemon(tmp_path, backend_port, **settings):
    """bin/gimapproxy with tmp_path/proxy.ini, its log (stderr) going to tmp_path/proxy.log,
    so that a test can wait for a line in it. Returns (process, port) once it accepts."""
    port = free_port()
    ini = tmp_path / 'proxy.ini'
    values = {'listen_port': port, 'server_hostname': '127.0.0.1',
              'server_port': backend_port, 'shutdown_timeout': 3, **settings}
    ini.write_text('[gimapproxy]\n' + ''.join('%s = %s\n' % item for item in values.items()))
    with open(tmp_path / 'proxy.log', 'wb') as log:
        process = subprocess.Popen([sys.executable, BIN, '-c', str(ini)], cwd=REPO,
                                   stderr=log)
    try:
        wait_until(lambda: process.poll() is not None or accepts(port),
                   'the proxy to accept on port %d' % port, 15)
        assert process.poll() is None, 'exited with status %d' % process.returncode
    except AssertionError as exc:
        process.kill()
        raise RuntimeError('proxy did not start: %s\n%s'
                           % (exc, (tmp_path / 'proxy.log').read_text())) from None
    return process, port


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_exits_zero(tmp_path, dovecot, signum):
    process, port = start_daemon(tmp_path, dovecot.port)
    try:
        user, password = dovecot.users[0]
        with Client(port) as cached:
            assert cached.login(user, password).startswith(b'L1 OK')
            cached.logout()
        busy = Client(port)
        assert busy.login(user, password).startswith(b'L1 OK')
        process.send_signal(signum)
        wait_for_text(tmp_path / 'proxy.log', 'stopping: ')
        # The open session still works while the proxy drains...
        assert busy.command(b'a', b'NOOP')[1].startswith(b'a OK')
        busy.logout()
        busy.close()
        # ...and new clients are no longer accepted.
        assert process.wait(timeout=15) == 0
        with pytest.raises(OSError):
            Client(port)
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / 'proxy.log').read_text()
    assert 'signal received: signal=%s' % signal.Signals(signum).name in log
    assert 'stopped: cached connections logged out=1' in log
    assert 'Traceback' not in log


def test_shutdown_timeout_ends_idle_sessions(tmp_path, dovecot):
    process, port = start_daemon(tmp_path, dovecot.port, shutdown_timeout=0.5)
    try:
        user, password = dovecot.users[1]
        idle = Client(port)
        idle.login(user, password)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert idle.read_eof() == b'* BYE Server shutting down.\r\n'
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / 'proxy.log').read_text()
    assert 'reason=server shutdown' in log and 'Traceback' not in log


def test_import_patches_nothing_and_loads_no_socket_code():
    code = ('import sys\n'
            'before = set(sys.modules)\n'
            'import gimapproxy\n'
            'new = set(sys.modules) - before\n'
            'bad = [m for m in ("socket", "ssl", "threading", "gevent") if m in new]\n'
            'print(",".join(bad))\n'
            'from gimapproxy import ProxyServer, load_config\n'
            'from gevent import monkey\n'
            'print(monkey.is_anything_patched())\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                            text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:2] == ['', 'False']


PROMETHEUS_PROBE = """
from gevent import monkey
monkey.patch_all()
import logging, sys, urllib.request
from gevent.event import Event
from gimapproxy import ProxyServer, make_config
checked = Event()


class Checked(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith('server check'):
            checked.set()


log = logging.getLogger('gimapproxy')
log.setLevel(logging.INFO)
log.addHandler(Checked())
settings = {'listen_port': '0', 'server_hostname': '127.0.0.1', 'server_port': '%d'}
if %r:
    settings['stats_listen'] = '127.0.0.1:%d'
server = ProxyServer(make_config(settings))
server.start()
# What start() left running has run: the server check it spawned logged its result.
assert checked.wait(10), 'no server check logged'
print('started', 'prometheus_client' in sys.modules)
if %r:
    urllib.request.urlopen('http://127.0.0.1:%d/metrics', timeout=10).read()
    print('scraped', 'prometheus_client' in sys.modules)
server.stop(1)
"""


@pytest.mark.parametrize('stats_listen', [False, True])
def test_prometheus_client_is_imported_only_when_metrics_are_served(pymap, stats_listen):
    stats_port = free_port()
    code = PROMETHEUS_PROBE % (pymap.port, stats_listen, stats_port, stats_listen,
                               stats_port)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    # Started, even with stats_listen on, it has not been needed yet; the first scrape
    # of /metrics loads it.
    expected = ['started False'] + (['scraped True'] if stats_listen else [])
    assert result.stdout.split('\n')[:-1] == expected, result.stdout + result.stderr
