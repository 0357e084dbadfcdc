"""ProxyServer: owns the listener, the session pool, the cache and the expiry greenlet.

`start()` returns at once and `stop(timeout)` drains, so the proxy can run inside any
gevent process: this is the embedding API. Nothing here patches, exits or handles
signals; `gimapproxy.cli` does that for the command-line daemon.
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress
import itertools
import logging
import time
from typing import Optional, Union

import gevent
from gevent import socket
from gevent.pool import Pool
from gevent.server import StreamServer

from .backend import BackendConnection, BackendError
from .cache import ConnectionCache
from .config import FLUSH_KEYS, KEYS, RESTART_KEYS, ProxyConfig
from .forward import is_trusted
from .lease import BackendPool, ServerChoice
from .proxyproto import V2_MAX_LENGTH, HeaderError, ProxyHeader, parse_header
from .session import ClientSession
from .stats import METRICS_MISSING, Stats, metrics_available
from .tls import BackendTLS, client_context

__all__ = ['ProxyServer']

log = logging.getLogger('gimapproxy.server')


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The original listens with a backlog of 5, so a burst of webmail requests gets refused
# or stalls in SYN retries; the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def tcp_listener(address: tuple, backlog: int, family: int,
                 reuse_port: bool = False) -> socket.socket:
    """Return a non-blocking TCP socket bound to `address` and listening, with
    SO_REUSEADDR (as gevent sets it) and, when `reuse_port`, SO_REUSEPORT: then several
    processes with the option set can bind the same address, and the kernel spreads new
    connections over their sockets. Raises OSError (its strerror naming the address)
    when it cannot bind."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            exc.strerror = '%s: %r' % (exc.strerror or exc, address)
            raise
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener(StreamServer):
    """A StreamServer that binds with `tcp_listener`, so with SO_REUSEPORT when its
    `reuse_port` is true. A socket passed in ready-bound (embedding) is used as it is."""

    reuse_port = False

    def get_listener(self, address, backlog=None, family=None):
        # gevent declares this a classmethod; an instance method sees reuse_port.
        return tcp_listener(address, self.backlog if backlog is None else backlog,
                            family or socket.AF_INET, self.reuse_port)


def read_proxy_header(sock, timeout: float) -> Union[ProxyHeader, HeaderError]:
    """Read the PROXY protocol header from `sock`, and nothing after it, within
    `timeout` seconds.

    It peeks at what has arrived, then receives only bytes known to be header: the
    parser says how long a complete header is, and an incomplete one is all header. So
    any IMAP bytes already behind the header stay in the socket for the session.

    Returns the header, or a HeaderError saying why there is none: malformed or
    oversized, the peer closed, the time ran out, or a socket error.
    """
    deadline = time.monotonic() + timeout
    taken = b''
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            peeked = sock.recv(V2_MAX_LENGTH - len(taken), socket.MSG_PEEK)
            if not peeked:
                return HeaderError('connection closed %s' % (
                    'inside the header' if taken else 'before the header'))
            result = parse_header(taken + peeked)
            if isinstance(result, HeaderError):
                return result
            end = result.length if isinstance(result, ProxyHeader) else len(taken + peeked)
            while len(taken) < end:
                data = sock.recv(end - len(taken))
                if not data:
                    return HeaderError('connection closed inside the header')
                taken += data
            if isinstance(result, ProxyHeader):
                return result
    except socket.timeout:
        return HeaderError('no complete header within %gs (%d bytes came)'
                           % (timeout, len(taken)))
    except OSError as exc:
        return HeaderError('reading the header failed: %s' % (exc.strerror or exc))
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


class ProxyServer(Listener):
    """The caching IMAP proxy as a gevent StreamServer.

    Args:
        config: the settings; `listen_address` and `listen_port` are used unless
            `listener` (an address tuple or a bound socket) is given. With `reuse_port`
            the sockets it binds itself get SO_REUSEPORT; a bound socket passed in is
            used as it is.
    """

    def __init__(self, config: ProxyConfig, listener=None) -> None:
        self.config = config
        self.cache = cache = ConnectionCache(
            config.cache_size, config.cache_expiration_time, config.max_connections_per_user,
            config.max_auth_age)
        pool = Pool()
        self.metrics = Stats(cache, lambda: len(pool))
        self.counters: collections.Counter = self.metrics.counters
        cache.on_dead = self._cached_connection_died
        cache.on_closed = lambda entry, reason: self.metrics.backend_closed(reason)
        self._ids = itertools.count(1)
        self._expiry: Optional[gevent.Greenlet] = None
        self.choice = ServerChoice(config.servers)
        # What sessions may use, and nothing else.
        self.backend_pool = BackendPool(
            config, cache, self.choice, self.metrics, self._new_backend,
            BackendTLS(config) if config.server_tls != 'off' else None,
            client_context(config))
        if listener is None:
            listener = (config.listen_address or '0.0.0.0', config.listen_port)
        self.reuse_port = config.reuse_port
        # gevent refuses a backlog with a socket that is already listening.
        backlog = None if hasattr(listener, 'accept') else LISTEN_BACKLOG
        super().__init__(listener, spawn=pool, backlog=backlog)
        self.stats_listener = None
        if config.stats_listen:
            from gevent.pywsgi import WSGIServer

            from .wsgi import make_app
            self.stats_listener = WSGIServer(config.stats_listen, make_app(self), log=None,
                                             error_log=logging.getLogger('gimapproxy.http'))
        # Implicit TLS for clients: a second listener feeding the same sessions. The
        # handshake runs in the session, under its login deadline.
        self.tls_listener: Optional[StreamServer] = None
        if config.listen_tls_port:
            self.tls_listener = Listener(
                (config.listen_address or '0.0.0.0', config.listen_tls_port),
                self._handle_tls, spawn=pool, backlog=LISTEN_BACKLOG)
            self.tls_listener.reuse_port = config.reuse_port

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (if not yet bound), start accepting and start the expiry loop. Returns at
        once. Raises OSError when the address cannot be bound."""
        super().start()
        try:
            for listener in (self.tls_listener, self.stats_listener):
                if listener is not None:
                    listener.start()
        except BaseException:
            for listener in (self.tls_listener, self.stats_listener):
                if listener is not None:
                    listener.close()
            super().stop(0)
            raise
        self._expiry = gevent.spawn(self._run_expiry)
        gevent.spawn(self.check_server)
        log.info('listening: address=%s:%d tls_port=%s reuse_port=%s server=%s:%d '
                 'server_tls=%s cache_size=%d', self.address[0], self.address[1],
                 self.tls_listener.server_port if self.tls_listener else '-',
                 'yes' if self.reuse_port else 'no', self.config.server_hostname,
                 self.config.server_port, self.config.server_tls, self.config.cache_size)
        for host, _ in self.config.servers:
            if self.config.server_tls == 'off' and not _is_loopback(host):
                log.warning('server_tls is off: passwords cross the network in clear text '
                            'to %s', host)
        if self.stats_listener is not None and not metrics_available():
            log.warning('metrics unavailable: stats_listen=%s:%d reason=%s (/metrics answers '
                        '501; /stats and /admin work)', self.stats_listener.server_host,
                        self.stats_listener.server_port, METRICS_MISSING)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, give open sessions up to `timeout` seconds (default
        `shutdown_timeout`) to end, then end the rest and log out every cached backend
        connection."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        log.info('stopping: sessions=%d timeout=%gs', len(self.pool), timeout)
        if self.tls_listener is not None:
            self.tls_listener.close()
        super().stop(timeout)
        if self.stats_listener is not None:
            self.stats_listener.stop(1)
        if self._expiry is not None:
            self._expiry.kill()
            self._expiry = None
        # Killed sessions dropped what their leases held; what is left (a LOGOUT under
        # way, say) is closed too, the cached connections with a LOGOUT.
        logged_out = self.cache.close_all('shutdown', timeout)
        log.info('stopped: cached connections logged out=%d', logged_out)

    def handle(self, sock, address, implicit_tls: bool = False) -> None:
        """Run one client's session (called by StreamServer in a pool greenlet)."""
        self.counters['clients'] += 1
        if len(self.pool) > self.config.max_clients:
            # Refuse, and keep accepting; the pool counts this greenlet too.
            self.counters['clients_refused'] += 1
            log.warning('client refused: peer=%s:%s reason=max_clients %d reached',
                        address[0], address[1], self.config.max_clients)
            try:
                if not implicit_tls:
                    sock.sendall(b'* BYE Too many connections, try again later.\r\n')
            except OSError:
                pass
            sock.close()
            return
        header = None
        if self.config.proxy_protocol:
            header = self._proxy_header(sock, address)
            if header is None:
                return
        real = address
        if header is not None and header.source is not None:
            # From here on the client is where the balancer saw it: peer, origin, the
            # trusted_networks check for its ID fields, and the ID sent to the server.
            address = header.source
        session = ClientSession(self.backend_pool, self._next_id('c'), sock, address,
                                implicit_tls)
        if header is not None:
            log.debug('proxy header: id=%s peer=%s:%s via=%s:%s version=%d command=%s '
                      'family=%s', session.id, address[0], address[1], real[0], real[1],
                      header.version, header.command, header.family)
        session.run()

    def _proxy_header(self, sock, address) -> Optional[ProxyHeader]:
        """Read the PROXY protocol header that must start the connection, before the
        greeting. Returns it, or None after closing the connection with one log line:
        the peer is not in trusted_networks (it may not say where clients are), or no
        valid header came within preauth_timeout."""
        if not is_trusted(address[0], self.config.trusted_networks):
            self._refuse_header(sock, address, 'peer not in trusted_networks')
            return None
        try:
            result = read_proxy_header(sock, self.config.preauth_timeout)
        except gevent.GreenletExit:
            self._refuse_header(sock, address, 'server shutdown')
            raise
        if isinstance(result, HeaderError):
            self._refuse_header(sock, address, result.reason)
            return None
        return result

    def _refuse_header(self, sock, address, reason: str) -> None:
        self.counters['clients_refused'] += 1
        log.warning('client refused: id=%s peer=%s:%s reason=proxy protocol: %s',
                    self._next_id('c'), address[0], address[1], reason)
        sock.close()

    def _handle_tls(self, sock, address) -> None:
        self.handle(sock, address, implicit_tls=True)

    def reload(self, config: ProxyConfig) -> tuple[list, list]:
        """Take a new configuration without dropping sessions.

        Returns (keys that changed and took effect, keys that changed but need a
        restart: RESTART_KEYS, which keep their running values). New sessions and new
        server connections use the new settings; when one of FLUSH_KEYS changed (the
        server, its TLS settings, username_case, cache_per_client_ip), cached
        connections are logged out.
        """
        changed = [key.name for key in KEYS
                   if getattr(config, key.name) != getattr(self.config, key.name)]
        restart = [name for name in changed if name in RESTART_KEYS]
        live = [name for name in changed if name not in RESTART_KEYS]
        flushing = [name for name in live if name in FLUSH_KEYS]
        pool = self.backend_pool
        pool.backend_tls = BackendTLS(config) if config.server_tls != 'off' else None
        pool.client_tls = client_context(config)
        # Keys a restart needs keep their running values, so the config stays true.
        self.config = pool.config = dataclasses.replace(
            config, **{name: getattr(self.config, name) for name in restart})
        cache = self.cache
        cache.size = config.cache_size
        cache.expiration = config.cache_expiration_time
        cache.per_user = config.max_connections_per_user
        cache.max_auth_age = config.max_auth_age
        self.choice.servers = config.servers
        # Cached connections lead to the old server or TLS settings, or were cached under
        # keys that no login would match again.
        if flushing:
            self.flush(None, 'reload changed %s' % ','.join(flushing))
        return live, restart

    def flush(self, user: Optional[bytes] = None, reason: str = 'admin flush') -> int:
        """Log out the cached connections of `user` (compared as username_case says),
        or all; active ones are not cached again. Returns how many were logged out."""
        return self.cache.flush(None if user is None else self.config.fold_username(user),
                                reason)

    def stats(self) -> dict:
        """The proxy's numbers as a JSON-able dict (as served on /stats)."""
        return self.metrics.snapshot()

    # -- expiry ---------------------------------------------------------------------------

    def _run_expiry(self) -> None:
        while True:
            gevent.sleep(self.config.expiry_interval)
            self.expire_once()

    def expire_once(self, now: Optional[float] = None) -> int:
        """Log out every cached connection idle for `cache_expiration_time` (or past
        max_auth_age); return how many. The logouts run in their own greenlets so that a
        stuck server cannot hold up the sweep."""
        expired = self.cache.expire_idle(now)
        self.counters['expired'] += expired
        return expired

    def check_server(self) -> bool:
        """Connect to each server once and read its greeting (TLS included), to tell the
        operator at start whether they are there; logins work or fail on their own
        anyway. Returns True when all answered. These connections are not the cache's:
        they are not counted."""
        config, healthy = self.config, True
        for address in config.servers:
            conn = self._new_backend(address)
            try:
                conn.connect(config.connect_timeout, self.backend_pool.backend_tls)
            except BackendError as exc:
                conn.close('startup check failed: %s' % exc.reason)
                log.warning('server check failed: server=%s:%d reason=%s (logins get NO '
                            '[UNAVAILABLE] until it answers)', address[0], address[1],
                            exc.reason)
                self.choice.failed(address)
                healthy = False
                continue
            conn.send_logout()
            conn.close('startup check')
            log.info('server check: server=%s:%d ok', *address)
        return healthy

    # -- backend connections --------------------------------------------------------------

    def _new_backend(self, address: tuple) -> BackendConnection:
        """A new, not yet connected backend connection to `address`."""
        return BackendConnection(address, self._next_id('b'))

    def _cached_connection_died(self, entry) -> None:
        self.counters['cached_died'] += 1

    def servers_for(self, user: bytes) -> list:
        """The servers to try for `user`'s new connection, best first (ServerChoice)."""
        return self.choice.order(user)

    def _next_id(self, prefix: str) -> str:
        """A new connection id unique in this server: 'c<n>' for clients, 'b<n>' for
        backend connections."""
        return '%s%d' % (prefix, next(self._ids))
