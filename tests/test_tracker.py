"""The command tracker, byte by byte: every client stream is also fed one byte at a time
(and in splits of 2, 3 and 7), and must give the same answers.

The tracker sends every command it frames under a tag of its own (`P.1`, `P.2`, ...,
with the tests' prefix) and gives the server's tagged replies back under the client's.
The helpers below play the server's part: the server text in the tests is written with
the client's tags, and each tagged line goes to the tracker under the owned tag the
server got for that command (the oldest in flight with that client tag); a tag the
tracker never sent goes as it is."""
import re

import pytest

from gimapproxy.tracker import Held, Tracker

SPLITS = [1, 2, 3, 7, 100000]


class Wire:
    """A tracker between a client and a server that answers as the tests say."""

    def __init__(self, tracker=None, forward_held=True):
        self.tracker = tracker or Tracker()
        self.forward_held = forward_held
        self.sent = []                 # the bytes for the server, as sent
        self.held = []                 # (kind, tag) of held commands
        self.owned = {}                # owned tag: the client's

    def client(self, data: bytes, step: int) -> 'Wire':
        for start in range(0, len(data), step):
            self.tracker.feed(data[start:start + step])
            self.drain()
        return self

    def drain(self) -> None:
        tracker = self.tracker
        while (event := tracker.next_event()) is not None:
            if isinstance(event, Held):
                self.held.append((event.kind.value, event.tag))
                if not self.forward_held:
                    continue
                event = tracker.forward(event)
            self.sent.append(event)
            tag = tracker.prefix + b'%d' % tracker.sent
            if tag in tracker.inflight and tag not in self.owned:
                self.owned[tag] = tracker.inflight[tag].client_tag

    def server(self, text: bytes) -> bytes:
        """Hand the tracker each response line of `text`; return what the client gets."""
        out = []
        for line in text.split(b'\n')[:-1]:
            tag, sep, rest = line.partition(b' ')
            for owned, command in self.tracker.inflight.items():
                if command.client_tag == tag:
                    line = owned + sep + rest
                    break
            out.append(self.tracker.on_response(line) + b'\n')
            if self.tracker.released:
                self.tracker.released = False
                self.drain()
        return b''.join(out)

    def seen(self) -> bytes:
        """What the server got, with the client's tags where the tracker put its own."""
        sent = b''.join(self.sent)
        return re.sub(rb'(?m)^P\.[0-9]+(?= )',
                      lambda match: self.owned.get(match.group(0), match.group(0)), sent)

    def inflight(self) -> list:
        """The client's tags of the commands in flight, sorted."""
        return sorted(command.client_tag for command in self.tracker.inflight.values())


def feed(client: bytes, step: int, tracker=None, forward_held=True):
    """Feed `client` in pieces of `step` bytes; return (tracker, the bytes the server got
    with the client's tags, held commands). Held commands are forwarded (recorded)
    unless told otherwise."""
    wire = Wire(tracker, forward_held).client(client, step)
    return wire.tracker, wire.seen(), wire.held


def answer(tracker, server: bytes) -> bytes:
    """Hand the tracker each response line of `server`; return what the client gets."""
    return Wire(tracker).server(server)


# (client stream, server lines, tags still in flight, unclean reason or None)
CASES = [
    # Clean pipelines, literals the server reads, IDLE and its DONE.
    (b'a SELECT INBOX\r\nb FETCH 1:2 (FLAGS)\r\n',
     b'* 2 EXISTS\r\na OK [READ-WRITE] done\r\n* 1 FETCH (FLAGS ())\r\nb OK done\r\n',
     [], None),
    (b'a APPEND INBOX (\\Seen) {5+}\r\nhello\r\nb NOOP\r\n', b'a OK done\r\n', [b'b'], None),
    (b'a APPEND INBOX ~{3}\r\n\x00\x01\x02\r\n', b'+ OK\r\na OK done\r\n', [], None),
    (b'a LOGIN {3}\r\n', b'', [], 'unknown command: LOGIN'),
    (b'a CREATE {3+}\r\nfoo\r\n', b'a OK done\r\n', [], None),
    (b'a STATUS {5+}\r\nINBOX (MESSAGES)\r\n', b'* STATUS INBOX (MESSAGES 2)\r\na OK x\r\n',
     [], None),
    (b'a IDLE\r\nDONE\r\nb NOOP\r\n', b'+ idling\r\na OK done\r\nb OK done\r\n', [], None),
    (b'a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n', b'a OK done\r\n',
     [], None),
    (b'a ID ("name" "x" "version" {1+}\r\n1)\r\n', b'* ID NIL\r\na OK done\r\n', [], None),
    # Literal sizes as Dovecot reads them: any number of digits.
    (b'a SELECT {000000000005+}\r\nINBOX\r\n', b'a OK done\r\n', [], None),
    # Empty literals, as Dovecot reads them: size 0.
    (b'a CREATE {+}\r\n\r\n', b'a OK done\r\n', [], None),
    (b'a SELECT {}\r\n\r\nb NOOP\r\n', b'+ OK\r\na NO no\r\nb OK done\r\n', [],
     'NO reply to a command with literals'),
    (b'a APPEND INBOX ~{+}\r\n\r\n', b'', [b'a'], None),
    # Literals the server does not read: the announcement is the end of the command,
    # which goes as it came, and so does everything after it.
    (b'a NOOP {00000000008+}\r\nb ENABLE QRESYNC\r\n', b'', [],
     'literal the server does not read: NOOP'),
    (b'a CREATE foo {8+}\r\nb NOTIFY NONE\r\n', b'', [],
     'literal the server does not read: CREATE'),
    (b'a STATUS INBOX (MESSAGES) {5+}\r\nb NOOP\r\n', b'', [],
     'literal the server does not read: STATUS'),
    (b'a FETCH 1 ~{3+}\r\nabc\r\n', b'', [],
     'literal the server does not read: FETCH'),
    (b'a SELECT "x{5}\r\nb NOOP\r\n', b'', [],
     'literal the server does not read: SELECT'),
    (b'a SELECT x{5}\r\nb NOOP\r\n', b'', [],
     'literal the server does not read: SELECT'),
    (b'a XFOO {3+}\r\nb NOOP\r\n', b'', [], 'unknown command: XFOO'),
    # CREATE reads one argument, an empty literal; the rest of the line is skipped,
    # with the literal it announces, and NOTIFY runs.
    (b'a CREATE {+}\r\nb LIST "" {13+}\r\nb NOTIFY NONE\r\n',
     b'a NO [CANNOT] bad name\r\nb OK done\r\n', [],
     'literal the server does not read: CREATE'),
    # STATUS reads two arguments: a list that opens after them is skipped with the
    # rest of its line.
    (b'c STATUS box (MESSAGES) ({13+}\r\nb NOTIFY NONE\r\n', b'', [],
     'literal the server does not read: STATUS'),
    (b'c STATUS box ({5+}\r\nUNSEEN)\r\n', b'c OK done\r\n', [], None),
    # A refused APPEND: Dovecot reads on, its literal's bytes as arguments.
    (b'a APPEND nobox foo {7+}\r\nx {6+}\r\nb NOOP\r\n', b'a NO [TRYCREATE] no\r\n',
     [b'b'], 'NO reply to a command with literals'),
    # Synchronizing literals: what follows the announcement waits for "+"; after a
    # refusal it is the next command, as the server reads it.
    (b'c APPEND nobox {13}\r\nb NOTIFY NONE\r\n', b'c NO [TRYCREATE] no\r\n', [],
     'notify'),
    (b'c APPEND box {0}\r\nb NOTIFY NONE\r\n', b'c NO no\r\n', [], 'notify'),
    (b'c APPEND box {13}\r\nb NOTIFY NONE\r\n', b'+ OK\r\n', [b'c'], None),
    (b'c APPEND box {13}\r\nb NOTIFY NONE\r\nd NOOP\r\n', b'+ OK\r\nc OK done\r\n',
     [b'd'], None),
    # Tags: reused while in flight (each gets its own reply), refused by the server,
    # missing command.
    (b'a SELECT INBOX\r\na NOOP\r\n', b'a OK done\r\na OK done\r\n', [], None),
    (b'a] NOOP\r\n', b'* BAD Error in IMAP tag: Invalid tag.\r\n', [], 'invalid tag'),
    (b'\xe4 NOOP\r\n', b'* BAD Error in IMAP tag: Invalid tag.\r\n', [], 'invalid tag'),
    (b'DONE\r\nz NOOP\r\n', b'DONE BAD Error in IMAP command: Invalid command name.\r\n'
     b'z OK done\r\n', [], 'not a command: DONE'),
    # What the server says that no command asked for.
    (b'a NOOP\r\n', b'* ENABLED QRESYNC\r\na OK done\r\n', [], 'ENABLED without ENABLE'),
    (b'a NOOP\r\n', b'* 3 EXISTS\r\na OK done\r\n', [],
     'mailbox data with no mailbox selected'),
    (b'a NOOP\r\n', b'+ go\r\na OK done\r\n', [], 'continuation request nobody asked for'),
    (b'a NOOP\r\n', b'zz OK x\r\na OK done\r\n', [],
     'server ran a command the proxy did not frame'),
    (b'a SEARCH {3+}\r\nabc\r\n', b'a BAD no\r\n', [],
     'BAD reply to a command with literals'),
    (b'a SEARCH {3}\r\n', b'a BAD no\r\n', [], None),     # refused before "+"
    # The owned tags' prefix from the client: learned, so not to be trusted.
    (b'a SEARCH TEXT P.1\r\n', b'a OK done\r\n', [], "client sent the proxy's tag"),
    # State no reset undoes.
    (b'a NOTIFY NONE\r\n', b'a OK done\r\n', [], 'notify'),
    (b'a SEARCH RETURN (UPDATE) ALL\r\n', b'a OK done\r\n', [], 'search updates'),
]


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client, server, inflight, unclean', CASES)
def test_tracker_reads_as_the_server_does(client, server, inflight, unclean, step):
    wire = Wire().client(client, step)
    assert wire.server(server) == server
    assert wire.seen() == client           # every byte goes to the server, in order
    tracker = wire.tracker
    assert wire.inflight() == sorted(inflight)
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
    tracker, sent, _ = feed(b'a SELECT {12+}\r\nb ENABLE X\r\n\r\n', step)
    assert [c.client_tag for c in tracker.inflight.values()] == [b'a']
    assert tracker.unclean is None
    # The bytes of the one it does not read go as they came: no owned tag in them.
    wire = Wire().client(b'a NOOP {12+}\r\nb ENABLE X\r\n\r\n', step)
    assert b''.join(wire.sent) == b'a NOOP {12+}\r\nb ENABLE X\r\n\r\n'
    assert wire.tracker.quiet and wire.tracker.unclean is not None


@pytest.mark.parametrize('step', SPLITS)
def test_commands_go_under_owned_tags(step):
    """The server sees the proxy's tags, the client its own, whatever it reuses."""
    wire = Wire(Tracker(prefix=b'Gx.')).client(b'a NOOP\r\na SELECT INBOX\r\n', step)
    assert b''.join(wire.sent) == b'Gx.1 NOOP\r\nGx.2 SELECT INBOX\r\n'
    tracker = wire.tracker
    assert tracker.on_response(b'Gx.1 OK NOOP done\r') == b'a OK NOOP done\r'
    assert tracker.on_response(b'Gx.2 OK [READ-WRITE] ok\r') == b'a OK [READ-WRITE] ok\r'
    assert tracker.quiet and tracker.unclean is None and tracker.selected
    # A reply to a tag the proxy never sent goes to the client as it is.
    assert tracker.on_response(b'a OK done\r') == b'a OK done\r'
    assert tracker.unclean == 'server ran a command the proxy did not frame'


@pytest.mark.parametrize('step', SPLITS)
def test_the_prefix_is_found_across_reads(step):
    tracker, _, _ = feed(b'a SEARCH TEXT xGx.y\r\n', step, Tracker(prefix=b'Gx.'))
    assert tracker.unclean == "client sent the proxy's tag"


@pytest.mark.parametrize('step', SPLITS)
def test_held_commands(step):
    tracker, sent, held = feed(b'a ENABLE QRESYNC\r\nb COMPRESS DEFLATE\r\nc LOGOUT\r\n',
                               step, forward_held=False)
    assert held == [('profile', b'a'), ('compress', b'b'), ('logout', b'c')]
    assert sent == b'' and tracker.quiet
    # A LOGOUT is held only on a clean connection, and only as RFC 3501 writes it.
    tracker, sent, held = feed(b'a NOOP\r\na XFOO\r\nz LOGOUT\r\n', step)
    assert held == [] and sent.endswith(b'z LOGOUT\r\n')
    tracker, sent, held = feed(b'z LOGOUT now\r\n', step)
    assert held == [] and tracker.unclean == 'logout'


@pytest.mark.parametrize('step', SPLITS)
@pytest.mark.parametrize('client, profile', [
    (b'a ENABLE QRESYNC\r\n', {b'QRESYNC', b'CONDSTORE'}),
    (b'i ID NIL\r\nc CAPABILITY\r\nn NOOP\r\nm NAMESPACE\r\na ENABLE X\r\n', {b'X'}),
    (b'a SELECT INBOX (CONDSTORE)\r\n', {b'CONDSTORE'}),
    (b'i ID NIL\r\na EXAMINE "a b" (condstore)\r\n', {b'CONDSTORE'}),
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
    # Commands that only might turn CONDSTORE on: a word in a name, a FETCH of MODSEQ
    # with nothing selected (BAD), a parameter list of other words.
    b'a LIST "" modseq\r\n',
    b'a CREATE condstore\r\n',
    b'i ID NIL\r\na FETCH 1:* (FLAGS MODSEQ)\r\n',
    b'a STATUS INBOX (HIGHESTMODSEQ)\r\n',
    b'a SELECT INBOX (CONDSTORE QRESYNC)\r\n',
    b'a SELECT INBOX  (CONDSTORE)\r\n',
])
def test_profile_is_not_chosen_after_state_changed(client, step):
    tracker, sent, held = feed(client, step, forward_held=False)
    assert held == [] and sent == client


def test_enable_sets_the_profile():
    tracker, _, _ = feed(b'a ENABLE QRESYNC\r\n', 100)
    answer(tracker, b'* ENABLED QRESYNC\r\na OK Enabled.\r\n')
    assert tracker.profile == {b'QRESYNC', b'CONDSTORE'} and tracker.unclean is None
    # The server's own answer, to be given again to the same bytes.
    replay = tracker.replay
    assert replay.command == b' ENABLE QRESYNC\r\n'
    assert replay.answer(b'z9') == b'* ENABLED QRESYNC\r\nz9 OK Enabled.\r\n'
    # Now CONDSTORE's words are expected.
    feed(b'b SELECT INBOX (CONDSTORE)\r\n', 100, tracker)
    answer(tracker, b'* 1 FETCH (MODSEQ (3))\r\nb OK done\r\n')
    assert tracker.unclean is None
    tracker, _, _ = feed(b'a ENABLE FOO\r\n', 100)
    answer(tracker, b'a NO no\r\n')
    assert tracker.unclean == 'enable failed'


@pytest.mark.parametrize('client, server', [
    # Not alone in flight, or not the first command that changes state.
    (b'a NOOP\r\nb ENABLE CONDSTORE\r\n', b'a OK x\r\n* ENABLED CONDSTORE\r\nb OK x\r\n'),
    (b'a ENABLE CONDSTORE\r\nb NOOP\r\n', b'* ENABLED CONDSTORE\r\na OK x\r\nb OK x\r\n'),
    (b'a LIST "" x\r\n', b'a OK x\r\n'),
    # An answer with more than ENABLED lines in it.
    (b'a ENABLE CONDSTORE\r\n', b'* OK [ALERT] hi\r\n* ENABLED CONDSTORE\r\na OK x\r\n'),
])
def test_only_an_enable_alone_is_kept_for_replay(client, server):
    wire = Wire()
    wire.client(client, 100)
    wire.server(server)
    if client.startswith(b'a LIST'):
        wire.client(b'b ENABLE CONDSTORE\r\n', 100)
        wire.server(b'* ENABLED CONDSTORE\r\nb OK x\r\n')
    assert wire.tracker.profile == {b'CONDSTORE'} and wire.tracker.replay is None


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
    assert tracker.held is not None and not tracker.framer.in_literal
    answer(tracker, b'a NO [TOOBIG] no\r\n')
    assert tracker.held is None and tracker.quiet and tracker.unclean is None
    feed(b'b NOOP\r\n', 100, tracker)
    assert [c.client_tag for c in tracker.inflight.values()] == [b'b']


def test_capabilities_are_filtered():
    tracker, _, _ = feed(b'a CAPABILITY\r\n', 100)
    assert answer(tracker, b'* CAPABILITY IMAP4rev1 AUTH=PLAIN COMPRESS=DEFLATE IDLE\r\n'
                           b'a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] done\r\n') == \
        b'* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1 IDLE] done\r\n'


def test_leftover():
    tracker, _, _ = feed(b'a FETCH 1:* (FLAGS)\r\n', 100)
    assert tracker.leftover() is None                # only the reply is owed
    tracker, _, _ = feed(b'a IDLE\r\n', 100)
    answer(tracker, b'+ idling\r\n')
    assert tracker.leftover() is None and tracker.idling is not None   # owes its DONE
    tracker, _, _ = feed(b'a APPEND INBOX {5+}\r\nhel', 100)
    assert tracker.leftover() == 'client left inside a command'
    tracker, _, _ = feed(b'a APPEND INBOX {5}\r\n', 100)
    assert tracker.leftover() == 'client left inside a literal'
    tracker, _, _ = feed(b'a ENABLE X\r\n', 100)
    assert tracker.leftover() == 'client left inside ENABLE'


@pytest.mark.parametrize('step', SPLITS)
def test_a_line_past_the_bound_goes_on_as_it_came(step):
    """The server's line limits apply after login, not the proxy's: past its buffer the
    tracker frames nothing more, and the bytes go to the server unchanged."""
    client = b'a NOOP ' + b'x' * 200 + b'\r\nb NOOP\r\n'
    wire = Wire(Tracker(max_line=100)).client(client, step)
    assert b''.join(wire.sent) == client
    assert wire.tracker.unclean.startswith('command the proxy does not frame')


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
