"""prometheus_client is the `metrics` extra: without it /metrics says what to install,
the rest of stats_listen works, and the proxy warns at start."""
import json
import sys
import urllib.error
import urllib.request

import pytest

from gimapproxy.stats import metrics_available
from tests.backends import free_port
from tests.conftest import start_proxy

INSTALL = 'pip install gimapproxy[metrics]'


def get(port, path):
    """(status, Content-Type, body) of GET `path`, error statuses included."""
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d%s' % (port, path),
                                    timeout=10) as response:
            return response.status, response.headers.get('Content-Type'), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get('Content-Type'), error.read()


@pytest.fixture
def proxy_with_stats(pymap):
    servers = []

    def start():
        port = free_port()
        proxy = start_proxy(pymap, stats_listen='127.0.0.1:%d' % port)
        proxy.stats_port = port
        servers.append(proxy)
        return proxy
    yield start
    for proxy in servers:
        proxy.stop(2)


def test_metrics_without_prometheus_client_say_what_to_install(proxy_with_stats, proxy_log,
                                                                monkeypatch):
    # None in sys.modules makes `import prometheus_client` raise ImportError, as when it
    # is not installed.
    monkeypatch.setitem(sys.modules, 'prometheus_client', None)
    assert not metrics_available()
    proxy = proxy_with_stats()
    # Warned once, when start() returns.
    assert [line for line in proxy_log.lines if 'metrics unavailable' in line] == [
        'metrics unavailable: stats_listen=127.0.0.1:%d reason=prometheus_client is not '
        'installed: %s (/metrics answers 501; /stats and /admin work)'
        % (proxy.stats_port, INSTALL)]
    for _ in range(2):      # not only the first scrape
        status, content_type, body = get(proxy.stats_port, '/metrics')
        assert status == 501, (status, body)
        assert content_type == 'text/plain; charset=utf-8'
        assert body == b'prometheus_client is not installed: %s\n' % INSTALL.encode()
    status, _, body = get(proxy.stats_port, '/stats')
    assert status == 200 and 'logins' in json.loads(body)
    assert get(proxy.stats_port, '/admin/cache')[0] == 200


def test_no_warning_when_prometheus_client_is_there(proxy_with_stats, proxy_log):
    assert metrics_available()
    proxy = proxy_with_stats()
    status, _, body = get(proxy.stats_port, '/metrics')
    assert status == 200 and b'gimapproxy_client_connections ' in body
    assert not [line for line in proxy_log.lines if 'metrics unavailable' in line]
