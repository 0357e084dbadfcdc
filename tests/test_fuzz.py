"""Hostile input to the pure parsers (hypothesis, bounded): nothing escapes but the
protocol's own errors, and the framer never holds more than its line limit."""
from hypothesis import given, settings
from hypothesis import strategies as st

from gimapproxy.command import BadCommand, parse_command
from gimapproxy.protocol import Framer, ProtocolError, parse_response, rewrite_capabilities

PIECES = [b'a1 ', b'LOGIN ', b'AUTHENTICATE ', b'PLAIN ', b'"', b'\\', b'{', b'}', b'{5}',
          b'{5+}', b'~{3}', b'{99999999999}', b'(', b')', b'\r\n', b'\n', b'\r', b'\x00',
          b'*', b'+ ', b'NIL', b' ', b'OK ', b'[CAPABILITY IMAP4rev1 AUTH=PLAIN] ',
          b'\xff\xfe', b'x' * 40]
imap_like = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=20)),
                     max_size=40).map(b''.join)
splits = st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10)
LIMIT = 64


def drain(framer):
    """Take every complete event; return them. Raises only ProtocolError."""
    events = []
    while True:
        event = framer.next_event()
        if event is None:
            return events
        events.append(event)


@settings(max_examples=400, deadline=None)
@given(data=imap_like, sizes=splits)
def test_framer_only_raises_protocol_errors_and_stays_bounded(data, sizes):
    framer = Framer(LIMIT)
    start, i = 0, 0
    try:
        while start < len(data):
            size = sizes[i % len(sizes)]
            framer.feed(data[start:start + size])
            start, i = start + size, i + 1
            drain(framer)
            assert framer.buffered <= LIMIT
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(data=imap_like)
def test_command_and_response_parsers_only_raise_their_own_errors(data):
    try:
        command = parse_command(data)
        assert command.tag and command.name
    except BadCommand:
        pass
    try:
        parse_response(data)
    except ProtocolError:
        pass
    assert isinstance(rewrite_capabilities(data), bytes)
