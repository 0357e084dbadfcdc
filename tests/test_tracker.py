"""The command tracker, byte by byte: every client stream is also fed one byte at a time
(and in splits of 2, 3 and 7), and must give the same answers."""
import pytest

from gimapproxy.protocol import LineTooLong
from gimapproxy.tracker import Held, Tracker

SPLITS = [1, 2, 3, 7, 100000]


def feed(client: bytes, step: int, tracker=None, forward_held=True):
    """Feed `client` in pieces of `step` bytes; return (tracker, bytes for the server,
    held commands). Held commands are forwarded (recorded) unless told otherwise."""
    tracker = tracker or Tracker()
    sent, held = [], []
    for start in range(0, len(client), step):
        tracker.feed(client[start:start + step])
        while (event := tracker.next_event()) is not None:
            if isinstance(event, Held):
                held.append((event.kind, event.tag))
                if forward_held:
                    sent.append(tracker.forward(event))
            else:
                sent.append(event)
    return tracker, b''.join(sent), held


def answer(tracker, server: bytes) -> bytes:
    """Hand the tracker each response line of `server`; return what the client gets."""
    return b''.join(tracker.on_response(line) + b'\n'
                    for line in server.split(b'\n')[:-1])


# (client stream, server lines, tags still in flight, unclean reason or None)
CASES = [
    # Clean pipelines, literals the server reads, IDLE and its DONE.
    (b'a SELECT INBOX\r\nb FETCH 1:2 (FLAGS)\r\n',
     b'* 2 EXISTS\r\na OK [READ-WRITE] done\r\n* 1 FETCH (FLAGS ())\r\nb OK done\r\n',
     [], None),
    (b'a APPEND INBOX (\\Seen) {5+}\r\nhello\r\nb NOOP\r\n', b'a OK done\r\n', [b'b'], None),
    (b'a APPEND INBOX ~{3}\r\n\x00\x01\x02\r\n', b'+ OK\r\na OK done\r\n', [], None),
    (b'a LOGIN {3}\r\n', b'', [b'a'], 'unknown command: LOGIN'),
    (b'a CREATE {3+}\r\nfoo\r\n', b'a OK done\r\n', [], None),
    (b'a STATUS {5+}\r\nINBOX (MESSAGES)\r\n', b'* STATUS INBOX (MESSAGES 2)\r\na OK x\r\n',
     [], None),
    (b'a IDLE\r\nDONE\r\nb NOOP\r\n', b'+ idling\r\na OK done\r\nb OK done\r\n', [], None),
    (b'a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n', b'a OK done\r\n',
     [], None),
    (b'a ID ("name" "x" "version" {1+}\r\n1)\r\n', b'* ID NIL\r\na OK done\r\n', [], None),
    # Literal sizes as Dovecot reads them: any number of digits.
    (b'a SELECT {000000000005+}\r\nINBOX\r\n', b'a OK done\r\n', [], None),
    # Literals the server does not read: the announcement is the end of the command.
    (b'a NOOP {00000000008+}\r\nb ENABLE QRESYNC\r\n', b'', [b'a', b'b'],
     'literal the server does not read: NOOP'),
    (b'a CREATE foo {8+}\r\nb NOTIFY NONE\r\n', b'', [b'a', b'b'],
     'literal the server does not read: CREATE'),
    (b'a STATUS INBOX (MESSAGES) {5+}\r\nb NOOP\r\n', b'', [b'a', b'b'],
     'literal the server does not read: STATUS'),
    (b'a FETCH 1 ~{3+}\r\nabc\r\n', b'', [b'a', b'abc'],
     'literal the server does not read: FETCH'),
    (b'a SELECT "x{5}\r\nb NOOP\r\n', b'', [b'a', b'b'],
     'literal the server does not read: SELECT'),
    (b'a SELECT x{5}\r\nb NOOP\r\n', b'', [b'a', b'b'],
     'literal the server does not read: SELECT'),
    (b'a XFOO {3+}\r\nb NOOP\r\n', b'', [b'a', b'b'], 'unknown command: XFOO'),
    # Tags: reused while in flight, refused by the server, missing command.
    (b'a SELECT INBOX\r\na NOOP\r\n', b'a OK done\r\na OK done\r\n', [],
     'tag reused while in flight'),
    (b'a] NOOP\r\n', b'* BAD Error in IMAP tag: Invalid tag.\r\n', [], 'invalid tag'),
    (b'\xe4 NOOP\r\n', b'* BAD Error in IMAP tag: Invalid tag.\r\n', [], 'invalid tag'),
    (b'DONE\r\nz NOOP\r\n', b'DONE BAD Error in IMAP command: Invalid command name.\r\n'
     b'z OK done\r\n', [], 'not a command: DONE'),
    # What the server says that no command asked for.
    (b'a NOOP\r\n', b'* ENABLED QRESYNC\r\na OK done\r\n', [], 'ENABLED without ENABLE'),
    (b'a NOOP\r\n', b'* 3 EXISTS\r\na OK done\r\n', [],
     'mailbox data with no mailbox selected'),
    (b'a NOOP\r\n', b'+ go\r\na OK done\r\n', [], 'continuation request nobody asked for'),
    (b'a NOOP\r\n', b'zz OK x\r\na OK done\r\n', [], 'reply to a tag never sent'),
    (b'a SEARCH {3}\r\n', b'a BAD no\r\n', [], 'BAD reply to a command with literals'),
    # State no reset undoes.
    (b'a NOTIFY NONE\r\n', b'a OK done\r\n', [], 'notify'),
    (b'a SEARCH RETURN (UPDATE) ALL\r\n', b'a OK done\r\n', [], 'search updates'),
]


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client, server, inflight, unclean', CASES)
def test_tracker_reads_as_the_server_does(client, server, inflight, unclean, step):
    tracker, sent, held = feed(client, step)
    assert sent == client                  # every byte goes to the server, in order
    assert answer(tracker, server) == server
    assert sorted(tracker.inflight) == sorted(inflight)
    if unclean is None:
        assert tracker.unclean is None
    else:
        assert tracker.unclean is not None and tracker.unclean.startswith(unclean), \
            tracker.unclean


# Implicit CONDSTORE (RFC 7162 section 3.1) wherever it hides: the connection is still
# clean, and is cached under the CONDSTORE profile.
CONDSTORE_CASES = [
    (b'a STATUS {5+}\r\nINBOX (MESSAGES HIGHESTMODSEQ)\r\n', b'a OK done\r\n'),
    (b'a EXAMINE {5+}\r\nINBOX (CONDSTORE)\r\n', b'a OK done\r\n'),
    (b'a EXAMINE INBOX ( CONDSTORE)\r\n', b'a OK done\r\n'),
    (b'a SEARCH CHARSET {5+}\r\nUTF-8 MODSEQ 1\r\n', b'a OK done\r\n'),
    (b'a SEARCH {6+}\r\nMODSEQ 1\r\n', b'a OK done\r\n'),
    (b'a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5)\r\n', b'a OK done\r\n'),
    (b'a SELECT INBOX\r\nb NOOP\r\n',
     b'a OK done\r\n* 1 FETCH (FLAGS () MODSEQ (5))\r\nb OK done\r\n'),
]


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client, server', CONDSTORE_CASES)
def test_implicit_condstore(client, server, step):
    tracker, sent, _ = feed(client, step)
    assert sent == client and answer(tracker, server) == server
    assert tracker.condstore and tracker.unclean is None and tracker.quiet
    tracker, _, _ = feed(b'a NOOP\r\nb SELECT INBOX\r\n', step)
    answer(tracker, b'a OK done\r\nb OK done\r\n')
    assert not tracker.condstore


@pytest.mark.parametrize('step', SPLITS)
def test_the_framing_follows_the_server_s_literals(step):
    """The bytes of a literal the server reads are never read as a command; those of one
    it does not read are."""
    tracker, _, _ = feed(b'a SELECT {12+}\r\nb ENABLE X\r\n\r\n', step)
    assert list(tracker.inflight) == [b'a'] and tracker.unclean is None
    tracker, _, _ = feed(b'a NOOP {12+}\r\nb ENABLE X\r\n\r\n', step)
    assert list(tracker.inflight) == [b'a', b'b']


@pytest.mark.parametrize('step', SPLITS)
def test_held_commands(step):
    tracker, sent, held = feed(b'a ENABLE QRESYNC\r\nb COMPRESS DEFLATE\r\nc LOGOUT\r\n',
                               step, forward_held=False)
    assert held == [('profile', b'a'), ('compress', b'b'), ('logout', b'c')]
    assert sent == b'' and tracker.quiet
    # A LOGOUT is held only on a clean connection, and only as RFC 3501 writes it.
    tracker, sent, held = feed(b'a NOOP\r\na NOOP\r\nz LOGOUT\r\n', step)
    assert held == [] and sent.endswith(b'z LOGOUT\r\n')
    tracker, sent, held = feed(b'z LOGOUT now\r\n', step)
    assert held == [] and tracker.unclean == 'logout'


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client, profile', [
    (b'a ENABLE QRESYNC\r\n', {b'QRESYNC', b'CONDSTORE'}),
    (b'i ID NIL\r\nc CAPABILITY\r\nn NOOP\r\nm NAMESPACE\r\na ENABLE X\r\n', {b'X'}),
    (b'a SELECT INBOX (CONDSTORE)\r\n', {b'CONDSTORE'}),
    (b'i ID NIL\r\na FETCH 1:* (FLAGS MODSEQ)\r\n', {b'CONDSTORE'}),
    (b'a STATUS INBOX (HIGHESTMODSEQ)\r\n', {b'CONDSTORE'}),
])
def test_the_first_command_that_changes_state_may_choose_the_profile(client, profile, step):
    tracker, sent, held = feed(client, step, forward_held=False)
    assert [kind for kind, _ in held] == ['profile']
    assert tracker.pinned is False


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client', [
    b'a SELECT INBOX\r\nb ENABLE QRESYNC\r\n',          # pinned to its plain profile
    b'a LIST "" *\r\nb SELECT INBOX (CONDSTORE)\r\n',
    b'a SELECT {5+}\r\nINBOX (CONDSTORE)\r\n',          # only a one-line command is held
    b'a ENABLE\r\n',
])
def test_profile_is_not_chosen_after_state_changed(client, step):
    tracker, sent, held = feed(client, step, forward_held=False)
    assert held == [] and sent == client


def test_enable_sets_the_profile():
    tracker, _, _ = feed(b'a ENABLE QRESYNC\r\n', 100)
    answer(tracker, b'* ENABLED QRESYNC\r\na OK Enabled.\r\n')
    assert tracker.profile == {b'QRESYNC', b'CONDSTORE'} and tracker.enabled == [b'QRESYNC']
    assert tracker.unclean is None
    # Now CONDSTORE's words are expected.
    feed(b'b SELECT INBOX (CONDSTORE)\r\n', 100, tracker)
    answer(tracker, b'* 1 FETCH (MODSEQ (3))\r\nb OK done\r\n')
    assert tracker.unclean is None
    tracker, _, _ = feed(b'a ENABLE FOO\r\n', 100)
    answer(tracker, b'a NO no\r\n')
    assert tracker.unclean == 'enable failed'


def test_selected_state():
    tracker, _, _ = feed(b'a SELECT INBOX\r\n', 100)
    answer(tracker, b'* 2 EXISTS\r\na OK done\r\n')
    assert tracker.selected is True
    feed(b'b SELECT nosuch\r\n', 100, tracker)
    answer(tracker, b'b NO no\r\n')
    assert tracker.selected is False       # RFC 3501 section 6.3.1
    feed(b'c EXAMINE INBOX\r\nd UNSELECT\r\n', 100, tracker)
    answer(tracker, b'c OK done\r\nd OK done\r\n')
    assert tracker.selected is False and tracker.unclean is None


def test_a_refused_synchronizing_literal_is_not_sent():
    tracker, _, _ = feed(b'a APPEND INBOX {99999}\r\n', 100)
    assert tracker.framer.in_literal
    answer(tracker, b'a NO [TOOBIG] no\r\n')
    assert not tracker.framer.in_literal and tracker.quiet and tracker.unclean is None
    feed(b'b NOOP\r\n', 100, tracker)
    assert list(tracker.inflight) == [b'b']


def test_capabilities_are_filtered():
    tracker, _, _ = feed(b'a CAPABILITY\r\n', 100)
    assert answer(tracker, b'* CAPABILITY IMAP4rev1 AUTH=PLAIN COMPRESS=DEFLATE IDLE\r\n'
                           b'a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] done\r\n') == \
        b'* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1 IDLE] done\r\n'


def test_settle():
    tracker, _, _ = feed(b'a FETCH 1:* (FLAGS)\r\n', 100)
    assert tracker.settle() is None                # only the reply is owed
    tracker, _, _ = feed(b'a IDLE\r\n', 100)
    answer(tracker, b'+ idling\r\n')
    assert tracker.settle() is None and tracker.idle is not None   # owes its DONE
    tracker, _, _ = feed(b'a APPEND INBOX {5+}\r\nhel', 100)
    assert tracker.settle() == 'client left inside a command'
    tracker, _, _ = feed(b'a APPEND INBOX {5}\r\n', 100)
    assert tracker.settle() == 'client left inside a command'
    tracker, _, _ = feed(b'a ENABLE X\r\n', 100)
    assert tracker.settle() == 'client left inside ENABLE'


def test_lines_are_bounded():
    tracker = Tracker(max_line=100)
    tracker.feed(b'a NOOP ' + b'x' * 200)
    with pytest.raises(LineTooLong):
        tracker.next_event()


def test_strict_reading_is_linear():
    """A hostile line that almost parses costs time in proportion to its length."""
    import time
    for size in (1000, 40000):
        tracker = Tracker()
        started = time.perf_counter()
        tracker.feed(b'a SEARCH ' + b'a' * size + b'"' + b' x' * size + b'{5}\r\n')
        tracker.next_event()
        assert tracker.unclean is not None
    assert time.perf_counter() - started < 2.0
