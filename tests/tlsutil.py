"""A throwaway PKI for TLS tests, made with trustme: a CA, a server certificate, a client
certificate, and a second, unrelated CA for "wrong CA" tests, all as PEM files.

    pki = TestPKI(str(tmp_path))
    Dovecot(tls=(pki.server_cert_file, pki.server_key_file))
    ctx = pki.client_context()                    # trusts pki.ca_file, checks host names
    imaplib.IMAP4_SSL('127.0.0.1', port, ssl_context=ctx)

The server certificate is valid for SERVER_NAMES: "localhost", "imap.test" (DNS names; a
client connecting to 127.0.0.1 can check the name "imap.test" with server_hostname=) and the
IP addresses 127.0.0.1 and 127.0.0.2 (IP SANs).

The SSLContexts are made when asked for, through the `ssl` module's attributes, so they are
gevent's when gevent's monkey-patching is active (tests/conftest.py patches first) and the
stdlib's otherwise; nothing here is bound at import time. No threads, no network.
"""
from __future__ import annotations

import os
import ssl
from typing import Optional, Sequence

import trustme

__all__ = ['SERVER_NAMES', 'SERVER_HOSTNAME', 'CLIENT_NAME', 'TestPKI', 'client_context',
           'server_context']

# Identities in the server certificate's subjectAltName.
SERVER_NAMES = ('localhost', 'imap.test', '127.0.0.1', '127.0.0.2')
# The DNS name that tests check the certificate against (any address reaches the server).
SERVER_HOSTNAME = 'imap.test'
# The (DNS) identity in the client certificate.
CLIENT_NAME = 'client.imap.test'


def _write(blob: 'trustme.Blob', path: str, append: bool = False) -> None:
    blob.write_to_path(path, append=append)


def client_context(cafile: Optional[str] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None, check_hostname: bool = True
                   ) -> ssl.SSLContext:
    """Return a client-side SSLContext (gevent's if patched) that trusts only `cafile`.

    It verifies the server certificate (CERT_REQUIRED) and, if check_hostname, its name;
    with `certfile` (and `keyfile`, else the key is read from certfile) it presents a
    client certificate. cafile None: trust nothing (every server certificate fails).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # CERT_REQUIRED, check_hostname
    ctx.check_hostname = check_hostname
    if cafile is not None:
        ctx.load_verify_locations(cafile=cafile)
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def server_context(certfile: str, keyfile: str, cafile: Optional[str] = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """Return a server-side SSLContext (gevent's if patched) for a fake TLS server.

    With `cafile`, client certificates issued by it are verified: required if
    require_client_cert, else optional.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        ctx.load_verify_locations(cafile=cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class TestPKI:
    """CA, server and client certificates written as PEM files into `directory`.

    Attributes (absolute paths):
      ca_file            the CA certificate (what clients trust)
      server_cert_file   the server certificate followed by its chain (here: just the leaf
                         is signed by the CA directly; the CA itself is not included)
      server_key_file    the server's private key (unencrypted, mode 0600)
      client_cert_file   a client certificate (CN and SAN CLIENT_NAME) from the same CA
      client_key_file    its private key
      other_ca_file      an unrelated CA certificate: trusting it must fail verification
    and server_names (SERVER_NAMES), hostname (SERVER_HOSTNAME), plus `ca`, `other_ca`,
    `server_cert` and `client_cert`, the trustme objects, for tests that need more.
    """

    __test__ = False    # not a pytest test class, despite the name

    def __init__(self, directory: str, server_names: Sequence[str] = SERVER_NAMES) -> None:
        """Create the CAs and certificates and write them into `directory` (created if
        missing; existing files of the same names are overwritten)."""
        os.makedirs(directory, exist_ok=True)
        self.directory = os.path.abspath(directory)
        self.server_names = tuple(server_names)
        self.hostname = SERVER_HOSTNAME
        path = lambda name: os.path.join(self.directory, name)  # noqa: E731
        self.ca_file = path('ca.pem')
        self.server_cert_file = path('server-cert.pem')
        self.server_key_file = path('server-key.pem')
        self.client_cert_file = path('client-cert.pem')
        self.client_key_file = path('client-key.pem')
        self.other_ca_file = path('other-ca.pem')

        self.ca = trustme.CA(organization_name='gimapproxy test CA')
        self.other_ca = trustme.CA(organization_name='gimapproxy unrelated CA')
        self.server_cert = self.ca.issue_cert(*self.server_names,
                                              common_name=self.server_names[0])
        self.client_cert = self.ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)

        _write(self.ca.cert_pem, self.ca_file)
        _write(self.other_ca.cert_pem, self.other_ca_file)
        # Leaf first, then any intermediates (none here: issued by the root directly).
        open(self.server_cert_file, 'wb').close()
        for blob in self.server_cert.cert_chain_pems:
            _write(blob, self.server_cert_file, append=True)
        self._write_key(self.server_cert, self.server_key_file)
        open(self.client_cert_file, 'wb').close()
        for blob in self.client_cert.cert_chain_pems:
            _write(blob, self.client_cert_file, append=True)
        self._write_key(self.client_cert, self.client_key_file)

    @staticmethod
    def _write_key(leaf: 'trustme.LeafCert', path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(leaf.private_key_pem.bytes())

    @property
    def server_tls(self) -> 'tuple[str, str]':
        """(server_cert_file, server_key_file), e.g. for Dovecot(tls=...)."""
        return (self.server_cert_file, self.server_key_file)

    def client_context(self, check_hostname: bool = True, client_cert: bool = False,
                       cafile: Optional[str] = None) -> ssl.SSLContext:
        """A client SSLContext trusting this CA (or `cafile`, e.g. other_ca_file),
        presenting the client certificate if client_cert."""
        return client_context(cafile or self.ca_file,
                              self.client_cert_file if client_cert else None,
                              self.client_key_file if client_cert else None,
                              check_hostname)

    def wrong_ca_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client SSLContext trusting only the unrelated CA: verification must fail."""
        return client_context(self.other_ca_file, check_hostname=check_hostname)

    def server_context(self, require_client_cert: bool = False,
                       verify_clients: bool = False) -> ssl.SSLContext:
        """A server SSLContext with the server certificate; if verify_clients or
        require_client_cert, client certificates from this CA are checked."""
        return server_context(self.server_cert_file, self.server_key_file,
                              self.ca_file if (verify_clients or require_client_cert)
                              else None, require_client_cert)
