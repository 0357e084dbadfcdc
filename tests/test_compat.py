"""What the compatibility matrix checks beyond the core tests, on every Python and gevent
it runs: the proxy as a guest in a gevent web application (the host patches, starts,
serves, reloads and stops it, in one process), and bin/gimapproxy serving a reused login.
Dovecot is the backend, as it is on every Python."""
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request

import gevent
from gevent import monkey
from gevent.pywsgi import WSGIServer

from gimapproxy import ProxyServer, make_config
from gimapproxy.wsgi import make_app
from tests.backends import free_port
from tests.conftest import REPO, wait_until
from tests.test_cli import start_daemon
from tests.wire import Client

HOST_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def get(port, path):
    with urllib.request.urlopen('http://127.0.0.1:%d%s' % (port, path), timeout=10) as reply:
        return reply.read()


def login_logout(port, user, password):
    with Client(port) as client:
        assert client.login(user, password).startswith(b'L1 OK')
        assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
        client.logout()


def cached(port, prefix=''):
    """How many server connections the proxy whose stats are on `port` (under `prefix`)
    has cached."""
    return json.loads(get(port, prefix + '/stats'))['backend_connections']['cached']


def host_app(proxy_app):
    """A host's own WSGI app with the proxy's views under /proxy."""
    def app(environ, start_response):
        path = environ.get('PATH_INFO', '')
        if path.startswith('/proxy/'):
            return proxy_app(dict(environ, PATH_INFO=path[len('/proxy'):]), start_response)
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'the host application\n']
    return app


def test_guest_in_a_gevent_wsgi_host(dovecot):
    """This process is the host: it monkey-patched before importing gimapproxy
    (conftest). It starts the proxy from a greenlet next to its WSGIServer, serves, reloads
    and stops it; the proxy leaves the host's signal handlers and root logger alone."""
    assert monkey.is_module_patched('socket')
    handlers = {signum: signal.getsignal(signum) for signum in HOST_SIGNALS}
    root = (list(logging.root.handlers), logging.root.level)
    user, password = dovecot.users[18]
    settings = {'listen_port': '0', 'server_hostname': '127.0.0.1',
                'server_port': str(dovecot.port), 'cache_expiration_time': '300'}
    proxy = ProxyServer(make_config(settings))
    web = WSGIServer(('127.0.0.1', 0), host_app(make_app(proxy)), log=None)
    web.start()
    try:
        starter = gevent.spawn(proxy.start)
        starter.join(timeout=5)
        assert starter.successful()                 # start() returned: it never blocks
        assert get(web.server_port, '/') == b'the host application\n'
        before = dovecot.server.login_count(user)
        login_logout(proxy.server_port, user, password)
        wait_until(lambda: proxy.cache.cached_count == 1, 'the connection to be cached')
        login_logout(proxy.server_port, user, password)
        assert json.loads(get(web.server_port, '/proxy/stats'))['logins'] == {
            'new': 1, 'reused': 1, 'failed': 0, 'failed_by_reason': {}}

        changed, restart = proxy.reload(make_config(dict(settings,
                                                         cache_expiration_time='600')))
        assert (changed, restart) == (['cache_expiration_time'], [])
        wait_until(lambda: proxy.cache.cached_count == 1, 'the connection to be cached')
        login_logout(proxy.server_port, user, password)      # the cache outlives a reload
        assert proxy.stats()['logins']['reused'] == 2
        assert dovecot.server.wait_login_count(before + 1, user=user) == before + 1
    finally:
        proxy.stop(2)
        web.stop(1)
    assert dovecot.server.settled_login_count() >= before + 1
    assert dovecot.server.login_count(user) == before + 1     # one server login in all
    try:
        Client(proxy.server_port, timeout=2).close()
        raise AssertionError('the proxy still accepts after stop()')
    except OSError:
        pass
    assert {signum: signal.getsignal(signum) for signum in HOST_SIGNALS} == handlers
    assert (list(logging.root.handlers), logging.root.level) == root


def test_embedding_example_serves_reloads_and_stops(tmp_path, dovecot):
    """examples/embed_in_wsgi.py as its own process: the host installs the signal
    handlers; SIGHUP reloads the proxy, SIGTERM stops both servers and exits 0."""
    user, password = dovecot.users[19]
    ini = tmp_path / 'proxy.ini'
    imap_port, http_port = free_port(), free_port()
    text = ('[gimapproxy]\nlisten_port = %d\nserver_hostname = 127.0.0.1\n'
            'server_port = %d\n' % (imap_port, dovecot.port))
    ini.write_text(text)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'examples',
                                                             'embed_in_wsgi.py'),
                                str(ini), str(http_port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert 'IMAP proxy on 127.0.0.1:%d' % imap_port in process.stdout.readline()
        assert get(http_port, '/') == b'the host application\n'
        for _ in range(2):
            login_logout(imap_port, user, password)
            wait_until(lambda: cached(http_port, '/proxy') == 1, 'the connection to be cached')
        assert json.loads(get(http_port, '/proxy/stats'))['logins']['reused'] == 1
        ini.write_text(text + 'cache_expiration_time = 600\n')
        process.send_signal(signal.SIGHUP)
        assert process.stdout.readline().strip() == ('reloaded: changed=cache_expiration_time'
                                                      ' restart_needed=-')
        login_logout(imap_port, user, password)
        assert json.loads(get(http_port, '/proxy/stats'))['logins']['reused'] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert 'Traceback' not in process.stderr.read()


def test_bin_serves_a_reused_login(tmp_path, dovecot):
    """bin/gimapproxy on this Python and gevent: two logins, one server login."""
    user, password = dovecot.users[17]
    before = dovecot.server.login_count(user)
    stats_port = free_port()
    process, port = start_daemon(tmp_path, dovecot.port,
                                 stats_listen='127.0.0.1:%d' % stats_port)
    try:
        for _ in range(2):
            login_logout(port, user, password)
            wait_until(lambda: cached(stats_port) == 1, 'the connection to be cached')
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / 'proxy.log').read_text()
    assert 'result=new' in log and 'result=reused' in log, log
    assert 'Traceback' not in log
    dovecot.server.settled_login_count()
    assert dovecot.server.login_count(user) == before + 1
