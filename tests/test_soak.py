"""A short soak: nothing acknowledged is lost, nothing duplicated, no foreign replies, and
the proxy's sockets return to baseline (the long run is benchmarks/soak.py)."""
import os

from benchmarks.soak import run
from gimapproxy.cache import State
from tests.conftest import start_proxy, wait_until


def open_fds():
    return len(os.listdir('/proc/self/fd'))


def test_short_soak(dovecot, proxy_log):
    users = dovecot.users[:4]
    proxy = start_proxy(dovecot)
    try:
        proxy_log.wait_for('server check: server=')      # the start-up check is done
        base = open_fds() - proxy.cache.total
        tally, lost, duplicated = run(proxy.server_port, dovecot.server, users, clients=12,
                                      seconds=4, seed=7)
        assert tally.acked and tally.sessions > 20
        assert lost == [] and duplicated == [] and tally.foreign == 0
        wait_until(lambda: not len(proxy.pool), 'the sessions to end', 10)
        wait_until(lambda: not proxy.cache.count(State.CLOSING),
                   'the LOGOUTs of the connections not cached to end')
        # Every socket left is a cached server connection.
        assert open_fds() - proxy.cache.total <= base
    finally:
        proxy.stop(2)
