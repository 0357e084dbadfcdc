"""Text from peers made safe for one log line."""
from __future__ import annotations

__all__ = ['printable']


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
