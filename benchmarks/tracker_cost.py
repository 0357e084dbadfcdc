"""What the command tracker costs per command, without sockets: a NOOP round trip (the
client's line in, the line for the server out, the server's tagged reply in, the line
for the client out) and a webmail FETCH (the same, with 20 untagged FETCH lines).

    python3 benchmarks/tracker_cost.py [--repo DIR]

`--repo` times the gimapproxy of another checkout (made with `git worktree add`, say),
to compare two versions on one machine in one sitting. The tracker answers with the tag
the server must echo, whatever it is (the proxy's own since the owned tags), so both
kinds of tracker are timed the same way.
"""
import argparse
import os
import sys
import timeit


def exchange(tracker, command: bytes, untagged: list) -> bytes:
    """Send `command` through `tracker`, answer it with the `untagged` lines and a tagged
    OK under the tag the tracker sent; return the OK as the client gets it."""
    tracker.feed(command)
    sent = tracker.next_event()
    for line in untagged:
        tracker.on_response(line)
    return tracker.on_response(sent[:sent.index(b' ')] + b' OK done\r')


def round_trip(tracker_class, command: bytes, untagged: list):
    """A function that runs one `exchange` of `command` on one tracker; a mailbox is
    selected first when there are `untagged` lines (mailbox data)."""
    # The session's prefix as the proxy makes it, where the tracker has one.
    make_prefix = getattr(sys.modules[tracker_class.__module__], 'new_prefix', None)
    tracker = tracker_class(prefix=make_prefix()) if make_prefix else tracker_class()
    if untagged:
        exchange(tracker, b'a0 SELECT INBOX\r\n', [])

    def once():
        out = exchange(tracker, command, untagged)
        assert out.startswith(command[:3] + b'OK'), out
    return once


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repo', default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    parser.add_argument('--rounds', type=int, default=7)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.repo))
    import gimapproxy.tracker
    from gimapproxy.tracker import Tracker
    fetch_lines = [b'* %d FETCH (UID %d FLAGS (\\Seen))\r' % (n, n) for n in range(1, 21)]
    cases = [
        ('NOOP round trip', b'a1 NOOP\r\n', []),
        ('FETCH 1:20 (UID FLAGS), 20 replies', b'a1 FETCH 1:20 (UID FLAGS)\r\n', fetch_lines),
    ]
    print('tracker of %s' % gimapproxy.tracker.__file__)
    number = 20000
    for name, command, untagged in cases:
        run = round_trip(Tracker, command, untagged)
        best = min(timeit.repeat(run, number=number, repeat=args.rounds)) / number
        print('%-40s %6.2f us per command (best of %d x %d)'
              % (name, best * 1e6, args.rounds, number))
    return 0


if __name__ == '__main__':
    sys.exit(main())
