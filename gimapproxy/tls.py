"""TLS contexts from the configuration, towards the server and towards clients.

Towards the server the default is strict: the system trust store (or `tls_ca_file`),
chain and host name verified, SNI sent (RFC 6066 section 3). New backend connections
resume an earlier TLS session instead of doing a full handshake, but only one made with
the same host and the same name: OpenSSL resumes a session without checking the
certificate again, so a session made under one name must never be offered under another.
"""
from __future__ import annotations

import weakref
from typing import Optional

from gevent import ssl

from .config import ProxyConfig

__all__ = ['BackendTLS', 'client_context', 'describe_error']


_VERSIONS = {'tlsv1.2': ssl.TLSVersion.TLSv1_2, 'tlsv1.3': ssl.TLSVersion.TLSv1_3}

# Sessions kept, one per (host, server name): more than the servers of any configuration,
# few enough that a long list of names cannot grow memory.
MAX_SESSIONS = 32


class BackendTLS:
    """How to wrap backend sockets: mode ('starttls' or 'implicit'), context, name."""

    def __init__(self, config: ProxyConfig) -> None:
        self.mode = config.server_tls
        self.server_name = config.tls_server_name    # None: each server's own host name
        context = ssl.create_default_context(cafile=config.tls_ca_file)
        if not config.tls_verify_server:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        if config.tls_ciphers:
            context.set_ciphers(config.tls_ciphers)
        context.minimum_version = _VERSIONS[config.tls_min_version]
        self.context = context
        # (host, name sent) -> the last session made with them, least recently used first.
        self._sessions: dict[tuple[str, str], object] = {}
        # Each wrapped socket's (host, name) until `remember` files its session.
        self._keys: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()

    def wrap(self, sock, host: str):
        """Run the TLS handshake on `sock` with server `host` (checked and sent as SNI
        unless tls_server_name says otherwise), offering for resumption only a session
        made with the same host and the same name.

        Returns the TLS socket. Raises ssl.SSLError (ssl.SSLCertVerificationError when a
        certificate check fails) or OSError.
        """
        key = (host, self.server_name or host)
        session = self._sessions.get(key)
        wrapped = self.context.wrap_socket(sock, server_hostname=key[1], session=session)
        self._keys[wrapped] = key
        return wrapped

    def remember(self, sock) -> None:
        """Keep `sock`'s session for the next connection to the same host under the same
        name (TLS 1.3 sends its ticket after the handshake, so call this once data has
        been read). A socket that `wrap` did not make is ignored."""
        key = self._keys.pop(sock, None)
        session = getattr(sock, 'session', None)
        if key is None or session is None:
            return
        self._sessions.pop(key, None)            # re-inserted: now the most recent
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]


def client_context(config: ProxyConfig) -> Optional[ssl.SSLContext]:
    """The server-side context for clients, or None when no certificate is configured."""
    if not config.client_tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.client_tls_cert_file, config.client_tls_key_file)
    context.minimum_version = _VERSIONS[config.tls_min_version]
    return context


def describe_error(exc: BaseException) -> str:
    """A log phrase saying which TLS check failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return 'certificate check failed: %s' % (exc.verify_message or exc.reason)
    if isinstance(exc, ssl.SSLError):
        return 'TLS failed: %s' % (exc.reason or exc)
    return 'TLS failed: %s' % (getattr(exc, 'strerror', None) or exc)
