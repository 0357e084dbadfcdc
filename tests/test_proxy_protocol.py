"""The PROXY protocol on the listener (HAProxy's doc/proxy-protocol.txt).

(a) the pure parser, byte by byte: every input is also fed in splits of 1, 2, 3 and 7
bytes, and every prefix of it must answer "need more" or the whole input's answer;
(b) the proxy with raw headers over real sockets, against a real Dovecot that trusts the
proxy's ID, so its log shows the address the header carried;
(c) a real HAProxy in TCP mode in front of the proxy, with send-proxy and send-proxy-v2.
"""
import os
import re
import shutil
import socket
import struct
import subprocess
import time

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gimapproxy.proxyproto import (NEED_MORE, V1_MAX_LENGTH, V2_MAX_LENGTH, V2_SIGNATURE,
                                   HeaderError, NeedMore, ProxyHeader, parse_header)
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, free_port, require_dovecot
from tests.conftest import Backend, start_proxy, wait_until
from tests.wire import Client

SPLITS = [1, 2, 3, 7]


def v2(command: int, family: int, block: bytes, length=None) -> bytes:
    """A version 2 header: signature, version 2 and `command`, `family`, the length
    (that of `block` unless given) and `block`."""
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack('!H', size) + block


def v2_tcp4(src: str, sport: int, dst: str, dport: int, tlvs: bytes = b'') -> bytes:
    return v2(1, 0x11, socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack('!HH', sport, dport) + tlvs)


def v2_tcp6(src: str, sport: int, dst: str, dport: int, tlvs: bytes = b'') -> bytes:
    return v2(1, 0x21, socket.inet_pton(socket.AF_INET6, src)
              + socket.inet_pton(socket.AF_INET6, dst) + struct.pack('!HH', sport, dport)
              + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack('!H', len(value)) + value


# -- (a) the pure parser ------------------------------------------------------------------

def parse_in_steps(data: bytes, step: int):
    """Feed `data` `step` bytes at a time, asking after each piece, as a reader would;
    return the first answer that is not NEED_MORE (or NEED_MORE at the end)."""
    buf = b''
    result = parse_header(buf)
    assert result is NEED_MORE
    for start in range(0, len(data), step):
        buf += data[start:start + step]
        result = parse_header(buf)
        if result is not NEED_MORE:
            break
    return result


def check_every_split(data: bytes):
    """The whole input's answer; every prefix answers NEED_MORE or that same answer,
    a complete header only once all its bytes are there, and every split ends the
    same."""
    whole = parse_header(data)
    for end in range(len(data) + 1):
        part = parse_header(data[:end])
        assert part is NEED_MORE or part == whole, (end, part, whole)
        if isinstance(whole, ProxyHeader):
            assert (part is NEED_MORE) == (end < whole.length), (end, part)
    for step in SPLITS:
        assert parse_in_steps(data, step) == whole, step
    return whole


V1_GOOD = [
    (b'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n',
     ProxyHeader(1, 'PROXY', 'TCP4', ('192.168.0.1', 56324), ('192.168.0.11', 443), 47)),
    (b'PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n',
     ProxyHeader(1, 'PROXY', 'TCP4', ('0.0.0.0', 0), ('255.255.255.255', 65535), 44)),
    (b'PROXY TCP6 2001:DB8::7 ::1 40000 143\r\n',
     ProxyHeader(1, 'PROXY', 'TCP6', ('2001:db8::7', 40000), ('::1', 143), 38)),
    (b'PROXY TCP6 ::FFFF:192.0.2.7 ::ffff:c000:201 1 2\r\n',
     ProxyHeader(1, 'PROXY', 'TCP6', ('::ffff:192.0.2.7', 1), ('::ffff:192.0.2.1', 2), 49)),
    (b'PROXY UNKNOWN\r\n', ProxyHeader(1, 'PROXY', 'UNKNOWN', None, None, 15)),
    # UNKNOWN: whatever follows up to the CRLF is ignored (section 2.1).
    (b'PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff '
     b'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n',
     ProxyHeader(1, 'PROXY', 'UNKNOWN', None, None, 107)),
]

# Each must be refused, with a reason saying why.
V1_BAD = [
    (b'a1 LOGIN alice secret\r\n', 'not a PROXY protocol header'),
    (b'PROXY\r\n', 'not a PROXY protocol header'),
    (b'proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n', 'not a PROXY protocol header'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n', 'bare LF'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX', 'CR without LF'),
    (b'PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n', 'not TCP4, TCP6 or UNKNOWN'),
    (b'PROXY UNKNOWNX\r\n', 'not TCP4, TCP6 or UNKNOWN'),
    (b'PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n', 'needs 6 fields'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n', 'needs 6 fields'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n', 'needs 6 fields'),
    (b'PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n', 'not a canonical IPv4'),   # octal-looking
    (b'PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n', 'not a canonical IPv4'),
    (b'PROXY TCP4 ::1 5.6.7.8 1 2\r\n', 'not a canonical IPv4'),
    (b'PROXY TCP6 1.2.3.4 ::1 1 2\r\n', 'not a canonical IPv6'),
    (b'PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n', 'not a canonical IPv6'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n', 'port is not a number'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n', 'port is not a number'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n', 'port is not a number'),
    # Oversized: no CRLF within 107 bytes; a CRLF that ends at byte 108.
    (b'PROXY UNKNOWN ' + b'x' * 200 + b'\r\n', 'longer than 107 bytes'),
    (b'PROXY UNKNOWN ' + b'x' * 92 + b'\r\n', 'longer than 107 bytes'),
]


def test_v1_limit_is_exactly_107_bytes():
    line = b'PROXY UNKNOWN ' + b'x' * 91 + b'\r\n'
    assert len(line) == V1_MAX_LENGTH
    assert check_every_split(line).length == V1_MAX_LENGTH
    # Refused at the 107th byte already, without waiting for more.
    assert isinstance(parse_header(b'PROXY UNKNOWN ' + b'x' * 93), HeaderError)


def test_v1_refused_as_early_as_possible():
    assert isinstance(parse_header(b'a'), HeaderError)
    assert isinstance(parse_header(b'PROXZ'), HeaderError)
    assert parse_header(b'PROXY TCP4 1.2.3.4') is NEED_MORE


V2_GOOD = [
    (v2_tcp4('192.0.2.7', 40000, '10.0.0.1', 143),
     ProxyHeader(2, 'PROXY', 'TCP4', ('192.0.2.7', 40000), ('10.0.0.1', 143), 28)),
    (v2_tcp6('2001:db8::7', 1, '2001:db8::1', 993),
     ProxyHeader(2, 'PROXY', 'TCP6', ('2001:db8::7', 1), ('2001:db8::1', 993), 52)),
    (v2_tcp6('::ffff:192.0.2.7', 1, '::1', 993),
     ProxyHeader(2, 'PROXY', 'TCP6', ('::ffff:192.0.2.7', 1), ('::1', 993), 52)),
    # TLVs (a unique id, the SNI, padding) are skipped.
    (v2_tcp4('192.0.2.7', 40000, '10.0.0.1', 143,
             tlv(0x05, b'x' * 128) + tlv(0x02, b'imap.example.org') + tlv(0x04, b'')),
     ProxyHeader(2, 'PROXY', 'TCP4', ('192.0.2.7', 40000), ('10.0.0.1', 143), 181)),
    # LOCAL: the balancer's own connection (a health check); addresses ignored, even
    # when present, and the length is still honoured.
    (v2(0, 0x00, b''), ProxyHeader(2, 'LOCAL', 'UNSPEC', None, None, 16)),
    (v2(0, 0x11, b'\x00' * 12), ProxyHeader(2, 'LOCAL', 'UNSPEC', None, None, 28)),
    (v2(0, 0xff, b''), ProxyHeader(2, 'LOCAL', 'UNSPEC', None, None, 16)),
    # Families without a client IP: the real connection's address is used.
    (v2(1, 0x00, b''), ProxyHeader(2, 'PROXY', 'UNSPEC', None, None, 16)),
    (v2(1, 0x31, b'/s' + b'\x00' * 214), ProxyHeader(2, 'PROXY', 'UNIX', None, None, 232)),
    (v2(1, 0x12, b'\x00' * 12), ProxyHeader(2, 'PROXY', 'UDP4', None, None, 28)),
]

V2_BAD = [
    (V2_SIGNATURE + b'\x11\x11\x00\x0c' + b'\x00' * 12, 'with version 1'),
    (V2_SIGNATURE + b'\x31\x11\x00\x0c' + b'\x00' * 12, 'with version 3'),
    (V2_SIGNATURE + b'\x22\x11\x00\x0c' + b'\x00' * 12, 'command 2 is neither'),
    (V2_SIGNATURE + b'\x2f\x11\x00\x0c' + b'\x00' * 12, 'command 15 is neither'),
    (v2(1, 0x41, b'\x00' * 12), 'byte 0x41 is not defined'),
    (v2(1, 0x13, b'\x00' * 12), 'byte 0x13 is not defined'),
    (v2(1, 0x11, b'\x00' * 8), 'TCP4 address block is 8 bytes, needs 12'),
    (v2(1, 0x21, b'\x00' * 12), 'TCP6 address block is 12 bytes, needs 36'),
    # Oversized: refused as soon as the length is read, without waiting for the bytes.
    (v2(1, 0x11, b'', length=65535), 'is over the limit'),
    (v2(1, 0x11, b'', length=V2_MAX_LENGTH - 15), 'is over the limit'),
    # Almost the signature.
    (V2_SIGNATURE[:11] + b'X' + b'\x21\x11\x00\x00', 'not a PROXY protocol header'),
    (b'\r\n\r\nGET', 'not a PROXY protocol header'),
]


@pytest.mark.parametrize('data, expected', V1_GOOD + V2_GOOD)
def test_headers(data, expected):
    assert check_every_split(data) == expected
    # Bytes after the header are the client's: not part of it, not looked at.
    assert check_every_split(data + b'a1 CAPABILITY\r\n') == expected


@pytest.mark.parametrize('data, reason', V1_BAD + V2_BAD)
def test_malformed_and_oversized(data, reason):
    result = check_every_split(data)
    assert isinstance(result, HeaderError) and reason in result.reason, result


def test_v2_limits():
    largest = v2_tcp4('192.0.2.7', 1, '10.0.0.1', 2, tlv(0x04, b'\x00' * (V2_MAX_LENGTH - 31)))
    assert len(largest) == V2_MAX_LENGTH
    assert check_every_split(largest).length == V2_MAX_LENGTH
    assert isinstance(parse_header(largest, max_size=V2_MAX_LENGTH - 1), HeaderError)
    # A truncated header is only ever "need more": the reader's timeout ends it.
    assert parse_header(largest[:-1]) is NEED_MORE
    assert parse_header(V2_SIGNATURE[:5]) is NEED_MORE


PIECES = [V2_SIGNATURE, V2_SIGNATURE[:7], b'PROXY ', b'TCP4 ', b'TCP6 ', b'UNKNOWN',
          b'192.0.2.7 ', b'::1 ', b'143 ', b'65535', b' ', b'\r\n', b'\r', b'\n', b'\x00',
          b'\x20\x11', b'\x21\x21', b'\x20\x00', b'\x00\x0c', b'\x00\x24', b'\xff\xff',
          b'x' * 60]
header_like = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=24)),
                       max_size=12).map(b''.join)


@settings(max_examples=400, deadline=None)
@given(data=header_like, cut=st.integers(min_value=0, max_value=400))
def test_fuzz_only_need_more_header_or_error(data, cut):
    result = parse_header(data)
    assert isinstance(result, (NeedMore, ProxyHeader, HeaderError)), result
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), V2_MAX_LENGTH)
        assert result.version == 1 or result.length >= 16
    if isinstance(result, HeaderError):
        assert result.reason
    if result is NEED_MORE:
        assert len(data) < V2_MAX_LENGTH
    # Any prefix says "need more" or the same thing.
    part = parse_header(data[:cut])
    assert part is NEED_MORE or part == result, (part, result)


# -- (b) the proxy, with raw headers over real sockets ------------------------------------

USERS = [('user%d' % i, 'secret%d' % i) for i in range(1, 21)]


@pytest.fixture(scope='module')
def rip_dovecot():
    """A Dovecot that trusts the proxy's address, so its login lines show the address
    the proxy forwards in its ID (rip=)."""
    require_dovecot()
    with Dovecot(trusted_networks='127.0.0.1/32', extra_conf=NO_AUTH_PENALTY_CONF) as server:
        yield server


@pytest.fixture
def proxies(rip_dovecot):
    started = []

    def make(**values):
        started.append(start_proxy(Backend('dovecot', rip_dovecot, USERS), **values))
        return started[-1]
    yield make
    for proxy in started:
        proxy.stop(2)


def pp_proxy(proxies, **values):
    """A proxy that wants the PROXY protocol from 127.0.0.1."""
    values = {'proxy_protocol': 'yes', 'trusted_networks': '127.0.0.1/32', **values}
    return proxies(**values)


class ProxiedClient(Client):
    """A client that sends `header` (in pieces of `step` bytes, when given) before it
    waits for the greeting, as a load balancer does."""

    def __init__(self, port, header, step=0, source='', timeout=10.0):
        self.sock = socket.create_connection(
            ('127.0.0.1', port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(header), step or len(header) or 1):
            self.sock.sendall(header[start:start + (step or len(header))])
            if step:
                # A pause, so that each piece comes in a read of its own: the proxy must
                # put the header together across reads.
                gevent.sleep(0.002)
        self.buf = b''
        self.greeting = self.readline()


def refused(port, data, source='', timeout=10.0) -> bytes:
    """Connect, send `data`, and return what came before the proxy closed."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        if data:
            sock.sendall(data)
        received = b''
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:      # closed with our bytes unread: a reset
                return received
            if not chunk:
                return received
            received += chunk


def wait_line(proxy_log, pattern: str, timeout: float = 5.0) -> str:
    """The first log line matching `pattern` (a regex), waiting for it to be logged."""
    def first():
        return next((line for line in proxy_log.lines if re.search(pattern, line)), None)
    try:
        wait_until(lambda: first() is not None, 'a log line %r' % pattern, timeout)
    except AssertionError as exc:
        raise AssertionError('%s in:\n%s' % (exc, '\n'.join(proxy_log.lines))) from None
    return first()


def session_lines(proxy_log, peer: str) -> dict:
    """The `client connected` and `login` lines of the session whose peer is `peer`."""
    connected = wait_line(proxy_log, r'^client connected: id=c\d+ peer=%s ' % re.escape(peer))
    cid = re.search(r'id=(c\d+)', connected).group(1)
    login = wait_line(proxy_log, r'^login: id=%s ' % cid)
    return {'connected': connected, 'login': login, 'id': cid}


def login_line(server, user):
    server.wait_login_count(1, user=user)
    return server.login_lines(user)[-1]


@pytest.mark.parametrize('version, step', [(1, 0), (1, 1), (2, 0), (2, 3)])
def test_header_gives_the_client_address(rip_dovecot, proxies, proxy_log, version, step):
    proxy = pp_proxy(proxies)
    user, password = USERS[version * 2 + bool(step)]
    if version == 1:
        header = b'PROXY TCP4 192.0.2.7 10.0.0.1 40001 1143\r\n'
    else:
        header = v2_tcp4('192.0.2.7', 40001, '10.0.0.1', 1143, tlv(0x05, b'id-1'))
    with ProxiedClient(proxy.server_port, header, step) as client:
        assert client.greeting.startswith(b'* OK [CAPABILITY ')
        assert client.login(user, password).startswith(b'L1 OK')
        client.logout()
    lines = session_lines(proxy_log, '192.0.2.7:40001')
    assert 'peer=192.0.2.7:40001' in lines['login'] and 'user=%s' % user in lines['login']
    via = wait_line(proxy_log, r'^proxy header: id=%s ' % lines['id'])
    assert re.search(r'via=127\.0\.0\.1:\d+ version=%d command=PROXY family=TCP4'
                     % version, via), via
    # The server is told the same address in the proxy's ID.
    assert 'rip=192.0.2.7,' in login_line(rip_dovecot, user)


def test_ipv6_source(rip_dovecot, proxies, proxy_log):
    proxy = pp_proxy(proxies)
    user, password = USERS[6]
    header = v2_tcp6('2001:db8::7', 40002, '2001:db8::1', 143)
    with ProxiedClient(proxy.server_port, header) as client:
        assert client.login(user, password).startswith(b'L1 OK')
    session_lines(proxy_log, '2001:db8::7:40002')
    assert 'rip=2001:db8::7,' in login_line(rip_dovecot, user)


def test_bytes_behind_the_header_are_kept(proxies, proxy_log):
    """A client that sends its first command with the header loses nothing: only the
    header is read before the greeting."""
    proxy = pp_proxy(proxies)
    for header in (b'PROXY TCP4 192.0.2.8 10.0.0.1 40003 1143\r\n',
                   v2_tcp4('192.0.2.8', 40004, '10.0.0.1', 1143)):
        with ProxiedClient(proxy.server_port, header + b'a1 CAPABILITY\r\n') as client:
            assert client.greeting.startswith(b'* OK ')
            lines, tagged = client.read_until_tagged(b'a1')
            assert tagged.startswith(b'a1 OK') and lines[0].startswith(b'* CAPABILITY ')


@pytest.mark.parametrize('header', [v2(0, 0x00, b''), b'PROXY UNKNOWN\r\n'],
                         ids=['v2-local', 'v1-unknown'])
def test_local_and_unknown_keep_the_real_address(proxies, proxy_log, header):
    proxy = pp_proxy(proxies)
    user, password = USERS[7]
    with ProxiedClient(proxy.server_port, header) as client:
        port = client.sock.getsockname()[1]
        assert client.login(user, password).startswith(b'L1 OK')
    session_lines(proxy_log, '127.0.0.1:%d' % port)


@pytest.mark.parametrize('data, reason', [
    (b'a1 LOGIN user1 secret1\r\n', 'not a PROXY protocol header'),
    (b'PROXY TCP4 192.0.2.7 10.0.0.1 40001 1143\n', 'bare LF'),
    (b'PROXY TCP4 192.0.2.07 10.0.0.1 40001 1143\r\n', 'not a canonical IPv4'),
    (b'PROXY UNKNOWN ' + b'x' * 300, 'longer than 107 bytes'),
    (V2_SIGNATURE + b'\x21\x11\xff\xff' + b'\x00' * 100, 'is over the limit'),
    (V2_SIGNATURE + b'\x25\x11\x00\x0c' + b'\x00' * 12, 'command 5'),
    (v2(1, 0x11, b'\x00' * 4), 'address block'),
], ids=['imap', 'bare-lf', 'octal', 'v1-oversized', 'v2-oversized', 'v2-command',
        'v2-short'])
def test_bad_header_closes_without_greeting(proxies, proxy_log, data, reason):
    proxy = pp_proxy(proxies)
    started = time.monotonic()
    assert refused(proxy.server_port, data) == b''
    assert time.monotonic() - started < 3          # at once, not at a timeout
    line = wait_line(proxy_log, r'^client refused: ')
    assert re.match(r'client refused: id=c\d+ peer=127\.0\.0\.1:\d+ reason=proxy protocol: ',
                    line), line
    assert reason in line, line
    # One line, and no session: nothing else about this connection.
    cid = re.search(r'id=(c\d+)', line).group(1)
    assert [entry for entry in proxy_log.lines if 'id=%s ' % cid in entry] == [line]
    assert not any(entry.startswith('client connected:') for entry in proxy_log.lines)
    assert 'secret1' not in '\n'.join(proxy_log.lines)


@pytest.mark.parametrize('data', [b'', b'PROXY TCP4 192.0.2.7 ',
                                  v2_tcp4('192.0.2.7', 1, '10.0.0.1', 2)[:20]],
                         ids=['nothing', 'v1-half', 'v2-half'])
def test_truncated_then_silent_times_out(proxies, proxy_log, data):
    proxy = pp_proxy(proxies, preauth_timeout='1')
    started = time.monotonic()
    assert refused(proxy.server_port, data) == b''
    assert 0.9 < time.monotonic() - started < 5
    line = wait_line(proxy_log, r'^client refused: ')
    assert re.search(r'id=c\d+ peer=127\.0\.0\.1:\d+ reason=proxy protocol: no complete '
                     r'header within 1s \(%d bytes came\)' % len(data), line), line


def test_closed_inside_the_header(proxies, proxy_log):
    proxy = pp_proxy(proxies)
    with socket.create_connection(('127.0.0.1', proxy.server_port)) as sock:
        sock.sendall(b'PROXY TCP4 ')
    line = wait_line(proxy_log, r'^client refused: ')
    assert 'reason=proxy protocol: connection closed inside the header' in line, line


def test_shutdown_while_waiting_for_a_header(rip_dovecot, proxy_log):
    proxy = start_proxy(Backend('dovecot', rip_dovecot, USERS), proxy_protocol='yes',
                        trusted_networks='127.0.0.1/32')
    with socket.create_connection(('127.0.0.1', proxy.server_port), timeout=10) as sock:
        sock.sendall(b'PROXY ')
        wait_line(proxy_log, r'^listening: ')
        # Once accepted, its session waits for the rest of the header.
        wait_until(lambda: proxy.counters['clients'] == 1, 'the connection to be accepted')
        proxy.stop(0.2)
        assert sock.recv(100) == b''
    line = wait_line(proxy_log, r'^client refused: ')
    assert re.search(r'id=c\d+ peer=127\.0\.0\.1:\d+ reason=proxy protocol: server shutdown$',
                     line), line


def test_header_from_an_untrusted_peer_is_refused(proxies, proxy_log):
    proxy = pp_proxy(proxies, trusted_networks='127.0.0.2/32')
    header = b'PROXY TCP4 192.0.2.7 10.0.0.1 40001 1143\r\n'
    assert refused(proxy.server_port, header) == b''
    line = wait_line(proxy_log, r'^client refused: ')
    assert re.match(r'client refused: id=c\d+ peer=127\.0\.0\.1:\d+ reason=proxy protocol: '
                    r'peer not in trusted_networks$', line), line
    # ... while the trusted address gets in.
    with ProxiedClient(proxy.server_port, header, source='127.0.0.2') as client:
        assert client.greeting.startswith(b'* OK ')
    wait_line(proxy_log, r'^client connected: id=c\d+ peer=192\.0\.2\.7:40001 ')


def test_carried_address_is_judged_as_if_it_connected(rip_dovecot, proxies, proxy_log):
    """trusted_networks lets the balancer send headers; the client it speaks for may
    pass its own x-originating-ip only if its own (carried) address is trusted too."""
    proxy = pp_proxy(proxies)
    user, password = USERS[8]
    header = b'PROXY TCP4 192.0.2.9 10.0.0.1 40009 1143\r\n'
    with ProxiedClient(proxy.server_port, header) as client:
        client.command(b'i', b'ID ("name" "webmail" "x-originating-ip" "198.51.100.1")')
        assert client.login(user, password).startswith(b'L1 OK')
    line = login_line(rip_dovecot, user)
    assert 'rip=192.0.2.9,' in line and '198.51.100.1' not in line, line


def test_off_a_header_is_just_a_bad_command(proxies, proxy_log):
    proxy = proxies()                   # proxy_protocol = no, the default
    with Client(proxy.server_port) as client:
        assert client.greeting.startswith(b'* OK ')
        client.send(b'PROXY TCP4 192.0.2.7 10.0.0.1 40001 1143\r\n')
        assert client.readline().startswith(b'PROXY BAD ')
        port = client.sock.getsockname()[1]
    wait_line(proxy_log, r'^client connected: id=c\d+ peer=127\.0\.0\.1:%d ' % port)
    assert not any('192.0.2.7' in line for line in proxy_log.lines)


def test_implicit_tls_port_reads_the_header_before_the_handshake(proxies, proxy_log, pki):
    proxy = pp_proxy(proxies, listen_tls_port=str(free_port()),
                     client_tls_cert_file=pki.server_tls[0],
                     client_tls_key_file=pki.server_tls[1])
    header = v2_tcp4('192.0.2.10', 40010, '10.0.0.1', 993)
    with socket.create_connection(('127.0.0.1', proxy.tls_listener.server_port),
                                  timeout=10) as raw:
        raw.sendall(header)
        with pki.client_context().wrap_socket(raw, server_hostname='127.0.0.1') as tls:
            assert tls.recv(4096).startswith(b'* OK ')
    line = wait_line(proxy_log, r'^client connected: id=c\d+ peer=192\.0\.2\.10:40010 ')
    assert 'tls=implicit' in line


# -- (c) a real HAProxy in front of the proxy ---------------------------------------------

def haproxy_binary() -> str:
    """The haproxy binary. Missing: the test is skipped when not root (a developer's
    machine), and fails as root (scripts/test installs it then) or when
    GIMAPPROXY_REQUIRE_DOVECOT=1 (CI must not pass by skipping)."""
    path = shutil.which('haproxy') or next(
        (p for p in ('/usr/sbin/haproxy', '/usr/local/sbin/haproxy') if os.access(p, os.X_OK)),
        None)
    if path:
        return path
    reason = 'haproxy is not installed (apt-get install haproxy)'
    if os.environ.get('GIMAPPROXY_REQUIRE_DOVECOT') == '1':
        pytest.fail(reason + ' and GIMAPPROXY_REQUIRE_DOVECOT=1', pytrace=False)
    if os.geteuid() == 0:
        pytest.fail(reason + ', and this runs as root, where scripts/test installs it',
                    pytrace=False)
    pytest.skip(reason)
    raise AssertionError('unreachable')


HAPROXY_CFG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend imap_v1
    bind 127.0.0.1:{v1_port}
    default_backend gimapproxy_v1

frontend imap_v2
    bind 127.0.0.1:{v2_port}
    default_backend gimapproxy_v2

backend gimapproxy_v1
    server proxy1 127.0.0.1:{proxy_port} send-proxy

backend gimapproxy_v2
    option tcp-check
    tcp-check expect string "* OK"
    tcp-check send "hc LOGOUT\\r\\n"
    tcp-check expect string "hc OK"
    server proxy2 127.0.0.1:{proxy_port} send-proxy-v2 check inter 200ms
"""


@pytest.fixture
def haproxy(tmp_path):
    """Start HAProxy in the foreground for a proxy on `proxy_port`; returns its two
    frontend ports (send-proxy, send-proxy-v2) and the path of its output. Stopped by
    its PID afterwards."""
    binary = haproxy_binary()
    started = []

    def start(proxy_port):
        ports = {'v1_port': free_port(), 'v2_port': free_port(), 'proxy_port': proxy_port}
        cfg = tmp_path / 'haproxy.cfg'
        cfg.write_text(HAPROXY_CFG.format(**ports))
        check = subprocess.run([binary, '-c', '-f', str(cfg)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(tmp_path / 'haproxy.log', 'w')
        process = subprocess.Popen([binary, '-f', str(cfg), '-db'], stdout=log,
                                   stderr=subprocess.STDOUT)
        started.append((process, log))

        def listening(port) -> bool:
            assert process.poll() is None, (tmp_path / 'haproxy.log').read_text()
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
            except OSError:
                return False
            return True
        for port in (ports['v1_port'], ports['v2_port']):
            wait_until(lambda: listening(port), 'haproxy to listen on %d' % port, 10)
        return ports['v1_port'], ports['v2_port'], tmp_path / 'haproxy.log'
    yield start
    for process, log in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def test_real_haproxy_send_proxy_v1_and_v2(rip_dovecot, proxies, proxy_log, haproxy):
    proxy = pp_proxy(proxies)
    v1_port, v2_port, output = haproxy(proxy.server_port)
    for version, port, (user, password) in ((1, v1_port, USERS[12]), (2, v2_port, USERS[13])):
        with Client(port) as client:
            assert client.greeting.startswith(b'* OK [CAPABILITY ')
            assert client.login(user, password).startswith(b'L1 OK')
            _, tagged = client.command(b's', b'SELECT INBOX')
            assert tagged.startswith(b's OK')
            client.logout()
            # HAProxy saw the client at its own address and port; so must the proxy.
            seen = '127.0.0.1:%d' % client.sock.getsockname()[1]
        lines = session_lines(proxy_log, seen)
        assert 'user=%s' % user in lines['login'] and 'peer=%s ' % seen in lines['login']
        via = wait_line(proxy_log, r'^proxy header: id=%s ' % lines['id'])
        assert 'version=%d command=PROXY family=TCP4' % version in via, via
    # HAProxy's health checks come as version 2 LOCAL: served as the balancer's own
    # connection, at its real address; the README's check (greeting, LOGOUT) passes.
    local = wait_line(proxy_log, r'^proxy header: .* version=2 command=LOCAL ')
    assert re.search(r'peer=127\.0\.0\.1:(\d+) via=127\.0\.0\.1:\1 ', local), local
    cid = re.search(r'id=(c\d+)', local).group(1)
    wait_line(proxy_log, r'^client closed: id=%s reason=logout before login$' % cid)
    # Time for two more health checks to run (inter 200ms), so that a failing one shows.
    gevent.sleep(0.5)
    assert 'DOWN' not in output.read_text(), output.read_text()
    assert not any(line.startswith('client refused:') for line in proxy_log.lines)


def test_readme_haproxy_configuration_is_valid(tmp_path):
    """The README's haproxy.cfg is the one users copy: HAProxy must accept it."""
    binary = haproxy_binary()
    readme = open(os.path.join(os.path.dirname(__file__), '..', 'README.md')).read()
    section = readme.split('## Behind a TCP load balancer (HAProxy)', 1)[1]
    block = re.search(r'`/etc/haproxy/haproxy.cfg`.*?:\n\n((?:    .*\n|\n)+)',
                      section).group(1)
    cfg = tmp_path / 'haproxy.cfg'
    cfg.write_text(re.sub(r'(?m)^    ', '', block))
    assert 'send-proxy-v2' in block and 'balance source' in block
    check = subprocess.run([binary, '-c', '-f', str(cfg)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    # ... and the proxy.ini lines that go with it load.
    ini = re.search(r"in each instance's `proxy.ini`:\n\n((?:    .*\n)+)", section).group(1)
    (tmp_path / 'proxy.ini').write_text(re.sub(r'(?m)^    ', '', ini))
    from gimapproxy.config import load_config
    config = load_config(str(tmp_path / 'proxy.ini'))
    assert config.proxy_protocol and config.trusted_networks


def test_missing_haproxy_skips_only_where_allowed(monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    monkeypatch.delenv('GIMAPPROXY_REQUIRE_DOVECOT', raising=False)
    monkeypatch.setattr(os, 'geteuid', lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match='haproxy is not installed'):
        haproxy_binary()
    monkeypatch.setattr(os, 'geteuid', lambda: 0)
    with pytest.raises(pytest.fail.Exception, match='as root'):
        haproxy_binary()
    monkeypatch.setattr(os, 'geteuid', lambda: 1000)
    monkeypatch.setenv('GIMAPPROXY_REQUIRE_DOVECOT', '1')
    with pytest.raises(pytest.fail.Exception, match='GIMAPPROXY_REQUIRE_DOVECOT=1'):
        haproxy_binary()


# -- the setting ---------------------------------------------------------------------------

def test_setting_defaults_off_and_needs_trusted_networks():
    from gimapproxy.config import ConfigError, make_config
    assert make_config({'server_hostname': 'x'}).proxy_protocol is False
    with pytest.raises(ConfigError, match=r'\] proxy_protocol: needs trusted_networks'):
        make_config({'server_hostname': 'x', 'proxy_protocol': 'yes'})
    config = make_config({'server_hostname': 'x', 'proxy_protocol': 'yes',
                          'trusted_networks': '10.0.0.5/32'})
    assert config.proxy_protocol is True
