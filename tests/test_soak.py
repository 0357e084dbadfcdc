"""A short soak: nothing acknowledged is lost, nothing duplicated, no foreign replies, and
the proxy's sockets return to baseline (the long run is benchmarks/soak.py)."""
import os

import gevent

from benchmarks.soak import run
from tests.conftest import start_proxy


def open_fds():
    return len(os.listdir('/proc/self/fd'))


def test_short_soak(dovecot):
    users = dovecot.users[:4]
    proxy = start_proxy(dovecot)
    try:
        gevent.sleep(0.3)
        base = open_fds() - proxy.cache.total
        tally, lost, duplicated = run(proxy.server_port, dovecot.server, users, clients=12,
                                      seconds=4, seed=7)
        assert tally.acked and tally.sessions > 20
        assert lost == [] and duplicated == [] and tally.foreign == 0
        with gevent.Timeout(10):
            while len(proxy.pool):
                gevent.sleep(0.05)
        gevent.sleep(0.3)
        # Every socket left is a cached server connection.
        assert open_fds() - proxy.cache.total <= base
    finally:
        proxy.stop(2)
