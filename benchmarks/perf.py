#!/usr/bin/env python3
"""Measure Dovecot directly, through a plain C relay and through gimapproxy, in one run.

Starts throwaway Dovecots (one with STARTTLS), the relay (benchmarks/tools/relay.c),
Debian's up-imapproxy with and without TCP_NODELAY (benchmarks/tools/nodelay.c
preloaded), bin/gimapproxy (also as two processes sharing a port with reuse_port), drives
them with benchmarks/tools/imapload.c (all built with gcc on first use), alternates the
endpoints round by round, and prints one table (the median per endpoint, the ratios, the
target and PASS/FAIL) and the performance goals, each PASS or MISS with its ratio. With
--before REV, gimapproxy as of that git revision runs in the same rounds too. The
exit status is 0 whenever it ran (FAIL and MISS too) and 2 when it could not.
benchmarks/README.md says how each row is measured.
"""
import argparse
import contextlib
import imaplib
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import goals, upimapproxy  # noqa: E402
from benchmarks.common import (HOST, Dovecot, build_tool, export_revision,  # noqa: E402
                               find_imapload, finish_imapload, fmt, free_port, log,
                               missing_for_benchmark, on_signal, proc_cpu_rss,
                               start_imapload, start_proxy, stop_process,
                               task_cpu, task_wait, wait_greeting)
from tests.backends import TLS_HOST, dovecot_binary, make_message  # noqa: E402

# The table's columns. 'up' is Debian's up-imapproxy as shipped, 'upnd' the same with
# TCP_NODELAY preloaded. The TLS pair ('upnd_tls', 'proxy_tls': STARTTLS to the server)
# and 'proxy2' (two gimapproxy processes sharing the port) have rows of their own.
ENDPOINTS = ('direct', 'relay', 'up', 'upnd', 'proxy')
COLUMNS = {'direct': 'direct', 'relay': 'relay', 'up': 'up-imapprx', 'upnd': 'up+ND',
           'proxy': 'proxy'}
PLAIN = ENDPOINTS
# Which endpoints each scenario runs against (those that are up).
# 'before' (--before) is gimapproxy as of another revision.
SCENARIO_ENDPOINTS = {'cycle1': PLAIN + ('before',),
                      'cycle16': PLAIN + ('before', 'upnd_tls', 'proxy_tls', 'proxy2'),
                      'noop': PLAIN + ('before',), 'bulk': PLAIN + ('before', 'upnd_tls', 'proxy_tls'),
                      'condstore16': ('direct', 'proxy', 'before')}
PROXIES = ('proxy', 'proxy_tls', 'proxy2')     # gimapproxy endpoints, for the error count
USERS = 20                                   # user1..user20 / secret1..secret20
BULK_USER = 'bulk1'                          # password secret1; messages 56 and 57 are big
BIG_MESSAGE = 5 * 1024 * 1024
SCALE_SESSIONS = 10000
FD_RESERVE = 100                             # proxy fds besides its sessions' two each

# The comparisons run Dovecot as the tests do (Debian's defaults: a new imap-login
# process per connection and an imap process per session), without the per-user+IP cap,
# since the proxy holds up to 500 sessions per user. Later settings override the
# harness's (checked with doveconf -n).
COMPARE_CONF = """\
mail_max_userip_connections = 20000
"""
# With --fast-login, and always for the many-sessions Dovecot: logins in Dovecot's
# "high-performance mode" (long-lived imap-login processes with up to 1000 clients each),
# which makes direct logins cheaper, so the proxy's ratio to direct smaller.
LOGIN_CONF = COMPARE_CONF + """\
service imap-login {
  service_count = 0
  client_limit = 1000
  process_min_avail = 2
  process_limit = 20
}
"""
# For the idle and scale scenarios only: up to 1000 sessions per imap process. The
# comparisons keep Dovecot's default of one imap process per session (as the tests and
# webmail.py run it); one process serving many clients makes direct cycles ~3x faster.
# client_limit alone changes nothing: with the default service_count = 1 an imap process
# still takes one client, and process_limit then caps the sessions.
SESSIONS_CONF = LOGIN_CONF + """\
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 100
  vsz_limit = 2G
}
"""
# Only the proxy's caps are raised (500 sessions per user at 10,000); all else is default.
PROXY_SETTINGS = {'cache_size': 12000, 'max_clients': 12000, 'max_connections_per_user': 1000}

# name: (imapload mode, options). Cycles rotate over user1..user20; bulk FETCHes
# 56:57 BODY.PEEK[] (imapload's default) as bulk1.
SCENARIOS = {
    'cycle1': ('cycle', ['--clients', 1, '--users', '1-%d' % USERS]),
    'cycle16': ('cycle', ['--clients', 16, '--users', '1-%d' % USERS]),
    'noop': ('noop', ['--clients', 1, '--users', '1-1']),
    'bulk': ('bulk', ['--clients', 1, '--users', '1-1', '--user-fmt', 'bulk%d']),
    # Webmail that uses CONDSTORE (Roundcube's message cache, Horde): each session
    # starts SELECT INBOX (CONDSTORE) and FETCHes MODSEQ.
    'condstore16': ('cycle', ['--clients', 16, '--users', '1-%d' % USERS, '--select-params',
                              '(CONDSTORE)', '--fetch', '1:10 (FLAGS MODSEQ)']),
}
HEADLINE = {'cycle': ('rate', 'cycles/s'), 'noop': ('p50_us', 'us p50'),
            'bulk': ('mb_per_s', 'MB/s')}
# Rows comparing the proxy's median with another endpoint's: (row, scenario, field of
# imapload's result, compared with, lowest and highest ratio proxy/other, target).
COMPARISONS = (
    ('webmail cycles/s, 1 client', 'cycle1', 'rate', 'direct', 8, None, '>= 8x direct'),
    ('webmail cycles/s, 16 clients', 'cycle16', 'rate', 'direct', 8, None, '>= 8x direct'),
    ('NOOP round trip p50, us', 'noop', 'p50_us', 'relay', None, 1, '<= relay'),
    ('10 MiB FETCH, MB/s', 'bulk', 'mb_per_s', 'relay', 0.95, None, '>= 0.95x relay'),
)


# --- setup -------------------------------------------------------------------------

def raise_file_limit():
    """Raise this process's soft open-file limit to the hard limit and return it. The
    proxy, the relay, Dovecot and imapload inherit it; the proxy's code is not involved."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1048576
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    except (ValueError, OSError):
        return soft


def add_bulk_mail(dovecot, context=None):
    """Give BULK_USER 57 messages: the harness's 20, 35 small ones, then two of 5 MiB.
    With `context` (an ssl.SSLContext) the check logs in after STARTTLS."""
    for i in range(21, 56):
        dovecot.add_message(BULK_USER, make_message(BULK_USER, i))
    body = (b'%075d\n' % 0) * (BIG_MESSAGE // 76)
    for i in (56, 57):
        dovecot.add_message(BULK_USER, make_message(BULK_USER, i) + body)
    imap = imaplib.IMAP4(dovecot.host, dovecot.port)
    try:
        if context is not None:
            imap.starttls(context)
        imap.login(BULK_USER, 'secret1')
        count = int(imap.select('INBOX')[1][0])
        sizes = imap.fetch('56:57', '(RFC822.SIZE)')[1]
    finally:
        imap.logout()
    if count != 57 or not all(b'RFC822.SIZE 5' in s for s in sizes):
        raise RuntimeError('bulk mailbox: %d messages, 56:57 sizes %r' % (count, sizes))


def start_relay(tool, target_port, workdir):
    """Start the C relay on a free port in front of `target_port`; return (Popen, port)."""
    port = free_port()
    with open(os.path.join(workdir, 'relay-%d.log' % port), 'wb') as out:
        proc = subprocess.Popen([tool, str(port), str(target_port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if not wait_greeting(port, proc):
        stop_process(proc)
        raise RuntimeError('relay did not start on port %d' % port)
    return proc, port


# --- measuring ---------------------------------------------------------------------

def imapload(bench, mode, port, options, pid=None, cpu=None):
    """Run imapload to the end (reporting `pid`'s RSS); return its result, with the CPU
    seconds that `cpu()` counted during the run as 'cpu_s' when `cpu` is given."""
    cpu0 = cpu() if cpu else 0
    result = finish_imapload(start_imapload(bench.imapload, mode, port, options, pid))
    if cpu:
        result['cpu_s'] = cpu() - cpu0
    return result


def cpu_reader(pids, threads_come_and_go=False):
    """A function returning the CPU seconds used so far by the processes `pids`.

    Per-thread schedstat (ns) is exact but forgets threads that have exited, and
    up-imapproxy runs a thread per client; for it /proc/PID/stat (10 ms ticks, exited
    threads included) is the right count."""
    if threads_come_and_go:
        return lambda: sum(proc_cpu_rss(pid)[0] for pid in pids)
    return lambda: sum(task_cpu(pid) for pid in pids)


def timed(bench, scenario):
    """Return (imapload mode, options) for one timed run of `scenario`."""
    mode, options = SCENARIOS[scenario]
    return mode, options + ['--seconds', bench.args.seconds, '--warmup', bench.args.warmup,
                            '--timeout', 10]


def run_scenario(bench, scenario, endpoint, rnd):
    """One timed run of `scenario` against `endpoint`; return imapload's result, tagged.
    Proxy cycle runs also get 'dovecot_logins': the Dovecot logins they caused; runs of
    gimapproxy get 'runq_wait_s': how long its threads were runnable but had no CPU."""
    mode, options = timed(bench, scenario)
    count_logins = endpoint in ('proxy', 'before') and mode == 'cycle'
    before = bench.dovecot.settled_login_count() if count_logins else 0
    # gimapproxy's one thread: how long it was runnable but waited for a CPU.
    waits = endpoint.startswith('proxy') and [task_wait(pid) for pid in bench.all_pids[endpoint]]
    r = imapload(bench, mode, bench.ports[endpoint], options, bench.pids.get(endpoint),
                 bench.cpu.get(endpoint))
    if waits and None not in waits:
        r['runq_wait_s'] = sum(task_wait(pid) for pid in bench.all_pids[endpoint]) - sum(waits)
    if count_logins:
        r['dovecot_logins'] = bench.dovecot.settled_login_count() - before
    r.update(scenario=scenario, endpoint=endpoint, round=rnd)
    key, unit = HEADLINE[mode]
    log('round %d/%d  %-7s  %-9s  %9.1f %-8s  %d errors %s' % (
        rnd, bench.args.rounds, scenario, endpoint, r[key], unit, r['errors_all'],
        r['last_error']))
    return r


def await_lines(clients, indexes, prefix, deadline):
    """Read from clients[i] for each i in `indexes` until it has a line starting with
    `prefix`; return {i: (line, seconds waited)} for those that had one before `deadline`.
    A client that closes or fails gets 'closed' set and is left out."""
    sel, t0, found = selectors.DefaultSelector(), time.monotonic(), {}
    for i in indexes:
        sel.register(clients[i]['sock'], selectors.EVENT_READ, i)
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            i, c = key.data, clients[key.data]
            try:
                data = c['sock'].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b''
            c['buf'] += data
            while i not in found and b'\n' in c['buf']:
                line, c['buf'] = c['buf'].split(b'\n', 1)
                if line.startswith(prefix):
                    found[i] = (line, time.monotonic() - t0)
            c['closed'] = not data
            if c['closed'] or i in found:
                sel.unregister(c['sock'])
    sel.close()
    return found


def connect_burst(port, count, timeout=10.0):
    """`count` clients connect at once (non-blocking sockets), wait for the greeting,
    then all send LOGIN, then all LOGOUT; each step gets `timeout` seconds.

    Returns counts of clients: 'ungreeted' (no '* OK' greeting in time), 'hung' (no tagged
    reply to LOGIN or LOGOUT in time, connection still open), 'failed' (a reply other
    than OK, or the connection closed), and 'greeting_max_ms', the slowest greeting.
    """
    clients = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((HOST, port))
        clients.append({'sock': sock, 'buf': b'', 'closed': False, 'user': i % USERS + 1})
    try:
        greeted = await_lines(clients, range(count), b'* ', time.monotonic() + timeout)
        alive = [i for i, (line, _) in greeted.items() if line.startswith(b'* OK')]
        result = {'clients': count, 'ungreeted': count - len(alive), 'hung': 0, 'failed': 0,
                  'greeting_max_ms': 1000 * max([w for _, w in greeted.values()] or [0])}
        for tag in (b'a1', b'a2'):
            for i in alive:
                user = clients[i]['user']
                line = (b'a1 LOGIN user%d secret%d\r\n' % (user, user) if tag == b'a1'
                        else b'a2 LOGOUT\r\n')
                try:
                    clients[i]['sock'].send(line)
                except OSError:
                    clients[i]['closed'] = True
            replies = await_lines(clients, alive, tag + b' ', time.monotonic() + timeout)
            good = [i for i in alive if i in replies and replies[i][0].startswith(tag + b' OK')]
            hung = [i for i in alive if i not in replies and not clients[i]['closed']]
            result['hung'] += len(hung)
            result['failed'] += len(alive) - len(good) - len(hung)
            alive = good
    finally:
        for c in clients:
            c['sock'].close()
    return result


def kb_per_session(r):
    """RSS growth from before to after opening, per session open, of an imapload idle
    result `r` (None if no session opened)."""
    rss = r['proxy_rss_kb']
    return (rss[1] - rss[0]) / r['sessions_open'] if r['sessions_open'] else None


def idle_memory(bench, port, pid, sessions):
    """Open `sessions` logged-in idle sessions through `port` (50 logins in flight), hold
    them 1 s; return imapload's result with 'kb_per_session': the RSS growth of `pid`
    from before to after opening, per session open."""
    r = imapload(bench, 'idle', port, ['--sessions', sessions, '--hold', 1, '--clients', 50,
                                        '--timeout', 60], pid)
    r['kb_per_session'] = kb_per_session(r)
    log('idle      %d sessions open of %d: %s kB per session' % (
        r['sessions_open'], sessions, fmt(r['kb_per_session'], '.1f')))
    return r


def wait_until_open(pid, idle_proc):
    """Wait until `pid`'s open-file count has not changed for 1.5 s (imapload idle has
    finished opening) or `idle_proc` has exited."""
    last, since = -1, time.monotonic()
    while idle_proc.poll() is None:
        count = len(os.listdir('/proc/%d/fd' % pid))
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= 1.5:
            break
        time.sleep(0.25)


def scale(bench, dovecot, port, pid, sessions):
    """Hold `sessions` idle sessions through a fresh proxy while 16 other clients cycle.

    The cycle rate is measured once before the sessions open and once while they are
    held. Returns the idle run's imapload result plus 'rate_before', 'rate_held',
    'logins_held' (Dovecot logins per 1,000 cycles while held), 'held_through' (the
    sessions were still open when the cycle run ended), 'rss_mb' and 'kb_per_session'.
    """
    mode, options = timed(bench, 'cycle16')
    before = imapload(bench, mode, port, options, pid)
    hold = bench.args.warmup + bench.args.seconds + 6    # + waiting, settling, draining
    idle = start_imapload(bench.imapload, 'idle', port,
                           ['--sessions', sessions, '--clients', 100, '--hold', hold,
                            '--timeout', 60], pid)
    try:
        log('scale     opening %d sessions ...' % sessions)
        wait_until_open(pid, idle)
        logins = dovecot.settled_login_count()
        held = imapload(bench, mode, port, options, pid)
        held_through = idle.poll() is None
        logins = dovecot.settled_login_count() - logins
    finally:
        r = finish_imapload(idle)
    r.update(rate_before=before['rate'], rate_held=held['rate'], held_through=held_through,
             logins_held=1000.0 * logins / max(held['done_all'], 1),
             errors_held=held['errors_all'], rss_mb=max(r['proxy_rss_kb'][1:]) / 1024,
             kb_per_session=kb_per_session(r))
    log('scale     %d sessions open of %d; cycles/s %.1f before, %.1f while held' % (
        r['sessions_open'], sessions, before['rate'], held['rate']))
    return r


# --- report ------------------------------------------------------------------------

def medians(runs, scenario, value):
    """{endpoint: median of value(run)} over the runs of `scenario`, for each endpoint
    that ran it (value(run) None: left out)."""
    out = {}
    for endpoint in dict.fromkeys(r['endpoint'] for r in runs):
        values = [value(r) for r in runs if r['scenario'] == scenario and r['endpoint'] == endpoint]
        values = [v for v in values if v is not None]
        if values:
            out[endpoint] = statistics.median(values)
    return out


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def cpu_us(per):
    """A function of a run: the endpoint's CPU microseconds per `per` (cycle, NOOP) of
    all the run's exchanges, warmup included, or None when its CPU was not read."""
    return lambda r: 1e6 * r['cpu_s'] / max(r['done_all'], 1) if 'cpu_s' in r else None


def pick(values, columns):
    """{column: values[endpoint]} for (endpoint, column) in `columns`, those present."""
    return {column: values[e] for e, column in columns if e in values}


def logins_per_1k(runs, scenarios, endpoint='proxy'):
    """Dovecot logins per 1,000 cycles of `scenarios` through `endpoint` (gimapproxy, or
    its --before revision), or None without any."""
    cycles = [r for r in runs if 'dovecot_logins' in r and r['scenario'] in scenarios
              and r['endpoint'] == endpoint]
    return ratio(1000.0 * sum(r['dovecot_logins'] for r in cycles),
                 sum(r['done_all'] for r in cycles))


def make_rows(res):
    """The table: one dict per scenario with 'values' per endpoint, 'ratio' (a number)
    and 'ratio_of' (its name), 'target' (text) and 'pass' (None: no target)."""
    rows = []

    def row(name, values, target='-', ok=None, ratio_value=None, ratio_of='', spec='.1f'):
        rows.append({'scenario': name, 'values': values, 'ratio': ratio_value,
                     'ratio_of': ratio_of, 'target': target, 'pass': ok, 'spec': spec})

    runs = res['runs']
    for name, scenario, field, other, low, high, target in COMPARISONS:
        v = pick(medians(runs, scenario, lambda r: r[field]), [(e, e) for e in ENDPOINTS])
        x = ratio(v.get('proxy'), v.get(other))
        ok = x is not None and (low is None or x >= low) and (high is None or x <= high)
        row(name, v, target, ok, x, 'px/' + other)
    per_1k = logins_per_1k(runs, ('cycle1', 'cycle16'))
    row('Dovecot logins per 1,000 cycles, warm', {'proxy': per_1k}, '<= 1',
        per_1k is not None and per_1k <= 1, spec='.2f')
    v = pick(medians(runs, 'condstore16', lambda r: r['rate']), [(e, e) for e in ENDPOINTS])
    row('CONDSTORE webmail cycles/s, 16 clients', v, '-', None,
        ratio(v.get('proxy'), v.get('direct')), 'px/direct')
    per_1k = logins_per_1k(runs, ('condstore16',))
    row('CONDSTORE webmail: Dovecot logins per 1,000 cycles, warm', {'proxy': per_1k},
        '<= 1', per_1k is not None and per_1k <= 1, spec='.2f')
    for clients in (1, 16):
        v = pick(medians(runs, 'cycle%d' % clients, cpu_us('cycle')),
                 [(e, e) for e in ENDPOINTS])
        ok = None not in (v.get('proxy'), v.get('relay'))
        ok = ok and v['proxy'] <= 270 and v['proxy'] <= v['relay']
        row('CPU us per cycle, %d client%s' % (clients, 's' if clients > 1 else ''), v,
            '<= 270 and <= relay', ok, ratio(v.get('proxy'), v.get('relay')), 'px/relay', '.0f')
    v = pick(medians(runs, 'noop', cpu_us('noop')), [(e, e) for e in ENDPOINTS])
    row('CPU us per NOOP', v, ratio_value=ratio(v.get('proxy'), v.get('relay')),
        ratio_of='px/relay')
    # STARTTLS to the server: up-imapproxy+ND with force_tls in its column, the proxy
    # with server_tls = starttls in its own.
    tls = (('upnd_tls', 'upnd'), ('proxy_tls', 'proxy'))
    for name, scenario, value, spec in (
            ('STARTTLS: cycles/s, 16 clients', 'cycle16', lambda r: r['rate'], '.1f'),
            ('STARTTLS: CPU us per cycle, 16 clients', 'cycle16', cpu_us('cycle'), '.0f'),
            ('STARTTLS: 10 MiB FETCH, MB/s', 'bulk', lambda r: r['mb_per_s'], '.1f')):
        v = pick(medians(runs, scenario, value), tls)
        if v:
            row(name, v, ratio_value=ratio(v.get('proxy'), v.get('upnd')), ratio_of='px/up+ND',
                spec=spec)
    one = medians(runs, 'cycle16', lambda r: r['rate']).get('proxy')
    one_cpu = medians(runs, 'cycle16', cpu_us('cycle')).get('proxy')
    two = medians(runs, 'cycle16', lambda r: r['rate']).get('proxy2')
    if two is not None:
        row('2 processes, reuse_port: cycles/s, 16 cl', {'proxy': two},
            ratio_value=ratio(two, one), ratio_of='vs 1 process')
        two_cpu = medians(runs, 'cycle16', cpu_us('cycle')).get('proxy2')
        row('2 processes: CPU us per cycle, 16 cl', {'proxy': two_cpu},
            ratio_value=ratio(two_cpu, one_cpu), ratio_of='vs 1 process', spec='.0f')
    idle = res['idle']
    v = {e: idle[e]['kb_per_session'] for e in ('relay', 'proxy')}
    row('kB per idle session, %d sessions' % idle['sessions'], v, '<= 32',
        v['proxy'] is not None and v['proxy'] <= 32 and
        idle['proxy']['sessions_open'] == idle['sessions'])
    bursts = res['bursts']
    lost = sum(b['ungreeted'] + b['hung'] for b in bursts)
    row('burst of %d: un-greeted or hung' % bursts[0]['clients'], {'proxy': lost}, '0',
        lost == 0, spec='d')
    row('burst of %d: LOGIN/LOGOUT not OK' % bursts[0]['clients'],
        {'proxy': sum(b['failed'] for b in bursts)}, spec='d')
    sc = res['scale']
    row('scale: sessions held', {'proxy': sc['sessions_open']}, '%d' % sc['sessions'],
        sc['sessions_open'] == sc['sessions'] and sc['held_through'], spec='d')
    row('scale: proxy RSS MB, sessions held', {'proxy': sc['rss_mb']})
    row('scale: proxy kB per session', {'proxy': sc['kb_per_session']})
    row('scale: cycles/s of 16 other clients', {'proxy': sc['rate_held']},
        ratio_value=ratio(sc['rate_held'], sc['rate_before']), ratio_of='vs none held')
    row('scale: Dovecot logins per 1,000 cycles', {'proxy': sc['logins_held']}, spec='.0f')
    return rows


BEFORE_AFTER = (('cycles/s, 1 client', 'cycle1', lambda r: r['rate']),
                ('cycles/s, 16 clients', 'cycle16', lambda r: r['rate']),
                ('CPU us per cycle, 1 client', 'cycle1', cpu_us('cycle')),
                ('CPU us per cycle, 16 clients', 'cycle16', cpu_us('cycle')),
                ('NOOP round trip p50, us', 'noop', lambda r: r['p50_us']),
                ('CPU us per NOOP', 'noop', cpu_us('noop')),
                ('10 MiB FETCH, MB/s', 'bulk', lambda r: r['mb_per_s']))


# Reuse in the same rounds: Dovecot logins per 1,000 warm cycles.
BEFORE_AFTER_LOGINS = (('Dovecot logins per 1,000 cycles', ('cycle1', 'cycle16')),
                       ('CONDSTORE: logins per 1,000 cycles', ('condstore16',)))


def before_after(runs):
    """[(figure, before, now)]: gimapproxy as of --before against this tree, medians of
    the same rounds; empty without --before."""
    out = []
    for name, scenario, value in BEFORE_AFTER:
        v = medians(runs, scenario, value)
        if 'before' in v:
            out.append((name, v['before'], v.get('proxy')))
    if out:
        for name, scenarios in BEFORE_AFTER_LOGINS:
            out.append((name, logins_per_1k(runs, scenarios, 'before'),
                        logins_per_1k(runs, scenarios)))
    return out


def print_report(report):
    """Print the settings, the table and the notes as plain text."""
    s = report['settings']
    print('gimapproxy performance benchmark, %s' % time.strftime('%Y-%m-%d %H:%M'))
    print('settings: %d round(s), endpoints alternating; %g s measured (+%g s warmup) per run; '
          '%d CPUs; load generator %s; open-file limit %d; took %.0f s'
          % (s['rounds'], s['seconds'], s['warmup'], s['cpus'], s['imapload'], s['nofile'],
             s['elapsed_s']))
    print('dovecot %s: comparisons with one imap process per session and %s imap-login '
          'mode; idle and scale with 1000 sessions per imap process'
          % (s['dovecot_version'], s['dovecot_login']))
    line = '%-40s' + ' %10s' * len(ENDPOINTS) + '  %-18s %-20s %s'
    print('\n' + line % ('scenario (median over rounds)', *COLUMNS.values(), 'ratio',
                         'target', 'result'))
    for row in report['rows']:
        cells = [fmt(row['values'].get(e), row['spec']) if e in row['values'] else ''
                 for e in ENDPOINTS]
        ratio_text = ('%.2f %s' % (row['ratio'], row['ratio_of'])) if row['ratio'] else ''
        result = {True: 'PASS', False: 'FAIL', None: ''}[row['pass']]
        print(line % (row['scenario'], *cells, ratio_text, row['target'], result))
    if report['before_after']:
        print('\nsince %s (same run)                     before        now   now/before'
              % report['settings']['before'])
        for name, before, now in report['before_after']:
            spec = '.2f' if max(before or 0, now or 0) < 10 else '.1f'
            print('%-40s %10s %10s %12s' % (name, fmt(before, spec), fmt(now, spec),
                                            fmt(ratio(now, before), '.2f')))
    print('\n' + goals.format_goals(report['goals']))
    for note in report['notes']:
        print('NOTE: ' + note)


def parse_args(argv=None):
    """Command-line options; --quick sets small defaults for a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, help='rounds of every scenario (3; quick 1)')
    p.add_argument('--seconds', type=float, help='measured seconds per run (2.5; quick 0.7)')
    p.add_argument('--warmup', type=float, help='unmeasured seconds per run (0.5; quick 0.2)')
    p.add_argument('--idle-sessions', type=int, help='idle sessions (2000; quick 200)')
    p.add_argument('--scale-sessions', type=int,
                   help='sessions held in the scale scenario (10000, capped by the open-file '
                        'limit; quick 500)')
    p.add_argument('--burst', type=int, default=200, help='clients in a connect burst (200)')
    p.add_argument('--fast-login', action='store_true',
                   help="compare with a Dovecot whose imap-login runs in high-performance "
                        "mode (service_count = 0), not with Dovecot's defaults")
    p.add_argument('--quick', action='store_true', help='1 short round, few sessions')
    p.add_argument('--before', metavar='REV',
                   help='also run gimapproxy as of git revision REV, in the same rounds, and '
                        'print how each figure changed since')
    p.add_argument('--json', action='store_true', help='print one JSON object instead')
    args = p.parse_args(argv)
    defaults = ({'rounds': 1, 'seconds': 0.7, 'warmup': 0.2, 'idle_sessions': 200,
                 'scale_sessions': 500} if args.quick else
                {'rounds': 3, 'seconds': 2.5, 'warmup': 0.5, 'idle_sessions': 2000,
                 'scale_sessions': SCALE_SESSIONS})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Bench:
    """What the runs need: the options, imapload, the comparison Dovecot (for its login
    count), and the port, PID and CPU reader of each endpoint."""

    def __init__(self, args, imapload_path, dovecot):
        self.args, self.imapload, self.dovecot = args, imapload_path, dovecot
        self.ports, self.pids, self.cpu = {'direct': dovecot.port}, {}, {}
        self.all_pids = {}

    def add(self, endpoint, port, pids, threads_come_and_go=False):
        """Register an endpoint: its port, and the processes whose CPU it uses."""
        self.ports[endpoint], self.pids[endpoint] = port, pids[0]
        self.all_pids[endpoint] = pids
        self.cpu[endpoint] = cpu_reader(pids, threads_come_and_go)


def log_problems(proxy_logs, dovecots):
    """{source: {'count': lines, 'last': the last 5}}: all lines of the proxies' logs
    (at log_level warning only warnings and errors) and each Dovecot log's Warning, Error
    and Fatal lines."""
    found = {'proxies': []}
    for path in proxy_logs:
        with open(path, errors='replace') as f:
            found['proxies'] += f.read().splitlines()
    for name, dovecot in dovecots.items():
        found[name] = [line for line in dovecot.log_text().splitlines()
                       if any(w in line for w in (' Warning: ', ' Error: ', ' Fatal: '))]
    return {name: {'count': len(lines), 'last': lines[-5:]} for name, lines in found.items()}


def listening_sockets(port):
    """How many TCP sockets listen on 127.0.0.1:`port` (from /proc/net/tcp)."""
    with open('/proc/net/tcp') as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[1] == '0100007F:%04X' % port and line.split()[3] == '0A')


def start_pair(stack, workdir, server_port, settings):
    """Start two gimapproxy processes with reuse_port = yes on one free port; return
    (port, [pid, pid], [log, log]) once both listen."""
    port = free_port()
    settings = dict(settings, reuse_port='yes', listen_port=port)
    pids, logs = [], []
    for count in (1, 2):
        proc, _, log_path = start_proxy(workdir, server_port, settings)
        stack.callback(stop_process, proc)
        deadline = time.monotonic() + 15
        while listening_sockets(port) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        if listening_sockets(port) < count:
            raise RuntimeError('gimapproxy with reuse_port: %d sockets on port %d, not %d'
                               % (listening_sockets(port), port, count))
        pids.append(proc.pid)
        logs.append(log_path)
    return port, pids, logs


def start_tls_pair(stack, bench, workdir, users, shim):
    """The STARTTLS pair: a Dovecot that requires TLS (tests/tlsutil's test CA), then
    up-imapproxy+ND with force_tls yes and gimapproxy with server_tls = starttls in front
    of it, both verifying its certificate; registers 'upnd_tls' and 'proxy_tls'. Returns
    the proxy's log, or None (after a note in bench.skipped) when the test CA cannot be
    made."""
    try:
        from tests.tlsutil import TestPKI
    except ImportError as exc:
        reason = 'the test CA needs trustme (pip install trustme): %s' % exc
        bench.skipped.update(upnd_tls=reason, proxy_tls=reason)
        return None
    pki = TestPKI(os.path.join(workdir, 'pki'))
    dovecot = Dovecot(users=dict(users, **{BULK_USER: 'secret1'}), tls=pki.server_tls,
                      extra_conf=LOGIN_CONF if bench.args.fast_login else COMPARE_CONF)
    stack.callback(dovecot.stop)
    dovecot.start()
    add_bulk_mail(dovecot, pki.client_context())
    if shim is not None:
        proc, port, _ = upimapproxy.start(workdir, TLS_HOST, dovecot.port, shim,
                                          force_tls=True, ca_file=pki.ca_file)
        stack.callback(stop_process, proc)
        bench.add('upnd_tls', port, [proc.pid], threads_come_and_go=True)
    proc, port, log_path = start_proxy(workdir, dovecot.port, dict(
        PROXY_SETTINGS, server_hostname=TLS_HOST, server_tls='starttls',
        tls_ca_file=pki.ca_file))
    stack.callback(stop_process, proc)
    bench.add('proxy_tls', port, [proc.pid])
    log('tls dovecot pid %d %s:%d; up-imapproxy+ND port %s; gimapproxy port %d' % (
        dovecot.pid, TLS_HOST, dovecot.port, bench.ports.get('upnd_tls', '-'), port))
    return log_path


def start_peers(stack, bench, workdir, relay_path, users):
    """Start every endpoint but Dovecot itself (already in bench): the relay, gimapproxy,
    and, unless --quick, up-imapproxy with and without the TCP_NODELAY shim, the
    STARTTLS pair and the two gimapproxy processes sharing a port. An endpoint that
    cannot run gets its reason in bench.skipped. Returns the gimapproxy log files."""
    compare, args = bench.dovecot, bench.args
    relay, port = start_relay(relay_path, compare.port, workdir)
    stack.callback(stop_process, relay)
    bench.add('relay', port, [relay.pid])
    proxy, port, proxy_log = start_proxy(workdir, compare.port, PROXY_SETTINGS)
    stack.callback(stop_process, proxy)
    bench.add('proxy', port, [proxy.pid])
    logs = [proxy_log]
    if args.before:
        tree = export_revision(args.before, os.path.join(workdir, 'before'))
        proc, port, before_log = start_proxy(workdir, compare.port, PROXY_SETTINGS, tree)
        stack.callback(stop_process, proc)
        bench.add('before', port, [proc.pid])
        logs.append(before_log)
    if args.quick:
        reason = 'skipped by --quick (a full run measures them)'
        bench.skipped.update(up=reason, upnd=reason, upnd_tls=reason, proxy_tls=reason,
                             proxy2=reason)
        return logs
    shim = None
    if upimapproxy.missing():
        bench.skipped.update(up=upimapproxy.missing(), upnd=upimapproxy.missing(),
                             upnd_tls=upimapproxy.missing())
    else:
        shim = build_tool('nodelay', shared=True)
        if shim is None:
            bench.skipped.update(upnd='benchmarks/tools/nodelay.c did not build',
                                 upnd_tls='benchmarks/tools/nodelay.c did not build')
        for endpoint, preload in (('up', None), ('upnd', shim)):
            if endpoint in bench.skipped:
                continue
            proc, port, _ = upimapproxy.start(workdir, HOST, compare.port, preload)
            stack.callback(stop_process, proc)
            bench.add(endpoint, port, [proc.pid], threads_come_and_go=True)
    tls_log = start_tls_pair(stack, bench, workdir, users, shim)
    logs += [tls_log] if tls_log else []
    port, pids, pair_logs = start_pair(stack, workdir, compare.port, PROXY_SETTINGS)
    bench.add('proxy2', port, pids)
    logs += pair_logs
    log('endpoints: %s' % ', '.join('%s port %d pid %s' % (e, p, bench.pids.get(e, '-'))
                                    for e, p in bench.ports.items()))
    return logs


def run_all(args, imapload_path, relay_path, report):
    """Start everything, measure every scenario, fill `report`; stop all that was started."""
    users = {'user%d' % i: 'secret%d' % i for i in range(1, USERS + 1)}
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix='gimap-perf-')
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        compare = Dovecot(users=dict(users, **{BULK_USER: 'secret1'}),
                          extra_conf=LOGIN_CONF if args.fast_login else COMPARE_CONF)
        sessions_dc = Dovecot(users=users, extra_conf=SESSIONS_CONF)
        for dovecot in (compare, sessions_dc):
            stack.callback(dovecot.stop)
            dovecot.start()
        add_bulk_mail(compare)
        bench = Bench(args, imapload_path, compare)
        bench.skipped = report['skipped'] = {}
        proxy_logs = start_peers(stack, bench, workdir, relay_path, users)
        # Warm the caches of the caching endpoints for 16 concurrent clients; these runs
        # are not reported.
        for endpoint in bench.ports:
            if endpoint not in ('direct', 'relay'):
                for scenario in ('cycle16', 'condstore16')[
                        :2 if endpoint in ('proxy', 'before') else 1]:
                    imapload(bench, 'cycle', bench.ports[endpoint], SCENARIOS[scenario][1] + [
                        '--seconds', max(args.seconds, 1), '--warmup', 0, '--timeout', 10])
        report['runs'], report['bursts'] = [], []
        for rnd in range(1, args.rounds + 1):
            for scenario in SCENARIOS:
                endpoints = [e for e in SCENARIO_ENDPOINTS[scenario] if e in bench.ports]
                shift = (rnd - 1) % len(endpoints)
                for endpoint in endpoints[shift:] + endpoints[:shift]:
                    report['runs'].append(run_scenario(bench, scenario, endpoint, rnd))
            report['bursts'].append(connect_burst(bench.ports['proxy'], args.burst))
            log('burst     %r' % report['bursts'][-1])
        # Memory and scale: a fresh proxy each, in front of the many-sessions Dovecot.
        relay2, relay2_port = start_relay(relay_path, sessions_dc.port, workdir)
        stack.callback(stop_process, relay2)
        idle_proxy, idle_port, idle_log = start_proxy(workdir, sessions_dc.port,
                                                      PROXY_SETTINGS)
        stack.callback(stop_process, idle_proxy)
        report['idle'] = {
            'sessions': args.idle_sessions,
            'relay': idle_memory(bench, relay2_port, relay2.pid, args.idle_sessions),
            'proxy': idle_memory(bench, idle_port, idle_proxy.pid, args.idle_sessions)}
        stop_process(idle_proxy)
        scale_proxy, scale_port, scale_log = start_proxy(workdir, sessions_dc.port,
                                                         PROXY_SETTINGS)
        stack.callback(stop_process, scale_proxy)
        report['scale'] = scale(bench, sessions_dc, scale_port, scale_proxy.pid,
                                args.scale_sessions)
        report['scale']['sessions'] = args.scale_sessions
        report['logs'] = log_problems(proxy_logs + [idle_log, scale_log],
                                      {'dovecot': compare, 'sessions dovecot': sessions_dc})


def add_notes(report):
    """Append notes on the load generator, the machine and the logs to report['notes']."""
    notes, runs = report['notes'], report['runs']
    skipped = {}
    for endpoint, reason in report['skipped'].items():
        skipped.setdefault(reason, []).append(endpoint)
    for reason, endpoints in skipped.items():
        notes.append('not run: %s: %s' % (', '.join(endpoints), reason))
    share = max(r['loadgen_cpu_s'] / r['wall_s'] for r in runs)
    notes.append('imapload used at most %.0f%% of one core in any run (one thread: near '
                 '100%% it would be the bottleneck)' % (100 * share))
    waits = [r['runq_wait_s'] / r['wall_s'] for r in runs
             if r['endpoint'] == 'proxy' and r['scenario'] == 'cycle16' and 'runq_wait_s' in r]
    if waits:
        notes.append('gimapproxy (one thread) was runnable but waiting for a CPU %.0f%% of the '
                     'time in its 16-client cycle runs (median; from schedstat)'
                     % (100 * statistics.median(waits)))
    notes.append('the machine was %.0f%% busy during the runs (median, all cores, this '
                 'benchmark included)' % (100 * statistics.median(r['sys_busy'] for r in runs)))
    if not report['scale']['held_through']:
        notes.append('scale: the idle sessions ended before the cycle run did')
    for name, problems in report['logs'].items():
        if problems['count']:
            notes.append('%s log: %d warning/error lines, last: %s' % (
                name, problems['count'], ' | '.join(problems['last'])[-600:]))


def main(argv=None):
    """Run the benchmark; return 0 when it ran (whatever the results), 2 when it could not."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    missing = missing_for_benchmark()
    if missing:
        log('cannot run: missing %s' % '; '.join(missing))
        return 2
    if not args.quick and upimapproxy.missing():
        log('missing %s: those columns and goals are skipped' % upimapproxy.missing())
    imapload_path, relay_path = find_imapload(), build_tool('relay')
    if not (imapload_path and relay_path):
        log('cannot run: the C tools in benchmarks/tools did not build (see above)')
        return 2
    nofile, notes = raise_file_limit(), []
    cap = (nofile - FD_RESERVE) // 2
    if args.scale_sessions > cap:
        notes.append('scale capped at %d sessions instead of %d: the hard open-file limit '
                     'is %d and each proxied session holds 2 files (client and server socket)'
                     % (cap, args.scale_sessions, nofile))
        log(notes[-1])
        args.scale_sessions = cap
    version = subprocess.run([dovecot_binary(), '--version'], capture_output=True, text=True)
    report = {'notes': notes, 'settings': {
        'rounds': args.rounds, 'seconds': args.seconds, 'warmup': args.warmup,
        'cpus': os.cpu_count(), 'imapload': imapload_path, 'relay': relay_path,
        'nofile': nofile, 'dovecot_version': version.stdout.split(' ')[0].strip(),
        'idle_sessions': args.idle_sessions, 'scale_sessions': args.scale_sessions,
        'burst': args.burst, 'proxy_settings': PROXY_SETTINGS, 'before': args.before,
        'dovecot_login': 'high-performance' if args.fast_login else 'default'}}
    t0 = time.monotonic()
    try:
        run_all(args, imapload_path, relay_path, report)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log('cannot run: %s' % e)
        return 2
    report['settings']['elapsed_s'] = round(time.monotonic() - t0, 1)
    report['rows'] = make_rows(report)
    report['before_after'] = before_after(report['runs'])
    report['goals'] = goals.evaluate(report, report['skipped'])
    add_notes(report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
