"""Configuration: one table of keys, types, defaults and help; INI in, frozen ProxyConfig out.

The file has one section, `[gimapproxy]`. Key names keep up-imapproxy's where one exists.
Every error names the file, the key and what is wrong; an unknown key is an error, never
ignored (up-imapproxy silently ignores unknown keys and reads garbage numbers as 0).
"""
from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import logging
import os
from typing import Any, Callable, NamedTuple, Optional

__all__ = ['ConfigError', 'ProxyConfig', 'KEYS', 'LIVE', 'FLUSH', 'RESTART', 'RESTART_KEYS',
           'FLUSH_KEYS', 'load_config', 'make_config', 'SECTION']

SECTION = 'gimapproxy'


class ConfigError(Exception):
    """The configuration is unusable; the message names file, key and problem."""


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError('%r is not a whole number' % text) from None
        if not low <= value <= high:
            raise ValueError('%d is out of range (%d to %d)' % (value, low, high))
        return value
    parse.__doc__ = 'a whole number from %d to %d' % (low, high)
    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError('%r is not a number of seconds' % text) from None
        if not low <= value <= high or value != value:
            raise ValueError('%s is out of range (%g to %g seconds)' % (text, low, high))
        return value
    return parse


def _hosts(text: str) -> str:
    entries = text.replace(',', ' ').split()
    if not entries:
        raise ValueError('%r is not a host name or address' % text)
    for entry in entries:
        _split_host(entry, 143)
    return ' '.join(entries)


def _split_host(entry: str, default_port: int) -> tuple:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address -> (host, port)."""
    if entry.startswith('['):
        host, _, rest = entry[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else ''
    elif entry.count(':') == 1:
        host, _, port = entry.partition(':')
    else:
        host, port = entry, ''
    if not host or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
        raise ValueError('%r is not host or host:port' % entry)
    return host, int(port) if port else default_port


def _address(text: str) -> str:
    if text in ('', '*'):
        return ''
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError('%r is not an IP address (use 0.0.0.0, ::, or * for all)'
                         % text) from None


def _boolean(text: str) -> bool:
    value = text.lower()
    if value in ('yes', 'true', 'on', '1'):
        return True
    if value in ('no', 'false', 'off', '0'):
        return False
    raise ValueError('%r is not yes or no' % text)


def _auto_boolean(text: str) -> Optional[bool]:
    return None if text.lower() == 'auto' else _boolean(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError('%r is not one of %s' % (text, ', '.join(choices)))
        return text.lower()
    return parse


def _file(text: str) -> Optional[str]:
    if not text:
        return None
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError('cannot read file %r' % text)
    return text


def _text(text: str) -> Optional[str]:
    return text or None


def _networks(text: str) -> tuple:
    networks = []
    for item in text.replace(',', ' ').split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError('%r is not a network (use CIDR, like 10.0.0.0/8)' % item) \
                from None
    return tuple(networks)


def _host_port(text: str) -> Optional[tuple]:
    if not text:
        return None
    host, sep, port = text.rpartition(':')
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('%r is not host:port' % text)
    return (_address(host.strip('[]')) or '0.0.0.0', int(port))


def _names(text: str) -> frozenset:
    return frozenset(text.replace(',', ' ').split())


def _user(text: str) -> Optional[str]:
    if not text:
        return None
    import pwd
    try:
        pwd.getpwnam(text)
    except KeyError:
        raise ValueError('no such user %r' % text) from None
    return text


def _group(text: str) -> Optional[str]:
    if not text:
        return None
    import grp
    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError('no such group %r' % text) from None
    return text


_LEVELS = ('debug', 'info', 'warning', 'error')


def _level(text: str) -> str:
    if text.lower() not in _LEVELS:
        raise ValueError('%r is not one of %s' % (text, ', '.join(_LEVELS)))
    return text.lower()


# What a reload (SIGHUP, `ProxyServer.reload`) does with a key whose value changed, its
# Key.on_reload:
LIVE = 'live'           # new sessions and new server connections use the new value
FLUSH = 'flush'         # as LIVE, and the cached connections are logged out: they were
                        # made to the old server, with the old TLS settings, or under a
                        # cache key that no login would match again
RESTART = 'restart'     # the running value stays until a restart: it is a bound socket
                        # or the user the process became


class Key(NamedTuple):
    name: str
    parse: Callable[[str], Any]
    default: Optional[str]          # None: required
    on_reload: str                  # LIVE, FLUSH or RESTART
    help: str


# The one table. etc/proxy.ini documents the same keys with the same defaults, and so
# does README.md's table; tests check that they agree.
KEYS = (
    Key('listen_address', _address, '127.0.0.1', RESTART,
        'Address to accept clients on; * for all addresses.'),
    Key('listen_port', _integer(0, 65535), '1143', RESTART,
        'Port to accept clients on (0: any free port, for tests).'),
    Key('reuse_port', _boolean, 'no', RESTART,
        'Set SO_REUSEPORT on the listening sockets, so that several proxy processes '
        'with the same listen_address and listen_port share them and the kernel spreads '
        'new clients over them (one core each); each process keeps its own cache.'),
    Key('server_hostname', _hosts, None, FLUSH,
        'Host name or address of the IMAP server; several (space separated, each may be '
        'host:port) spread users over them and fail over.'),
    Key('server_port', _integer(1, 65535), '143', FLUSH,
        'Port of the IMAP server.'),
    Key('cache_size', _integer(1, 1000000), '1000', LIVE,
        'Most backend connections, active plus cached. Keep it below the server\'s '
        'process limit (Dovecot: service imap process_limit, 1024 by default).'),
    Key('cache_expiration_time', _seconds(0, 86400), '300', LIVE,
        'Seconds a logged-out backend connection is kept for reuse. Keep it below the '
        'server\'s autologout (Dovecot: 30 minutes).'),
    Key('max_auth_age', _seconds(0, 86400), '900', LIVE,
        'Seconds after the server last checked a user\'s password during which a cached '
        'connection may still be handed out; reuse does not extend it. A password '
        'changed on the server stops working through the proxy after this long.'),
    Key('max_connections_per_user', _integer(1, 10000), '10', LIVE,
        'Most backend connections of one user, active plus cached. Keep it at or below '
        'the server\'s per-user limit (Dovecot: mail_max_userip_connections, 10).'),
    Key('username_case', _choice('lower', 'exact'), 'lower', FLUSH,
        'How the server compares user names, so that the proxy counts, caches and flushes '
        'one account under one name: lower (ASCII lower case, so USER1 and user1 are one '
        'user) or exact. Dovecot: lower, unless auth_username_format was changed to one '
        'that does not lower-case the name (its default, %Lu, does). Cyrus: lower with '
        'username_tolower (on by default), else exact. Courier: exact. The server and the '
        'log still see the name as the client spelled it.'),
    Key('send_reuse_code', _boolean, 'no', LIVE,
        'Tell clients when they get a reused connection: [XPROXYREUSE] before the login '
        'OK, and XIMAPPROXY in the pre-login capabilities (up-imapproxy\'s convention).'),
    Key('expiry_interval', _seconds(0.01, 3600), '60', LIVE,
        'Seconds between sweeps that close expired cached connections.'),
    Key('connect_timeout', _seconds(0.01, 600), '10', LIVE,
        'Seconds to connect to the server and read its greeting.'),
    Key('shutdown_timeout', _seconds(0, 3600), '10', LIVE,
        'Seconds that open sessions get to finish after SIGTERM or SIGINT.'),
    Key('log_level', _level, 'info', LIVE,
        'One of debug, info, warning, error.'),
    # TLS towards the server.
    Key('server_tls', _choice('off', 'starttls', 'implicit'), 'off', FLUSH,
        'TLS towards the server: off, starttls (on server_port, usually 143) or implicit '
        '(usually port 993). STARTTLS fails closed.'),
    Key('tls_ca_file', _file, '', FLUSH,
        'CA certificates (PEM) to verify the server with; empty: the system trust store.'),
    Key('tls_verify_server', _boolean, 'yes', FLUSH,
        'Verify the server\'s certificate chain and host name.'),
    Key('tls_server_name', _text, '', FLUSH,
        'Name to verify the server certificate against and to send as SNI; empty: '
        'server_hostname.'),
    Key('tls_cert_file', _file, '', FLUSH,
        'Client certificate (PEM) the proxy shows the server; optional.'),
    Key('tls_key_file', _file, '', FLUSH,
        'Key of tls_cert_file.'),
    Key('tls_ciphers', _text, '', FLUSH,
        'OpenSSL cipher list for TLS 1.2 towards the server; empty: OpenSSL\'s default.'),
    Key('tls_min_version', _choice('tlsv1.2', 'tlsv1.3'), 'tlsv1.2', FLUSH,
        'Lowest TLS version accepted, towards the server and from clients.'),
    # TLS towards clients.
    Key('listen_tls_port', _integer(0, 65535), '0', RESTART,
        'Port for implicit-TLS clients on listen_address; 0: off.'),
    Key('client_tls_cert_file', _file, '', LIVE,
        'Certificate (PEM, with its chain) the proxy shows clients.'),
    Key('client_tls_key_file', _file, '', LIVE,
        'Key of client_tls_cert_file.'),
    Key('client_starttls', _auto_boolean, 'auto', LIVE,
        'Offer STARTTLS on listen_port: yes, no, or auto (yes when a client certificate '
        'is configured).'),
    Key('require_client_tls', _boolean, 'no', LIVE,
        'Refuse logins on listen_port before STARTTLS (clients see LOGINDISABLED).'),
    # The client's address at the server.
    Key('forward_client_ip', _boolean, 'yes', LIVE,
        'On each new server connection, send ID with the client\'s address '
        '(x-originating-ip, ...) when the server offers ID; Dovecot honours it from '
        'login_trusted_networks.'),
    Key('trusted_networks', _networks, '', LIVE,
        'Networks (CIDR, space separated) whose clients may pass their own x-originating-* '
        'ID fields, such as a webmail host that reports the browser\'s address; with '
        'proxy_protocol, also the load balancers that may send PROXY headers.'),
    Key('proxy_protocol', _boolean, 'no', LIVE,
        'Every client connection starts with a PROXY protocol header (HAProxy\'s, '
        'version 1 or 2) that gives the client\'s address; accepted only from '
        'trusted_networks, and a connection without a valid one is closed.'),
    Key('cache_per_client_ip', _boolean, 'no', FLUSH,
        'Reuse a cached connection only for the same client address; needed when the '
        'server applies per-IP policy (Dovecot allow_nets).'),
    # Limits.
    Key('max_clients', _integer(1, 1000000), '5000', LIVE,
        'Most client connections at once; past it new clients get BYE and are closed.'),
    Key('preauth_timeout', _seconds(1, 3600), '60', LIVE,
        'Seconds a client has to log in.'),
    Key('idle_timeout', _seconds(1, 86400), '1800', LIVE,
        'Seconds of silence on both sides after login before the session is closed (an '
        'IDLE kept alive by the server counts as traffic).'),
    Key('max_line_length', _integer(512, 1048576), '65536', LIVE,
        'Longest command line before login, in bytes (Dovecot takes a 30 KB ID).'),
    Key('max_literal_size', _integer(0, 1048576), '8192', LIVE,
        'Largest literal before login: a bigger synchronizing one gets NO, a '
        'non-synchronizing one ends the session.'),
    Key('login_timeout', _seconds(0.1, 600), '30', LIVE,
        'Seconds the server may take to answer a login (Dovecot delays failed logins by '
        'up to 15 s).'),
    Key('send_tcp_keepalives', _boolean, 'yes', LIVE,
        'TCP keepalives on server connections (tcp_keepidle, tcp_keepintvl, tcp_keepcnt), '
        'so that one a firewall or NAT forgot is found dead.'),
    Key('tcp_keepidle', _integer(1, 86400), '60', LIVE,
        'Seconds a server connection is idle before the first keepalive.'),
    Key('tcp_keepintvl', _integer(1, 3600), '10', LIVE,
        'Seconds between keepalives that get no answer.'),
    Key('tcp_keepcnt', _integer(1, 100), '3', LIVE,
        'Keepalives without an answer before the connection counts as dead.'),
    Key('server_check_delay', _seconds(0, 86400), '30', LIVE,
        'A cached connection idle for longer than this is checked with a NOOP before it '
        'is handed out; one that fails is closed and the login goes on with another '
        '(0: always check).'),
    Key('server_check_timeout', _seconds(0.01, 600), '2', LIVE,
        'Seconds that NOOP may take.'),
    Key('busy_timeout', _seconds(0, 600), '5', LIVE,
        'Seconds a login waits for a server connection when the user '
        '(max_connections_per_user) or the proxy (cache_size) has none free: one being '
        'reset or closed frees a place. Past it the login gets NO [UNAVAILABLE].'),
    Key('reset_timeout', _seconds(0.1, 600), '10', LIVE,
        'Seconds the server may take to reset a connection for reuse; past it the '
        'connection is closed.'),
    Key('write_timeout', _seconds(1, 3600), '60', LIVE,
        'Seconds a write to a client (or, after login, to the server) may make no progress '
        'before that peer counts as gone.'),
    # Operations.
    Key('stats_listen', _host_port, '', RESTART,
        'host:port for HTTP /metrics (Prometheus), /stats (JSON) and /admin; empty: off.'),
    Key('admin_networks', _networks, '127.0.0.0/8 ::1/128', LIVE,
        'Networks (CIDR) allowed to use /admin on stats_listen.'),
    Key('trace_users', _names, '', LIVE,
        'Users whose traffic is logged at debug level (passwords and message bodies '
        'masked), space separated.'),
    Key('proc_username', _user, '', RESTART,
        'User to run as after binding the ports; empty: stay as started. Never root.'),
    Key('proc_groupname', _group, '', RESTART,
        'Group to run as after binding the ports; empty: the user\'s group.'),
)
# Keys a reload (SIGHUP) cannot change: they need a restart.
RESTART_KEYS = frozenset(key.name for key in KEYS if key.on_reload == RESTART)
# Keys whose change on a reload logs out the cached connections.
FLUSH_KEYS = frozenset(key.name for key in KEYS if key.on_reload == FLUSH)
_BY_NAME = {key.name: key for key in KEYS}


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """Validated settings; attribute names are the INI key names.

    Build one with `load_config(path)` or `make_config({...})`, which fill in defaults
    from KEYS; the class itself has no defaults so that the table stays the one source.
    """
    listen_address: str
    listen_port: int
    reuse_port: bool
    server_hostname: str
    server_port: int
    cache_size: int
    cache_expiration_time: float
    max_auth_age: float
    max_connections_per_user: int
    username_case: str
    send_reuse_code: bool
    expiry_interval: float
    connect_timeout: float
    shutdown_timeout: float
    log_level: str
    server_tls: str
    tls_ca_file: Optional[str]
    tls_verify_server: bool
    tls_server_name: Optional[str]
    tls_cert_file: Optional[str]
    tls_key_file: Optional[str]
    tls_ciphers: Optional[str]
    tls_min_version: str
    listen_tls_port: int
    client_tls_cert_file: Optional[str]
    client_tls_key_file: Optional[str]
    client_starttls: Optional[bool]
    require_client_tls: bool
    forward_client_ip: bool
    trusted_networks: tuple
    proxy_protocol: bool
    cache_per_client_ip: bool
    max_clients: int
    preauth_timeout: float
    idle_timeout: float
    max_line_length: int
    max_literal_size: int
    login_timeout: float
    reset_timeout: float
    busy_timeout: float
    send_tcp_keepalives: bool
    tcp_keepidle: int
    tcp_keepintvl: int
    tcp_keepcnt: int
    server_check_delay: float
    server_check_timeout: float
    write_timeout: float
    stats_listen: Optional[tuple]
    admin_networks: tuple
    trace_users: frozenset
    proc_username: Optional[str]
    proc_groupname: Optional[str]
    source: str = '<dict>'

    @property
    def servers(self) -> list:
        """The IMAP servers as (host, port) pairs, in the order given."""
        return [_split_host(entry, self.server_port) for entry in self.server_hostname.split()]

    @property
    def client_tls(self) -> bool:
        """True when the proxy has a certificate for clients."""
        return self.client_tls_cert_file is not None

    @property
    def offer_starttls(self) -> bool:
        """True when listen_port offers STARTTLS."""
        if self.client_starttls is None:
            return self.client_tls
        return self.client_starttls

    def fold_username(self, name: bytes) -> bytes:
        """Return the spelling of user name `name` that the server compares
        (username_case): ASCII lower case, as Dovecot's %Lu, or `name` itself."""
        return name.lower() if self.username_case == 'lower' else name

    @property
    def log_level_number(self) -> int:
        """The log level as a `logging` constant."""
        return getattr(logging, self.log_level.upper())


def make_config(values: dict[str, str], source: str = '<dict>') -> ProxyConfig:
    """Validate `values` (key name to text, as in the INI file) into a ProxyConfig.

    Raises:
        ConfigError: an unknown key, a missing required key or a bad value, naming both.
    """
    parsed: dict[str, Any] = {}
    for name, text in values.items():
        key = _BY_NAME.get(name)
        if key is None:
            raise ConfigError('%s: [%s] %s: unknown key (known keys: %s)'
                              % (source, SECTION, name, ', '.join(sorted(_BY_NAME))))
        try:
            parsed[name] = key.parse(str(text).strip())
        except ValueError as exc:
            raise ConfigError('%s: [%s] %s: %s' % (source, SECTION, name, exc)) from None
    for key in KEYS:
        if key.name not in parsed:
            if key.default is None:
                raise ConfigError('%s: [%s] %s: required key is missing (%s)'
                                  % (source, SECTION, key.name, key.help))
            parsed[key.name] = key.parse(key.default)
    _check_together(parsed, source)
    return ProxyConfig(source=source, **parsed)


def _check_together(parsed: dict, source: str) -> None:
    """Keys that only make sense with others (ConfigError names the key)."""
    def fail(key: str, problem: str) -> None:
        raise ConfigError('%s: [%s] %s: %s' % (source, SECTION, key, problem))
    for cert, key in (('tls_cert_file', 'tls_key_file'),
                      ('client_tls_cert_file', 'client_tls_key_file')):
        if bool(parsed[cert]) != bool(parsed[key]):
            present, missing = (cert, key) if parsed[cert] else (key, cert)
            fail(present, 'needs %s as well' % missing)
    has_cert = parsed['client_tls_cert_file'] is not None
    if parsed['listen_tls_port'] and not has_cert:
        fail('listen_tls_port', 'needs client_tls_cert_file and client_tls_key_file')
    if parsed['client_starttls'] and not has_cert:
        fail('client_starttls', 'needs client_tls_cert_file and client_tls_key_file')
    offer = has_cert if parsed['client_starttls'] is None else parsed['client_starttls']
    if parsed['require_client_tls'] and not offer:
        fail('require_client_tls', 'needs STARTTLS offered (client_starttls and a '
             'client certificate)')
    if parsed['listen_tls_port'] and parsed['listen_tls_port'] == parsed['listen_port']:
        fail('listen_tls_port', 'is the same as listen_port')
    if parsed['proxy_protocol'] and not parsed['trusted_networks']:
        fail('proxy_protocol', 'needs trusted_networks: the load balancers\' addresses')
    if parsed['proc_groupname'] and not parsed['proc_username']:
        fail('proc_groupname', 'needs proc_username as well')
    if parsed['proc_username'] == 'root':
        fail('proc_username', 'the point is not to run as root')


def load_config(path: str) -> ProxyConfig:
    """Read and validate an INI file.

    Raises:
        ConfigError: unreadable file, syntax error, missing section, unknown key or bad
            value; the message names the file and, where there is one, the key.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       inline_comment_prefixes=None)
    parser.optionxform = str        # key names are case-sensitive, as documented
    try:
        with open(path, encoding='utf-8') as handle:
            parser.read_file(handle, source=path)
    except OSError as exc:
        raise ConfigError('%s: cannot read: %s' % (path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise ConfigError('%s: not valid UTF-8 text' % path) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError('%s: [%s] %s: given twice (line %s)'
                          % (path, exc.section, exc.option, exc.lineno)) from None
    except configparser.Error as exc:
        raise ConfigError('%s: %s' % (path, str(exc).replace('\n', ' '))) from None
    extra = [name for name in parser.sections() if name != SECTION]
    if extra:
        raise ConfigError('%s: [%s]: unknown section (only [%s] is read)'
                          % (path, extra[0], SECTION))
    if not parser.has_section(SECTION):
        raise ConfigError('%s: [%s]: section is missing' % (path, SECTION))
    return make_config(dict(parser.items(SECTION)), source=path)
