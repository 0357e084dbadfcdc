"""What a login through the proxy costs with TLS towards the server, new and reused.

    python3 benchmarks/tls_login.py [--rounds N]

Starts a throwaway Dovecot with TLS (tests/backends.py, certificates from
tests/tlsutil.py) and, in this process, proxies in front of it: one with implicit TLS to
the server, one with STARTTLS, and for reference one in clear text to a plain Dovecot. Each
round starts a fresh proxy and logs in the 20 users once (new: connect, TLS, ID, LOGIN at
the server) and then again (reused: no server traffic at all). Prints the median time from
sending LOGIN to the tagged OK, as the client sees it, and how many new TLS connections
resumed an earlier session.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from gevent import monkey

monkey.patch_all()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gimapproxy import ProxyServer, make_config  # noqa: E402
from tests.backends import Dovecot  # noqa: E402
from tests.tlsutil import TestPKI  # noqa: E402
from tests.wire import Client  # noqa: E402

USERS = [('user%d' % i, 'secret%d' % i) for i in range(1, 21)]


def timed_login(port, user, password):
    """Seconds from sending LOGIN to reading its tagged reply."""
    with Client(port) as client:
        started = time.perf_counter()
        reply = client.login(user, password)
        elapsed = time.perf_counter() - started
        assert reply.startswith(b'L1 OK'), reply
        client.logout()
    return elapsed


def measure(settings, rounds):
    """Median new and reused login times (ms) and resumed/new TLS counts."""
    new, reused, resumed = [], [], 0
    for _ in range(rounds):
        proxy = ProxyServer(make_config(dict(settings, listen_port='0', log_level='warning')))
        proxy.start()
        try:
            for user, password in USERS:
                new.append(timed_login(proxy.server_port, user, password))
            for user, password in USERS:
                reused.append(timed_login(proxy.server_port, user, password))
            tls = proxy.backend_tls
            resumed += tls.resumed if tls is not None else 0
        finally:
            proxy.stop(2)
    return (statistics.median(new) * 1000, statistics.median(reused) * 1000, resumed,
            len(new))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    pki = TestPKI(tempfile.mkdtemp(prefix='gimap-pki-'))
    # Dovecot resumes TLS sessions only in its "performance mode" (one imap-login process
    # for many connections); tls_resumption turns that on.
    with Dovecot(tls=pki.server_tls, tls_resumption=True) as tls_server, \
            Dovecot() as plain_server:
        common = {'server_hostname': tls_server.host, 'tls_ca_file': pki.ca_file}
        rows = [
            ('clear text', {'server_hostname': plain_server.host,
                            'server_port': str(plain_server.port)}),
            ('implicit TLS', dict(common, server_tls='implicit',
                                  server_port=str(tls_server.tls_port))),
            ('STARTTLS', dict(common, server_tls='starttls', server_port=str(tls_server.port))),
        ]
        print('login through gimapproxy, median ms from LOGIN to OK (%d rounds x %d users)'
              % (args.rounds, len(USERS)))
        print('%-14s %10s %10s %16s' % ('to the server', 'new', 'reused', 'TLS resumed'))
        for name, settings in rows:
            new, reused, resumed, count = measure(settings, args.rounds)
            shown = '%d of %d' % (resumed, count) if 'tls' in name.lower() else '-'
            print('%-14s %10.2f %10.3f %16s' % (name, new, reused, shown))


if __name__ == '__main__':
    main()
