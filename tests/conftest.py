"""Fixtures: real IMAP servers (Dovecot, pymap) and the proxy in front of them.

gevent's monkey-patching comes first, as in bin/gimapproxy: the proxy runs in this
process, so the tests' own blocking sockets must yield to it.
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402

import gevent  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402

from gimapproxy import ProxyServer, make_config  # noqa: E402
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, Pymap, require_dovecot  # noqa: E402
from tests.tlsutil import TestPKI  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses (bin/gimapproxy, examples) import this checkout, whatever is installed.
os.environ['PYTHONPATH'] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])


@dataclass
class Backend:
    """A running IMAP server and the accounts tests may use on it."""
    name: str
    server: object
    users: list = field(default_factory=list)    # [(user, password)]

    @property
    def port(self) -> int:
        return self.server.port

    def logins(self) -> int:
        return self.server.login_count()

    def wait_logins(self, count: int, timeout: float = 5.0) -> int:
        return self.server.wait_login_count(count, timeout)

    def settled_logins(self) -> int:
        return self.server.settled_login_count()


@pytest.fixture(scope='session')
def dovecot():
    require_dovecot()
    # Tests fail logins on purpose; Dovecot's per-IP auth penalty would then slow every
    # later login from 127.0.0.1 by seconds.
    with Dovecot(extra_conf=NO_AUTH_PENALTY_CONF) as server:
        yield Backend('dovecot', server, [('user%d' % i, 'secret%d' % i) for i in range(1, 21)])


@pytest.fixture(scope='session')
def pymap():
    with Pymap() as server:
        yield Backend('pymap', server, [('demouser', 'demopass')])


@pytest.fixture(scope='session')
def pki(tmp_path_factory):
    """A test CA with server and client certificates (tests/tlsutil.py), made per run."""
    return TestPKI(str(tmp_path_factory.mktemp('pki')))


@pytest.fixture(params=['dovecot', 'pymap'])
def backend(request):
    """Each test that takes `backend` runs against Dovecot and against pymap."""
    return request.getfixturevalue(request.param)


def start_proxy(backend: Backend, **settings) -> ProxyServer:
    """An in-process proxy on a free loopback port in front of `backend`."""
    values = {'listen_port': '0', 'server_hostname': '127.0.0.1',
              'server_port': str(backend.port), 'shutdown_timeout': '2'}
    values.update({key: str(value) for key, value in settings.items()})
    server = ProxyServer(make_config(values))
    server.start()
    return server


def wait_until(predicate, what: str, timeout: float = 5.0) -> None:
    """Wait until `predicate()` is true, checking every 10 ms: the one way tests wait
    for an event (a connection cached, a log line, a process gone) instead of sleeping
    for a fixed time. Raises AssertionError naming `what` after `timeout` seconds."""
    with gevent.Timeout(timeout, AssertionError('waited %gs for %s' % (timeout, what))):
        while not predicate():
            gevent.sleep(0.01)


def wait_cached(proxy: ProxyServer, count: int = 1, timeout: float = 5.0) -> None:
    """Wait until `count` connections are cached. A LOGOUT is answered as soon as the
    reset that caches the connection is sent, so the reset may still be under way."""
    wait_until(lambda: proxy.cache.cached_count >= count,
               '%d connection(s) to be cached' % count, timeout)


def wait_for_text(path, text: str, timeout: float = 5.0) -> str:
    """Wait until the file at `path` (a process's log, say) holds `text`; return the
    file's text then. A file not there yet holds nothing. Raises AssertionError after
    `timeout` seconds."""
    def read() -> str:
        try:
            with open(path, errors='replace') as handle:
                return handle.read()
        except FileNotFoundError:
            return ''
    wait_until(lambda: text in read(), '%s to hold %r' % (path, text), timeout)
    return read()


@pytest.fixture
def make_proxy(backend):
    """Start proxies with extra settings; all are stopped after the test."""
    servers = []

    def make(**settings) -> ProxyServer:
        servers.append(start_proxy(backend, **settings))
        return servers[-1]
    yield make
    for server in servers:
        server.stop(2)


@pytest.fixture
def proxy(make_proxy) -> ProxyServer:
    return make_proxy()


class SecretWatch(logging.Handler):
    """Collects every log line of the package, at debug level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """Wait until a log line holds `text`; return the first that does."""
        wait_until(lambda: any(text in line for line in self.lines),
                   'a log line with %r' % text, timeout)
        return next(line for line in self.lines if text in line)


@pytest.fixture(autouse=True)
def greenlet_errors():
    """No greenlet may die of an exception during a test: gevent only prints those."""
    hub = gevent.get_hub()
    errors = []
    original = hub.handle_error

    def handle_error(context, kind, value, tb):
        if kind is not None and not issubclass(kind, hub.NOT_ERROR):
            errors.append('%s: %r' % (context, value))
        return original(context, kind, value, tb)
    hub.handle_error = handle_error
    yield errors
    hub.handle_error = original
    assert not errors, errors


@pytest.fixture(autouse=True)
def proxy_log(request):
    """Every test's proxy log, at debug level; no test may leak a password into it."""
    watch = SecretWatch()
    logger = logging.getLogger('gimapproxy')
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old_level)
    text = '\n'.join(watch.lines)
    for secret in ['secret%d' % i for i in range(1, 21)] + ['demopass', 'wrongpass']:
        assert secret not in text, 'a password reached the log'
    # A bug logs a traceback; no test may cause one.
    assert 'Traceback' not in text, text[text.index('Traceback') - 200:][:3000]


def pytest_addoption(parser):
    parser.addoption('--gevent-api', choices=('auto', 'public'), default='auto',
                     help="'public': run the proxy on gevent's public API only, as it runs "
                          "when gevent's private socket read watcher is gone")


def pytest_configure(config):
    if config.getoption('--gevent-api') == 'public':
        from gimapproxy import duplex, sockio
        sockio.SOCKET_WATCHER = duplex.RAW_SOCKET = False
