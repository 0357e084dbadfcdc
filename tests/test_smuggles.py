"""Issue 19's smuggles, each against a real Dovecot: directly and through the proxy.

A client with a valid password writes bytes that Dovecot reads otherwise than a proxy
that models it slightly wrong: an empty literal, a literal after the last argument a
command reads, a synchronizing literal Dovecot refuses, a keyword that looks like
CONDSTORE, an ENABLE written oddly, a command line longer than the proxy's buffer. Each
test compares what the client gets directly and through the proxy, then runs the fixed
probe (tests/transcript.py) as the same user's next session through the proxy and as a
fresh direct login: the two must be equal, reused or not.

The last test takes one rule out of the tracker (empty literals) and shows that the
proxy's own tags still keep the connection out of the cache: what the server ran shows
in what it answered.
"""
import re

import pytest

from tests.test_attacks import assert_next_session_fresh, assert_same, run
from tests.transcript import account_fixture, login_results, module_fixtures, wait_settled

USERS = 60

server, proxy = module_fixtures('smg', USERS)

account = account_fixture('smg')


def both(server, proxy, user, password, steps, before=()):
    """`run` directly, then through the proxy, each after the sessions `before` (steps
    of their own); return (direct, proxied) transcripts of `steps`."""
    for port in (server.port, proxy.server_port):
        for setup in before:
            run(port, user, password, setup)
            if port == proxy.server_port:
                wait_settled(proxy, user)
        transcript = run(port, user, password, steps)
        if port == server.port:
            direct = transcript
    return direct, transcript


def closes(log, reason):
    return [line for line in log.lines if line.startswith('backend closed:')
            and reason in line]


# -- 1. empty literals -------------------------------------------------------------------

def _skipped_line(payload: bytes) -> bytes:
    """CREATE with an empty literal for its one argument: Dovecot skips the rest of the
    line, a LIST whose literal holds `payload`, and runs the payload."""
    return (b'a CREATE {+}\r\nb LIST "" {%d+}\r\n' % len(payload)) + payload + b'\r\n'


@pytest.mark.parametrize('payload, proof', [
    (b'b NOTIFY NONE', b'b OK NOTIFY completed'),
    (b'b ENABLE QRESYNC', b'* ENABLED QRESYNC'),
], ids=['notify', 'qresync'])
def test_empty_literal_is_read_as_dovecot_reads_it(server, proxy, account, proxy_log,
                                                   payload, proof):
    user, password = account
    direct, proxied = both(server, proxy, user, password,
                           [(_skipped_line(payload), [b'a', b'b'])])
    assert any(line.startswith(proof) for line in direct), direct   # the attack is live
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- 2. literals the server never reads ------------------------------------------------

def _tags_matched(opener: bytes) -> bytes:
    """`opener`, after which Dovecot runs `x2 NOTIFY NONE` where a proxy that reads it
    wrong sees literal data; then an x3 LIST with an empty literal, which Dovecot reads
    and that proxy does not, so that the x2 NOOP after it is Dovecot's LIST line and that
    proxy's x2: every tag that proxy expects comes back, one to one."""
    return opener + b'x2 NOTIFY NONE\r\nx3 LIST "" {+}\r\nx2 NOOP\r\n'


@pytest.mark.parametrize('steps', [
    # A refused APPEND: Dovecot reads on, the literal's bytes as arguments, and b NOOP
    # is swallowed.
    [(b'a APPEND no-such-box foo {7+}\r\nx {6+}\r\nb NOOP\r\n', [b'a']),
     (b'c NOOP\r\n', [b'c'])],
    # STATUS reads two arguments: the list after them is skipped with its line.
    [(b'c STATUS box (MESSAGES) ({13+}\r\nb NOTIFY NONE\r\n', [b'c', b'b'])],
    [(_tags_matched(b'x1 STATUS box (MESSAGES) ({14+}\r\n'), [b'x1', b'x2', b'x3'])],
    # Synchronizing literals Dovecot refuses without "+"; the client does not wait.
    [(b'c APPEND no-such-box {13}\r\nb NOTIFY NONE\r\n', [b'c', b'b'])],
    [(_tags_matched(b'x1 APPEND no-such-box {14}\r\n'), [b'x1', b'x2', b'x3'])],
    [(b'c APPEND INBOX {0}\r\nb NOTIFY NONE\r\n', [b'c', b'b'])],
    [(_tags_matched(b'x1 APPEND INBOX {0}\r\n'), [b'x1', b'x2', b'x3'])],
], ids=['append-refused', 'status-third-argument', 'status-tags-matched', 'sync-refused',
        'sync-refused-tags-matched', 'sync-empty', 'sync-empty-tags-matched'])
def test_unread_literal_leaves_nothing_behind(server, proxy, account, proxy_log, steps):
    user, password = account
    direct, proxied = both(server, proxy, user, password, steps)
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- 3. and 4. the profile switch ------------------------------------------------------

ENABLED = [(b'x1 ENABLE CONDSTORE\r\n', [b'x1'])]
PLAIN_AFTER = [(b'x2 SELECT INBOX\r\n', [b'x2']),
               (b'x3 STORE 1 +FLAGS (\\Flagged)\r\n', [b'x3']),
               (b'x4 STORE 1 -FLAGS (\\Flagged)\r\n', [b'x4'])]


@pytest.mark.parametrize('first', [
    b'x1 LIST "" modseq\r\n',
    b'x1 STATUS changedsince (MESSAGES)\r\n',
    b'x1 FETCH 1 (MODSEQ)\r\n',
], ids=['list-modseq', 'status-name', 'fetch-unselected'])
def test_a_keyword_does_not_move_a_session(server, proxy, account, proxy_log, first):
    """After a CONDSTORE session was cached, a plain session whose first command only
    names such a word stays plain."""
    user, password = account
    steps = [(first, [b'x1'])] + PLAIN_AFTER
    direct, proxied = both(server, proxy, user, password, steps, before=[ENABLED])
    assert not any(b'MODSEQ' in line for line in direct), direct
    assert_same(proxied, direct, 'session 2')
    assert not [line for line in proxy_log.lines if line.startswith('profile:')
                and 'user=%s ' % user in line]


@pytest.mark.parametrize('enable', [
    b'x1 ENABLE condstore\r\n',
    b'x1 ENABLE X-UNKNOWN\r\n',
    b'x1 ENABLE CONDSTORE\t\r\n',
    b'x1 ENABLE CONDSTORE\r\r\n',
    b'x1 ENABLE  CONDSTORE\r\n',
], ids=['lower', 'unknown', 'tab', 'bare-cr', 'two-spaces'])
@pytest.mark.parametrize('setup', ['canonical', 'same'])
def test_enable_is_answered_in_the_server_s_words(server, proxy, account, proxy_log,
                                                  enable, setup):
    """An ENABLE after a cached session that sent the canonical ENABLE, or these very
    bytes, gets what Dovecot says to them."""
    user, password = account
    before = ENABLED if setup == 'canonical' else [(enable, [b'x1'])]
    steps = [(enable, [b'x1'])] + PLAIN_AFTER
    direct, proxied = both(server, proxy, user, password, steps, before=[before])
    assert_same(proxied, direct, 'session 2')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


@pytest.mark.parametrize('enable', [b'x1 ENABLE QRESYNC\r\n', b'x1 ENABLE condstore\r\n',
                                    b'x1 ENABLE X-UNKNOWN\r\n'])
def test_the_same_enable_is_replayed_from_a_cached_connection(server, proxy, account,
                                                               proxy_log, enable):
    """The same bytes again: the session moves to the cached connection they set up,
    and gets the server's own answer to them, under its own tag."""
    user, password = account
    steps = [(enable, [b'x1'])] + PLAIN_AFTER
    direct, proxied = both(server, proxy, user, password, steps, before=[[(enable, [b'x1'])]])
    assert_same(proxied, direct, 'session 2')
    moved = [line for line in proxy_log.lines if line.startswith('profile:')
             and 'result=reused' in line]
    assert len(moved) == 1, proxy_log.lines


# -- 7. a long command line after login ------------------------------------------------

@pytest.mark.parametrize('data', [
    b'a NOOP ' + b'x' * 140000 + b'\r\n',
    b'a SELECT ' + b'x' * 100000 + b'\r\n',
    b'a SEARCH TEXT ' + b'x' * 140000 + b' {5+}\r\nhello\r\n',
], ids=['noop', 'select', 'literal-after'])
def test_a_long_line_is_the_server_s_to_answer(server, proxy, account, proxy_log, data):
    user, password = account
    steps = [(data, [b'a']), (b'b NOOP\r\n', [b'b'])]
    direct, proxied = both(server, proxy, user, password, steps)
    assert not any(line.startswith(b'* BYE') for line in direct[:-2]), direct
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)


# -- the owned tags, without a rule ----------------------------------------------------

def test_owned_tags_catch_what_a_missing_rule_lets_through(server, proxy, account,
                                                           proxy_log, monkeypatch):
    """With empty literals unknown to the framer and the tracker, the proxy takes the
    CREATE's line for a whole command and the LIST's literal for data; Dovecot runs
    NOTIFY, under a tag the proxy never sent: the connection is not reused."""
    import gimapproxy.protocol
    import gimapproxy.tracker
    monkeypatch.setattr(gimapproxy.protocol, '_LITERAL_RE',
                        re.compile(rb'(~?)\{([0-9]+)(\+?)\}\r?\n\Z'))
    monkeypatch.setattr(gimapproxy.protocol, '_ANNOUNCEMENT_RE',
                        re.compile(rb'\{[0-9]+\+?\}\r?\n'))
    monkeypatch.setattr(gimapproxy.tracker, 'TOKEN_RE', re.compile(
        rb' +|\(|\)|"(?:[^"\\\r\n\x00]|\\[^\r\n\x00])*"'
        rb'|~?\{[0-9]+\+?\}\r?\n\Z|[^\x00-\x20(){"\x7f-\xff]+'))
    user, password = account
    direct, proxied = both(server, proxy, user, password,
                           [(_skipped_line(b'b NOTIFY NONE'), [b'a', b'b'])])
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)
    assert login_results(proxy_log.lines, user) == ['new', 'new']
    assert closes(proxy_log, 'server ran a command the proxy did not frame'), \
        [line for line in proxy_log.lines if line.startswith('backend closed:')]


def test_an_owned_tag_left_unanswered_keeps_the_connection_out(server, proxy, account,
                                                               proxy_log, monkeypatch):
    """Without the empty-literal rule the proxy takes `{+}` for an atom; Dovecot reads a
    literal of size 0, and the next line as the rest of CREATE's, which it skips: the
    proxy's NOOP under its own tag is never answered. The LOGOUT held behind it goes to
    the server once the server falls silent, and the connection is not reused."""
    import gimapproxy.protocol
    monkeypatch.setattr(gimapproxy.protocol, '_LITERAL_RE',
                        re.compile(rb'(~?)\{([0-9]+)(\+?)\}\r?\n\Z'))
    monkeypatch.setattr(gimapproxy.protocol, '_ANNOUNCEMENT_RE',
                        re.compile(rb'\{[0-9]+\+?\}\r?\n'))
    user, password = account
    direct, proxied = both(server, proxy, user, password,
                           [(b'a CREATE {+}\r\nb NOOP\r\n', [b'a'])])
    assert not any(line.startswith(b'b ') for line in direct), direct   # swallowed
    assert_same(proxied, direct, 'session 1')
    assert_next_session_fresh(server, proxy, user, password, proxy_log)
    assert login_results(proxy_log.lines, user) == ['new', 'new']
    assert closes(proxy_log, 'no reply to commands pipelined before LOGOUT')
