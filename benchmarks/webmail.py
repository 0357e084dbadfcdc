#!/usr/bin/env python3
"""Webmail benchmark: cycles per second and Dovecot logins, direct and through gimapproxy.

One webmail cycle is: connect, LOGIN userN secretN, SELECT INBOX,
FETCH 1:10 (FLAGS ENVELOPE), LOGOUT. The script starts a throwaway Dovecot and a
gimapproxy in front of it, measures Dovecot directly and through the proxy, alternating,
then checks how many Dovecot logins a fixed number of cycles through a fresh proxy cause.
Usage: python3 benchmarks/webmail.py [--help]. See benchmarks/README.md.
"""
import argparse
import functools
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (HOST, Dovecot, find_imapload,  # noqa: E402
                               finish_imapload, fmt, free_port, log, on_signal,
                               proc_cpu_rss, start_imapload, start_proxy,
                               stop_process)

LITERAL_RE = re.compile(rb'\{(\d+)\+?\}\r\n$')


# --- load generators ---------------------------------------------------------------

def run_imapload(binary, port, clients, users, seconds, warmup, proxy_pid):
    """One imapload cycle run; return its JSON result as a dict."""
    result = finish_imapload(start_imapload(
        binary, 'cycle', port, ['--clients', clients, '--users', '1-%d' % users, '--seconds',
                                seconds, '--warmup', warmup, '--timeout', 10], proxy_pid))
    if proxy_pid:
        result['proxy_rss_kb'] = result['proxy_rss_kb'][-1]   # [start, mid, end]: the end
    else:
        del result['proxy_cpu_s'], result['proxy_rss_kb']
    return result


def read_response(f, tag):
    """Read lines (skipping literals) up to the tagged response; return its status word."""
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError('connection closed while waiting for %s' % tag.decode())
        m = LITERAL_RE.search(line)
        if m:
            f.read(int(m.group(1)))
        elif line.startswith(tag + b' '):
            return line.split(b' ', 2)[1].upper()


def imap_cycle(port, user, timeout=10.0):
    """Do one webmail cycle as user<N>/secret<N> with a blocking socket; raise on failure."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile('rb')
        if not f.readline().startswith(b'* OK'):
            raise RuntimeError('bad greeting')
        commands = ['LOGIN user%d secret%d' % (user, user), 'SELECT INBOX',
                    'FETCH 1:10 (FLAGS ENVELOPE)', 'LOGOUT']
        for i, command in enumerate(commands):
            tag = b'a%d' % i
            s.sendall(tag + b' ' + command.encode() + b'\r\n')
            status = read_response(f, tag)
            if status != b'OK':
                raise RuntimeError('%s: %s' % (command.split()[0], status.decode()))


def python_client(port, first, step, users, t_measure, t_end):
    """One fallback client process: cycles until t_end; returns (done, done_all, errors, last)."""
    done = done_all = errors = 0
    last, i = '', first
    while time.time() < t_end:
        try:
            imap_cycle(port, i % users + 1)
            done_all += 1
            if t_measure <= time.time() < t_end:
                done += 1
        except (OSError, RuntimeError) as e:
            errors, last = errors + 1, str(e)
            time.sleep(0.01)
        i += step
    return done, done_all, errors, last


def run_python(port, clients, users, seconds, warmup, proxy_pid):
    """The fallback load generator: one process per client, results shaped like imapload's."""
    t0 = time.time()
    cpu0 = proc_cpu_rss(proxy_pid)[0] if proxy_pid else 0
    args = [(port, k, clients, users, t0 + warmup, t0 + warmup + seconds) for k in range(clients)]
    with multiprocessing.Pool(clients) as pool:
        parts = pool.starmap(python_client, args)
    result = {'done': sum(p[0] for p in parts), 'done_all': sum(p[1] for p in parts),
              'errors_all': sum(p[2] for p in parts), 'last_error': next((p[3] for p in parts if p[3]), ''),
              'wall_s': time.time() - t0}
    result['rate'] = result['done'] / seconds
    if proxy_pid:
        cpu1, rss = proc_cpu_rss(proxy_pid)
        result['proxy_cpu_s'], result['proxy_rss_kb'] = cpu1 - cpu0, rss
    return result


# --- measurements and report -------------------------------------------------------

def measure_throughput(args, loadgen, dovecot, proxy, proxy_port):
    """Alternate direct and proxy runs; return {clients: {'direct': [runs], 'proxy': [runs]}}."""
    runs = {c: {'direct': [], 'proxy': []} for c in args.clients}
    for rnd in range(1, args.rounds + 1):
        for clients in args.clients:
            for endpoint, port, pid in (('direct', dovecot.port, None),
                                        ('proxy', proxy_port, proxy.pid)):
                before = dovecot.settled_login_count()
                r = loadgen(port, clients, args.users, args.seconds, args.warmup, pid)
                r['logins'] = dovecot.settled_login_count() - before
                runs[clients][endpoint].append(r)
                log('round %d/%d  %2d clients  %-6s  %7.1f cycles/s  %5d cycles  %5d logins'
                    '  %d errors %s' % (rnd, args.rounds, clients, endpoint, r['rate'],
                                        r['done_all'], r['logins'], r['errors_all'],
                                        r['last_error']))
    return runs


def summarize(runs):
    """Medians per client count, plus totals over all proxy runs."""
    rows = []
    for clients, by_endpoint in runs.items():
        row = {'clients': clients}
        for endpoint, rs in by_endpoint.items():
            row[endpoint + '_cycles_per_s'] = statistics.median(r['rate'] for r in rs)
            cycles, logins = sum(r['done_all'] for r in rs), sum(r['logins'] for r in rs)
            row[endpoint + '_logins_per_1000'] = 1000.0 * logins / cycles if cycles else None
            row[endpoint + '_errors'] = sum(r['errors_all'] for r in rs)
        row['ratio'] = row['proxy_cycles_per_s'] / (row['direct_cycles_per_s'] or float('nan'))
        proxy = by_endpoint['proxy']
        if all('proxy_cpu_s' in r for r in proxy):
            row['proxy_cpu_us_per_cycle'] = statistics.median(
                1e6 * r['proxy_cpu_s'] / max(r['done_all'], 1) for r in proxy)
            row['proxy_core_percent'] = statistics.median(
                100 * r['proxy_cpu_s'] / r['wall_s'] for r in proxy)
            row['proxy_rss_mb'] = max(r['proxy_rss_kb'] for r in proxy) / 1024
        rows.append(row)
    proxy_runs = [r for by_endpoint in runs.values() for r in by_endpoint['proxy']]
    keys = ('rate', 'done', 'done_all', 'errors_all', 'last_error', 'logins', 'wall_s',
            'proxy_cpu_s', 'proxy_rss_kb')
    raw = [dict(clients=c, endpoint=e, **{k: r[k] for k in keys if k in r})
           for c, by_endpoint in runs.items() for e, rs in by_endpoint.items() for r in rs]
    return {'rows': rows, 'proxy_total_cycles': sum(r['done_all'] for r in proxy_runs),
            'proxy_total_logins': sum(r['logins'] for r in proxy_runs), 'runs': raw}


def fixed_count_check(args, dovecot, workdir):
    """Run exactly args.cycles cycles (one client, users rotating) through a fresh proxy."""
    proxy, port, _ = start_proxy(workdir, dovecot.port, {'cache_size': args.cache_size})
    try:
        before, errors = dovecot.settled_login_count(), 0
        for i in range(args.cycles):
            try:
                imap_cycle(port, i % args.users + 1)
            except (OSError, RuntimeError):
                errors += 1
        logins = dovecot.settled_login_count() - before
    finally:
        stop_process(proxy)
    return {'cycles': args.cycles, 'errors': errors, 'logins': logins,
            'target_max_logins': args.users, 'ok': logins <= args.users and not errors}


def print_report(report):
    """Print the plain-text table and totals."""
    print('gimapproxy webmail benchmark: connect, LOGIN, SELECT INBOX, '
          'FETCH 1:10 (FLAGS ENVELOPE), LOGOUT')
    print('load generator: %s; %d users; %d round(s) of %g s (+%g s warmup) per endpoint; '
          '%d CPUs' % (report['loadgen'], report['users'], report['rounds'],
                       report['seconds'], report['warmup'], os.cpu_count()))
    if report['loadgen'].startswith('python'):
        print('NOTE: the built-in Python load generator was used (imapload not available, '
              'or --python-loadgen); it may itself be the bottleneck.')
    if report['rows']:
        print('\n%7s %11s %10s %7s %11s %10s %9s %8s %7s' % (
            'clients', 'direct c/s', 'proxy c/s', 'ratio', 'logins/1k', 'logins/1k',
            'proxy CPU', 'proxy', 'proxy'))
        print('%7s %11s %10s %7s %11s %10s %9s %8s %7s' % (
            '', '(median)', '(median)', 'px/dir', 'direct', 'proxy', 'us/cycle', 'core %',
            'RSS MB'))
        for row in report['rows']:
            print('%7d %11.1f %10.1f %7.2f %11s %10s %9s %8s %7s' % (
                row['clients'], row['direct_cycles_per_s'], row['proxy_cycles_per_s'],
                row['ratio'], fmt(row['direct_logins_per_1000'], '.1f'),
                fmt(row['proxy_logins_per_1000'], '.1f'),
                fmt(row.get('proxy_cpu_us_per_cycle'), '.0f'),
                fmt(row.get('proxy_core_percent'), '.0f'), fmt(row.get('proxy_rss_mb'), '.1f')))
            if row.get('proxy_core_percent', 0) >= 85:
                print('        NOTE: the proxy used %.0f%% of one core here: it is (close to) '
                      'CPU-bound, so this rate is limited by the proxy.'
                      % row['proxy_core_percent'])
        errors = sum(row['direct_errors'] + row['proxy_errors'] for row in report['rows'])
        print('\nproxy, all runs: %d cycles, %d Dovecot logins (%d users); errors in all runs: '
              '%d' % (report['proxy_total_cycles'], report['proxy_total_logins'],
                      report['users'], errors))
        if report['proxy_total_logins'] > report['users']:
            print('  (above one login per user: a user with two sessions at the same time '
                  'needs a second server connection)')
    check = report.get('check')
    if check:
        print('fixed-count check: %d cycles through a fresh proxy (1 client, Python client) '
              'caused %d Dovecot logins, %d errors (target: at most %d): %s' % (
                  check['cycles'], check['logins'], check['errors'],
                  check['target_max_logins'], 'OK' if check['ok'] else 'FAILED'))


def start_scraper(port, interval):
    """Fetch /metrics every `interval` seconds in a daemon thread, as Prometheus would."""
    import threading
    import urllib.request

    def scrape():
        while True:
            try:
                with urllib.request.urlopen('http://%s:%d/metrics' % (HOST, port),
                                            timeout=5) as response:
                    response.read()
            except OSError:
                pass
            time.sleep(interval)
    threading.Thread(target=scrape, daemon=True).start()
    log('scraping http://%s:%d/metrics every %gs' % (HOST, port, interval))


def parse_args():
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--scrape', type=float, default=0, metavar='SECONDS',
                   help='turn on stats_listen and fetch /metrics every SECONDS (0: off)')
    p.add_argument('--clients', default='1,16', type=lambda s: [int(c) for c in s.split(',')],
                   help='comma-separated concurrent client counts (default 1,16)')
    p.add_argument('--rounds', type=int, default=3,
                   help='direct/proxy alternations per client count (default 3; 0: none)')
    p.add_argument('--seconds', type=float, default=5, help='measured seconds per run (5)')
    p.add_argument('--warmup', type=float, default=1, help='unmeasured seconds per run (1)')
    p.add_argument('--users', type=int, default=20, help='users user1..userN (default 20)')
    p.add_argument('--cycles', type=int, default=1000,
                   help='cycles in the fixed-count login check (default 1000; 0: skip it)')
    p.add_argument('--cache-size', type=int, default=1000, help='proxy cache_size (1000)')
    p.add_argument('--python-loadgen', action='store_true',
                   help='use the built-in Python load generator even if imapload is there')
    p.add_argument('--json', action='store_true', help='print one JSON object instead')
    return p.parse_args()


def main():
    """Start Dovecot and the proxy, measure, report; always stop what was started."""
    args = parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from tests.backends import dovecot_binary
    if not dovecot_binary():
        log('cannot run: missing Dovecot (apt-get install dovecot-imapd)')
        return 2
    binary = None if args.python_loadgen else find_imapload()
    if binary:
        loadgen, name = functools.partial(run_imapload, binary), 'imapload (%s)' % binary
    else:
        loadgen, name = run_python, 'python (built-in, one process per client)'
    report = {'loadgen': name, 'users': args.users, 'rounds': args.rounds,
              'seconds': args.seconds, 'warmup': args.warmup, 'rows': []}
    workdir = tempfile.mkdtemp(prefix='gimap-bench-')
    dovecot = Dovecot(users={'user%d' % i: 'secret%d' % i for i in range(1, args.users + 1)})
    proxy = None
    try:
        dovecot.start()
        if args.rounds > 0 and args.clients:
            stats_port = free_port() if args.scrape else 0
            settings = {'cache_size': args.cache_size}
            if stats_port:
                settings['stats_listen'] = '%s:%d' % (HOST, stats_port)
            proxy, proxy_port, proxy_log = start_proxy(workdir, dovecot.port, settings)
            if stats_port:
                start_scraper(stats_port, args.scrape)
            log('dovecot pid %d port %d; gimapproxy pid %d port %d; load generator: %s'
                % (dovecot.pid, dovecot.port, proxy.pid, proxy_port, name))
            runs = measure_throughput(args, loadgen, dovecot, proxy, proxy_port)
            report.update(summarize(runs))
            stop_process(proxy)
            with open(proxy_log, errors='replace') as f:
                report['proxy_log_lines'] = f.read().splitlines()[-20:]
        if args.cycles > 0:
            report['check'] = fixed_count_check(args, dovecot, workdir)
    finally:
        stop_process(proxy)
        dovecot.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
        if report.get('proxy_log_lines'):
            print('proxy log (warnings and errors, last 20 lines):\n  ' +
                  '\n  '.join(report['proxy_log_lines']))
    return 0 if report.get('check', {'ok': True})['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
