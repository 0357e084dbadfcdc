"""The pure protocol layer, byte by byte: every input is also fed one byte at a time."""
import pytest

from gimapproxy.command import BadCommand, command_head, parse_command, tag_of
from gimapproxy.protocol import (BadLiteral, Framer, Line, LineTooLong, LiteralData, astring,
                                 filter_capabilities, literal_of, parse_response, quote,
                                 rewrite_capabilities)


def frame(data: bytes, step: int, max_line: int = 1000) -> list:
    """Feed `data` in pieces of `step` bytes; return events with literal pieces merged."""
    framer = Framer(max_line)
    events = []
    for start in range(0, len(data), step):
        framer.feed(data[start:start + step])
        while (event := framer.next_event()) is not None:
            if isinstance(event, LiteralData) and events and isinstance(events[-1], LiteralData) \
                    and not events[-1].last:
                event = LiteralData(events.pop().data + event.data, event.last)
            events.append(event)
    assert framer.buffered == 0
    return events


SPLITS = [1, 2, 3, 7, 10000]


@pytest.mark.parametrize('step', SPLITS)
def test_framer_lines_and_literals(step):
    data = (b'a1 NOOP\r\n'
            b'a2 APPEND INBOX {12}\r\nhello\r\na2 OK\r\n'
            b'a3 LOGIN {3+}\r\nbob {0}\r\n\r\n'
            b'a4 FETCH 1 BODY[] ~{2}\r\n\x00\x01 x\n')
    assert frame(data, step) == [
        Line(b'a1 NOOP\r\n', True),
        Line(b'a2 APPEND INBOX {12}\r\n', True, 12, True),
        LiteralData(b'hello\r\na2 OK', True),       # never scanned for commands
        Line(b'\r\n', False),
        Line(b'a3 LOGIN {3+}\r\n', True, 3, False),
        LiteralData(b'bob', True),
        Line(b' {0}\r\n', False, 0, True),
        Line(b'\r\n', False),
        Line(b'a4 FETCH 1 BODY[] ~{2}\r\n', True, 2, True),
        LiteralData(b'\x00\x01', True),
        Line(b' x\n', False),                       # bare LF accepted, as Dovecot does
    ]


def split_runs(events: list) -> list:
    """next_event's events in next_lines' shape: every Line becomes (first line's
    `first`, the lines' bytes, last line's literal and sync), runs of lines merged."""
    runs = []
    for event in events:
        if isinstance(event, Line) and runs and isinstance(runs[-1], list) \
                and runs[-1][2] is None:
            runs[-1][1] += event.data
            runs[-1][2:] = [event.literal, event.sync]
        elif isinstance(event, Line):
            runs.append([event.first, event.data, event.literal, event.sync])
        else:
            runs.append(event)
    return runs


SERVER_STREAM = (b'* OK [CAPABILITY IMAP4rev1] ready\r\n* 1 FETCH (BODY[] {12}\r\n'
                 b'a1 OK\r\n* 2\r\n)\r\n* 2 EXISTS\r\n* 3 FETCH (X {0}\r\n {2+}\r\n'
                 b'ab)\r\n+ go\r\na2 OK [x] {2}\r\n\r\n~{1}\r\nZ\n* 4 EXPUNGE\n')


@pytest.mark.parametrize('step', SPLITS)
def test_next_lines_cuts_where_next_event_does(step):
    """next_lines returns runs of whole lines, cut after each literal announcement, and
    the literals in between exactly as next_event does, whatever the split."""
    framer = Framer(1000)
    got = []
    for start in range(0, len(SERVER_STREAM), step):
        framer.feed(SERVER_STREAM[start:start + step])
        while (event := framer.next_lines()) is not None:
            if isinstance(event, Line):
                last = event.data.rstrip(b'\n').rsplit(b'\n', 1)[-1] + b'\n'
                announced = literal_of(last)
                assert (event.literal, event.sync) == (announced[:2] if announced else (None, False))
            got.append(event)
    assert framer.at_boundary and not framer.buffered
    reference = frame(SERVER_STREAM, 10000)
    assert b''.join(e.data for e in got) == SERVER_STREAM
    assert [r for r in split_runs(got) if isinstance(r, list)] == \
        [r for r in split_runs(reference) if isinstance(r, list)]


def test_next_lines_limits():
    framer = Framer(10)
    framer.feed(b'* 1 FETCH (X {9999999999}\r\n')
    with pytest.raises(BadLiteral):
        framer.next_lines()
    framer = Framer(10)
    framer.feed(b'* a line without an end')
    with pytest.raises(LineTooLong):
        framer.next_lines()


@pytest.mark.parametrize('step', SPLITS)
def test_framer_boundary_tracking(step):
    framer = Framer(100)
    data = b'* 1 FETCH (BODY[] {3}\r\nabc)\r\n'
    seen = []
    for start in range(0, len(data), step):
        framer.feed(data[start:start + step])
        while framer.next_event() is not None:
            seen.append(framer.at_boundary)
    assert seen[-1] is True
    assert not any(seen[:-1])


@pytest.mark.parametrize('step', [1, 5, 200])
def test_framer_line_limit(step):
    framer = Framer(16)
    with pytest.raises(LineTooLong):
        for start in range(0, 40, step):
            framer.feed((b'x' * 40)[start:start + step])
            framer.next_event()
    framer = Framer(16)
    framer.feed(b'0123456789abcdef')     # exactly the limit, without its end yet: fine
    assert framer.next_event() is None
    framer.feed(b'\r\n')
    with pytest.raises(LineTooLong):
        framer.next_event()


def test_framer_cancel_literal():
    framer = Framer(100)
    framer.feed(b'a APPEND INBOX {5}\r\n')
    assert framer.next_event() == Line(b'a APPEND INBOX {5}\r\n', True, 5, True)
    assert framer.in_literal and not framer.at_boundary
    framer.cancel_literal()           # the server said NO instead of "+"
    framer.feed(b'b NOOP\r\n')
    assert framer.next_event() == Line(b'b NOOP\r\n', True)


def test_literal_announcements():
    assert literal_of(b'a LOGIN {5}\r\n') == (5, True, False)
    assert literal_of(b'a LOGIN {5+}\r\n') == (5, False, False)
    assert literal_of(b'a LOGIN ~{5}\r\n') == (5, True, True)
    assert literal_of(b'a LOGIN "{5}"\r\n') is None
    assert literal_of(b'a LOGIN {5}x\r\n') is None
    # No digits at all is a size of 0, as Dovecot reads it (digits, "+", then "}").
    assert literal_of(b'a LOGIN {}\r\n') == (0, True, False)
    assert literal_of(b'a LOGIN {+}\r\n') == (0, False, False)
    assert literal_of(b'a X {4294967295}\r\n') == (4294967295, True, False)
    # Any number of digits, leading zeros included, as Dovecot reads them.
    assert literal_of(b'a X {00000000008+}\r\n') == (8, False, False)
    assert literal_of(b'a X {' + b'0' * 500 + b'7}\r\n') == (7, True, False)
    for size in (b'4294967296', b'99999999999', b'1' * 5000):
        with pytest.raises(BadLiteral):
            literal_of(b'a X {' + size + b'}\r\n')


@pytest.mark.parametrize('step', SPLITS)
def test_framer_reads_long_sizes_and_literal8_only_where_asked(step):
    data = b'a APPEND x {000000000003+}\r\nabc b X ~{2}\r\nc NOOP\r\n'
    assert frame(data, step)[:4] == [
        Line(b'a APPEND x {000000000003+}\r\n', True, 3, False),
        LiteralData(b'abc', True),
        Line(b' b X ~{2}\r\n', False, 2, True),
        LiteralData(b'c ', True)]
    framer = Framer(1000, literal8=False)
    for start in range(0, len(data), step):
        framer.feed(data[start:start + step])
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    assert events[2:] == [Line(b' b X ~{2}\r\n', False), Line(b'c NOOP\r\n', True)]


def test_framer_reads_literals_only_when_told():
    framer = Framer(1000, auto_literals=False)
    framer.feed(b'a X {3}\r\nabc\r\nb Y {2}\r\nc\r\n')
    assert framer.next_event() == Line(b'a X {3}\r\n', True, 3, True)
    framer.expect_literal(3)
    assert framer.next_event() == LiteralData(b'abc', True)
    assert framer.next_event() == Line(b'\r\n', False)
    assert framer.next_event() == Line(b'b Y {2}\r\n', True, 2, True)
    assert framer.next_event() == Line(b'c\r\n', True)      # not read as a literal


def test_tag_and_head():
    assert command_head(b'a1 LOGOUT\r\n') == (b'a1', b'LOGOUT')
    assert command_head(b'a1 logout\r\n') == (b'a1', b'LOGOUT')
    assert command_head(b'a1 LOGOUTNOW\r\n') == (b'a1', b'LOGOUTNOW')
    assert command_head(b'a1 uid fetch 1 x\r\n') == (b'a1', b'UID')
    assert command_head(b'+a LOGOUT\r\n') == (None, None)      # "+" is not a tag character
    assert command_head(b'a1\r\n') == (None, None)
    assert command_head(b'a1 \r\n') == (b'a1', None)
    assert tag_of(b'x.y-1 NOOP\r\n') == b'x.y-1'
    assert tag_of(b'* NOOP\r\n') is None


def parse_split(data: bytes, step: int = 1):
    """parse_command over the bytes a Framer assembles when fed `step` bytes at a time."""
    framer = Framer(1000)
    parts = []
    for start in range(0, len(data), step):
        framer.feed(data[start:start + step])
        while (event := framer.next_event()) is not None:
            parts.append(event.data)
    assert framer.at_boundary
    return parse_command(b''.join(parts))


@pytest.mark.parametrize('data, tag, name, args', [
    (b'a LOGIN bob secret\r\n', b'a', b'LOGIN', [b'bob', b'secret']),
    (b'a login "bob" "s\\"e\\\\c"\r\n', b'a', b'LOGIN', [b'bob', b's"e\\c']),
    (b'a LOGIN {3}\r\nbob {6+}\r\nsec et\r\n', b'a', b'LOGIN', [b'bob', b'sec et']),
    (b'a LOGIN "b\xc3\xb6b" {2}\r\n\r\n\r\n', b'a', b'LOGIN', [b'b\xc3\xb6b', b'\r\n']),
    (b'a LOGIN "" ""\r\n', b'a', b'LOGIN', [b'', b'']),
    (b'a ID NIL\r\n', b'a', b'ID', [None]),
    (b'a ID ("name" "x" "version" NIL)\r\n', b'a', b'ID', [[b'name', b'x', b'version', None]]),
    (b'a ID ()\r\n', b'a', b'ID', [[]]),
    (b'a NOOP\n', b'a', b'NOOP', []),
    (b'a AUTHENTICATE PLAIN =\r\n', b'a', b'AUTHENTICATE', [b'PLAIN', b'=']),
])
def test_parse_command(data, tag, name, args):
    for parsed in (parse_command(data), parse_split(data)):
        assert (parsed.tag, parsed.name, parsed.args) == (tag, name, args)


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('data, args', [
    (b'a LOGIN {}\r\n {+}\r\n\r\n', [b'', b'']),
    (b'a LOGIN {+}\r\n {0}\r\n\r\n', [b'', b'']),
    (b'a ID ({}\r\n {+}\r\n)\r\n', [[b'', b'']]),
])
def test_literal_without_digits_is_empty(data, args, step):
    """Dovecot reads a literal's size as digits, an optional "+", then "}": no digits at
    all is a size of 0, and the framer and the parser before login read it so too."""
    assert parse_command(data).args == args
    assert parse_split(data, step).args == args
    starts = [event.first for event in frame(data, step) if isinstance(event, Line)]
    assert starts == [True] + [False] * (len(starts) - 1)      # one command


@pytest.mark.parametrize('data, tag', [
    (b'a LOGIN "bob\r\n', b'a'),
    (b'a LOGIN "b\\ob" x\r\n', b'a'),
    (b'a LOGIN bob  secret\r\n', b'a'),
    (b'a LOGIN bob secret \r\n', b'a'),
    (b'a ID ("a" "b"\r\n', b'a'),
    (b'a LOGIN {10}\r\nabc\r\n', b'a'),
    (b'a LOGIN x"y z\r\n', b'a'),
    (b'a\r\n', None),
    (b'* LOGIN a b\r\n', None),
    (b'\r\n', None),
])
def test_parse_command_errors_keep_the_tag(data, tag):
    with pytest.raises(BadCommand) as info:
        parse_command(data)
    assert info.value.tag == tag


def test_parse_response():
    ok = parse_response(b'A1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n')
    assert (ok.kind, ok.tag, ok.status, ok.code, ok.text) == (
        'tagged', b'A1', b'OK', b'CAPABILITY IMAP4rev1 IDLE', b'Logged in')
    no = parse_response(b'A2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n')
    assert (no.status, no.code) == (b'NO', b'AUTHENTICATIONFAILED')
    assert parse_response(b'* BYE shutting down\r\n').status == b'BYE'
    assert parse_response(b'* 23 EXISTS\r\n').name == b'EXISTS'
    assert parse_response(b'* 1 FETCH (FLAGS ())\r\n').name == b'FETCH'
    assert parse_response(b'* CAPABILITY IMAP4rev1\r\n').name == b'CAPABILITY'
    assert parse_response(b'+ idling\r\n').kind == 'continuation'
    assert parse_response(b'+\r\n').kind == 'continuation'
    assert parse_response(b'a ok done\r\n').status == b'OK'


def test_capability_filter():
    caps = [b'IMAP4rev1', b'SASL-IR', b'LOGIN-REFERRALS', b'ID', b'ENABLE', b'IDLE',
            b'STARTTLS', b'AUTH=PLAIN', b'auth=login', b'LOGINDISABLED', b'COMPRESS=DEFLATE',
            b'UNSELECT', b'UNAUTHENTICATE', b'LITERAL+']
    assert filter_capabilities(caps) == [b'IMAP4rev1', b'ID', b'ENABLE', b'IDLE',
                                         b'UNSELECT', b'LITERAL+']
    assert rewrite_capabilities(b'* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE IDLE\r\n') \
        == b'* CAPABILITY IMAP4rev1 IDLE\r\n'
    assert rewrite_capabilities(b'a OK [CAPABILITY IMAP4rev1 AUTH=PLAIN MOVE] Logged in\r\n') \
        == b'a OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n'
    assert rewrite_capabilities(b'* OK [UIDNEXT 4] x\r\n') == b'* OK [UIDNEXT 4] x\r\n'


def test_quoting():
    assert quote(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert astring(b'bob', False) == (b'"bob"', None)
    assert astring(b'b\xc3\xb6b', False) == (b'{4}', b'b\xc3\xb6b')
    assert astring(b'a\r\nb', True) == (b'{4+}', b'a\r\nb')
    for value in (b'plain', b'with "quotes" and \\', b'', b'sp ace'):
        text, literal = astring(value, False)
        assert literal is None
        assert parse_command(b't LOGIN ' + text + b' x\r\n').args[0] == value


def test_deep_nesting_is_refused_without_recursion():
    bad = None
    try:
        parse_command(b'a ID ' + b'(' * 8000 + b'\r\n')
    except BadCommand as exc:
        bad = exc
    assert bad is not None and bad.tag == b'a' and bad.message == 'Lists nested too deep'
    assert parse_command(b'a ID ((a b) (c (d)) ())\r\n').args == [[[b'a', b'b'],
                                                                   [b'c', [b'd']], []]]


def test_literal8_is_refused_before_login():
    with pytest.raises(BadCommand, match='literal8 not allowed here'):
        parse_command(b'a LOGIN user ~{9+}\r\n')


@pytest.mark.parametrize('caps, pieces, tail', [
    ({b'LITERAL+'}, [], b't LOGIN "bob" "p\\"w"\r\n'),
    ({b'LITERAL+'}, [(b't LOGIN "bob" {3+}\r\n', b'\xe4\xf6x', True)], b'\r\n'),
    (set(), [(b't LOGIN {4}\r\n', b'b\xf6b\n', False),
             (b' {3}\r\n', b'\xe4\xf6x', False)], b'\r\n'),
])
def test_login_command(caps, pieces, tail):
    from gimapproxy.protocol import login_command
    user = b'bob' if caps and not pieces else b'b\xf6b\n' if not caps else b'bob'
    password = b'p"w' if not pieces else b'\xe4\xf6x'
    assert login_command(b't', user, password, caps) == (pieces, tail)
