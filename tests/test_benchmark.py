"""Smoke test of benchmarks/perf.py: one --quick run produces a number for every scenario.

Only that it runs is tested, not the speed: the targets may PASS or FAIL here. The C
tools it needs are the repository's own (benchmarks/tools), built with gcc.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from benchmarks import perf
from tests.backends import require_dovecot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(180)
def test_perf_quick_produces_every_number():
    require_dovecot()
    if shutil.which('gcc') is None:
        pytest.skip('gcc is missing: it builds benchmarks/tools (scripts/test installs it '
                    'as root)')
    # In a git checkout, gimapproxy as of HEAD runs beside the working tree (--before).
    before = ['--before', 'HEAD'] if os.path.isdir(os.path.join(REPO, '.git')) else []
    out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'perf.py'),
                          '--quick', '--json'] + before, capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    if before:
        figures = len(perf.BEFORE_AFTER)
        assert [name for name, _, _ in report['before_after']] == [
            name for name, _, _ in perf.BEFORE_AFTER] + [
            name for name, _ in perf.BEFORE_AFTER_LOGINS]
        for name, was, now in report['before_after'][:figures]:
            assert was > 0 and now > 0 and math.isfinite(was / now), (name, was, now)
        # Logins: none is a fine count; a scenario --quick leaves out has none.
        for name, was, now in report['before_after'][figures:]:
            assert (was is None) == (now is None), (name, was, now)
            assert was is None or (was >= 0 and now >= 0), (name, was, now)
    names = [row['scenario'] for row in report['rows']]
    assert len(names) >= 14, names
    for row in report['rows']:
        assert row['values'], row
        for endpoint, value in row['values'].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (row, endpoint)
            assert value >= 0, (row, endpoint)
        assert row['pass'] in (True, False, None), row
    # Every timed run did work, without errors, through every endpoint.
    for run in report['runs']:
        assert run['done_all'] > 0 and run['errors_all'] == 0, run
    assert report['scale']['sessions_open'] > 0
    assert report['idle']['proxy']['sessions_open'] == report['idle']['sessions']
    assert report['idle']['relay']['sessions_open'] == report['idle']['sessions']
    # The repository's own tool, built here.
    assert report['settings']['imapload'].startswith(os.path.join(
        tempfile.gettempdir(), 'gimapproxy-bench-%d' % os.getuid(), 'imapload-'))
    assert sum(b['ungreeted'] + b['hung'] + b['failed'] for b in report['bursts']) == 0
    # Every goal is there: measured (PASS or MISS), or skipped with the reason, as the
    # comparisons with up-imapproxy and the STARTTLS pair are in --quick.
    assert len(report['goals']) == 11, report['goals']
    for goal in report['goals']:
        assert goal['pass'] in (True, False, None), goal
        assert goal['pass'] is not None or goal['why'], goal
    assert {'upnd', 'upnd_tls', 'proxy_tls', 'proxy2'} <= set(report['skipped'])
    relay_goals = [g for g in report['goals'] if g.get('peer') == 'C relay']
    assert relay_goals and all(g['pass'] is not None for g in relay_goals)


def test_perf_help_is_whole_sentences():
    out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'perf.py'),
                          '--help'], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    text = ' '.join(out.stdout.split())
    assert 'Measure Dovecot directly, through a plain C relay and through gimapproxy, in one run.' in text
    assert 'issue' not in text and 'shared' not in text
