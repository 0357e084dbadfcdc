"""Text from peers made safe for one log line."""
from __future__ import annotations

__all__ = ['printable', 'ProtocolTrace']


def printable(value: bytes | str | None, limit: int = 200, spaces: bool = False) -> str:
    """Return `value` as printable log text: non-printing characters (and spaces, unless
    `spaces`) escaped, cut to `limit` characters. Never pass a password here."""
    if value is None:
        return '-'
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'backslashreplace')
    if 0 < len(value) <= limit and value.isprintable() and (spaces or ' ' not in value):
        return value            # the usual case (a user name), without a loop per character
    out = ''.join(c if c.isprintable() and (spaces or c != ' ') else '\\x%02x' % ord(c)
                  for c in value[:limit])
    return out + ('...' if len(value) > limit else '') if out else '""'


class ProtocolTrace:
    """The protocol of one session at debug level (the trace_users setting). Literal
    data is shown by its size only, and LOGIN and AUTHENTICATE lines are masked."""

    def __init__(self, log, session_id: str, user: bytes) -> None:
        self.log = log
        self.id = session_id
        self.user = printable(user)
        self.masking = False              # the command being traced carries a secret

    def client(self, data: bytes, kind: str) -> None:
        """A piece of client input: `kind` is 'first' (a command's first line), 'more'
        (its later lines), 'literal', or 'raw' (bytes the tracker no longer frames, once
        the connection is unclean: shown by their size, as they may hold anything)."""
        if kind == 'literal':
            self.text('C', '<literal data, %d bytes>' % len(data))
            return
        if kind == 'raw':
            self.text('C', '<unframed data, %d bytes>' % len(data))
            return
        if kind == 'first':
            words = data.split(b' ', 2)
            self.masking = len(words) > 1 and words[1].upper().strip() in (
                b'LOGIN', b'AUTHENTICATE')
            if self.masking:
                self.text('C', '%s %s <masked>' % (printable(words[0]),
                                                   printable(words[1].upper())))
                return
        if self.masking:
            self.text('C', '<masked>')
            return
        self.text('C', printable(data.rstrip(b'\r\n'), 300, spaces=True))

    def server(self, data: bytes, literal: bool) -> None:
        if literal:
            self.text('S', '<literal data, %d bytes>' % len(data))
        else:
            self.text('S', printable(data.rstrip(b'\r\n'), 300, spaces=True))

    def text(self, direction: str, text: str) -> None:
        self.log.debug('trace: id=%s user=%s %s: %s', self.id, self.user, direction, text)
