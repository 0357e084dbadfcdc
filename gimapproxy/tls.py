"""TLS contexts from the configuration, towards the server and towards clients.

Towards the server the default is strict: the system trust store (or `tls_ca_file`),
chain and host name verified, SNI sent (R49). The last TLS session is kept and offered on
the next connection, so that new backend connections resume instead of doing a full
handshake.
"""
from __future__ import annotations

import logging
from typing import Optional

from gevent import ssl

from .config import ProxyConfig

__all__ = ['BackendTLS', 'client_context', 'describe_error']

log = logging.getLogger('gimapproxy.tls')

_VERSIONS = {'tlsv1.2': ssl.TLSVersion.TLSv1_2, 'tlsv1.3': ssl.TLSVersion.TLSv1_3}


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
        self._session = None
        self.resumed = 0              # new connections that resumed an earlier session

    def wrap(self, sock, host: str):
        """Run the TLS handshake on `sock` with server `host` (checked and sent as SNI
        unless tls_server_name says otherwise), offering the last session for resumption.

        Returns the TLS socket. Raises ssl.SSLError (ssl.SSLCertVerificationError when a
        certificate check fails) or OSError.
        """
        return self.context.wrap_socket(sock, server_hostname=self.server_name or host,
                                        session=self._session)

    def remember(self, sock) -> None:
        """Keep `sock`'s session for the next connection (TLS 1.3 sends its ticket after
        the handshake, so call this once data has been read)."""
        if sock.session_reused:
            self.resumed += 1
        session = getattr(sock, 'session', None)
        if session is not None:
            self._session = session


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
