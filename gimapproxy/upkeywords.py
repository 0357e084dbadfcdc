"""up-imapproxy's configuration keywords, one handler each, for gimapproxy.migrate.

Each handler gets the migration under way and one `keyword value` line, and sets
gimapproxy keys or says why it cannot (see gimapproxy.migrate for the message forms).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from .config import KEYS

if TYPE_CHECKING:
    from .migrate import _Migration

__all__ = ['HANDLERS', 'UP_IMAPPROXY_OPTIONS', 'Line', 'atoi']

KEY_DEFAULTS = {key.name: key.default for key in KEYS}

# Every keyword up-imapproxy 1.2.8 reads (src/config.c), in the order of its docs.
UP_IMAPPROXY_OPTIONS = (
    'server_hostname', 'server_port', 'listen_address', 'listen_port', 'connect_retries',
    'connect_delay', 'cache_size', 'cache_expiration_time', 'proc_username',
    'proc_groupname', 'stat_filename', 'protocol_log_filename', 'syslog_facility',
    'syslog_prioritymask', 'send_tcp_keepalives', 'enable_select_cache', 'foreground_mode',
    'force_tls', 'chroot_directory', 'preauth_command', 'enable_admin_commands',
    'tls_ca_file', 'tls_ca_path', 'tls_cert_file', 'tls_key_file', 'tls_verify_server',
    'tls_ciphers', 'tls_no_tlsv1', 'tls_no_tlsv1.1', 'tls_no_tlsv1.2',
    'auth_sasl_plain_username', 'auth_sasl_plain_password', 'auth_shared_secret', 'dns_rr',
    'ipversion_only',
)
# syslog_prioritymask (LOG_UPTO) to log_level. gimapproxy logs each login at info, as
# up-imapproxy does, so a mask of NOTICE (which hid those) becomes warning.
_PRIORITIES = {
    'log_emerg': 'error', 'log_alert': 'error', 'log_crit': 'error', 'log_err': 'error',
    'log_warning': 'warning', 'log_notice': 'warning', 'log_info': 'info',
    'log_debug': 'debug',
}
# Service names getaddrinfo() would have accepted for server_port.
_SERVICES = {'imap': 143, 'imap2': 143, 'imaps': 993}

_WHY_NOT_NEEDED = {
    'connect_retries': 'gimapproxy does not wait for the server at start (it checks each '
                       'server once, only to log whether it answers); it connects per '
                       'login, within connect_timeout, and a login while the server is '
                       'down gets NO [UNAVAILABLE]',
    'connect_delay': 'gimapproxy does not wait for the server at start (it checks each '
                     'server once, only to log whether it answers); it connects per login, '
                     'within connect_timeout',
    'stat_filename': 'replaced by stats_listen (HTTP /metrics for Prometheus and /stats as '
                     'JSON) and `gimapproxy stats -c proxy.ini` (like `pimpstat -c`)',
    'protocol_log_filename': 'replaced by trace_users: the traffic of the users named there '
                             'goes to the ordinary log at debug level, passwords and message '
                             'bodies masked',
    'syslog_facility': 'gimapproxy logs to stderr, one line per event; supervisord or '
                       'systemd (journald) files it',
    'foreground_mode': 'gimapproxy always runs in the foreground; run it under supervisord '
                       '(etc/supervisord.conf) or systemd',
}


class Line(NamedTuple):
    number: int
    keyword: str        # lower case
    value: str
    text: str           # the line without its comment, for the output's comments


def atoi(text: str) -> int:
    """What C's atoi() makes of `text`: leading blanks, a sign, digits; else 0."""
    text = text.lstrip(' \t')
    sign = 1
    if text[:1] in ('+', '-'):
        sign = -1 if text[0] == '-' else 1
        text = text[1:]
    digits = ''
    for char in text:
        if not ('0' <= char <= '9'):
            break
        digits += char
    return sign * int(digits) if digits else 0


# -- one handler per keyword -------------------------------------------------------------

def _server_hostname(m: _Migration, line: Line) -> None:
    m.set('server_hostname', line.value, line)


def _server_port(m: _Migration, line: Line) -> None:
    port = _SERVICES.get(line.value.lower())
    if port is None:
        port = m.number(line)
        if port is None:
            return
    m.set('server_port', str(port), line)
    if port == 993:
        m.set('server_tls', 'implicit', line)
        m.note(line, 'server_tls = implicit: up-imapproxy could not speak TLS on port 993 '
               '(it only warned); gimapproxy does')


def _listen_address(m: _Migration, line: Line) -> None:
    value = line.value
    if value.lower() == 'localhost':
        m.note(line, "'localhost' becomes 127.0.0.1: gimapproxy listens on an address, "
               'not a name')
        value = '127.0.0.1'
    m.set('listen_address', value, line)


def _listen_port(m: _Migration, line: Line) -> None:
    port = m.number(line)
    if port is not None:
        m.set('listen_port', str(port), line)


# Open files the proxy can have without a word from migrate-config: the proxy raises its
# soft limit itself, and hard limits are seldom below this.
_USUAL_NOFILE = 4096


def _cache_size(m: _Migration, line: Line) -> None:
    size = m.number(line)
    if size is None:
        return
    m.set('cache_size', str(size), line)
    # As cli.raise_file_limit: the soft limit goes up to this, as far as the hard limit
    # allows, and the proxy warns at start when it falls short.
    files = 2 * size + 1024
    if files > _USUAL_NOFILE:
        m.note(line, 'gimapproxy raises its own open-file limit towards 2 x cache_size + '
               '1024 (%d), but only as far as the hard limit allows: give it a hard limit '
               'that high (supervisord: minfds = %d in [supervisord]; systemd: '
               'LimitNOFILE=%d); it warns at start when the limit falls short'
               % (files, files, files))


def _cache_expiration_time(m: _Migration, line: Line) -> None:
    seconds = m.number(line)
    if seconds is None:
        return
    m.set('cache_expiration_time', str(seconds), line)
    max_auth_age = float(KEY_DEFAULTS['max_auth_age'])
    if seconds > max_auth_age:
        m.warn(line, 'a cached connection is also handed out only within max_auth_age '
               '(%g s) of its server login; raise max_auth_age to keep connections this '
               'long' % max_auth_age)


def _force_tls(m: _Migration, line: Line) -> None:
    value = m.boolean(line)
    port = m.lines.get('server_port')
    implicit = port is not None and port.value.lower() in ('993', 'imaps')
    if value and implicit:
        m.note(line, 'not needed: server_port 993 already means server_tls = implicit')
    elif value:
        m.set('server_tls', 'starttls', line)
    elif value is False and not implicit:
        m.note(line, 'server_tls = off (the default). up-imapproxy still used STARTTLS '
               'when the server said LOGINDISABLED; gimapproxy then refuses the login '
               'instead: set server_tls = starttls if the server needs TLS')


def _copy(key: str) -> Callable[[_Migration, Line], None]:
    def handle(m: _Migration, line: Line) -> None:
        m.set(key, line.value, line)
    return handle


def _tls_ca_path(m: _Migration, line: Line) -> None:
    m.warn(line, 'not carried over: gimapproxy takes CA certificates from one PEM file '
           '(tls_ca_file), not a directory; without tls_ca_file it uses the system trust '
           'store (/etc/ssl/certs on Debian)')


def _tls_verify_server(m: _Migration, line: Line) -> None:
    value = m.boolean(line)
    if value:
        m.set('tls_verify_server', 'yes', line)
        m.note(line, 'gimapproxy also checks the host name (against tls_server_name, '
               'default server_hostname) and sends it as SNI; up-imapproxy checked the '
               'chain only')
    elif value is False:
        m.set('tls_verify_server', 'no', line)
        m.warn(line, 'tls_verify_server = no: the server\'s certificate is not checked, so '
               'anyone on the path can read passwords. gimapproxy verifies by default '
               '(chain and host name); remove this line once the server\'s certificate '
               'verifies (tls_ca_file for a private CA)')


def _tls_no(version: str) -> Callable[[_Migration, Line], None]:
    def handle(m: _Migration, line: Line) -> None:
        value = m.boolean(line)
        if value is None:
            return
        if version == '1.2':
            if value:
                m.set('tls_min_version', 'tlsv1.3', line)
            else:
                m.note(line, 'TLS 1.2 stays on (tls_min_version = tlsv1.2, the default)')
        elif value:
            m.note(line, 'not needed: gimapproxy never uses TLS below 1.2 '
                   '(tls_min_version = tlsv1.2)')
        else:
            m.warn(line, 'gimapproxy never uses TLS %s: a server that only speaks TLS 1.0 '
                   'or 1.1 will not work (tls_min_version is tlsv1.2 at the lowest)'
                   % version)
    return handle


def _proc_username(m: _Migration, line: Line) -> None:
    if line.value == 'root':
        m.warn(line, 'not carried over: gimapproxy refuses to run as root, as '
               'up-imapproxy did; leave proc_username empty to stay as started')
        return
    m.set('proc_username', line.value, line)


def _proc_groupname(m: _Migration, line: Line) -> None:
    m.set('proc_groupname', line.value, line)


def _syslog_prioritymask(m: _Migration, line: Line) -> None:
    name = line.value.lower()
    if not name.startswith('log_'):
        name = 'log_' + name
    level = _PRIORITIES.get(name)
    if level is None:
        m.warn(line, '%s is not a syslog priority (LOG_ERR, LOG_WARNING, LOG_NOTICE, '
               'LOG_INFO, LOG_DEBUG, ...); not carried over, %s'
               % (m.shown(line), m.default_text('log_level')))
        return
    m.set('log_level', level, line)


def _on_off(m: _Migration, line: Line, when_on: str, when_off: str) -> None:
    """A yes/no option gimapproxy has no key for: warn when it was on, note when off."""
    value = m.boolean(line)
    if value:
        m.warn(line, when_on)
    elif value is False:
        m.note(line, when_off)


def _enable_admin_commands(m: _Migration, line: Line) -> None:
    value = m.boolean(line)
    text = ('gimapproxy has no XPROXY_* commands and nothing admin-related on the IMAP '
            'port. Instead, on stats_listen (HTTP) from admin_networks only: GET '
            '/admin/cache lists cached connections (XPROXY_DUMPICC), POST /admin/flush '
            'logs them out (also `gimapproxy flush`); trace_users replaces XPROXY_TRACE; '
            '`gimapproxy --version` replaces XPROXY_VERSION')
    if value:
        m.warn(line, 'not carried over: ' + text)
    elif value is False:
        m.note(line, 'not needed: ' + text)


def _enable_select_cache(m: _Migration, line: Line) -> None:
    _on_off(m, line, 'not carried over: gimapproxy never caches SELECT responses, on '
               'purpose: up-imapproxy\'s cache served stale EXISTS counts and the '
               'wrong mailbox state, and was slower than a real SELECT',
            'not needed: gimapproxy never caches SELECT responses')


def _send_tcp_keepalives(m: _Migration, line: Line) -> None:
    value = m.boolean(line)
    if value:
        m.note(line, 'not needed: gimapproxy sends TCP keepalives by default (tcp_keepidle, '
               'tcp_keepintvl, tcp_keepcnt), and checks a cached connection idle for '
               'server_check_delay with a NOOP before it hands it out')
    elif value is False:
        m.note(line, 'not carried over: gimapproxy sends TCP keepalives by default, so that '
               'a firewall that forgets idle connections cannot leave a dead cached '
               'connection; write send_tcp_keepalives = no to turn them off')


def _dns_rr(m: _Migration, line: Line) -> None:
    _on_off(m, line, 'not carried over: gimapproxy resolves server_hostname for each new '
               'server connection and tries its addresses in order (failover, not '
               'rotation); put a load balancer in front of the servers to spread logins',
            'not needed: gimapproxy resolves server_hostname for each new server '
               'connection and tries its addresses in order')


def _ipversion_only(m: _Migration, line: Line) -> None:
    if line.value == '0':
        m.note(line, 'not needed: both IPv4 and IPv6, as in gimapproxy')
    elif line.value in ('4', '6'):
        m.warn(line, 'not carried over: gimapproxy has no such setting; to use only IPv%s, '
               'put an IPv%s address (or a name with only such addresses) in '
               'server_hostname' % (line.value, line.value))
    else:
        m.warn(line, 'not carried over: %s is not 4, 6 or 0, and gimapproxy has no such '
               'setting; an address in server_hostname picks the family' % m.shown(line))


def _chroot_directory(m: _Migration, line: Line) -> None:
    m.warn(line, 'not carried over: gimapproxy does not chroot. It drops privileges to '
           'proc_username after binding; for more confinement use the service manager '
           '(systemd: ProtectSystem=strict, PrivateTmp=yes, ...)')


def _preauth_command(m: _Migration, line: Line) -> None:
    m.warn(line, 'not carried over: gimapproxy sends no configurable command before login. '
           'It sends its own ID (client address, with forward_client_ip = yes) on each new '
           'server connection; a server that needs another command first will not work')


def _master_user(m: _Migration, line: Line) -> None:
    m.warn(line, 'not carried over: gimapproxy has no master-user mode '
           '(auth_sasl_plain_username, auth_sasl_plain_password, auth_shared_secret): it '
           'logs in to the server with each user\'s own password')


def _not_needed(m: _Migration, line: Line) -> None:
    m.note(line, 'not needed: ' + _WHY_NOT_NEEDED[line.keyword])


HANDLERS: dict[str, Callable[[_Migration, Line], None]] = {
    'server_hostname': _server_hostname,
    'server_port': _server_port,
    'listen_address': _listen_address,
    'listen_port': _listen_port,
    'connect_retries': _not_needed,
    'connect_delay': _not_needed,
    'cache_size': _cache_size,
    'cache_expiration_time': _cache_expiration_time,
    'proc_username': _proc_username,
    'proc_groupname': _proc_groupname,
    'stat_filename': _not_needed,
    'protocol_log_filename': _not_needed,
    'syslog_facility': _not_needed,
    'syslog_prioritymask': _syslog_prioritymask,
    'send_tcp_keepalives': _send_tcp_keepalives,
    'enable_select_cache': _enable_select_cache,
    'foreground_mode': _not_needed,
    'force_tls': _force_tls,
    'chroot_directory': _chroot_directory,
    'preauth_command': _preauth_command,
    'enable_admin_commands': _enable_admin_commands,
    'tls_ca_file': _copy('tls_ca_file'),
    'tls_ca_path': _tls_ca_path,
    'tls_cert_file': _copy('tls_cert_file'),
    'tls_key_file': _copy('tls_key_file'),
    'tls_verify_server': _tls_verify_server,
    'tls_ciphers': _copy('tls_ciphers'),
    'tls_no_tlsv1': _tls_no('1.0'),
    'tls_no_tlsv1.1': _tls_no('1.1'),
    'tls_no_tlsv1.2': _tls_no('1.2'),
    'auth_sasl_plain_username': _master_user,
    'auth_sasl_plain_password': _master_user,
    'auth_shared_secret': _master_user,
    'dns_rr': _dns_rr,
    'ipversion_only': _ipversion_only,
}
assert set(HANDLERS) == set(UP_IMAPPROXY_OPTIONS)
