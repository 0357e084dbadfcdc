"""Soak: many clients APPEND uniquely identified messages through the proxy while others
log in and out and some drop abruptly; at the end every APPEND the proxy answered OK must
be on the server exactly once, and no client may have seen a reply to another's tag.

    python3 benchmarks/soak.py [--clients 40] [--seconds 60] [--users 10]

Starts a throwaway Dovecot (tests/backends.py) and bin/gimapproxy in front of it, runs
the clients in this process (gevent), then checks the mailboxes directly on Dovecot and
prints: clients, sessions, APPENDs acknowledged, lost and duplicated messages (both must
be 0), foreign replies, the proxy's peak RSS, and its open files before and after.
tests/test_soak.py runs a short version against an in-process proxy.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.backends import Dovecot, free_port  # noqa: E402
from tests.wire import Client  # noqa: E402

_TAGGED = re.compile(rb'^([^*+ ]+) (OK|NO|BAD)\b')
_SUBJECT = re.compile(rb'Subject: (soak-[0-9a-f]{32})')


class Tally:
    """What the clients did and saw."""

    def __init__(self):
        self.acked = []              # ids of APPENDs answered OK
        self.sessions = 0
        self.foreign = 0             # replies with a tag the client did not send
        self.errors = collections.Counter()


def client_loop(port, user, password, deadline, rng, tally):
    """One client: sessions until `deadline`; each APPENDs, reads, and leaves one way."""
    while time.monotonic() < deadline:
        try:
            one_session(port, user, password, rng, tally)
        except (OSError, EOFError) as exc:
            tally.errors[type(exc).__name__] += 1


def one_session(port, user, password, rng, tally):
    with Client(port, timeout=30) as client:
        tally.sessions += 1
        assert client.login(user, password, b'L').startswith(b'L OK')
        for number in range(rng.randint(0, 3)):
            message_id = 'soak-' + uuid.uuid4().hex
            body = (b'Subject: %s\r\nFrom: soak@example.test\r\n\r\n' % message_id.encode()
                    + os.urandom(rng.randint(10, 3000)).hex().encode() + b'\r\n')
            tag = b'A%d' % number
            client.send(tag + b' APPEND INBOX {%d+}\r\n' % len(body) + body + b'\r\n')
            lines, tagged = client.read_until_tagged(tag)
            tally.foreign += sum(1 for line in lines if _TAGGED.match(line))
            if tagged.startswith(tag + b' OK'):
                tally.acked.append(message_id)
        lines, tagged = client.command(b'S', b'SELECT INBOX')
        tally.foreign += sum(1 for line in lines if _TAGGED.match(line))
        way = rng.random()
        if way < 0.6:
            client.logout()
        elif way < 0.8:
            client.send(b'F FETCH 1:* (FLAGS)\r\n')            # leave mid-command
        # else: drop the connection abruptly


def count_on_server(server, users):
    """Occurrences of each soak id in the users' INBOXes, read directly from Dovecot."""
    seen = collections.Counter()
    for user, password in users:
        with Client(server.port, timeout=60) as client:
            assert client.login(user, password).startswith(b'L1 OK')
            client.command(b's', b'SELECT INBOX')
            lines, tagged = client.command(b'f', b'FETCH 1:* (BODY.PEEK[HEADER.FIELDS '
                                                 b'(SUBJECT)])')
            for line in lines:
                for match in _SUBJECT.finditer(line):
                    seen[match.group(1).decode()] += 1
    return seen


def run(port, server, users, clients, seconds, seed):
    """Run the soak against a proxy on `port`; return (tally, lost, duplicated)."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    workers = [gevent.spawn(client_loop, port, *users[n % len(users)], deadline,
                            random.Random(seed * 1000 + n), tally) for n in range(clients)]
    gevent.joinall(workers, timeout=seconds + 120)
    seen = count_on_server(server, users)
    lost = [mid for mid in tally.acked if seen[mid] == 0]
    duplicated = [mid for mid in tally.acked if seen[mid] > 1]
    return tally, lost, duplicated


def proc_figures(pid):
    """(RSS kB, peak RSS kB, open files) of a process."""
    status = open('/proc/%d/status' % pid).read()
    rss = int(re.search(r'VmRSS:\s+(\d+)', status).group(1))
    peak = int(re.search(r'VmHWM:\s+(\d+)', status).group(1))
    return rss, peak, len(os.listdir('/proc/%d/fd' % pid))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--clients', type=int, default=40)
    parser.add_argument('--seconds', type=float, default=60)
    parser.add_argument('--users', type=int, default=10)
    parser.add_argument('--seed', type=int, default=1)
    args = parser.parse_args()
    users = [('user%d' % i, 'secret%d' % i) for i in range(1, args.users + 1)]
    workdir = tempfile.mkdtemp(prefix='gimap-soak-')
    with Dovecot(users=dict(users), messages=1) as server:
        port, stats_port = free_port(), free_port()
        ini = os.path.join(workdir, 'proxy.ini')
        with open(ini, 'w') as handle:
            handle.write('[gimapproxy]\nlisten_port = %d\nserver_hostname = 127.0.0.1\n'
                         'server_port = %d\nlog_level = warning\nshutdown_timeout = 2\n'
                         'stats_listen = 127.0.0.1:%d\n' % (port, server.port, stats_port))
        proxy = subprocess.Popen([sys.executable, os.path.join(REPO, 'bin', 'gimapproxy'),
                                  '-c', ini], stderr=open(ini + '.log', 'w'))
        try:
            for _ in range(100):
                try:
                    Client(port).close()
                    break
                except OSError:
                    time.sleep(0.1)
            start = proc_figures(proxy.pid)
            tally, lost, duplicated = run(port, server, users, args.clients, args.seconds,
                                          args.seed)
            time.sleep(1)
            end = proc_figures(proxy.pid)
            import json
            import urllib.request
            with urllib.request.urlopen('http://127.0.0.1:%d/stats' % stats_port) as reply:
                stats = json.load(reply)
        finally:
            proxy.terminate()
            proxy.wait(10)
    print('soak: clients=%d users=%d seconds=%g sessions=%d appends_acked=%d lost=%d '
          'duplicated=%d foreign_replies=%d client_errors=%s'
          % (args.clients, args.users, args.seconds, tally.sessions, len(tally.acked),
             len(lost), len(duplicated), tally.foreign, dict(tally.errors) or 0))
    cached = stats['backend_connections']['cached']
    print('proxy: rss_start=%d kB rss_end=%d kB rss_peak=%d kB fds_start=%d fds_end=%d '
          '(of which cached server connections %d, active clients %d)'
          % (start[0], end[0], end[1], start[2], end[2], cached,
             stats['clients']['current']))
    backends, logins = stats['backend_connections'], stats['logins']
    print('logins: new=%d reused=%d failed=%d %s' % (
        logins['new'], logins['reused'], logins['failed'],
        logins.get('failed_by_reason') or ''))
    print('not reusable, by reason: %s' % (backends.get('not_reusable_by_reason') or '-'))
    print('closed, by reason: %s' % backends['closed_by_reason'])
    return 1 if lost or duplicated or tally.foreign else 0


if __name__ == '__main__':
    sys.exit(main())
