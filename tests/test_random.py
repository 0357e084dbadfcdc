"""Randomized isolation test: many clients of a few users, random commands, random exits.

After every login the client checks that it sees what a fresh direct login would see, and
every reply it reads must carry one of its own tags. Bounded in sessions and in time; the
seed is printed so that a failure can be replayed (GIMAPPROXY_SEED=...).
"""
import os
import random
import re

import gevent
import pytest

from tests.conftest import start_proxy
from tests.wire import Client

CLIENTS = 12
SESSIONS = 12                 # per client and round
TIME_LIMIT = 90
_TAGGED = re.compile(rb'^([^*+ ]+) (OK|NO|BAD)\b')
_APPENDUID = re.compile(rb'\[APPENDUID \d+ (\d+)\]')


class Mismatch(AssertionError):
    pass


class RandomClient:
    """One simulated webmail client: sessions of random commands against one user."""

    def __init__(self, port, user, password, rng, number):
        self.port, self.user, self.password = port, user, password
        self.rng = rng
        self.keyword = b'$p%d' % number
        self.tags = 0
        self.client = None
        self.uids = []            # messages this client appended (and may expunge)

    def tag(self):
        self.tags += 1
        return b't%d' % self.tags

    def command(self, text):
        """Send one command; return (untagged lines, tagged line); check the tags."""
        tag = self.tag()
        lines, tagged = self.client.command(tag, text)
        foreign = [line for line in lines if _TAGGED.match(line)]
        if foreign:
            raise Mismatch('reply with a foreign tag: %r' % foreign[0][:80])
        return lines, tagged

    def session(self):
        self.client = Client(self.port)
        try:
            wants_qresync = self.rng.random() < 0.2
            tagged = self.client.login(self.user, self.password, b'L')
            assert tagged.startswith(b'L OK'), tagged
            if wants_qresync:
                lines, tagged = self.command(b'ENABLE QRESYNC')
                assert lines == [b'* ENABLED QRESYNC\r\n'], lines
            self.check_fresh(condstore=wants_qresync)
            for _ in range(self.rng.randint(0, 6)):
                getattr(self, 'op_' + self.rng.choice(
                    ['select', 'fetch', 'store', 'append', 'expunge', 'idle', 'enable',
                     'notify']))()
            self.leave()
        finally:
            self.client.close()

    def check_fresh(self, condstore):
        lines, tagged = self.command(b'NOOP')
        if lines:
            raise Mismatch('untagged data the session did not cause: %r' % lines[:3])
        lines, tagged = self.command(b'FETCH 1 (FLAGS)')
        if not tagged.split()[1] == b'BAD':
            raise Mismatch('a mailbox was selected at login: %r' % tagged)
        self.command(b'SELECT INBOX')
        lines = self.command(b'STORE 1 +FLAGS (%s)' % self.keyword)[0]
        lines += self.command(b'STORE 1 -FLAGS (%s)' % self.keyword)[0]
        modseq = any(b'MODSEQ' in line for line in lines)
        if modseq != condstore:
            raise Mismatch('CONDSTORE is %s, the session asked for %s' % (modseq, condstore))
        self.command(b'UNSELECT')

    def op_select(self):
        self.command(self.rng.choice([b'SELECT INBOX', b'EXAMINE INBOX']))

    def op_fetch(self):
        self.command(b'FETCH 1:3 (FLAGS ENVELOPE)')

    def op_store(self):
        self.command(b'SELECT INBOX')
        self.command(b'STORE 2 +FLAGS (%s)' % self.keyword)

    def op_append(self):
        body = b'Subject: random %d\r\n\r\nbody\r\n' % self.rng.randint(0, 10**9)
        lines, tagged = self.command(b'APPEND INBOX {%d+}\r\n%s' % (len(body), body))
        match = _APPENDUID.search(tagged)
        if match:
            self.uids.append(match.group(1))

    def op_expunge(self):
        if self.uids:
            self.command(b'SELECT INBOX')
            self.command(b'UID STORE %s +FLAGS.SILENT (\\Deleted)' % self.uids.pop())
            self.command(b'EXPUNGE')

    def op_idle(self):
        self.command(b'SELECT INBOX')
        tag = self.tag()
        self.client.send(tag + b' IDLE\r\n')
        assert self.client.readline().startswith(b'+')
        self.client.send(b'DONE\r\n')
        lines, tagged = self.client.read_until_tagged(tag)
        assert tagged.startswith(tag + b' OK') and not [l for l in lines if _TAGGED.match(l)]

    def op_enable(self):
        self.command(b'ENABLE CONDSTORE')

    def op_notify(self):
        self.command(b'NOTIFY SET (selected (MessageNew MessageExpunge))')

    def leave(self):
        way = self.rng.random()
        if way < 0.5:
            self.client.logout()
        elif way < 0.7:
            pass                                        # abrupt close
        else:                                           # close in the middle of a command
            self.command(b'SELECT INBOX')
            self.client.send(self.rng.choice([
                b'x1 FETCH 1:* (BODY.PEEK[])\r\n',
                b'x2 IDLE\r\n',
                b'x3 APPEND INBOX {500}\r\nhalf a message',
                b'x4 NOOP\r\nx5 FETCH 1:5 (FLAGS)\r\n',
            ]))
            # A random pause, so that the close lands at a random point of that command.
            gevent.sleep(self.rng.random() * 0.01)


@pytest.fixture(scope='module')
def random_proxy(dovecot):
    proxy = start_proxy(dovecot)
    yield proxy
    proxy.stop(2)


@pytest.mark.parametrize('round_', [1, 2])
def test_random_sessions_stay_isolated(dovecot, random_proxy, round_, capsys):
    seed = int(os.environ.get('GIMAPPROXY_SEED', random.randrange(10**6)))
    users = dovecot.users[16:19]
    before = dict(random_proxy.counters)
    failures = []

    def run_client(number):
        rng = random.Random(seed * 100 + number)
        user, password = users[number % len(users)]
        client = RandomClient(random_proxy.server_port, user, password, rng, number)
        try:
            for _ in range(SESSIONS):
                client.session()
        except Exception as exc:                        # collected, reported below
            failures.append('client %d (%s): %r' % (number, user, exc))

    with gevent.Timeout(TIME_LIMIT):
        gevent.joinall([gevent.spawn(run_client, n) for n in range(CLIENTS)])
    counters = random_proxy.counters
    new = counters['login_new'] - before.get('login_new', 0)
    reused = counters['login_reused'] - before.get('login_reused', 0)
    with capsys.disabled():
        print('\nrandom isolation round %d: seed=%d sessions=%d new=%d reused=%d '
              'reuse rate=%.0f%%' % (round_, seed, new + reused, new, reused,
                                     100.0 * reused / max(1, new + reused)))
    assert not failures, 'seed %d: %s' % (seed, '; '.join(failures[:3]))
    assert new + reused == CLIENTS * SESSIONS
    assert reused > 0, 'isolation must not make reuse impossible'
