"""The client's address for the server: the fields of the proxy's own ID (RFC 2971).

Pure functions; the session supplies addresses and the client's own ID fields.
"""
from __future__ import annotations

import ipaddress
from typing import Optional

__all__ = ['is_trusted', 'id_fields', 'originating_ip']

# Fields that say where a connection comes from: Dovecot's imap-login honours them from
# login_trusted_networks, so the proxy takes them from a client only when it trusts that
# client too.
_FORWARDING = (b'x-originating-', b'x-connected-', b'x-session-', b'x-proxy-ttl',
               b'x-forward-')


def is_trusted(ip: str, networks: tuple) -> bool:
    """True when `ip` is inside one of `networks` (ipaddress networks)."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip.split('%')[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _field(fields: list, name: bytes) -> Optional[bytes]:
    for key, value in fields:
        if key.lower() == name:
            return value
    return None


def originating_ip(client_fields: list, peer_ip: str, trusted: bool) -> str:
    """The address the session stands for: a trusted client's x-originating-ip, else
    the client's own address."""
    if trusted:
        value = _field(client_fields, b'x-originating-ip')
        if value:
            return value.decode('ascii', 'replace')
    return peer_ip


def id_fields(client_fields: list, peer: tuple, local: tuple, session_id: str,
              trusted: bool) -> list:
    """The proxy's ID for a new server connection, as (name, value) byte pairs.

    The client's own fields come first; its forwarding fields only when it is
    `trusted`, and then they win over the proxy's view of the connection.
    """
    keep = [(key, value) for key, value in client_fields
            if value is not None and (trusted or not key.lower().startswith(_FORWARDING))]
    own = [(b'x-originating-ip', peer[0]), (b'x-originating-port', str(peer[1])),
           (b'x-connected-ip', local[0]), (b'x-connected-port', str(local[1])),
           (b'x-session-ext-id', session_id)]
    names = {key.lower() for key, _ in keep}
    return keep + [(key, value.encode()) for key, value in own if key not in names]
