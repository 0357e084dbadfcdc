"""A tiny blocking IMAP test client that shows the exact bytes on the wire."""
from __future__ import annotations

import re
import socket

_LITERAL = re.compile(rb'\{(\d+)\+?\}\r\n\Z')


class Client:
    """One client connection. Lines are returned with their CRLF, literals inlined."""

    def __init__(self, port: int, host: str = '127.0.0.1', timeout: float = 20.0,
                 source: str = '', context=None) -> None:
        """Connect from `source` (a loopback address) if given; with `context`, an
        ssl.SSLContext, speak implicit TLS."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=host)
        self.buf = b''
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def starttls(self, context, host: str = '127.0.0.1') -> None:
        """Switch to TLS after the server said OK to STARTTLS (nothing may be buffered)."""
        assert not self.buf, self.buf
        self.sock = context.wrap_socket(self.sock, server_hostname=host)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError('connection closed; unread: %r' % self.buf)
        self.buf += data

    def readline(self) -> bytes:
        """Return the next response, with any literals it carries."""
        out = b''
        while True:
            while b'\r\n' not in self.buf:
                self._fill()
            line, _, self.buf = self.buf.partition(b'\r\n')
            out += line + b'\r\n'
            match = _LITERAL.search(out)
            if not match:
                return out
            size = int(match.group(1))
            while len(self.buf) < size:
                self._fill()
            out += self.buf[:size]
            self.buf = self.buf[size:]

    def read_until_tagged(self, tag: bytes) -> tuple[list[bytes], bytes]:
        """Read responses up to the tagged one; return (untagged and other lines, tagged)."""
        lines = []
        while True:
            line = self.readline()
            if line.startswith(tag + b' '):
                return lines, line
            lines.append(line)

    def command(self, tag: bytes, text: bytes) -> tuple[list[bytes], bytes]:
        self.send(tag + b' ' + text + b'\r\n')
        return self.read_until_tagged(tag)

    def login(self, user: str, password: str, tag: bytes = b'L1') -> bytes:
        _, tagged = self.command(tag, b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        return tagged

    def logout(self) -> list[bytes]:
        lines, tagged = self.command(b'Z9', b'LOGOUT')
        assert tagged.startswith(b'Z9 OK'), tagged
        return lines

    def read_eof(self) -> bytes:
        """Read until the peer closes; return what came."""
        data = self.buf
        self.buf = b''
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> 'Client':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
