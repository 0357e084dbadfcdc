"""The compatibility matrix (scripts/matrix runs it): `nox -s compat table`.

For every Python from 3.8 to 3.13 found here (on PATH, or under ~/.pyenv/versions), and
for the oldest and the newest gevent release with wheels for that Python (a cell), the
session of that Python installs gimapproxy with that gevent in its venv and runs the
compatibility subset against a real Dovecot. `table` then prints every cell's result and
names the Pythons not found. A Python that is missing is skipped, not failed; a cell that
ran and failed fails the run.

pymap (a test backend) needs Python 3.11, so the matrix leaves it out everywhere and its
tests skip; scripts/test runs them on the default Python.
"""
import glob
import json
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ElementTree

import nox

# For each Python, the oldest gevent release with wheels for it (setup.py's minimum),
# then the newest at the time of writing. To move the newest on:
# pip download --no-deps --only-binary=:all: --python-version 3.X gevent==V -d "$(mktemp -d)"
GEVENTS = {
    '3.8': ('21.12.0', '24.2.1'),
    '3.9': ('21.12.0', '25.9.1'),
    '3.10': ('21.12.0', '26.9.0'),
    '3.11': ('22.10.1', '26.9.0'),
    '3.12': ('23.7.0', '26.9.0'),
    '3.13': ('24.10.1', '26.9.0'),
}
PYTHONS = list(GEVENTS)
CELLS = [(python, gevent) for python in PYTHONS for gevent in GEVENTS[python]]
# gevent before 23.7 loads its plugins with pkg_resources: setuptools 82 no longer has it,
# from 80.9 importing it warns on stderr, and before 76 it cannot find zope.interface 8's
# distribution (Python 3.8 stops at setuptools 75 and zope.interface 7, which work).
OLD_GEVENT_SETUPTOOLS = 'setuptools>=76,<80.9'
# On these two cells the relay's tests run a second time on gevent's public API only
# (--gevent-api=public), the path taken when gevent drops its private socket watcher.
PUBLIC_TOO = {('3.8', '21.12.0'), ('3.13', '26.9.0')}

SUBSET = ['tests/test_proxy.py', 'tests/test_isolation.py', 'tests/test_tracker.py',
          'tests/test_attacks.py', 'tests/test_sockio.py', 'tests/test_cli.py',
          'tests/test_compat.py', 'tests/test_relay.py']
# The public API run: the relay's paths, and the two wakes (idle timeout, stalled server).
RELAY = ['tests/test_proxy.py', 'tests/test_isolation.py', 'tests/test_sockio.py',
         'tests/test_limits.py', 'tests/test_relay.py',
         'tests/test_faults.py::test_server_that_stalls_mid_response_is_bounded']
# Left to scripts/test: slow tests about time rather than about the Python or gevent,
# and test_per_user_cap, whose second round can start before the first round's
# connections are back (it fails now and then on any Python, under load).
LEFT_OUT = ('not max_auth_age and not password_change_on_the_server'
            ' and not tls_sessions_kept_are_bounded and not per_user_cap')
TEST_DEPS = ['pytest', 'pytest-timeout', 'trustme', 'hypothesis']

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, '.nox', 'matrix-results')

nox.options.sessions = ['compat', 'table']
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True
# The standard library's venv: virtualenv's newest releases no longer seed Python 3.8.
nox.options.default_venv_backend = 'venv'


def _works(python):
    """True when `python` runs (a pyenv shim of a version not selected does not)."""
    try:
        return subprocess.run([python, '-c', ''], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_python(version):
    """The path of a working pythonX.Y on PATH or under ~/.pyenv/versions, or None."""
    name = 'python' + version
    candidates = [os.path.join(directory, name)
                  for directory in os.environ.get('PATH', '').split(os.pathsep)]
    candidates += sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/%s.*/bin/%s'
                                                      % (version, name))), reverse=True)
    for path in candidates:
        if os.access(path, os.X_OK) and _works(path):
            return path
    return None


def _put_found_pythons_first():
    """nox looks pythonX.Y up on PATH, where a pyenv shim may stand that does not run:
    put the directory of each interpreter found first."""
    found = [find_python(version) for version in PYTHONS]
    dirs = [os.path.dirname(path) for path in found if path]
    os.environ['PATH'] = os.pathsep.join(dirs + [os.environ.get('PATH', '')])


_put_found_pythons_first()


def _cell_id(python, gevent):
    return '%s-%s' % (python, gevent)


def _version_tuple(version):
    return tuple(int(part) for part in version.split('.')[:2])


@nox.session(python=PYTHONS)
def compat(session):
    """The cells of one Python: gimapproxy with its oldest gevent, the subset (-x), then
    the same venv moved to the newest gevent (pip check: setup.py allows both), and the
    subset again."""
    python = session.python
    os.makedirs(RESULTS, exist_ok=True)
    env = {'GIMAPPROXY_SKIP_PYMAP': '1'}
    if shutil.which('dovecot') or os.access('/usr/sbin/dovecot', os.X_OK):
        env['GIMAPPROXY_REQUIRE_DOVECOT'] = '1'
    failed = []
    for gevent in GEVENTS[python]:
        extra = []
        if _version_tuple(gevent) < (23, 7) and _version_tuple(python) >= (3, 9):
            extra = [OLD_GEVENT_SETUPTOOLS]
        if gevent == GEVENTS[python][0]:
            # The metrics extra too: test_cli scrapes /metrics.
            session.install('.[metrics]', 'gevent==' + gevent, *extra, *TEST_DEPS)
        else:
            session.install('gevent==' + gevent, *extra)
        session.run('python', '-m', 'pip', 'check', silent=True)
        try:
            _run_cell(session, python, gevent, env)
        except nox.command.CommandFailed:
            failed.append(gevent)             # the newest gevent still gets its run
    if failed:
        session.error('failed with gevent %s' % ', '.join(failed))


def _run_cell(session, python, gevent, env):
    stem = os.path.join(RESULTS, _cell_id(python, gevent))
    versions = session.run(
        'python', '-c', 'import json, platform, gevent, greenlet; print(json.dumps('
        '{"python": platform.python_version(), "gevent": gevent.__version__, '
        '"greenlet": greenlet.__version__}))', silent=True)
    runs = [('auto', SUBSET)] + ([('public', RELAY)] if (python, gevent) in PUBLIC_TOO
                                 else [])
    with open(stem + '.json', 'w') as handle:
        json.dump({'versions': json.loads(versions.strip().splitlines()[-1]),
                   'runs': [api for api, _ in runs]}, handle)
    for api, files in runs:
        started = time.monotonic()
        try:
            session.run('python', '-m', 'pytest', '-x', '-q', '-p', 'no:warnings', '-rfE',
                        '--gevent-api=' + api, '-k', LEFT_OUT,
                        '--junitxml=%s-%s.xml' % (stem, api), *files, *session.posargs,
                        env=env)
        finally:
            with open('%s-%s.time' % (stem, api), 'w') as handle:
                handle.write('%.0f' % (time.monotonic() - started))


def _counts(path):
    """(passed, failed, skipped) from a JUnit XML file, or None when there is none."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    total, skipped = int(suite.get('tests')), int(suite.get('skipped'))
    failed = int(suite.get('failures')) + int(suite.get('errors'))
    return total - failed - skipped, failed, skipped


@nox.session(python=False)
def table(session):
    """Print the matrix as run; fail when a cell whose Python exists did not pass."""
    rows, missing, bad = [], [], False
    for python, gevent in CELLS:
        stem = os.path.join(RESULTS, _cell_id(python, gevent))
        try:
            with open(stem + '.json') as handle:
                info = json.load(handle)
        except OSError:
            if find_python(python) is None:
                if python not in missing:
                    missing.append(python)
            else:
                rows.append((python, gevent, '-', '-', 'FAILED (no tests ran)', '-'))
                bad = True
            continue
        versions = info['versions']
        for api in info['runs']:
            counts = _counts('%s-%s.xml' % (stem, api))
            try:
                with open('%s-%s.time' % (stem, api)) as handle:
                    seconds = handle.read() + ' s'
            except OSError:
                seconds = '-'
            if counts is None:
                result = 'FAILED (no result)'
            elif counts[1]:
                result = 'FAILED: %d passed, %d failed' % counts[:2]
            else:
                result = 'ok: %d passed, %d skipped' % (counts[0], counts[2])
            bad = bad or not result.startswith('ok')
            path = 'public API only' if api == 'public' else 'default'
            rows.append((versions['python'], versions['gevent'], versions['greenlet'],
                         path, result, seconds))
    header = ('Python', 'gevent', 'greenlet', 'gevent API', 'result', 'time')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    print('\n'.join(lines))
    print('Left out of every cell: the tests against pymap (skipped: it needs Python 3.11; '
          'Dovecot is the backend), and %s.' % LEFT_OUT.replace('not ', ''))
    print('Pythons not found: %s' % (', '.join(missing) or 'none'))
    if bad:
        session.error('a cell did not pass')
