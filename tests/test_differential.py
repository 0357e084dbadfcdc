"""Differential fuzz test of session isolation, against a real Dovecot.

hypothesis writes a first session: commands valid and malformed, pipelined or one at a
time, with their arguments written in every literal form (`{n}` with the client waiting
for "+", `{n}` sent at once with the literal (a part that does not wait: the server may
refuse the command, to a mailbox that does not exist, say, and never send "+"), `{0}`
followed by the value anyway, `{n+}`, `~{n+}`, the empty literals `{}`, `{+}` and `~{}`
(size 0 to Dovecot), leading zeros, many digits, wrong sizes, a quoted string that ends
in `{n+}`), a literal that carries a command line of the carrying command's tag (NOTIFY
NONE, ENABLE QRESYNC, ...), literals announced after the last argument a command reads
(a literal or a list after STATUS's two arguments, after CREATE's one, an APPEND to a
mailbox that does not exist), reused and refused tags, stray lines (DONE, "+", empty
lines, garbage), ENABLE (with odd names, case and whitespace: lower case, X-UNKNOWN,
repeated names, a tab, a bare CR, two spaces), NOTIFY, SELECT and EXAMINE with
CONDSTORE, STATUS, FETCH and SEARCH with MODSEQ and CHANGEDSINCE, commands that only
name CONDSTORE's keywords (LIST, CREATE, STATUS of a mailbox named modseq or
changedsince, FETCH (MODSEQ) with nothing selected), IDLE; it logs in with the user name
as created or in another case (one account to Dovecot); it ends with LOGOUT, or the
client just leaves, after its last command or in the middle of it (inside a literal,
say).

Each example runs that session through the proxy, waits until the proxy has kept or
dropped the server connection, then runs the fixed probe (tests/transcript.py) as the
same user's next session through the proxy (under the name as created), and again
directly against Dovecot as a fresh login. The two transcripts must be equal. One
example in three opens the next session with a command that may move it to a cached
connection of another profile (an ENABLE of odd names, case or whitespace, a command
that only names a CONDSTORE keyword), recorded too: the move must leave the session and
its answers as a fresh login's. The log says whether the probe's session reused the
connection; the counts are printed at the end. The smuggles found so far (PLANTED) are
always the first examples, each in every run.

In CI: FUZZ_EXAMPLES examples (derandomized, so every run tries the same ones) within
FUZZ_SECONDS. Longer runs: GIMAPPROXY_FUZZ_EXAMPLES=2000 GIMAPPROXY_FUZZ_SECONDS=3600
(scripts/fuzz-isolation), GIMAPPROXY_FUZZ_SEED=<n> for other examples than CI's.
"""
import collections
import os
import re
import time
from dataclasses import dataclass
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, Phase, example, given, reject, seed, settings
from hypothesis import strategies as st

from tests.transcript import (Session, busy, closes_of, diff, login_results,
                              module_fixtures, probe, wait_settled)

FUZZ_EXAMPLES = int(os.environ.get('GIMAPPROXY_FUZZ_EXAMPLES', '150'))
FUZZ_SECONDS = float(os.environ.get('GIMAPPROXY_FUZZ_SECONDS', '60'))
FUZZ_SEED = os.environ.get('GIMAPPROXY_FUZZ_SEED')
# Record every differing example and go on, failing at the end with all of them (to
# survey a build), instead of stopping at the first.
KEEP_GOING = os.environ.get('GIMAPPROXY_FUZZ_KEEP_GOING') == '1'
SETTLE_TIMEOUT = 8.0        # the proxy may finish a departed client's commands first
CONTINUATION_WAIT = 0.5     # for "+" after a synchronizing literal's announcement


server, proxy = module_fixtures('fz', 2)


# -- the generator ---------------------------------------------------------------------

@dataclass
class Part:
    """Bytes to send; with `wait`, they end in a synchronizing literal's announcement
    and the client waits for "+" (or the command's tagged refusal) before going on."""
    data: bytes
    wait: bool = False
    tag: bytes = b''


class Script(NamedTuple):
    """A first session and how the next one opens. `items` are (pieces, tag, whether
    to wait for its reply); `ending` is 'logout', 'leave' (after the last item) or 'cut'
    (after `cut` bytes of the last item); `spelling` is how the first session writes the
    user name (see `spelled`); `opening`, the next session's first commands (texts
    without tag or line end), sent before the probe's and recorded with them."""
    items: list
    ending: str = 'logout'
    cut: int = 0
    spelling: str = 'as created'
    opening: tuple = ()


def _literal(value: bytes, form: str) -> list:
    """`value` as an IMAP string in `form`; a list of Parts and bytes."""
    n = len(value)
    if form == 'atom':
        return [value]
    if form == 'quoted':
        return [b'"' + value + b'"']
    if form == 'sync':
        return [Part(b'{%d}\r\n' % n, wait=True), value]
    if form == 'sync-at-once':                   # a part that does not wait for "+"
        return [b'{%d}\r\n' % n + value]
    if form == 'zero-at-once':                   # {0}, then the value all the same
        return [b'{0}\r\n' + value]
    if form == 'nonsync':
        return [b'{%d+}\r\n' % n + value]
    if form == 'literal8':
        return [b'~{%d+}\r\n' % n + value]
    if form == 'literal8-sync':
        return [Part(b'~{%d}\r\n' % n, wait=True), value]
    # Dovecot reads a size without digits as 0: an empty string, the value left out.
    if form == 'empty':
        return [b'{+}\r\n']
    if form == 'empty-sync':
        return [Part(b'{}\r\n', wait=True)]
    if form == 'empty8':
        return [b'~{+}\r\n']
    if form == 'empty8-sync':
        return [Part(b'~{}\r\n', wait=True)]
    if form.startswith('zeros'):                 # zeros4, zeros11, zeros24: digit count
        return [b'{%s+}\r\n' % str(n).zfill(int(form[5:])).encode() + value]
    if form == 'short':
        return [b'{%d+}\r\n' % max(0, n - 1) + value]
    if form == 'long':                           # ends after the line end that follows
        return [b'{%d+}\r\n' % (n + 2) + value + b'\r\n']
    if form == 'quoted-open':                    # a quoted string that ends in {n+}
        return [b'"x{%d+}\r\n' % n + value]
    raise ValueError(form)


EMPTY = ['empty', 'empty-sync', 'empty8', 'empty8-sync']
FORMS = ['atom', 'quoted', 'sync', 'sync-at-once', 'zero-at-once', 'nonsync', 'literal8',
         'literal8-sync', 'zeros4', 'zeros11', 'zeros24', 'short', 'long',
         'quoted-open'] + EMPTY
# The forms that write the value as a literal's bytes: one may carry a command line.
CARRYING = [form for form in FORMS if form not in ['atom', 'quoted'] + EMPTY]

# Commands: bytes, with ('slot', value) where an argument may take any form. None of
# them changes what the probe reads back (no \Deleted, no EXPUNGE, no flag on message 1).
S = 'slot'
# What webmail sends: a connection left by these alone is clean, and should be reused.
PLAIN_COMMANDS = [
    [b'NOOP'], [b'CAPABILITY'], [b'CHECK'], [b'ID NIL'], [b'NAMESPACE'],
    [b'SELECT ', (S, b'INBOX')], [b'EXAMINE ', (S, b'INBOX')],
    [b'SELECT ', (S, b'nosuchbox')], [b'UNSELECT'], [b'CLOSE'],
    [b'STATUS ', (S, b'INBOX'), b' (MESSAGES UIDNEXT)'],
    [b'FETCH 1:3 (FLAGS)'], [b'UID FETCH 1:3 (FLAGS)'], [b'FETCH 2 BODY.PEEK[HEADER]'],
    [b'SEARCH SUBJECT ', (S, b'test')], [b'SEARCH ALL'],
    [b'STORE 2 +FLAGS (\\Seen)'], [b'STORE 2 -FLAGS (\\Seen)'],
    [b'LIST "" ', (S, b'*')],
    [b'APPEND ', (S, b'INBOX'), b' ', (S, b'Subject: fuzz\r\n\r\nfuzz\r\n')],
]
# State a fresh login does not have: ENABLE, NOTIFY, CONDSTORE turned on by a command.
STATEFUL_COMMANDS = [
    [b'SELECT ', (S, b'INBOX'), b' (CONDSTORE)'],
    [b'EXAMINE ', (S, b'INBOX'), b' ( CONDSTORE)'],
    [b'STATUS ', (S, b'INBOX'), b' (MESSAGES HIGHESTMODSEQ)'],
    [b'ENABLE ', (S, b'CONDSTORE')], [b'ENABLE QRESYNC'], [b'ENABLE UTF8=ACCEPT'],
    [b'ENABLE CONDSTORE QRESYNC'],
    [b'NOTIFY NONE'], [b'NOTIFY SET (selected (MessageNew MessageExpunge))'],
    [b'FETCH 1 (MODSEQ)'], [b'FETCH 1:* (FLAGS) (CHANGEDSINCE 1)'],
    [b'SEARCH CHARSET ', (S, b'UTF-8'), b' MODSEQ 1'],
]
# ENABLE with names a server may read otherwise than a proxy: case, unknown and repeated
# names, whitespace Dovecot refuses (a tab, a bare CR) or takes (two spaces).
ENABLE_FORMS = [
    b'ENABLE condstore', b'ENABLE Condstore', b'ENABLE X-UNKNOWN', b'ENABLE CONDSTORE\t',
    b'ENABLE CONDSTORE\r', b'ENABLE  CONDSTORE', b'ENABLE CONDSTORE CONDSTORE',
    b'ENABLE CONDSTORE X-UNKNOWN', b'ENABLE qresync', b'ENABLE QRESYNC CONDSTORE',
    b'ENABLE CONDSTORE ', b'ENABLE']
# Commands that only name a CONDSTORE keyword (a mailbox or pattern of that name, a
# MODSEQ with nothing selected): they turn nothing on.
KEYWORD_COMMANDS = [
    [b'LIST "" ', (S, b'modseq')], [b'LIST "" ', (S, b'CondStore*')],
    [b'CREATE ', (S, b'changedsince')], [b'STATUS ', (S, b'modseq'), b' (MESSAGES)'],
    [b'SELECT ', (S, b'condstore')], [b'FETCH 1 (MODSEQ)'],
]
# Literals announced where the server reads no more (after STATUS's two arguments,
# after CREATE's one: it skips the rest of the line, literal unread), or in a command it
# refuses at once (APPEND to a mailbox that does not exist; a zero-byte message).
UNREAD_COMMANDS = [
    [b'STATUS ', (S, b'INBOX'), b' (MESSAGES) ', (S, b'x')],
    [b'STATUS ', (S, b'INBOX'), b' (MESSAGES) (', (S, b'x')],
    [b'CREATE ', (S, b'fuzzbox'), b' ', (S, b'x')],
    [b'CREATE ', (S, b'fuzzbox'), b' (', (S, b'x')],
    [b'APPEND ', (S, b'nosuchbox'), b' ', (S, b'Subject: fuzz\r\n\r\nfuzz\r\n')],
    [b'APPEND ', (S, b'nosuchbox'), b' foo ', (S, b'x'), b' ', (S, b'y')],
    [b'APPEND ', (S, b'INBOX'), b' ', (S, b'')],
]
# None of the commands changes what the probe reads back (no \Deleted, no EXPUNGE, no
# flag on message 1).
COMMANDS = (PLAIN_COMMANDS + STATEFUL_COMMANDS + [[text] for text in ENABLE_FORMS]
            + KEYWORD_COMMANDS + UNREAD_COMMANDS)
# What a literal may carry instead of its value: a command line under the carrying
# command's tag or an earlier one, alone or after an argument and a line end. A server
# that does not read the literal as one runs it, and answers it in the place of the
# command the proxy thought it carried, or of one the server swallowed. The line
# before it may be long (_PAD).
CARRIED = [b'NOTIFY NONE', b'ENABLE QRESYNC', b'ENABLE CONDSTORE', b'SELECT INBOX']
# Past the bytes of a literal a proxy may read for keywords.
_PAD = b'x' * 70 + b'\r\n'
STRAYS = [b'DONE\r\n', b'+\r\n', b'\r\n', b'garbage\r\n', b')\r\n', b'* NOOP\r\n',
          b'+ OK\r\n']
BAD_TAGS = [b'a]', b'\xc3\xa9', b'+', b'*', b'(', b'a{']
# How a first session writes the user name: one account to Dovecot (auth_username_format
# %Lu), whatever the case.
SPELLINGS = ['as created', 'upper case', 'capitalized']
# How the next session opens, before the probe's commands: one that may move it to a
# cached connection of another profile, and its answer then in the proxy's words. A
# CREATE is deleted again, so that the two runs of the probe find the same mailboxes.
OPENINGS = [(text,) for text in ENABLE_FORMS + [
    b'ENABLE CONDSTORE', b'ENABLE QRESYNC', b'LIST "" modseq', b'LIST "" condstore',
    b'STATUS changedsince (MESSAGES)', b'FETCH 1 (MODSEQ)', b'SELECT condstore']] + [
    (b'CREATE modseq-next', b'DELETE modseq-next')]


def spelled(user: str, spelling: str) -> str:
    """`user` as written in a login with `spelling` (one of SPELLINGS)."""
    return {'as created': user, 'upper case': user.upper(),
            'capitalized': user.capitalize()}[spelling]


@st.composite
def commands(draw, tag, plain, earlier=()):
    """One command with `tag`: a list of Parts and bytes. With `plain`, one webmail
    could send, its arguments written the usual way; else an argument written as a
    literal carries a command line (CARRIED, under `tag` or one of the `earlier`) one
    time in three. An empty literal that ends the command ends its line too: to a
    server that reads it, the line goes on into the next command."""
    if draw(st.integers(0, 11)) == 0:
        return [Part(tag + b' IDLE\r\n', wait=True, tag=tag), b'DONE\r\n']
    template = draw(st.sampled_from(PLAIN_COMMANDS if plain else COMMANDS))
    pieces = [tag + b' ']
    form = None
    for piece in template:
        if isinstance(piece, tuple):
            # Plain sessions write arguments the usual way; the others half the time.
            value = piece[1]
            if plain or draw(st.booleans()):
                form = 'nonsync' if b'\n' in value else 'atom'
            else:
                form = draw(st.sampled_from(FORMS))
                if form in CARRYING and draw(st.integers(0, 2)) == 0:
                    value = (draw(st.sampled_from([b'', b'x\r\n', _PAD]))
                             + draw(st.sampled_from([tag, tag] + list(earlier))) + b' '
                             + draw(st.sampled_from(CARRIED)))
            pieces += _literal(value, form)
        else:
            form = None
            pieces.append(piece)
    if form not in EMPTY:
        pieces.append(b'\r\n')
    for piece in pieces:
        if isinstance(piece, Part):
            piece.tag = tag
    return pieces


@st.composite
def sessions(draw):
    """A Script. Two in five first sessions are plain webmail sessions, so that the next
    session often gets the connection back; in the others one line in twenty is a
    stray line, one has a tag Dovecot refuses, one reuses an earlier tag. One in six
    logs in with the user name in another case; one next session in three opens with
    one of OPENINGS."""
    plain = draw(st.integers(0, 4)) < 2
    items = []
    for number in range(draw(st.integers(1, 6))):
        kind = 'command' if plain else draw(st.sampled_from(
            ['stray', 'bad tag', 'reused tag'] + ['command'] * 17))
        if kind == 'stray':
            items.append(([draw(st.sampled_from(STRAYS))], None, False))
            continue
        earlier = [item[1] for item in items if item[1]]
        if kind == 'bad tag':
            tag = draw(st.sampled_from(BAD_TAGS))
        elif kind == 'reused tag' and earlier:
            tag = draw(st.sampled_from(earlier))
        else:
            tag = b't%d' % number
        # Waiting for the reply of a tag Dovecot refuses would only time out.
        wait = tag not in BAD_TAGS and draw(st.booleans())
        items.append((draw(commands(tag, plain, earlier)), tag, wait))
    ending = draw(st.sampled_from(['logout', 'logout', 'leave', 'cut']))
    cut = draw(st.integers(0, 200))
    spelling = draw(st.sampled_from(SPELLINGS[:1] * 10 + SPELLINGS[1:]))
    opening = draw(st.sampled_from(OPENINGS)) if draw(st.integers(0, 2)) == 0 else ()
    return Script(items, ending, cut, spelling, opening)


def _one(data: bytes, tag: bytes) -> tuple:
    """A first-session item: bytes sent at once, then the reply of `tag` awaited."""
    return ([data], tag, True)


_LONG_QRESYNC = b'd NOOP ' + b'x' * 64 + b'\r\nb ENABLE QRESYNC'

# Always tried first, every one in every run: smuggles found against earlier builds,
# each a first session that left state on a connection the proxy kept, or a next
# session that the proxy answered in words Dovecot does not say.
PLANTED = [
    # ENABLE QRESYNC hidden from a proxy that counts `~{n+}` outside APPEND as a
    # literal (Dovecot does not) and does not count a literal size written with 11
    # digits (Dovecot does).
    Script([_one(b'x1 LIST "" ~{19+}\r\nx2 ENABLE QRESYNC\r\n'
                 b'x3 LIST "" {00000000009+}\r\nx2 NOOP\r\nx3 NOOP\r\n', b'x3')]),
    # Empty literals: Dovecot reads `{+}` as a literal of size 0, runs CREATE with an
    # empty name and skips the rest of that line, literal unread: it runs the NOTIFY a
    # proxy that needs a digit takes for the LIST's literal.
    Script([_one(b'a CREATE {+}\r\nb LIST "" {13+}\r\nb NOTIFY NONE\r\n', b'b')]),
    # The same twice: the first hides from Dovecot the ENABLE a proxy then waits for, the
    # second runs ENABLE QRESYNC from a literal, after a line long enough that a proxy
    # reading a literal's first bytes for keywords does not see it.
    Script([_one(b'a CREATE {+}\r\nb ENABLE\r\nc CREATE {+}\r\nd LIST "" {%d+}\r\n%s\r\n'
                 % (len(_LONG_QRESYNC), _LONG_QRESYNC), b'b')]),
    # `~{+}` too, a literal8 of size 0 in APPEND: Dovecot refuses the zero-byte message
    # and reads the next line as more of its arguments (b NOOP is swallowed); a list
    # after STATUS's two arguments then hides the NOTIFY that answers the b.
    Script([_one(b'a APPEND INBOX ~{+}\r\nb NOOP\r\n'
                 b'c STATUS INBOX (MESSAGES) ({13+}\r\nb NOTIFY NONE\r\n', b'b')]),
    # Literals the server never reads. An APPEND Dovecot refuses at once but whose
    # arguments it goes on reading, a literal's bytes among them: b NOOP is swallowed,
    # and the b that NOTIFY NONE answers is the one a proxy waits for. NOTIFY comes from
    # a list that opens after STATUS's two arguments (skipped with the rest of its line,
    # literal unread), or from a synchronizing APPEND literal refused with NO, never "+",
    # its bytes sent at once: to a mailbox that does not exist, or a zero-byte message.
    Script([_one(b'a APPEND no-such-box foo {7+}\r\nx {6+}\r\nb NOOP\r\n'
                 b'c STATUS INBOX (MESSAGES) ({13+}\r\nb NOTIFY NONE\r\n', b'b')]),
    Script([_one(b'a APPEND no-such-box foo {7+}\r\nx {6+}\r\nb NOOP\r\n'
                 b'c APPEND no-such-box {13}\r\nb NOTIFY NONE\r\n', b'b')]),
    Script([_one(b'a APPEND no-such-box foo {7+}\r\nx {6+}\r\nb NOOP\r\n'
                 b'c APPEND INBOX {0}\r\nb NOTIFY NONE\r\n', b'b')]),
    # The literal's bytes are read as arguments: a line end among them ends the APPEND.
    Script([_one(b'a APPEND no-such-box foo {7+}\r\nx {6+}\r\nb NOOP\r\n'
                 b'c APPEND no-such-box foo {16+}\r\nx\r\nb NOTIFY NONE\r\n', b'b')]),
    # The profile switch on a keyword: after a session that enabled CONDSTORE, a
    # session whose first command only names a keyword is moved to that connection.
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], opening=(b'LIST "" modseq',)),
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')],
           opening=(b'CREATE modseq-next', b'DELETE modseq-next')),
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], opening=(b'FETCH 1 (MODSEQ)',)),
    # ENABLE answered in the proxy's words after a switch: a name in lower case, an
    # unknown name, whitespace Dovecot refuses.
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], opening=(b'ENABLE condstore',)),
    Script([_one(b'e ENABLE X-UNKNOWN\r\n', b'e')], opening=(b'ENABLE X-UNKNOWN',)),
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], opening=(b'ENABLE CONDSTORE\t',)),
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], opening=(b'ENABLE CONDSTORE\r',)),
    # The user name in upper case: one account to Dovecot.
    Script([_one(b'a CREATE {+}\r\nb LIST "" {13+}\r\nb NOTIFY NONE\r\n', b'b')],
           spelling='upper case'),
    Script([_one(b'e ENABLE CONDSTORE\r\n', b'e')], spelling='upper case',
           opening=(b'ENABLE condstore',)),
]


def describe(script: Script) -> str:
    out = [] if script.spelling == 'as created' else [
        '(logged in with the user name in %s)' % script.spelling]
    for pieces, _, wait in script.items:
        data = b''.join(p.data + b'<wait +>' if isinstance(p, Part) and p.wait else
                        (p.data if isinstance(p, Part) else p) for p in pieces)
        out.append(repr(data) + (' (then its reply)' if wait else ''))
    end = script.ending + (' at byte %d' % script.cut if script.ending == 'cut' else '')
    out.append('then: ' + end)
    if script.opening:
        out.append('the next session opening with: %s'
                   % ', '.join(repr(text) for text in script.opening))
    return '\n'.join(out)


# -- running one example ---------------------------------------------------------------

def run_first_session(port, user, password, script: Script) -> None:
    """Play `script`'s first session as a client of the proxy, logged in as `user`
    (its answers are not compared)."""
    items, ending, cut = script.items, script.ending, script.cut
    with Session(port, timeout=3) as s:
        s.login(user, password)
        for number, (pieces, tag, wait) in enumerate(items):
            last = number == len(items) - 1
            budget = cut if last and ending == 'cut' else None
            for piece in pieces:
                data = piece.data if isinstance(piece, Part) else piece
                if budget is not None:
                    if budget <= len(data):
                        s.send(data[:budget])
                        return                          # the client leaves, mid-command
                    budget -= len(data)
                if not s.send(data):
                    return
                if isinstance(piece, Part) and piece.wait:
                    _wait_continuation(s, piece.tag)
            if wait and tag is not None and not s.ended:
                s.expect(tag, 2.0)
            if s.ended:
                return
        if ending == 'logout':
            s.command(b'Z9', b'LOGOUT', 3.0)


def _wait_continuation(s: Session, tag: bytes) -> None:
    """Wait for "+" or the command's tagged answer (a refusal), at most briefly: where
    the server does not read a literal there, no "+" comes."""
    deadline = time.monotonic() + CONTINUATION_WAIT
    while not s.ended and time.monotonic() < deadline:
        try:
            s.client.sock.settimeout(max(0.01, deadline - time.monotonic()))
            line = s.client.readline()
        except (OSError, EOFError):
            return
        if line.startswith(b'+') or line.startswith(tag + b' '):
            return


class Tally:
    """What the examples did, from the proxy's log."""

    def __init__(self):
        self.examples = 0
        self.results = collections.Counter()
        self.reasons = collections.Counter()
        self.failures: list[str] = []
        self.slowest = 0.0

    def line(self) -> str:
        reasons = ', '.join('%s: %d' % item for item in self.reasons.most_common())
        return ('differential fuzz: %d examples, %d differing; next session reused %d, '
                'new %d; slowest %.1fs; connections closed by reason: %s'
                % (self.examples, len(self.failures), self.results['reused'],
                   self.results['new'], self.slowest, reasons or '-'))


_ID = re.compile(r'\b[bc]\d+\b|\d+(\.\d+)?s\b')


def check_example(server, proxy, log, user, password, script: Script, tally) -> None:
    seen = len(log.lines)
    started = time.monotonic()
    login = spelled(user, script.spelling)
    names = sorted({login, user})
    # Held by earlier examples (when keeping going), under either name.
    stuck = {name: busy(proxy, name) for name in names}
    run_first_session(proxy.server_port, login, password, script)
    try:
        for name in names:
            wait_settled(proxy, name, SETTLE_TIMEOUT, baseline=stuck[name])
    except AssertionError:
        tally.examples += 1
        message = ('after this first session:\n%s\n\nthe proxy still held the connection '
                   'after %gs' % (describe(script), SETTLE_TIMEOUT))
        tally.failures.append(message)
        if not KEEP_GOING:
            raise AssertionError(message) from None
        return
    through = probe(proxy.server_port, user, password, opening=script.opening)
    fresh = probe(server.port, user, password, opening=script.opening)
    new_lines = log.lines[seen:]
    tally.examples += 1
    tally.slowest = max(tally.slowest, time.monotonic() - started)
    results = login_results(new_lines, login)
    if login != user:
        results += login_results(new_lines, user)
    if len(results) >= 2:
        tally.results[results[1]] += 1
    for reason in closes_of(new_lines):
        tally.reasons[_ID.sub('', reason).strip()] += 1
    if through != fresh:
        changes = diff(through, fresh, 'next session through the proxy', 'fresh login')
        message = ('after this first session:\n%s\n\nthe next session differs (login '
                   'results %s):\n%s' % (describe(script), results, changes))
        tally.failures.append(message)
        if not KEEP_GOING:
            raise AssertionError(message)
        # The connection that differed must not spoil the examples that follow.
        for name in names:
            proxy.flush(name.encode())


def _settings(function):
    kwargs = dict(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
    if FUZZ_SEED is None:
        return settings(derandomize=True, **kwargs)(function)
    return seed(int(FUZZ_SEED))(settings(**kwargs)(function))


def test_next_session_equals_a_fresh_login(server, proxy, proxy_log, request):
    user = 'fz1'
    password = server.users[user]
    tally = Tally()
    started = time.monotonic()
    terminal = request.config.pluginmanager.get_plugin('terminalreporter')

    def one(script):
        if time.monotonic() - started > FUZZ_SECONDS:
            reject()                           # out of time: the rest are skipped
        check_example(server, proxy, proxy_log, user, password, script, tally)

    # hypothesis runs explicit examples last added first: PLANTED in its order.
    for script in reversed(PLANTED):
        one = example(script=script)(one)
    one = _settings(given(script=sessions())(one))

    try:
        one()
    finally:
        summary = '%s; %.1fs; seed %s' % (tally.line(), time.monotonic() - started,
                                          FUZZ_SEED or 'derandomized')
        if terminal is not None:
            terminal.write_line('\n' + summary)
        else:
            print(summary)
    assert 'pw-fz' not in '\n'.join(proxy_log.lines), 'a password reached the log'
    assert not tally.failures, '\n\n'.join(tally.failures)
    assert tally.examples >= min(FUZZ_EXAMPLES, 10), tally.line()
    # Most first sessions are clean: the probe must often run on a reused connection,
    # or the test would only ever compare two fresh logins.
    assert tally.results['reused'] >= tally.examples // 4, tally.line()


@pytest.mark.parametrize('leftover', [
    (b'SELECT INBOX',), (b'ENABLE QRESYNC',), (b'ENABLE CONDSTORE',),
    (b'EXAMINE INBOX (CONDSTORE)', b'UNSELECT'), (b'NOTIFY NONE',)],
    ids=['selected', 'qresync', 'condstore', 'implicit-condstore', 'notify-none'])
def test_probe_tells_a_used_session_from_a_fresh_one(server, leftover):
    """The comparison can fail: the probe, run directly on a session that was left in
    one of the states a proxy must not hand on, differs from a fresh login's."""
    user = 'fz2'
    password = server.users[user]
    used = probe(server.port, user, password, prelude=leftover)
    fresh = probe(server.port, user, password)
    assert used != fresh
