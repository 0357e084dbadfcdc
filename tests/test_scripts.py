"""scripts/demo as a user runs it: it serves a login twice (the second reused), stops on
TERM, and exits non-zero, saying why, when the proxy cannot listen. README.md's
deployment commands match the shipped files."""
import imaplib
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.backends import free_port
from tests.conftest import REPO, wait_until

DEMO = os.path.join(REPO, 'scripts', 'demo')


def in_project_venv() -> bool:
    """True when the tests run in the checkout's .venv, as scripts/test runs them: the
    demo then finds everything installed and does not run pip."""
    return os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(REPO, '.venv'))


needs_venv = pytest.mark.skipif(not in_project_venv(), reason='scripts/demo would install '
                                'into .venv; run the tests with scripts/test')


def start_demo(tmp_path, listen_port):
    out, err = tmp_path / 'demo.out', tmp_path / 'demo.err'
    env = dict(os.environ, LISTEN_PORT=str(listen_port))
    with open(out, 'wb') as stdout, open(err, 'wb') as stderr:
        process = subprocess.Popen(['bash', DEMO], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr)
    return process, out, err


@needs_venv
def test_demo_serves_a_login_twice_the_second_reused(tmp_path):
    port = free_port()
    process, out, err = start_demo(tmp_path, port)
    try:
        wait_until(lambda: 'gimapproxy on 127.0.0.1:%d' % port in out.read_text()
                   or process.poll() is not None, 'the demo to start', 60)
        text = out.read_text()
        assert process.poll() is None, text + err.read_text()
        assert re.search(r'^demo IMAP server \(pymap\) on 127\.0\.0\.1:\d+: user demouser, '
                         r'password demopass$', text, re.M), text
        # No wait between the two: LOGOUT is answered once the reset is sent, and the
        # next login of the user waits for that reset and gets the connection. (This
        # proxy shows no numbers, and logs nothing when it caches.)
        for _ in range(2):
            imap = imaplib.IMAP4('127.0.0.1', port)
            assert imap.login('demouser', 'demopass')[0] == 'OK'
            assert imap.select('INBOX')[0] == 'OK'
            imap.logout()
        wait_until(lambda: 'result=reused' in err.read_text(), 'the reused login in the log',
                   10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
    log = err.read_text()
    assert re.search(r'INFO login: id=c\d+ user=demouser .*result=new', log), log
    assert re.search(r'INFO login: id=c\d+ user=demouser .*result=reused', log), log
    assert 'stopped: cached connections logged out=1' in log, log
    assert 'demopass' not in log and 'Traceback' not in log


@needs_venv
def test_demo_fails_loudly_when_the_port_is_busy(tmp_path):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        process, out, err = start_demo(tmp_path, port)
        try:
            assert process.wait(timeout=60) == 1
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
    text = err.read_text()
    assert 'ERROR cannot listen: address=127.0.0.1:%d' % port in text, text
    assert text.rstrip().endswith('scripts/demo: gimapproxy did not start on 127.0.0.1:%d: it '
                                  'exited with status 1; its log is above' % port), text
    assert 'gimapproxy on' not in out.read_text()


def test_readme_deployment_matches_the_shipped_files():
    readme = open(os.path.join(REPO, 'README.md')).read()
    useradd = 'useradd --system --no-create-home --shell /usr/sbin/nologin gimapproxy'
    venv = 'python3 -m venv /opt/gimapproxy && /opt/gimapproxy/bin/pip install /path/to/clone'
    assert useradd in readme and venv in readme
    assert useradd in open(os.path.join(REPO, 'etc', 'proxy.ini')).read()
    for name in ('gimapproxy.service', 'supervisord.conf'):
        text = open(os.path.join(REPO, 'etc', name)).read()
        assert '/opt/gimapproxy/bin/gimapproxy -c /etc/gimapproxy.ini' in text, name
    assert 'LISTEN_PORT=' in readme
