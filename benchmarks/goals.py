"""The performance goals perf.py checks, each PASS or MISS with its ratio in one run.

Ratios compare the proxy's median with a peer's median over the rounds of the same run:
Debian's up-imapproxy with TCP_NODELAY preloaded ('upnd', and 'upnd_tls' with STARTTLS to
the server) or the plain C relay. A goal whose peer did not run (--quick, or up-imapproxy
not installed) is SKIP, with the reason.
"""
import statistics

NAMES = {'upnd': 'up+ND', 'upnd_tls': 'up+ND TLS', 'relay': 'C relay'}


def _rate(r):
    return r['rate']


def _p50(r):
    return r['p50_us']


def _mb(r):
    return r['mb_per_s']


def _cpu(r):
    return 1e6 * r['cpu_s'] / max(r['done_all'], 1) if 'cpu_s' in r else None


# (goal, scenario, value of a run, gimapproxy endpoint, peer, '>=' or '<=', ratio limit)
RATIO_GOALS = (
    ('cycles/s, 1 client', 'cycle1', _rate, 'proxy', 'upnd', '>=', 1.2),
    ('cycles/s, 16 clients', 'cycle16', _rate, 'proxy', 'upnd', '>=', 1.2),
    ('CPU us per cycle, 16 clients', 'cycle16', _cpu, 'proxy', 'upnd', '<=', 1.0),
    ('NOOP round trip p50, us', 'noop', _p50, 'proxy', 'relay', '<=', 1.1),
    ('CPU us per NOOP', 'noop', _cpu, 'proxy', 'relay', '<=', 1.5),
    ('10 MiB FETCH, MB/s', 'bulk', _mb, 'proxy', 'relay', '>=', 0.95),
    ('STARTTLS: cycles/s, 16 clients', 'cycle16', _rate, 'proxy_tls', 'upnd_tls', '>=', 1.2),
    ('STARTTLS: 10 MiB FETCH, MB/s', 'bulk', _mb, 'proxy_tls', 'upnd_tls', '>=', 1.0),
)
IDLE_KB = 24          # at most, per logged-in session at 2,000 sessions
LOGINS_PER_1K = 1     # at most, per 1,000 warm cycles


def _median(runs, scenario, endpoint, value):
    values = [value(r) for r in runs if r['scenario'] == scenario and r['endpoint'] == endpoint]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def evaluate(report, skipped):
    """Return the goals as dicts: 'goal', 'proxy' (its value), 'other' and 'peer' (the
    peer's value and name, for ratio goals), 'ratio', 'limit' (text) and 'pass' (True,
    False, or None when it could not be measured, 'why' then says why).
    `skipped` maps an endpoint that did not run to the reason."""
    runs, out = report['runs'], []
    for goal, scenario, value, endpoint, peer, op, limit in RATIO_GOALS:
        mine = _median(runs, scenario, endpoint, value)
        other = _median(runs, scenario, peer, value)
        x = mine / other if mine is not None and other else None
        ok = None if x is None else (x >= limit if op == '>=' else x <= limit)
        why = skipped.get(peer) or skipped.get(endpoint) or ('' if ok is not None
                                                              else 'not measured')
        out.append({'goal': goal, 'proxy': mine, 'other': other, 'peer': NAMES[peer],
                    'ratio': x, 'limit': '%s %gx %s' % (op, limit, NAMES[peer]), 'pass': ok,
                    'why': why})
    idle = report['idle']
    kb = idle['proxy']['kb_per_session']
    out.append({'goal': 'kB per idle session, %d sessions' % idle['sessions'], 'proxy': kb,
                'limit': '<= %d kB' % IDLE_KB,
                'pass': None if kb is None or idle['sessions'] != 2000 else
                kb <= IDLE_KB and idle['proxy']['sessions_open'] == idle['sessions'],
                'why': '' if idle['sessions'] == 2000 else 'the goal is at 2000 sessions'})
    cycles = [r for r in runs if 'dovecot_logins' in r and r['scenario'] != 'condstore16']
    done = sum(r['done_all'] for r in cycles)
    per_1k = 1000.0 * sum(r['dovecot_logins'] for r in cycles) / done if done else None
    out.append({'goal': 'server logins per 1,000 warm cycles', 'proxy': per_1k,
                'limit': '<= %d' % LOGINS_PER_1K,
                'pass': None if per_1k is None else per_1k <= LOGINS_PER_1K, 'why': ''})
    errors = sum(r['errors_all'] for r in runs if r['endpoint'].startswith('proxy'))
    out.append({'goal': 'errors in all gimapproxy runs', 'proxy': errors, 'limit': '0',
                'pass': errors == 0, 'why': ''})
    return out


def format_goals(items):
    """The goals as text lines: value, peer's value, ratio, limit, PASS/MISS/SKIP."""
    line = '%-38s %10s %10s  %-10s %7s  %-20s %s'
    lines = [line % ('goals (ratios within this run)', 'gimapproxy', 'peer', '', 'ratio',
                     'goal', 'result')]
    for g in items:
        result = {True: 'PASS', False: 'MISS', None: 'SKIP'}[g['pass']]
        if g['why']:
            result += ' (%s)' % g['why']
        ratio = '%.2fx' % g['ratio'] if g.get('ratio') is not None else ''
        other = '%.1f' % g['other'] if g.get('other') is not None else ''
        mine = '-' if g['proxy'] is None else ('%.1f' % g['proxy']
                                               if isinstance(g['proxy'], float) else g['proxy'])
        lines.append(line % (g['goal'], mine, other, g.get('peer', '') if ratio else '',
                             ratio, g['limit'], result))
    return '\n'.join(lines)
