"""Differential fuzz test of session isolation, against a real Dovecot.

hypothesis writes a first session: commands valid and malformed, pipelined or one at a
time, with their arguments written in every literal form (`{n}` with the client waiting
for "+", `{n+}`, `~{n+}`, leading zeros, many digits, wrong sizes, a quoted string that
ends in `{n+}`), reused and refused tags, stray lines (DONE, "+", empty lines, garbage),
ENABLE, NOTIFY, SELECT and EXAMINE with CONDSTORE, STATUS, FETCH and SEARCH with MODSEQ
and CHANGEDSINCE, IDLE; it ends with LOGOUT, or the client just leaves, after its last
command or in the middle of it (inside a literal, say).

Each example runs that session through the proxy, waits until the proxy has kept or
dropped the server connection, then runs the fixed probe (tests/transcript.py) as the
same user's next session through the proxy, and again directly against Dovecot as a fresh
login. The two transcripts must be equal. The log says whether the probe's session
reused the connection; the counts are printed at the end. A known smuggle (PLANTED) is
always the first example, so that every run shows the comparison can fail.

In CI: FUZZ_EXAMPLES examples (derandomized, so every run tries the same ones) within
FUZZ_SECONDS. Longer runs: GIMAPPROXY_FUZZ_EXAMPLES=2000 GIMAPPROXY_FUZZ_SECONDS=3600
(scripts/fuzz-isolation), GIMAPPROXY_FUZZ_SEED=<n> for other examples than CI's.
"""
import collections
import os
import re
import time
from dataclasses import dataclass

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


def _literal(value: bytes, form: str) -> list:
    """`value` as an IMAP string in `form`; a list of Parts and bytes."""
    n = len(value)
    if form == 'atom':
        return [value]
    if form == 'quoted':
        return [b'"' + value + b'"']
    if form == 'sync':
        return [Part(b'{%d}\r\n' % n, wait=True), value]
    if form == 'nonsync':
        return [b'{%d+}\r\n' % n + value]
    if form == 'literal8':
        return [b'~{%d+}\r\n' % n + value]
    if form == 'literal8-sync':
        return [Part(b'~{%d}\r\n' % n, wait=True), value]
    if form.startswith('zeros'):                 # zeros4, zeros11, zeros24: digit count
        return [b'{%s+}\r\n' % str(n).zfill(int(form[5:])).encode() + value]
    if form == 'short':
        return [b'{%d+}\r\n' % max(0, n - 1) + value]
    if form == 'long':                           # ends after the line end that follows
        return [b'{%d+}\r\n' % (n + 2) + value + b'\r\n']
    if form == 'quoted-open':                    # a quoted string that ends in {n+}
        return [b'"x{%d+}\r\n' % n + value]
    raise ValueError(form)


FORMS = ['atom', 'quoted', 'sync', 'nonsync', 'literal8', 'literal8-sync', 'zeros4',
         'zeros11', 'zeros24', 'short', 'long', 'quoted-open']

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
# None of the commands changes what the probe reads back (no \Deleted, no EXPUNGE, no
# flag on message 1).
COMMANDS = PLAIN_COMMANDS + STATEFUL_COMMANDS
STRAYS = [b'DONE\r\n', b'+\r\n', b'\r\n', b'garbage\r\n', b')\r\n', b'* NOOP\r\n',
          b'+ OK\r\n']
BAD_TAGS = [b'a]', b'\xc3\xa9', b'+', b'*', b'(', b'a{']


@st.composite
def commands(draw, tag, plain):
    """One command with `tag`: a list of Parts and bytes. With `plain`, one webmail
    could send, its arguments written the usual way."""
    if draw(st.integers(0, 11)) == 0:
        return [Part(tag + b' IDLE\r\n', wait=True, tag=tag), b'DONE\r\n']
    template = draw(st.sampled_from(PLAIN_COMMANDS if plain else COMMANDS))
    pieces = [tag + b' ']
    for piece in template:
        if isinstance(piece, tuple):
            # Plain sessions write arguments the usual way; the others half the time.
            value = piece[1]
            if plain or draw(st.booleans()):
                form = 'nonsync' if b'\n' in value else 'atom'
            else:
                form = draw(st.sampled_from(FORMS))
            pieces += _literal(value, form)
        else:
            pieces.append(piece)
    pieces.append(b'\r\n')
    for piece in pieces:
        if isinstance(piece, Part):
            piece.tag = tag
    return pieces


@st.composite
def sessions(draw):
    """A first session: (items, ending, cut). Each item is (pieces, tag, whether to
    wait for its reply); the ending is 'logout', 'leave' (after the last item) or 'cut'
    (after `cut` bytes of the last item). Two in five are plain webmail sessions, so
    that the next session often gets the connection back; in the others one line in
    twenty is a stray line, one has a tag Dovecot refuses, one reuses an earlier tag."""
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
        items.append((draw(commands(tag, plain)), tag, wait))
    ending = draw(st.sampled_from(['logout', 'logout', 'leave', 'cut']))
    cut = draw(st.integers(0, 200))
    return items, ending, cut


# Always tried first: ENABLE QRESYNC hidden from a proxy that counts `~{n+}` outside
# APPEND as a literal (Dovecot does not) and does not count a literal size written with
# 11 digits (Dovecot does). Today's main hands the connection on with QRESYNC on.
PLANTED = ([([b'x1 LIST "" ~{19+}\r\nx2 ENABLE QRESYNC\r\n'
              b'x3 LIST "" {00000000009+}\r\nx2 NOOP\r\nx3 NOOP\r\n'], b'x3', True)],
           'logout', 0)


def describe(script) -> str:
    items, ending, cut = script
    out = []
    for pieces, _, wait in items:
        data = b''.join(p.data + b'<wait +>' if isinstance(p, Part) and p.wait else
                        (p.data if isinstance(p, Part) else p) for p in pieces)
        out.append(repr(data) + (' (then its reply)' if wait else ''))
    end = ending + (' at byte %d' % cut if ending == 'cut' else '')
    return '\n'.join(out) + '\nthen: ' + end


# -- running one example ---------------------------------------------------------------

def run_first_session(port, user, password, script) -> None:
    """Play `script` as a client of the proxy (its answers are not compared)."""
    items, ending, cut = script
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


def check_example(server, proxy, log, user, password, script, tally) -> None:
    seen = len(log.lines)
    started = time.monotonic()
    stuck = busy(proxy, user)       # held by earlier examples (when keeping going)
    run_first_session(proxy.server_port, user, password, script)
    try:
        wait_settled(proxy, user, SETTLE_TIMEOUT, baseline=stuck)
    except AssertionError:
        tally.examples += 1
        message = ('after this first session:\n%s\n\nthe proxy still held the connection '
                   'after %gs' % (describe(script), SETTLE_TIMEOUT))
        tally.failures.append(message)
        if not KEEP_GOING:
            raise AssertionError(message) from None
        return
    through = probe(proxy.server_port, user, password)
    fresh = probe(server.port, user, password)
    new_lines = log.lines[seen:]
    tally.examples += 1
    tally.slowest = max(tally.slowest, time.monotonic() - started)
    results = login_results(new_lines, user)
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
        proxy.flush(user.encode())


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

    @_settings
    @given(script=sessions())
    @example(script=PLANTED)
    def one(script):
        if time.monotonic() - started > FUZZ_SECONDS:
            reject()                           # out of time: the rest are skipped
        check_example(server, proxy, proxy_log, user, password, script, tally)

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
