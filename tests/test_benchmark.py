"""Smoke test of benchmarks/perf.py: one --quick run produces a number for every scenario.

Only that it runs is tested, not the speed: the targets may PASS or FAIL here.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.backends import require_dovecot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(180)
def test_perf_quick_produces_every_number():
    require_dovecot()
    if shutil.which('gcc') is None:
        pytest.skip('gcc is needed to build imapbench and relay')
    out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'perf.py'),
                          '--quick', '--json'], capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    names = [row['scenario'] for row in report['rows']]
    assert len(names) >= 14, names
    for row in report['rows']:
        assert row['values'], row
        for endpoint, value in row['values'].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (row, endpoint)
            assert value >= 0, (row, endpoint)
        assert row['pass'] in (True, False, None), row
    assert report['scale']['sessions_open'] > 0
    assert report['idle']['proxy']['sessions_open'] > 0
