"""Turn an up-imapproxy `imapproxy.conf` into the equivalent gimapproxy `proxy.ini`.

`migrate(text, source)` is pure: it reads no files and looks nothing up (no DNS, no
users, no certificates); `gimapproxy migrate-config FILE` wraps it. up-imapproxy's syntax
(`src/config.c`): one `keyword value` per line, `#` anywhere ends the line, keywords are
case-insensitive, the value is the rest of the line. Where up-imapproxy is lax (unknown
keywords ignored, garbage numbers read as 0, odd booleans read as false) this reports each
case, with the file and line, instead of guessing.

Every message is one line, `SOURCE:LINE: warning: KEYWORD: text` (something behaves
differently or is lost: read it) or `SOURCE:LINE: note: KEYWORD: text` (nothing to do);
messages about the file as a whole have no line number. Secret values
(`auth_sasl_plain_password`, `auth_shared_secret`) are never repeated.
"""
from __future__ import annotations

import difflib
from typing import Optional

from .config import KEYS, SECTION
from .upkeywords import HANDLERS, UP_IMAPPROXY_OPTIONS, Line as _Line, atoi as _atoi

__all__ = ['migrate', 'UP_IMAPPROXY_OPTIONS']

_SECRET = frozenset(('auth_sasl_plain_password', 'auth_shared_secret'))

_KEYS = {key.name: key for key in KEYS}
# Keys whose check looks at this machine (files, users); the output may be meant for
# another one, so their values are passed on unchecked and --check judges them there.
_SYSTEM_KEYS = frozenset(('tls_ca_file', 'tls_cert_file', 'tls_key_file', 'proc_username',
                          'proc_groupname'))


class _Migration:
    """The state of one migration: the lines read, the keys set, the messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, _Line] = {}
        self.settings: dict[str, tuple[str, _Line]] = {}
        self._messages: list[tuple[float, int, str]] = []

    # -- messages ------------------------------------------------------------------------

    def _say(self, kind: str, line: Optional[_Line], text: str) -> None:
        where = self.source if line is None else '%s:%d' % (self.source, line.number)
        subject = '' if line is None else '%s: ' % line.keyword
        order = float('inf') if line is None else line.number
        self._messages.append((order, len(self._messages),
                               '%s: %s: %s%s' % (where, kind, subject, text)))

    @property
    def messages(self) -> list[str]:
        """The messages so far: by line number, those about the whole file last."""
        return [text for _, _, text in sorted(self._messages)]

    def warn(self, line: Optional[_Line], text: str) -> None:
        """Record something that behaves differently, or is lost, after the migration."""
        self._say('warning', line, text)

    def note(self, line: Optional[_Line], text: str) -> None:
        """Record something the reader need not act on."""
        self._say('note', line, text)

    def shown(self, line: _Line) -> str:
        """The line's value quoted for a message; secrets are not repeated."""
        return '(value not shown)' if line.keyword in _SECRET else repr(line.value)

    # -- values --------------------------------------------------------------------------

    def set(self, key: str, value: str, line: _Line) -> None:
        """Set proxy.ini `key` from `line`, unless `value` would not load (then warn)."""
        spec = _KEYS.get(key)
        if spec is not None and key not in _SYSTEM_KEYS:
            try:
                spec.parse(value)
            except ValueError as exc:
                self.warn(line, 'not carried over: gimapproxy\'s %s would reject it: %s; %s'
                          % (key, exc, self.default_text(key)))
                return
        self.settings[key] = (value, line)

    @staticmethod
    def default_text(key: str) -> str:
        """'gimapproxy uses its default (X)' for a key not set."""
        default = _KEYS[key].default if key in _KEYS else ''
        return 'gimapproxy uses its default (%s)' % (default or 'empty')

    def boolean(self, line: _Line) -> Optional[bool]:
        """The line's yes/no value, or None (with a warning) if it is neither."""
        value = line.value.lower()
        if value in ('yes', 'y', 'true'):
            return True
        if value in ('no', 'n', 'false'):
            return False
        # up-imapproxy takes anything starting with "yes" as yes, "no" as no, and the
        # rest (after logging it) as no.
        read_as = 'yes' if value.startswith('yes') else 'no'
        self.warn(line, '%s is not yes or no (up-imapproxy read it as %s); not carried '
                  'over, fix it and migrate again' % (self.shown(line), read_as))
        return None

    def number(self, line: _Line) -> Optional[int]:
        """The line's whole number, or None (with a warning) if it is not one."""
        value = line.value
        if value.isascii() and value.isdigit():
            return int(value)
        self.warn(line, '%s is not a whole number (up-imapproxy read it as %d); not carried '
                  'over' % (self.shown(line), _atoi(value)))
        return None


def _read(text: str, m: _Migration) -> None:
    """Split `text` into lines; the last of a keyword given twice wins, as in C."""
    for number, raw in enumerate(text.splitlines(), 1):
        body = raw.split('#', 1)[0].strip()
        if not body:
            continue
        parts = body.split(None, 1)
        value = parts[1].strip() if len(parts) > 1 else ''
        line = _Line(number, parts[0].lower(), value, body)
        if not line.value:
            m.warn(line, 'has no value; not carried over')
            continue
        earlier = m.lines.get(line.keyword)
        if earlier is not None:
            m.warn(line, 'given again (first on line %d); the last one counts, as in '
                   'up-imapproxy' % earlier.number)
        m.lines[line.keyword] = line


def _whole_file(m: _Migration) -> None:
    """Checks of what is missing or of keys together, after every line is handled."""
    if 'server_hostname' not in m.settings:
        m.settings['server_hostname'] = ('127.0.0.1', None)
        m.warn(None, 'server_hostname is not set (or not usable): up-imapproxy then '
               'connected to the local host; server_hostname = 127.0.0.1 is written, set '
               'the real server there')
    if 'server_port' not in m.lines:
        m.note(None, 'server_port is not set (up-imapproxy would not start without it); '
               'gimapproxy uses 143')
    if 'listen_address' not in m.lines:
        m.warn(None, 'listen_address is not set: up-imapproxy then listened on all '
               'addresses, gimapproxy listens on 127.0.0.1 only; set listen_address = * '
               'if webmail on other hosts connects to it')
    if 'listen_port' not in m.lines:
        m.note(None, 'listen_port is not set: up-imapproxy then took any free port; '
               'gimapproxy uses 1143')
    if 'cache_expiration_time' not in m.lines:
        m.note(None, 'cache_expiration_time is not set: up-imapproxy then kept no '
               'connection past its next sweep; gimapproxy keeps them 300 s')
    # up-imapproxy had no switch for it: clients of a migrated setup (Horde) expect it.
    m.settings['send_reuse_code'] = ('yes', None)
    m.note(None, 'send_reuse_code = yes is written: up-imapproxy always sent [XPROXYREUSE] '
           'on a reused login (and XIMAPPROXY before login), and Horde uses it to skip its '
           'login-time setup; gimapproxy sends them only with this key')
    server_tls = m.settings.get('server_tls', ('off', None))[0]
    if server_tls != 'off' and 'tls_verify_server' not in m.settings:
        line = m.settings['server_tls'][1]
        m.warn(line, 'the server\'s certificate is now verified: up-imapproxy did not verify '
               'it by default (tls_verify_server no), gimapproxy does (chain and host '
               'name, tls_verify_server = yes). Set tls_ca_file for a private CA')
    for cert, key in (('tls_cert_file', 'tls_key_file'), ('tls_key_file', 'tls_cert_file')):
        if cert in m.settings and key not in m.settings:
            line = m.settings.pop(cert)[1]
            m.warn(line, 'not carried over: gimapproxy needs %s as well' % key)
    if 'proc_groupname' in m.settings and 'proc_username' not in m.settings:
        line = m.settings.pop('proc_groupname')[1]
        m.warn(line, 'not carried over: gimapproxy needs proc_username as well')
    for key in sorted(set(m.settings) - set(_KEYS)):
        m.warn(m.settings[key][1], 'written commented out: this version of gimapproxy has '
               'no %s key' % key)


def _render(m: _Migration) -> str:
    """The proxy.ini text: header, [gimapproxy], each key with its origin, the notes."""
    out = [
        '# gimapproxy configuration, migrated from up-imapproxy\'s %s' % m.source,
        '# by `gimapproxy migrate-config`. Keys not set here keep their defaults;',
        '# etc/proxy.ini documents every key. Check it with: gimapproxy -c FILE --check',
        '',
        '[%s]' % SECTION,
        '',
    ]
    order = [key.name for key in KEYS] + sorted(set(m.settings) - set(_KEYS))
    for key in order:
        if key not in m.settings:
            continue
        value, line = m.settings[key]
        if line is not None:
            out.append('# %s line %d: %s' % (m.source, line.number, line.text))
        if key in _KEYS:
            out.append('%s = %s' % (key, value))
        else:
            out.append('# (this gimapproxy has no %s key)' % key)
            out.append('#%s = %s' % (key, value))
        out.append('')
    if m.messages:
        out.append('# What did not carry over, or changed (also printed on stderr):')
        out.extend('# ' + message for message in m.messages)
        out.append('')
    return '\n'.join(out)


def migrate(text: str, source: str = '<imapproxy.conf>') -> tuple[str, list[str]]:
    """Convert up-imapproxy configuration text to gimapproxy's.

    `source` names the file in the messages and in the output's header.

    Returns:
        (ini, messages): `ini` is the proxy.ini text, one [gimapproxy] section, that
        gimapproxy's load_config() accepts as long as the files and users it names exist
        where it runs; `messages` are one-line warnings and notes, each naming `source`
        and, where there is one, the line number, sorted by line (those about the whole
        file last). Unknown keywords, bad numbers and bad yes/no values are each
        reported and not carried over.

    Raises nothing for any input text.
    """
    m = _Migration(' '.join(source.splitlines()))     # one line in comments and messages
    _read(text, m)
    for keyword, line in sorted(m.lines.items(), key=lambda item: item[1].number):
        handler = HANDLERS.get(keyword)
        if handler is not None:
            handler(m, line)
            continue
        close = difflib.get_close_matches(keyword, UP_IMAPPROXY_OPTIONS, n=1)
        hint = ' (did you mean %s?)' % close[0] if close else ''
        m.warn(line, 'unknown option%s; up-imapproxy ignores unknown options silently, '
               'gimapproxy would refuse it: not carried over' % hint)
    _whole_file(m)
    return _render(m), m.messages
