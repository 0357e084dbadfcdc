"""The shipped systemd units (etc/gimapproxy.service, and the template
etc/gimapproxy@.service for several processes sharing a port): systemd's own checker
accepts them, and they run the proxy unprivileged, hardened, from README.md's venv."""
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

UNIT = os.path.join(REPO, 'etc', 'gimapproxy.service')
TEMPLATE = os.path.join(REPO, 'etc', 'gimapproxy@.service')
VENV_BIN = '/opt/gimapproxy/bin/gimapproxy'

units = pytest.mark.parametrize('unit', [UNIT, TEMPLATE], ids=os.path.basename)


def unit_settings(unit: str = UNIT) -> dict:
    """{key: [values]} of the unit's [Service] section."""
    settings, section = {}, None
    for line in open(unit).read().splitlines():
        line = line.strip()
        if line.startswith('['):
            section = line
        elif line and not line.startswith('#') and section == '[Service]':
            key, value = line.split('=', 1)
            settings.setdefault(key, []).append(value)
    return settings


@units
def test_unit_is_hardened_and_unprivileged(unit):
    service = unit_settings(unit)
    assert service['ExecStart'] == ['%s -c /etc/gimapproxy.ini' % VENV_BIN]
    assert service['ExecReload'] == ['/bin/kill -HUP $MAINPID']
    assert service['KillSignal'] == ['SIGTERM']
    assert service['User'] == ['gimapproxy']
    assert service['CapabilityBoundingSet'] == ['CAP_NET_BIND_SERVICE']
    for key, value in (('NoNewPrivileges', 'yes'), ('ProtectSystem', 'strict'),
                       ('ProtectHome', 'yes'), ('PrivateTmp', 'yes'),
                       ('PrivateDevices', 'yes')):
        assert service[key] == [value], key
    assert service['RestrictAddressFamilies'] == ['AF_INET AF_INET6 AF_UNIX']
    # The drain (shutdown_timeout, 10 s by default) ends before systemd's SIGKILL.
    assert int(service['TimeoutStopSec'][0]) >= 15
    # Room for 2 x cache_size + 1024 open files at the default cache_size.
    assert int(service['LimitNOFILE'][0]) >= 2 * 1000 + 1024


def test_template_has_the_hardening_of_the_unit():
    """Every instance of the template runs exactly as the single unit does."""
    assert unit_settings(TEMPLATE) == unit_settings(UNIT)


def verify(tmp_path, text: str, name: str = 'gimapproxy.service') -> subprocess.CompletedProcess:
    """Run systemd-analyze verify on the unit `text`. verify also checks that ExecStart's
    program exists; here it is not installed at /opt/gimapproxy, so the unit is checked
    with a stand-in at another path."""
    analyze = shutil.which('systemd-analyze')
    if analyze is None:
        pytest.skip('systemd-analyze is missing (Debian package systemd)')
    stand_in = tmp_path / 'gimapproxy'
    stand_in.write_text('#!/bin/sh\n')
    stand_in.chmod(0o755)
    assert VENV_BIN in text
    unit = tmp_path / name
    unit.write_text(text.replace(VENV_BIN, str(stand_in)))
    return subprocess.run([analyze, 'verify', str(unit)], capture_output=True, text=True,
                          timeout=60)


@units
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, unit):
    result = verify(tmp_path, open(unit).read(), os.path.basename(unit))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 even for unknown keys and bad values; it only prints them.
    ours = [line for line in output.splitlines() if 'gimapproxy' in line]
    assert ours == [], output


def test_systemd_analyze_verify_catches_a_bad_value(tmp_path):
    """The check above can fail: the same unit with one bad value is reported."""
    text = re.sub(r'^ProtectHome=yes$', 'ProtectHome=sometimes', open(UNIT).read(),
                  flags=re.M)
    result = verify(tmp_path, text)
    assert 'gimapproxy.service' in result.stderr and 'protect home' in result.stderr.lower()
    # The template too (as an instance, which is what systemd loads).
    text = re.sub(r'^ProtectHome=yes$', 'ProtectHome=sometimes', open(TEMPLATE).read(),
                  flags=re.M)
    result = verify(tmp_path, text, 'gimapproxy@1.service')
    assert 'gimapproxy@1.service' in result.stderr
    assert 'protect home' in result.stderr.lower()
