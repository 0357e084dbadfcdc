"""etc/supervisord.conf under a real supervisord: start, status, stop, restart.

The program section is the shipped one with only `command`, `stdout_logfile` and
`directory` changed, so the shipped stop signal, wait, start and restart settings are the
ones proven here. supervisord runs with all of its files in tmp_path and is shut down (by
PID, if need be) at the end.
"""
import configparser
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gimapproxy.config import KEYS
from tests.backends import free_port
from tests.conftest import REPO, wait_for_text, wait_until
from tests.wire import Client

SHIPPED = os.path.join(REPO, 'etc', 'supervisord.conf')
SECTION = 'program:gimapproxy'
BIN = os.path.join(REPO, 'bin', 'gimapproxy')
TIMEOUT = 30.0          # seconds any one step may take


def shipped_program() -> dict:
    """The shipped [program:gimapproxy] settings, as supervisord reads them."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(';', '#'))
    with open(SHIPPED) as handle:
        parser.read_file(handle)
    assert parser.sections() == [SECTION]
    return dict(parser.items(SECTION))


def test_shipped_settings():
    program = shipped_program()
    # The venv of README.md's deployment section.
    assert program['command'].split()[:2] == ['/opt/gimapproxy/bin/gimapproxy', '-c']
    assert program['stopsignal'] == 'TERM'
    assert program['redirect_stderr'] == 'true'
    assert program['autorestart'] == 'true'
    assert program['stdout_logfile'].startswith('/')
    assert int(program['startsecs']) > 0
    shutdown_timeout = float(next(k.default for k in KEYS if k.name == 'shutdown_timeout'))
    # The drain must end before supervisord's SIGKILL, with time to log out the cache.
    assert int(program['stopwaitsecs']) >= shutdown_timeout + 5


def supervisord_groups(tmp_path, program_file: str) -> list:
    """The process groups that supervisord's own parser makes of `program_file`,
    included from conf.d as Debian's supervisor does."""
    pytest.importorskip('supervisor')
    from supervisor.options import ServerOptions
    main = tmp_path / 'supervisord.conf'
    main.write_text('[supervisord]\nlogfile=%s\npidfile=%s\n[include]\nfiles=%s\n'
                    % (tmp_path / 'supervisord.log', tmp_path / 'supervisord.pid', program_file))
    options = ServerOptions()
    options.realize(['-c', str(main)])
    return options.process_group_configs


def test_supervisord_accepts_the_shipped_file(tmp_path):
    """supervisord's own parser takes the file as shipped, included from conf.d."""
    [group] = supervisord_groups(tmp_path, SHIPPED)
    [program] = group.process_configs
    assert program.name == 'gimapproxy'
    assert program.command == shipped_program()['command']
    assert program.stopsignal == signal.SIGTERM
    assert program.redirect_stderr is True
    assert program.stopwaitsecs == int(shipped_program()['stopwaitsecs'])


def test_supervisord_accepts_the_several_processes_example(tmp_path):
    """etc/supervisord-multi.conf: two processes of the shipped program, one log each."""
    [group] = supervisord_groups(tmp_path, os.path.join(REPO, 'etc', 'supervisord-multi.conf'))
    programs = group.process_configs
    assert [p.name for p in programs] == ['gimapproxy-0', 'gimapproxy-1']
    assert {p.command for p in programs} == {shipped_program()['command']}
    assert len({p.stdout_logfile for p in programs}) == 2
    for program in programs:
        assert program.stopsignal == signal.SIGTERM
        assert program.stopwaitsecs == int(shipped_program()['stopwaitsecs'])


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(')') + 2:].split()[0] != 'Z'


class Supervisor:
    """A throwaway supervisord in `workdir`, and supervisorctl commands against it."""

    def __init__(self, workdir, program: dict) -> None:
        self.workdir = str(workdir)
        self.conf = os.path.join(self.workdir, 'supervisord.conf')
        self.log = os.path.join(self.workdir, 'supervisord.log')
        self.program_log = program['stdout_logfile']
        socket_path = os.path.join(self.workdir, 'supervisor.sock')
        assert len(socket_path) < 100, 'unix socket path too long: %s' % socket_path
        include_dir = os.path.join(self.workdir, 'conf.d')
        os.mkdir(include_dir)
        # The program section goes in its own file, included like /etc/supervisor/conf.d.
        parser = configparser.RawConfigParser()
        parser.optionxform = str
        parser[SECTION] = program
        with open(os.path.join(include_dir, 'gimapproxy.conf'), 'w') as handle:
            parser.write(handle)
        with open(self.conf, 'w') as handle:
            handle.write('\n'.join([
                '[unix_http_server]',
                'file=%s' % socket_path,
                'chmod=0700',
                '[supervisord]',
                'logfile=%s' % self.log,
                'pidfile=%s' % os.path.join(self.workdir, 'supervisord.pid'),
                'childlogdir=%s' % self.workdir,
                'loglevel=info',
                'nodaemon=true',
                '[rpcinterface:supervisor]',
                'supervisor.rpcinterface_factory = '
                'supervisor.rpcinterface:make_main_rpcinterface',
                '[supervisorctl]',
                'serverurl=unix://%s' % socket_path,
                '[include]',
                'files = %s/*.conf' % include_dir,
                '']))
        # The program imports this checkout's gimapproxy, whatever is installed.
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
        self.output = open(os.path.join(self.workdir, 'supervisord.out'), 'w')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'supervisor.supervisord', '-n', '-c', self.conf],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=self.output,
            stderr=subprocess.STDOUT)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """Run supervisorctl with `args`; return its result (output in .stdout)."""
        return subprocess.run(
            [sys.executable, '-m', 'supervisor.supervisorctl', '-c', self.conf, *args],
            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)

    def state(self) -> str:
        """The program's state word from `supervisorctl status`, or '' if none yet."""
        match = re.match(r'gimapproxy\s+(\S+)', self.ctl('status', 'gimapproxy').stdout)
        return match.group(1) if match else ''

    def wait_state(self, state: str) -> None:
        wait_until(lambda: self.state() == state, 'gimapproxy to be %s (now %s)'
                   % (state, self.state()), TIMEOUT)

    def pid(self) -> int:
        """The program's PID (supervisorctl pid gimapproxy); 0 when it is not running."""
        out = self.ctl('pid', 'gimapproxy').stdout.strip()
        return int(out) if out.isdigit() else 0

    def text(self, path: str) -> str:
        try:
            with open(path, errors='replace') as handle:
                return handle.read()
        except OSError:
            return ''

    def diagnostics(self) -> str:
        return ('--- supervisord output:\n%s\n--- supervisord log:\n%s\n'
                '--- gimapproxy log:\n%s'
                % (self.text(self.output.name)[-2000:], self.text(self.log)[-3000:],
                   self.text(self.program_log)[-3000:]))

    def shutdown(self) -> None:
        """Stop supervisord and its program: supervisorctl shutdown, then by PID."""
        if self.process.poll() is None:
            try:
                self.ctl('shutdown')
            except subprocess.TimeoutExpired:
                pass
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=TIMEOUT)
        self.output.close()


def login_works(port: int) -> bool:
    """Log in and out through the proxy on `port` as pymap's demo user."""
    with Client(port) as client:
        assert client.login('demouser', 'demopass').startswith(b'L1 OK'), 'login failed'
        client.logout()
    return True


def wait_listening(port: int) -> None:
    def connects() -> bool:
        try:
            Client(port).close()
            return True
        except OSError:
            return False
    wait_until(connects, 'the proxy to accept on port %d' % port, TIMEOUT)


def test_supervisord_runs_the_shipped_program(tmp_path, pymap):
    pytest.importorskip('supervisor')
    port = free_port()
    ini = tmp_path / 'proxy.ini'
    ini.write_text('[gimapproxy]\nlisten_port = %d\nserver_hostname = 127.0.0.1\n'
                   'server_port = %d\n' % (port, pymap.port))
    program = shipped_program()
    program['command'] = '%s %s -c %s' % (sys.executable, BIN, ini)
    program['stdout_logfile'] = str(tmp_path / 'gimapproxy.log')
    program['directory'] = str(tmp_path)

    supervisor = Supervisor(tmp_path, program)
    pids = []
    try:
        wait_until(lambda: supervisor.process.poll() is not None or
                   supervisor.ctl('status').returncode in (0, 3),
                   'supervisord to answer', TIMEOUT)
        assert supervisor.process.poll() is None, supervisor.diagnostics()

        # autostart=true: supervisord starts it; running counts after startsecs.
        supervisor.wait_state('RUNNING')
        pids.append(supervisor.pid())
        assert alive(pids[-1])
        wait_listening(port)
        assert login_works(port)
        status = supervisor.ctl('status')
        assert re.match(r'gimapproxy\s+RUNNING\s+pid %d, uptime ' % pids[-1], status.stdout), \
            status.stdout

        # stop: SIGTERM drains (an open session still works and may log out), exit 0
        # within stopwaitsecs, no process left.
        busy = Client(port)
        assert busy.login('demouser', 'demopass').startswith(b'L1 OK')
        started = time.monotonic()
        stopper = subprocess.Popen(
            [sys.executable, '-m', 'supervisor.supervisorctl', '-c', supervisor.conf,
             'stop', 'gimapproxy'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True)
        try:
            wait_for_text(supervisor.program_log, 'signal received: signal=SIGTERM', TIMEOUT)
            assert busy.command(b'a', b'NOOP')[1].startswith(b'a OK')
            busy.logout()
            busy.close()
            output = stopper.communicate(timeout=TIMEOUT)[0]
        finally:
            if stopper.poll() is None:
                stopper.kill()
                stopper.wait()
        assert 'gimapproxy: stopped' in output, output
        assert time.monotonic() - started < int(program['stopwaitsecs'])
        assert supervisor.state() == 'STOPPED'
        wait_until(lambda: not alive(pids[-1]), 'pid %d to be gone' % pids[-1], TIMEOUT)
        log = supervisor.text(supervisor.program_log)
        assert 'signal received: signal=SIGTERM' in log, supervisor.diagnostics()
        assert 'stopped: cached connections logged out=' in log, supervisor.diagnostics()
        assert 'Traceback' not in log and 'demopass' not in log, supervisor.diagnostics()
        wait_for_text(supervisor.log, 'stopped: gimapproxy (exit status 0)', TIMEOUT)

        # start again, by hand.
        result = supervisor.ctl('start', 'gimapproxy')
        assert 'gimapproxy: started' in result.stdout, result.stdout + result.stderr
        assert supervisor.state() == 'RUNNING'
        pids.append(supervisor.pid())
        wait_listening(port)
        assert login_works(port)

        # restart: a new process that serves logins.
        result = supervisor.ctl('restart', 'gimapproxy')
        assert 'gimapproxy: started' in result.stdout, result.stdout + result.stderr
        pids.append(supervisor.pid())
        assert pids[-1] != pids[-2] and not alive(pids[-2])
        wait_listening(port)
        assert login_works(port)
        text = supervisor.text(supervisor.log)
        assert text.count('stopped: gimapproxy (exit status 0)') == 2, supervisor.diagnostics()
        assert 'SIGKILL' not in text, supervisor.diagnostics()
    finally:
        supervisor.shutdown()
        for pid in pids:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert supervisor.process.returncode == 0
    for pid in pids:
        wait_until(lambda: not alive(pid), 'pid %d to be gone after shutdown' % pid, TIMEOUT)
    assert 'Traceback' not in supervisor.text(supervisor.program_log)
