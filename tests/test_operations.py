"""Operations: metrics, stats, admin, reload, signals, tracing, privilege drop, embedding."""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from gimapproxy.cache import State
from tests.backends import free_port
from tests.conftest import REPO, start_proxy, wait_cached, wait_for_text, wait_until
from tests.transcript import wait_settled
from tests.test_cli import BIN, start_daemon
from tests.wire import Client


def http(port, path, method='GET'):
    request = urllib.request.Request('http://127.0.0.1:%d%s' % (port, path), method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers.get('Content-Type'), response.read()


@pytest.fixture
def stats_proxy(pymap):
    port = free_port()
    proxy = start_proxy(pymap, stats_listen='127.0.0.1:%d' % port)
    proxy.stats_port = port
    yield proxy
    proxy.stop(2)


def login_logout(proxy, user='demouser', password='demopass'):
    with Client(proxy.server_port) as client:
        assert client.login(user, password).startswith(b'L1 OK')
        client.command(b'a', b'SELECT INBOX')
        client.logout()
    wait_cached(proxy)


def test_metrics_in_prometheus_format(stats_proxy):
    login_logout(stats_proxy)
    login_logout(stats_proxy)
    status, content_type, body = http(stats_proxy.stats_port, '/metrics')
    text = body.decode()
    assert status == 200 and content_type.startswith('text/plain')
    assert 'gimapproxy_logins_total{result="new"} 1.0' in text
    assert 'gimapproxy_logins_total{result="reused"} 1.0' in text
    assert 'gimapproxy_client_connections_total 2.0' in text
    assert 'gimapproxy_backend_connections{state="cached"} 1.0' in text
    assert 'gimapproxy_cache_hit_ratio 0.5' in text
    # Every counter the proxy keeps is exported.
    for name in ('client_connections_refused', 'backend_connections_expired',
                 'backend_connections_died_while_cached'):
        assert 'gimapproxy_%s_total 0.0' % name in text, name
    assert 'gimapproxy_login_seconds_bucket{le="+Inf",result="reused"} 1.0' in text
    assert re.search(r'gimapproxy_relayed_bytes_total\{direction="server_to_client"\} '
                     r'[1-9]', text)


def test_stats_json_and_the_stats_command(stats_proxy, tmp_path):
    login_logout(stats_proxy)
    stats = json.loads(http(stats_proxy.stats_port, '/stats')[2])
    assert stats['logins'] == {'new': 1, 'reused': 0, 'failed': 0, 'failed_by_reason': {}}
    assert stats['backend_connections']['cached'] == 1
    assert stats['backend_connections']['died_while_cached'] == 0
    assert stats['clients']['refused'] == 0
    assert 'demopass' not in json.dumps(stats)
    ini = tmp_path / 'proxy.ini'
    ini.write_text('[gimapproxy]\nserver_hostname = 127.0.0.1\nstats_listen = 127.0.0.1:%d\n'
                   % stats_proxy.stats_port)
    result = subprocess.run([sys.executable, BIN, 'stats', '-c', str(ini)], timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r'logins\s+1 new\s+0 reused', result.stdout), result.stdout
    # Why connections were not reused, and why logins failed, most frequent first.
    with Client(stats_proxy.server_port) as client:
        client.login('demouser', 'demopass')
        client.command(b'a', b'XUNKNOWN')
        client.logout()
    with Client(stats_proxy.server_port) as client:
        client.login('demouser', 'wrongpass')
    numbers = stats_proxy.stats
    wait_until(lambda: numbers()['backend_connections']['not_reusable_by_reason']
               and numbers()['logins']['failed_by_reason'],
               'the unclean close and the refused login to be counted')
    result = subprocess.run([sys.executable, BIN, 'stats', '-c', str(ini)], timeout=30,
                            capture_output=True, text=True)
    assert re.search(r'not reusable: unknown command\s+1\n', result.stdout), result.stdout
    assert re.search(r'login failed: refused by the server\s+1\n', result.stdout), \
        result.stdout


def test_admin_list_and_flush(stats_proxy, tmp_path):
    login_logout(stats_proxy)
    listing = json.loads(http(stats_proxy.stats_port, '/admin/cache')[2])
    assert listing[0]['user'] == 'demouser' and len(listing[0]['cached_idle_seconds']) == 1
    assert 'demopass' not in json.dumps(listing)
    status, _, body = http(stats_proxy.stats_port, '/admin/flush?user=nobody', 'POST')
    assert json.loads(body) == {'flushed': 0}
    ini = tmp_path / 'proxy.ini'
    ini.write_text('[gimapproxy]\nserver_hostname = 127.0.0.1\nstats_listen = 127.0.0.1:%d\n'
                   % stats_proxy.stats_port)
    result = subprocess.run([sys.executable, BIN, 'flush', '-c', str(ini), 'demouser'],
                            timeout=30, capture_output=True, text=True)
    assert result.returncode == 0 and 'flushed 1 ' in result.stdout, result
    assert stats_proxy.cache.total == 0
    login_logout(stats_proxy)
    assert stats_proxy.counters['login_new'] == 2          # the flush forced a new login


def test_wrong_method_is_405_unknown_path_404(stats_proxy):
    port = stats_proxy.stats_port
    for path, method, allow in (('/admin/flush', 'GET', 'POST'),
                                ('/admin/flush?user=demouser', 'GET', 'POST'),
                                ('/admin/cache', 'POST', 'GET'), ('/stats', 'POST', 'GET'),
                                ('/metrics', 'DELETE', 'GET')):
        with pytest.raises(urllib.error.HTTPError) as info:
            http(port, path, method)
        assert (info.value.code, info.value.headers['Allow']) == (405, allow), path
        assert json.loads(info.value.read())['error'] == 'method not allowed'
    for path in ('/admin/nothing', '/', '/metrics/x'):
        with pytest.raises(urllib.error.HTTPError) as info:
            http(port, path)
        assert info.value.code == 404, path
    # A GET did not flush anything.
    login_logout(stats_proxy)
    with pytest.raises(urllib.error.HTTPError):
        http(port, '/admin/flush', 'GET')
    assert stats_proxy.cache.cached_count == 1


def test_admin_refused_outside_admin_networks(pymap):
    port = free_port()
    proxy = start_proxy(pymap, stats_listen='127.0.0.1:%d' % port,
                        admin_networks='10.0.0.0/8')
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            http(port, '/admin/flush', 'POST')
        assert info.value.code == 403
        assert http(port, '/stats')[0] == 200
        # Nothing admin-related on the IMAP port.
        with Client(proxy.server_port) as client:
            assert client.command(b'a', b'XPROXY_DUMPICC')[1].startswith(b'a BAD')
    finally:
        proxy.stop(2)


def test_sighup_reloads_without_dropping_sessions(tmp_path, pymap):
    process, port = start_daemon(tmp_path, pymap.port, cache_expiration_time=300)
    ini, log_path = tmp_path / 'proxy.ini', tmp_path / 'proxy.log'
    try:
        session = Client(port)
        assert session.login('demouser', 'demopass').startswith(b'L1 OK')
        text = ini.read_text()
        ini.write_text(text.replace('cache_expiration_time = 300', 'cache_expiration_time = 60')
                       .replace('listen_port = %d' % port, 'listen_port = %d' % free_port()))
        process.send_signal(signal.SIGHUP)
        wait_for_text(log_path, 'reloaded: file=')
        assert session.command(b'a', b'NOOP')[1].startswith(b'a OK')   # still there
        ini.write_text(text + 'cache_size = lots\n')
        process.send_signal(signal.SIGHUP)
        wait_for_text(log_path, 'reload failed')
        with Client(port) as other:                                    # old port still
            assert other.login('demouser', 'demopass').startswith(b'L1 OK')
        session.logout()
        session.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = log_path.read_text()
    assert 'reloaded: file=%s changed=cache_expiration_time' % ini in log, log
    assert 'need a restart to take effect: keys=listen_port' in log
    assert 'reload failed, configuration unchanged' in log and 'cache_size' in log


def test_second_sigterm_exits_at_once(tmp_path, pymap):
    process, port = start_daemon(tmp_path, pymap.port, shutdown_timeout=30)
    try:
        busy = Client(port)
        busy.login('demouser', 'demopass')
        process.send_signal(signal.SIGTERM)
        wait_for_text(tmp_path / 'proxy.log', 'signal received: ')
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.monotonic() - started < 3
        busy.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert 'second signal: exiting at once' in (tmp_path / 'proxy.log').read_text()


def test_trace_users_masks_secrets(pymap, proxy_log):
    proxy = start_proxy(pymap, trace_users='demouser')
    body = b'Subject: traced\r\n\r\nthe body of the message\r\n'
    try:
        with Client(proxy.server_port) as client:
            client.login('demouser', 'demopass')
            client.command(b'a', b'SELECT INBOX')
            client.send(b'b APPEND INBOX {%d+}\r\n%s\r\n' % (len(body), body))
            client.read_until_tagged(b'b')
            client.command(b'c', b'LOGIN demouser demopass')         # identity change
            plain = base64.b64encode(b'\0demouser\0demopass')
            client.command(b'd', b'AUTHENTICATE PLAIN ' + plain)
            client.logout()
    finally:
        proxy.stop(2)
    traced = [line for line in proxy_log.lines if line.startswith('trace: ')]
    text = '\n'.join(traced)
    # The trace shows the bytes on the server's side: the proxy's own tags.
    assert re.search(r'C: P[0-9a-f]{12}\.1 SELECT INBOX', text), text
    assert re.search(r'S: P[0-9a-f]{12}\.1 OK', text), text
    assert '<literal data, %d bytes>' % len(body) in text
    # LOGIN after login is not a command the tracker knows: from there on it frames
    # nothing, and the trace shows the client's bytes by their size only.
    assert 'C: c LOGIN <masked>' in text and 'C: <unframed data, ' in text
    assert 'demopass' not in text and plain.decode() not in text
    assert 'the body of the message' not in text


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to drop privileges')
def test_privilege_drop(tmp_path, pymap):
    process, port = start_daemon(tmp_path, pymap.port, proc_username='nobody',
                                 proc_groupname='nogroup')
    try:
        with Client(port) as client:
            assert client.login('demouser', 'demopass').startswith(b'L1 OK')
        status = open('/proc/%d/status' % process.pid).read()
        uids = re.search(r'^Uid:\s+(.*)$', status, re.M).group(1).split()
        assert set(uids) == {'65534'}, uids
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert 'privileges dropped: user=nobody uid=65534' in (tmp_path / 'proxy.log').read_text()
    bad = tmp_path / 'root.ini'
    bad.write_text('[gimapproxy]\nserver_hostname = x\nproc_username = root\n')
    result = subprocess.run([sys.executable, BIN, '-c', str(bad), '--check'],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and 'proc_username: the point is not to run as root' \
        in result.stderr


def test_embedding_example(tmp_path, pymap):
    ini = tmp_path / 'proxy.ini'
    imap_port, http_port = free_port(), free_port()
    ini.write_text('[gimapproxy]\nlisten_port = %d\nserver_hostname = 127.0.0.1\n'
                   'server_port = %d\n' % (imap_port, pymap.port))
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'examples',
                                                             'embed_in_wsgi.py'),
                                str(ini), str(http_port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert 'IMAP proxy on' in process.stdout.readline()
        assert http(http_port, '/')[2] == b'the host application\n'
        with Client(imap_port) as client:
            assert client.login('demouser', 'demopass').startswith(b'L1 OK')
            client.logout()
        stats = json.loads(http(http_port, '/proxy/stats')[2])
        assert stats['logins']['new'] == 1
        assert b'gimapproxy_logins_total' in http(http_port, '/proxy/metrics')[2]
        listing = json.loads(http(http_port, '/proxy/admin/cache')[2])
        assert listing[0]['user'] == 'demouser'
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    # The host configured logging: the proxy's events are in its output, no password.
    log = process.stderr.read()
    assert re.search(r' gimapproxy[.\w]* INFO login: id=c\d+ user=demouser .*result=new',
                     log), log
    assert 'demopass' not in log and 'Traceback' not in log
    doc = open(os.path.join(REPO, 'examples', 'embed_in_wsgi.py')).read().split('"""')[1]
    assert '/proxy/admin/cache' in doc and '/proxy/admin/flush' in doc


def test_backend_counters_add_up_at_every_moment(dovecot):
    """created = connections in each state + connections closed, by reason: sampled
    while logins succeed, fail, are reused, are dropped unclean and are cut off."""
    import gevent

    proxy = start_proxy(dovecot)
    samples = []

    def check():
        numbers = proxy.stats()['backend_connections']
        live = sum(numbers[state] for state in ('connecting', 'logging_in', 'active',
                                                 'resetting', 'cached'))
        closed = sum(numbers['closed_by_reason'].values())
        assert numbers['created'] == live + closed, numbers
        samples.append(numbers)

    def sampler():
        while True:
            check()
            gevent.sleep(0.001)            # a pause between samples, not a wait for one

    watcher = gevent.spawn(sampler)
    (user, password), (other, _) = dovecot.users[16], dovecot.users[17]
    try:
        for _ in range(3):
            login_logout(proxy, user, password)                 # new, then reused
        with Client(proxy.server_port) as client:               # refused: closed too
            assert client.login(other, 'wrong').startswith(b'L1 NO')
        with Client(proxy.server_port) as client:               # unclean: dropped
            client.login(user, password)
            client.command(b'a', b'NOTIFY NONE')
            client.logout()
        with Client(proxy.server_port) as client:               # cut off mid-session
            client.login(user, password)
            client.send(b'a FETCH 1:* (FLAGS)\r\n')
        wait_settled(proxy, user)
        wait_until(lambda: not proxy.cache.count(State.CLOSING),
                   'the LOGOUTs of the connections not cached to end')
    finally:
        watcher.kill()
        proxy.stop(2)
    check()
    last = samples[-1]
    reasons = set(last['closed_by_reason'])
    assert last['created'] >= 3 and {'login refused', 'shutdown'} <= reasons
    # After the server answered its LOGOUT; the client may have gone first.
    assert any(reason.startswith('not reusable after') for reason in reasons)
    assert last['not_reusable_by_reason'] == {'notify': 1}
    assert len(samples) > 50
