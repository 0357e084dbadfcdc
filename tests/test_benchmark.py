"""Smoke test of benchmarks/perf.py: one --quick run produces a number for every scenario.

Only that it runs is tested, not the speed: the targets may PASS or FAIL here.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.common import TOOLS_DIR, build_tool, find_imapbench
from tests.backends import require_dovecot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(180)
def test_perf_quick_produces_every_number():
    require_dovecot()
    if find_imapbench() is None or build_tool('relay') is None:
        pytest.skip('the C instruments cannot be built: no gcc, or no imapbench.c and '
                    'relay.c in %s (set GIMAPPROXY_TOOLS)' % os.path.abspath(TOOLS_DIR))
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
