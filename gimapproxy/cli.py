"""gimapproxy - a connection-caching IMAP proxy for webmail.

Usage:
  gimapproxy -c FILE [--check]
  gimapproxy stats -c FILE
  gimapproxy flush -c FILE [USER]
  gimapproxy migrate-config IMAPPROXY_CONF
  gimapproxy -h | --help
  gimapproxy --version

Commands:
  (none)          Run the proxy in the foreground, logging to stderr.
  stats           Print a summary of a running proxy's numbers (needs stats_listen).
  flush           Log out the cached server connections of USER, or all of them, in a
                  running proxy (needs stats_listen; from admin_networks).
  migrate-config  Print a proxy.ini equivalent to an up-imapproxy imapproxy.conf;
                  every option that does not carry over is reported on stderr.

Options:
  -c FILE, --config FILE  The configuration file (INI, one [gimapproxy] section).
  --check                 Validate the configuration, then exit: 0 if it is good,
                          1 with a message naming the file, key and problem if not.
  -h, --help              Show this text.
  --version               Show the version.

Signals: SIGTERM or SIGINT stops accepting clients, gives open sessions up to
shutdown_timeout seconds, logs out cached server connections and exits 0; a second one
exits at once. SIGHUP re-reads the configuration file: the keys that can change live
take effect for new sessions, the log names each changed key, and an invalid file
leaves the running configuration as it was.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
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
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(__doc__, argv=argv, version='gimapproxy %s' % __version__)
    except DocoptExit:
        print(usage_error(argv), file=sys.stderr)
        return 2
    except SystemExit as exc:      # --help and --version print and "exit" with None
        return exc.code if isinstance(exc.code, int) else 0
    if args['migrate-config']:
        return migrate_config(args['IMAPPROXY_CONF'])
    try:
        config = load_config(args['--config'])
    except ConfigError as exc:
        print('gimapproxy: configuration error: %s' % exc, file=sys.stderr)
        return 1
    if args['stats']:
        return print_stats(config)
    if args['flush']:
        return flush(config, args['USER'])
    if args['--check']:
        print('%s: configuration is valid' % config.source)
        return 0
    setup_logging(config.log_level_number)
    return serve(config)


def usage_error(argv: list[str]) -> str:
    """The message for arguments that match no usage line: what is wrong, in words (not
    docopt's internal report), then the usage lines."""
    has_config = any(arg == '--config' or arg.startswith(('--config=', '-c')) for arg in argv)
    wants_config = not argv or argv[0] in ('stats', 'flush') or '--check' in argv
    if wants_config and not has_config:
        problem = ('no configuration file: give it with -c FILE, for example '
                   '-c /etc/gimapproxy.ini')
    else:
        problem = 'these arguments match no usage: %s' % ' '.join(argv)
    usage = __doc__[__doc__.index('Usage:'):__doc__.index('\n\n', __doc__.index('Usage:'))]
    return 'gimapproxy: %s\n%s' % (problem, usage)


def serve(config) -> int:
    """Run the proxy until SIGTERM or SIGINT; return the exit code."""
    import gevent
    from gevent.event import Event

    from .server import ProxyServer

    raise_file_limit(config)
    server = ProxyServer(config)
    stopping = Event()

    def on_stop(signum: int) -> None:
        if stopping.is_set():
            log.warning('second signal: exiting at once: signal=%s',
                        signal.Signals(signum).name)
            os._exit(1)
        log.info('signal received: signal=%s', signal.Signals(signum).name)
        stopping.set()

    def on_reload() -> None:
        gevent.spawn(reload, server)

    # The handlers come first: a TERM that arrives as soon as the port answers must
    # drain and exit 0, not kill the process.
    handlers = [gevent.signal_handler(signum, on_stop, signum)
                for signum in (signal.SIGTERM, signal.SIGINT)]
    handlers.append(gevent.signal_handler(signal.SIGHUP, on_reload))
    try:
        try:
            server.start()
        except OSError as exc:
            log.error('cannot listen: address=%s:%d error=%s', config.listen_address,
                      config.listen_port, exc.strerror or exc)
            return 1
        if config.proc_username:
            try:
                warm_up(config)
                drop_privileges(config.proc_username, config.proc_groupname)
            except (OSError, RuntimeError) as exc:
                log.error('cannot drop privileges: user=%s error=%s', config.proc_username,
                          exc)
                server.stop(0)
                return 1
        warning = root_warning(config, os.geteuid())
        if warning:
            log.warning('%s', warning)
        stopping.wait()
        server.stop(server.config.shutdown_timeout)
    finally:
        for handler in handlers:
            handler.cancel()
    return 0


def raise_file_limit(config) -> None:
    """Raise the soft limit on open files towards what the configuration can use: two
    per backend connection plus the clients. Logs when the hard limit is lower."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * config.cache_size + 1024
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError) as exc:
        log.warning('cannot raise the open file limit: soft=%d wanted=%d error=%s', soft,
                    want, exc)
        return
    if new < want:
        log.warning('open file limit %d is below the %d that cache_size %d may need',
                    new, want, config.cache_size)


def reload(server) -> None:
    """Re-read the configuration file into the running server; log what changed."""
    path = server.config.source
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error('reload failed, configuration unchanged: error=%s', exc)
        return
    live, restart = server.reload(config)
    log.setLevel(server.config.log_level_number)
    log.info('reloaded: file=%s changed=%s', path, ','.join(live) or '-')
    if restart:
        log.warning('reload: changed keys need a restart to take effect: keys=%s',
                    ','.join(restart))


def warm_up(config) -> None:
    """Load what is loaded on first use, while the files are still readable: after the
    drop the unprivileged user may not read the Python installation (a root-only pyenv,
    say). The first name lookup loads gevent's resolver and the idna codec."""
    import gevent
    from gevent import socket
    gevent.get_hub().resolver
    host, port = config.servers[0]
    try:
        socket.getaddrinfo(host, port)
    except OSError as exc:
        log.warning('cannot resolve the server yet: host=%s error=%s', host, exc)


def root_warning(config, euid: int) -> Optional[str]:
    """The warning to log when the proxy is about to serve clients as root (`euid` 0 and
    no proc_username to drop to), else None."""
    if euid != 0 or config.proc_username:
        return None
    return ('running as root: proc_username is not set, so client sessions are served '
            'with root privileges; set proc_username (for example gimapproxy, a system '
            'user: useradd --system --no-create-home --shell /usr/sbin/nologin gimapproxy) '
            'or start the proxy as that user')


def drop_privileges(user: str, group: Optional[str]) -> None:
    """Become `user` (and `group`, else the user's group), after the ports are bound.
    Started as that user already (a service manager's User=), there is nothing to do.

    Raises:
        OSError: not allowed (started as another user that is not root).
        RuntimeError: still root afterwards.
    """
    import grp
    import pwd
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    if os.geteuid() != 0 and os.geteuid() == entry.pw_uid and os.getegid() == gid:
        log.info('privileges: already user=%s uid=%d gid=%d', user, os.getuid(), os.getgid())
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise RuntimeError('still root after dropping privileges')
    log.info('privileges dropped: user=%s uid=%d gid=%d', user, os.getuid(), os.getgid())


def _stats_url(config, path: str) -> str:
    if not config.stats_listen:
        raise ConfigError('%s: [gimapproxy] stats_listen: is off; set it to use this '
                          'command' % config.source)
    host, port = config.stats_listen
    if host in ('0.0.0.0', '::', ''):
        host = '127.0.0.1'
    return 'http://%s:%d%s' % ('[%s]' % host if ':' in host else host, port, path)


def _request(config, path: str, method: str = 'GET') -> dict:
    request = urllib.request.Request(_stats_url(config, path), method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def print_stats(config) -> int:
    """Print a one-screen summary of a running proxy, as up-imapproxy's `pimpstat -c`."""
    try:
        stats = _request(config, '/stats')
    except ConfigError as exc:
        print('gimapproxy: %s' % exc, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print('gimapproxy: cannot read stats: %s' % exc, file=sys.stderr)
        return 1
    backends = stats['backend_connections']
    lines = [
        'gimapproxy up %(uptime_seconds)ss' % stats,
        'clients         %6d now %10d total' % (stats['clients']['current'],
                                                 stats['clients']['total']),
        'logins          %6d new %6d reused %6d failed  hit ratio %.1f%%' % (
            stats['logins']['new'], stats['logins']['reused'], stats['logins']['failed'],
            100 * stats['cache_hit_ratio']),
        'server conns    %6d active %6d cached %6d created %6d expired' % (
            backends['active'], backends['cached'], backends['created'],
            backends['expired']),
        'bytes relayed   %12d to server %14d to clients' % (
            stats['bytes_relayed']['client_to_server'],
            stats['bytes_relayed']['server_to_client']),
    ]
    for reason, count in sorted(backends['closed_by_reason'].items()):
        lines.append('  closed: %-40s %6d' % (reason, count))
    # Why the hit ratio is what it is: connections closed instead of cached, and failed
    # logins, most frequent first.
    for title, counts in (('not reusable', backends.get('not_reusable_by_reason', {})),
                          ('login failed', stats['logins'].get('failed_by_reason', {}))):
        for reason, count in sorted(counts.items(), key=lambda item: -item[1])[:10]:
            lines.append('  %s: %-34s %6d' % (title, reason, count))
    print('\n'.join(lines))
    return 0


def flush(config, user: Optional[str]) -> int:
    """Ask a running proxy to log out cached connections of `user`, or all."""
    path = '/admin/flush' + ('?' + urllib.parse.urlencode({'user': user}) if user else '')
    try:
        result = _request(config, path, 'POST')
    except ConfigError as exc:
        print('gimapproxy: %s' % exc, file=sys.stderr)
        return 1
    except urllib.error.HTTPError as exc:
        print('gimapproxy: flush refused: %s %s' % (exc.code, exc.reason), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print('gimapproxy: cannot reach the proxy: %s' % exc, file=sys.stderr)
        return 1
    print('flushed %d cached connection(s)%s' % (result['flushed'],
                                                 ' of %s' % user if user else ''))
    return 0


def migrate_config(path: str) -> int:
    """Print the proxy.ini equivalent of an imapproxy.conf; notes go to stderr."""
    from .migrate import migrate
    try:
        with open(path, encoding='utf-8', errors='replace') as handle:
            text = handle.read()
    except OSError as exc:
        print('gimapproxy: %s: cannot read: %s' % (path, exc.strerror or exc),
              file=sys.stderr)
        return 1
    ini, notes = migrate(text, path)
    sys.stdout.write(ini)
    for note in notes:
        print(note, file=sys.stderr)
    return 0
