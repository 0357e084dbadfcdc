"""gimapproxy - a connection-caching IMAP proxy for webmail.

Usage:
  gimapproxy -c FILE [--check]
  gimapproxy -h | --help
  gimapproxy --version

Options:
  -c FILE, --config FILE  The configuration file (INI, one [gimapproxy] section).
  --check                 Validate the configuration, then exit: 0 if it is good,
                          1 with a message naming the file, key and problem if not.
  -h, --help              Show this text.
  --version               Show the version.

Runs in the foreground and logs to stderr. SIGTERM or SIGINT stops accepting clients,
gives open sessions up to shutdown_timeout seconds, logs out cached server connections
and exits 0; a second signal exits at once.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

from docopt import DocoptExit, docopt

from . import __version__
from .config import ConfigError, load_config

__all__ = ['main']

log = logging.getLogger('gimapproxy')


def setup_logging(level: int) -> None:
    """Send the package's log lines to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; return the process exit code."""
    try:
        args = docopt(__doc__, argv=sys.argv[1:] if argv is None else argv,
                      version='gimapproxy %s' % __version__)
    except DocoptExit as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:      # --help and --version print and "exit" with None
        return exc.code if isinstance(exc.code, int) else 0
    try:
        config = load_config(args['--config'])
    except ConfigError as exc:
        print('gimapproxy: configuration error: %s' % exc, file=sys.stderr)
        return 1
    if args['--check']:
        print('%s: configuration is valid' % config.source)
        return 0
    setup_logging(config.log_level_number)
    return serve(config)


def serve(config) -> int:
    """Run the proxy until SIGTERM or SIGINT; return the exit code."""
    import gevent
    from gevent.event import Event

    from .server import ProxyServer

    server = ProxyServer(config)
    try:
        server.start()
    except OSError as exc:
        log.error('cannot listen: address=%s:%d error=%s', config.listen_address,
                  config.listen_port, exc.strerror or exc)
        return 1
    stopping = Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning('second signal: exiting at once: signal=%s',
                        signal.Signals(signum).name)
            os._exit(1)
        log.info('signal received: signal=%s', signal.Signals(signum).name)
        stopping.set()

    handlers = [gevent.signal_handler(signum, on_signal, signum)
                for signum in (signal.SIGTERM, signal.SIGINT)]
    try:
        stopping.wait()
        server.stop(config.shutdown_timeout)
    finally:
        for handler in handlers:
            handler.cancel()
    return 0
