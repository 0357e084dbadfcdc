"""Logging in to the server: the proxy's own ID, then AUTHENTICATE PLAIN or LOGIN.

The commands go through BackendConnection (gimapproxy.backend), with proxy-owned tags;
this module only says what to send and what the answers mean.
"""
from __future__ import annotations

import base64
import logging

import gevent

from .backend import BackendConnection, BackendUnavailable, LoginRefused
from .logfmt import printable
from .protocol import Response, code_capabilities, login_command, quote, untagged_capabilities

__all__ = ['identify', 'login']

log = logging.getLogger('gimapproxy.backend')


def identify(conn: BackendConnection, fields: list, timeout: float) -> None:
    """Send ID with `fields` (name, value byte pairs) as the first command, when the
    server offers ID (RFC 2971). A refusal is logged, not fatal.

    Raises:
        BackendError: timeout, EOF, a foreign tag.
    """
    if b'ID' not in conn.capability_set() or not fields:
        return
    items = []
    for name, value in fields:
        try:
            items.append(quote(name) + b' ' + quote(value))
        except ValueError:
            continue              # a value that needs a literal: leave it out
    with gevent.Timeout(timeout, BackendUnavailable('ID timeout')):
        response, _ = conn.command(b'ID (' + b' '.join(items) + b')')
    if response.status != b'OK':
        log.info('backend refused ID: id=%s status=%s', conn.id,
                 printable(response.status))


def login(conn: BackendConnection, authzid: bytes, user: bytes, password: bytes,
          timeout: float) -> None:
    """Authenticate as `user`; on success `conn.capabilities` holds the post-login list.

    AUTHENTICATE PLAIN is preferred (it carries an authzid and UTF-8), LOGIN is the
    fallback. The proxy never sends a password to a server that says
    LOGINDISABLED (RFC 3501 section 6.2.3).

    Raises:
        LoginRefused: the server said NO or BAD.
        BackendUnavailable: timeout, EOF, or no usable mechanism.
        BackendDesync: the server answered with a tag we did not send.
    """
    caps = conn.capability_set()
    with gevent.Timeout(timeout, BackendUnavailable('login timeout after %gs' % timeout)):
        if b'LOGINDISABLED' in caps:
            raise BackendUnavailable('server says LOGINDISABLED: it wants TLS '
                                     '(see server_tls)')
        if b'AUTH=PLAIN' in caps:
            response, untagged = _authenticate_plain(conn, authzid, user, password,
                                                     b'SASL-IR' in caps)
        elif authzid:
            raise BackendUnavailable('server offers no AUTH=PLAIN for an authzid login')
        else:
            response, untagged = _login_command(conn, user, password, caps)
        if response.status != b'OK':
            raise LoginRefused(response)
        conn.login_text = response.text or b'Logged in'
        # The post-login list comes in the OK's code, as untagged data during the
        # login (Dovecot), or has to be asked for.
        caps_after = code_capabilities(response) or untagged_capabilities(
            untagged) or conn.ask_capabilities()
        conn.capabilities = caps_after
    if conn.tls is not None:
        conn.tls.remember(conn.sock)
        log.debug('backend TLS: id=%s version=%s resumed=%s', conn.id,
                  conn.sock.version(), 'yes' if conn.sock.session_reused else 'no')


def _authenticate_plain(conn: BackendConnection, authzid: bytes, user: bytes, password: bytes,
                        sasl_ir: bool) -> tuple[Response, list[bytes]]:
    # RFC 4616 section 2: message = [authzid] NUL authcid NUL passwd.
    payload = base64.b64encode(authzid + b'\0' + user + b'\0' + password)
    tag = conn.next_tag()
    if sasl_ir:
        # RFC 4959 section 3: the initial response goes on the command line.
        conn.send(tag + b' AUTHENTICATE PLAIN ' + (payload or b'=') + b'\r\n')
        return conn.read_tagged(tag)
    conn.send(tag + b' AUTHENTICATE PLAIN\r\n')
    return conn.read_tagged(tag, continuation=payload + b'\r\n')


def _login_command(conn: BackendConnection, user: bytes, password: bytes,
                   caps: set) -> tuple[Response, list[bytes]]:
    tag = conn.next_tag()
    pieces, tail = login_command(tag, user, password, caps)
    for head, literal, non_sync in pieces:
        conn.send(head)
        if not non_sync:
            response = conn.wait_continuation(tag)
            if response is not None:
                return response, []
        conn.send(literal)
    conn.send(tail)
    return conn.read_tagged(tag)
