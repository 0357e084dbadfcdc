"""gimapproxy.migrate: up-imapproxy's imapproxy.conf to proxy.ini, and migrate-config."""
import os
import random
import resource
import re
import subprocess
import sys

import pytest

import gimapproxy.migrate as migrate_module
from gimapproxy.config import KEYS, ConfigError, load_config
from gimapproxy.migrate import UP_IMAPPROXY_OPTIONS, migrate
from tests.backends import free_port
from tests.conftest import REPO

SOURCE = '/etc/imapproxy.conf'
KEYS_BY_NAME = {key.name: key for key in KEYS}

# Debian 12's /etc/imapproxy.conf (imapproxy 1.2.8~svn20171105-2), shortened comments.
DEBIAN_CONF = """\
##
## imapproxy.conf
##
## This is the global configuration file for imapproxy.
##

#
## server_hostname
## This setting controls which imap server we proxy our connections to.
#
server_hostname localhost

#
## connect_retries / connect_delay
#
connect_retries 10
connect_delay 5

#
## listen_port
## This setting specifies which port the proxy server will bind to and
## accept incoming connections from.
#
listen_port 1143

#
## listen_address
## This setting specifies which address the proxy server will bind to and
## accept incoming connections to.  If undefined, bind to all.
#
#listen_address 127.0.0.1

#
## server_port
## This setting specifies the port that server_hostname is listening on.
#
server_port 143

#
## cache_size
## This setting determines how many in-core imap connection structures
## will be allocated.
#
cache_size 3072

#
## cache_expiration_time
## Number of seconds an inactive connection is kept for reuse.
#
cache_expiration_time 300

#
## proc_username / proc_groupname
#
proc_username nobody
proc_groupname nogroup

#
## stat_filename
#
stat_filename /var/run/pimpstats

#
## protocol_log_filename
#
protocol_log_filename /var/log/imapproxy_protocol.log

#
## syslog_facility
#
syslog_facility LOG_MAIL

#
## syslog_prioritymask
#
#syslog_prioritymask LOG_WARNING

#
## send_tcp_keepalives
#
send_tcp_keepalives no

#
## enable_select_cache
#
enable_select_cache no

#
## foreground_mode
#
foreground_mode no

#
## force_tls
#
force_tls no

#
## chroot_directory
#
#chroot_directory /var/lib/imapproxy/chroot

#
## preauth_command
#
#preauth_command

#
## enable_admin_commands
#
enable_admin_commands no

#
## tls_ca_file / tls_ca_path / tls_cert_file / tls_key_file / tls_verify_server
#
#tls_ca_file /etc/ssl/certs/ca-certificates.crt
#tls_ca_path /etc/ssl/certs/
#tls_cert_file /etc/ssl/certs/ssl-cert-snakeoil.pem
#tls_key_file /etc/ssl/private/ssl-cert-snakeoil.key
#tls_verify_server yes
"""


def settings(ini: str) -> dict:
    """The `key = value` lines of the [gimapproxy] section (comments left out)."""
    return dict(re.findall(r'^(\w+) = (.*)$', ini, re.M))


def load(tmp_path, ini: str):
    """Write `ini` to a file and load it with gimapproxy's own loader."""
    path = tmp_path / 'proxy.ini'
    path.write_text(ini)
    return load_config(str(path))


def about(messages: list, keyword: str) -> list:
    """The messages about `keyword`."""
    return [m for m in messages if re.match(r'[^ ]*: (warning|note): %s: '
                                            % re.escape(keyword), m)]


def line_of(keyword: str, text: str = DEBIAN_CONF) -> int:
    """The line number of `keyword`'s (uncommented) line in `text`."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.split('#')[0].split()[:1] == [keyword]:
            return number
    raise KeyError(keyword)


def test_debian_config(tmp_path):
    ini, messages = migrate(DEBIAN_CONF, SOURCE)
    assert ini.startswith('# gimapproxy configuration, migrated from up-imapproxy\'s '
                          '/etc/imapproxy.conf')
    assert '\n[gimapproxy]\n' in ini
    assert settings(ini) == {
        'server_hostname': 'localhost', 'listen_port': '1143', 'server_port': '143',
        'cache_size': '3072', 'cache_expiration_time': '300', 'proc_username': 'nobody',
        'proc_groupname': 'nogroup', 'send_reuse_code': 'yes'}
    config = load(tmp_path, ini)
    assert (config.server_hostname, config.server_port, config.listen_port) == \
        ('localhost', 143, 1143)
    assert (config.cache_size, config.cache_expiration_time) == (3072, 300)
    assert (config.proc_username, config.proc_groupname) == ('nobody', 'nogroup')
    assert config.server_tls == 'off' and config.log_level == 'info'
    # up-imapproxy always sent [XPROXYREUSE]; a migrated Horde setup relies on it.
    assert config.send_reuse_code is True
    # Each option that does not carry over has its message, naming file and line.
    for keyword in ('connect_retries', 'connect_delay', 'stat_filename',
                    'protocol_log_filename', 'syslog_facility', 'send_tcp_keepalives',
                    'enable_select_cache', 'foreground_mode', 'force_tls',
                    'enable_admin_commands'):
        found = about(messages, keyword)
        assert len(found) == 1, (keyword, messages)
        assert found[0].startswith('%s:%d: note: ' % (SOURCE, line_of(keyword))), found
    # The open-file limit the proxy raises itself, as far as the hard limit allows
    # (cli.raise_file_limit: 2 x cache_size + 1024).
    assert about(messages, 'cache_size') == [
        '%s:%d: note: cache_size: gimapproxy raises its own open-file limit towards 2 x '
        'cache_size + 1024 (7168), but only as far as the hard limit allows: give it a hard '
        'limit that high (supervisord: minfds = 7168 in [supervisord]; systemd: '
        'LimitNOFILE=7168); it warns at start when the limit falls short'
        % (SOURCE, line_of('cache_size'))]
    # listen_address is commented out: up-imapproxy listened on all addresses.
    assert [m for m in messages if m.startswith(SOURCE + ': warning: listen_address is '
                                                'not set')]
    # Every message names the file (and a line, unless it is about the whole file), and
    # the output repeats them as comments.
    for message in messages:
        assert re.match(r'%s(:\d+)?: (warning|note): ' % re.escape(SOURCE), message), message
        assert '\n# %s\n' % message in ini
    # The output says where each value came from.
    assert '# %s line %d: cache_size 3072\ncache_size = 3072\n' % (
        SOURCE, line_of('cache_size')) in ini


@pytest.mark.parametrize('conf, expected', [
    ('server_hostname imap.example.org', {'server_hostname': 'imap.example.org'}),
    ('server_port 10143', {'server_port': '10143'}),
    ('server_port imap', {'server_port': '143'}),
    ('listen_address 127.0.0.2', {'listen_address': '127.0.0.2'}),
    ('listen_address ::1', {'listen_address': '::1'}),
    ('listen_address localhost', {'listen_address': '127.0.0.1'}),
    ('listen_port 2143', {'listen_port': '2143'}),
    ('cache_size 50', {'cache_size': '50'}),
    ('cache_size 3072', {'cache_size': '3072'}),
    ('cache_expiration_time 120', {'cache_expiration_time': '120'}),
    ('force_tls yes', {'server_tls': 'starttls'}),
    ('force_tls no', {}),
    ('tls_ciphers ECDHE+AESGCM:!aNULL', {'tls_ciphers': 'ECDHE+AESGCM:!aNULL'}),
    ('tls_no_tlsv1 yes', {}),
    ('tls_no_tlsv1.1 yes', {}),
    ('tls_no_tlsv1.2 yes', {'tls_min_version': 'tlsv1.3'}),
    ('tls_no_tlsv1.2 no', {}),
    ('tls_verify_server yes', {'tls_verify_server': 'yes'}),
    ('tls_verify_server no', {'tls_verify_server': 'no'}),
    ('proc_username nobody', {'proc_username': 'nobody'}),
    ('proc_username nobody\nproc_groupname nogroup',
     {'proc_username': 'nobody', 'proc_groupname': 'nogroup'}),
    ('syslog_prioritymask LOG_DEBUG', {'log_level': 'debug'}),
    ('syslog_prioritymask LOG_INFO', {'log_level': 'info'}),
    ('syslog_prioritymask LOG_NOTICE', {'log_level': 'warning'}),
    ('syslog_prioritymask LOG_WARNING', {'log_level': 'warning'}),
    ('syslog_prioritymask LOG_ERR', {'log_level': 'error'}),
    ('syslog_prioritymask log_crit', {'log_level': 'error'}),
])
def test_mapping(tmp_path, conf, expected):
    text = 'server_hostname imap.example.org\nserver_port 143\n' + conf + '\n'
    ini, messages = migrate(text, SOURCE)
    got = settings(ini)
    for key in ('server_hostname', 'server_port', 'send_reuse_code'):
        if key not in expected:
            del got[key]
    assert got == expected, messages
    config = load(tmp_path, ini)
    for key, value in expected.items():
        assert getattr(config, key) == KEYS_BY_NAME[key].parse(value), key


def test_tls_files(tmp_path):
    for name in ('ca.pem', 'cert.pem', 'key.pem'):
        (tmp_path / name).write_text('not checked by the loader beyond reading\n')
    text = ('server_hostname imap.example.org\nforce_tls yes\ntls_verify_server yes\n'
            'tls_ca_file %s/ca.pem\ntls_cert_file %s/cert.pem\ntls_key_file %s/key.pem\n'
            % (tmp_path, tmp_path, tmp_path))
    ini, messages = migrate(text, SOURCE)
    config = load(tmp_path, ini)
    assert config.tls_ca_file == str(tmp_path / 'ca.pem')
    assert config.tls_cert_file == str(tmp_path / 'cert.pem')
    assert config.tls_key_file == str(tmp_path / 'key.pem')
    assert config.server_tls == 'starttls' and config.tls_verify_server is True
    assert not [m for m in messages if ':5: warning: ' in m or ':6: warning: ' in m
                or 'verified' in m], messages


def test_tls_cert_without_key_is_not_carried_over(tmp_path):
    ini, messages = migrate('server_hostname x\ntls_cert_file /etc/cert.pem\n', SOURCE)
    assert 'tls_cert_file' not in settings(ini)
    assert about(messages, 'tls_cert_file') == [
        '%s:2: warning: tls_cert_file: not carried over: gimapproxy needs tls_key_file as '
        'well' % SOURCE]
    load(tmp_path, ini)


def test_tls_ca_path_is_reported():
    ini, messages = migrate('server_hostname x\ntls_ca_path /etc/ssl/certs/\n', SOURCE)
    assert 'tls_ca_path' not in ini.split('[gimapproxy]')[1].split('# What')[0]
    assert about(messages, 'tls_ca_path')[0].startswith(SOURCE + ':2: warning: ')


def test_server_port_993_means_implicit_tls(tmp_path):
    ini, messages = migrate('server_hostname imap.example.org\nserver_port 993\n', SOURCE)
    assert settings(ini) == {'server_hostname': 'imap.example.org', 'server_port': '993',
                             'server_tls': 'implicit', 'send_reuse_code': 'yes'}
    config = load(tmp_path, ini)
    assert (config.server_port, config.server_tls, config.tls_verify_server) == \
        (993, 'implicit', True)
    assert ('%s:2: note: server_port: server_tls = implicit: up-imapproxy could not speak '
            'TLS on port 993 (it only warned); gimapproxy does' % SOURCE) in messages
    # up-imapproxy never verified by default; gimapproxy does: a warning says so.
    verify = [m for m in messages if 'certificate is now verified' in m]
    assert len(verify) == 1 and verify[0].startswith(SOURCE + ':2: warning: ')


def test_server_port_993_with_force_tls(tmp_path):
    ini, messages = migrate('server_hostname h\nforce_tls yes\nserver_port imaps\n', SOURCE)
    assert settings(ini)['server_tls'] == 'implicit'
    assert 'server_port 993 already means' in about(messages, 'force_tls')[0]
    load(tmp_path, ini)


def test_force_tls_warns_about_verification():
    ini, messages = migrate('server_hostname h\nforce_tls yes\n', SOURCE)
    assert settings(ini)['server_tls'] == 'starttls'
    assert about(messages, 'force_tls')[0].startswith(
        SOURCE + ':2: warning: force_tls: the server\'s certificate is now verified')


def test_tls_verify_server_no_is_kept_with_a_warning():
    ini, messages = migrate('server_hostname h\nforce_tls yes\ntls_verify_server no\n',
                            SOURCE)
    assert settings(ini)['tls_verify_server'] == 'no'
    assert [m for m in messages if 'now verified' in m] == []
    assert about(messages, 'tls_verify_server')[0].startswith(
        SOURCE + ':3: warning: tls_verify_server: tls_verify_server = no: ')


def test_unknown_keywords_are_each_reported(tmp_path):
    text = ('server_hostname h\nthis_is_not_an_option 42\ncache_sise 10\n'
            'listen_port 1143\nmax_connections_per_user 5\n')
    ini, messages = migrate(text, SOURCE)
    assert settings(ini) == {'server_hostname': 'h', 'listen_port': '1143',
                             'send_reuse_code': 'yes'}
    unknown = [m for m in messages if 'unknown option' in m]
    assert [m.split(': unknown')[0] for m in unknown] == [
        '%s:2: warning: this_is_not_an_option' % SOURCE,
        '%s:3: warning: cache_sise' % SOURCE,
        '%s:5: warning: max_connections_per_user' % SOURCE]
    assert 'did you mean cache_size?' in unknown[1]
    load(tmp_path, ini)


@pytest.mark.parametrize('conf, keyword, read_as', [
    ('cache_expiration_time abc', 'cache_expiration_time', 0),
    ('cache_size lots', 'cache_size', 0),
    ('cache_size 300s', 'cache_size', 300),
    ('listen_port -1', 'listen_port', -1),
    ('server_port imap4', 'server_port', 0),
])
def test_bad_numbers_are_reported_not_zero(tmp_path, conf, keyword, read_as):
    ini, messages = migrate('server_hostname h\n' + conf + '\n', SOURCE)
    assert keyword not in settings(ini)
    assert about(messages, keyword) == [
        "%s:2: warning: %s: %r is not a whole number (up-imapproxy read it as %d); not "
        "carried over" % (SOURCE, keyword, conf.split(' ', 1)[1], read_as)]
    load(tmp_path, ini)


@pytest.mark.parametrize('conf, keyword', [
    ('cache_size 0', 'cache_size'),
    ('listen_port 70000', 'listen_port'),
    ('server_port 0', 'server_port'),
    ('cache_expiration_time 999999', 'cache_expiration_time'),
    ('listen_address imap-proxy.example', 'listen_address'),
])
def test_values_gimapproxy_rejects_are_reported(tmp_path, conf, keyword):
    ini, messages = migrate('server_hostname h\n' + conf + '\n', SOURCE)
    assert keyword not in settings(ini)
    found = about(messages, keyword)
    assert found and found[0].startswith(
        "%s:2: warning: %s: not carried over: gimapproxy's %s would reject it: "
        % (SOURCE, keyword, keyword)), found
    load(tmp_path, ini)


def test_bad_boolean():
    ini, messages = migrate('server_hostname h\nforce_tls maybe\nenable_select_cache yess\n',
                            SOURCE)
    assert 'server_tls' not in settings(ini)
    assert about(messages, 'force_tls') == [
        "%s:2: warning: force_tls: 'maybe' is not yes or no (up-imapproxy read it as no); "
        "not carried over, fix it and migrate again" % SOURCE]
    assert "read it as yes" in about(messages, 'enable_select_cache')[0]


def test_syntax_comments_case_tabs_and_repeats(tmp_path):
    text = ('  SERVER_HOSTNAME\timap.example.org   # the server\n'
            'Cache_Size 10#no space before the comment\n'
            'cache_size 20\n'
            'listen_port\n'
            '# listen_port 1\n'
            '\n')
    ini, messages = migrate(text, SOURCE)
    assert settings(ini) == {'server_hostname': 'imap.example.org', 'cache_size': '20',
                             'send_reuse_code': 'yes'}
    assert about(messages, 'cache_size') == [
        '%s:3: warning: cache_size: given again (first on line 2); the last one counts, as '
        'in up-imapproxy' % SOURCE]
    assert about(messages, 'listen_port') == [
        '%s:4: warning: listen_port: has no value; not carried over' % SOURCE]
    load(tmp_path, ini)


def test_empty_file_still_loads(tmp_path):
    ini, messages = migrate('', SOURCE)
    assert settings(ini) == {'server_hostname': '127.0.0.1', 'send_reuse_code': 'yes'}
    assert any('server_hostname is not set' in m for m in messages)
    assert any('server_port is not set' in m for m in messages)
    assert load(tmp_path, ini).server_hostname == '127.0.0.1'


@pytest.mark.parametrize('conf, words', [
    ('enable_admin_commands yes', ['warning', 'stats_listen', 'IMAP port']),
    ('enable_admin_commands no', ['note', 'stats_listen']),
    ('enable_select_cache yes', ['warning', 'on purpose', 'stale EXISTS']),
    ('enable_select_cache no', ['note', 'never caches SELECT']),
    ('send_tcp_keepalives yes', ['note', 'by default', 'server_check_delay']),
    ('connect_retries 10', ['note', 'connect_timeout']),
    ('connect_delay 5', ['note', 'connect_timeout']),
    ('dns_rr yes', ['warning', 'in order']),
    ('ipversion_only 4', ['warning', 'IPv4 address']),
    ('ipversion_only 0', ['note']),
    ('stat_filename /var/run/pimpstats', ['note', 'stats_listen', 'gimapproxy stats']),
    ('protocol_log_filename /var/log/imapproxy_protocol.log', ['note', 'trace_users']),
    ('foreground_mode yes', ['note', 'foreground', 'supervisord']),
    ('chroot_directory /var/lib/imapproxy/chroot', ['warning', 'proc_username']),
    ('preauth_command ID ("GUID" "1")', ['warning', 'ID']),
    ('auth_sasl_plain_username master', ['warning', 'master-user']),
    ('auth_sasl_plain_password hunter2', ['warning', 'master-user']),
    ('auth_shared_secret s3cret', ['warning', 'master-user']),
    ('syslog_facility LOG_LOCAL0', ['note', 'stderr']),
    ('syslog_prioritymask LOG_LOUD', ['warning', 'not a syslog priority']),
    ('tls_no_tlsv1 no', ['warning', 'TLS 1.0']),
    ('proc_username root', ['warning', 'root']),
])
def test_options_that_do_not_carry_over(tmp_path, conf, words):
    keyword = conf.split()[0]
    ini, messages = migrate('server_hostname h\n' + conf + '\n', SOURCE)
    found = about(messages, keyword)
    assert len(found) == 1, messages
    assert found[0].startswith('%s:2: %s: %s: ' % (SOURCE, words[0], keyword)), found
    for word in words[1:]:
        assert word in found[0], (word, found)
    # Nothing but the server (and send_reuse_code, always) is set, secrets are not
    # repeated, and the file loads.
    assert set(settings(ini)) == {'server_hostname', 'send_reuse_code'}
    assert 'hunter2' not in ini + ''.join(messages)
    assert 's3cret' not in ini + ''.join(messages)
    load(tmp_path, ini)


def test_every_up_imapproxy_option_is_handled():
    for keyword in UP_IMAPPROXY_OPTIONS:
        ini, messages = migrate('server_hostname h\n%s 1\n' % keyword, SOURCE)
        assert not [m for m in messages if 'unknown option' in m], keyword
        assert about(messages, keyword) or set(settings(ini)) - {'server_hostname'}, keyword


def test_random_configs_always_load(tmp_path):
    """Whatever the input, the output loads (given that the files and users it names
    exist here), and every message names the source."""
    (tmp_path / 'file.pem').write_text('x\n')
    values = ['yes', 'no', 'Y', 'maybe', '0', '1', '143', '993', '65536', '-3', '2x', 'abc',
              'imaps', '127.0.0.1', '::', '*', 'localhost', 'LOG_INFO', 'nobody', 'root',
              'nogroup', str(tmp_path / 'file.pem'), 'a b', '%(x)s', '[x]', '4', '6',
              'tlsv1.3', '\u0663']
    keywords = list(UP_IMAPPROXY_OPTIONS) + ['bogus', 'Server_Port', 'cache_sise']
    rng = random.Random(20240601)
    for attempt in range(300):
        lines = []
        for _ in range(rng.randint(0, 12)):
            line = '%s%s%s' % (rng.choice(keywords), rng.choice([' ', '\t', '  ']),
                               rng.choice(values))
            if rng.random() < 0.2:
                line += ' # comment'
            lines.append(line)
        text = '\n'.join(lines)
        ini, messages = migrate(text, 'random.conf')
        assert all(m.startswith('random.conf') for m in messages), messages
        # Files and users are checked where the output runs, not by migrate(): make the
        # ones named exist here.
        here = re.sub(r'^(tls_(ca|cert|key)_file) = .*$',
                      r'\1 = %s' % (tmp_path / 'file.pem'), ini, flags=re.M)
        here = re.sub(r'^proc_username = .*$', 'proc_username = nobody', here, flags=re.M)
        here = re.sub(r'^proc_groupname = .*$', 'proc_groupname = nogroup', here, flags=re.M)
        try:
            load(tmp_path, here)
        except ConfigError as exc:
            raise AssertionError('%s\n--- input:\n%s\n--- output:\n%s' % (exc, text, ini))


def test_keys_missing_from_this_gimapproxy_are_written_commented_out(tmp_path, monkeypatch):
    keys = {name: key for name, key in migrate_module._KEYS.items()
            if name not in ('proc_username', 'proc_groupname')}
    monkeypatch.setattr(migrate_module, '_KEYS', keys)
    ini, messages = migrate('server_hostname h\nproc_username nobody\n'
                            'proc_groupname nogroup\n', SOURCE)
    assert settings(ini) == {'server_hostname': 'h', 'send_reuse_code': 'yes'}
    assert '\n#proc_username = nobody\n' in ini and '\n#proc_groupname = nogroup\n' in ini
    assert about(messages, 'proc_username') == [
        '%s:2: warning: proc_username: written commented out: this version of gimapproxy '
        'has no proc_username key' % SOURCE]
    load(tmp_path, ini)


def test_upgrading_doc_maps_every_option():
    with open(os.path.join(REPO, 'docs', 'upgrading.md')) as handle:
        doc = handle.read()
    rows = set(re.findall(r'^\| `([a-z0-9_.]+)`', doc, re.M))
    assert rows >= set(UP_IMAPPROXY_OPTIONS), set(UP_IMAPPROXY_OPTIONS) - rows
    assert 'gimapproxy migrate-config /etc/imapproxy.conf > proxy.ini' in doc


def test_migrate_config_command(tmp_path):
    conf = tmp_path / 'imapproxy.conf'
    conf.write_text(DEBIAN_CONF)
    env = dict(os.environ, PYTHONPATH=REPO)
    bin_path = os.path.join(REPO, 'bin', 'gimapproxy')
    result = subprocess.run([sys.executable, bin_path, 'migrate-config', str(conf)],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == migrate(DEBIAN_CONF, str(conf))[0]
    assert result.stderr.splitlines() == migrate(DEBIAN_CONF, str(conf))[1]
    load(tmp_path, result.stdout)
    result = subprocess.run([sys.executable, bin_path, 'migrate-config',
                             str(tmp_path / 'missing.conf')],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 1 and 'missing.conf' in result.stderr
    assert result.stdout == ''


def test_send_reuse_code_is_written_whatever_the_file(tmp_path):
    """up-imapproxy always sent [XPROXYREUSE]: every migration turns it on, and says so."""
    for conf in ('', 'server_hostname imap.example.org\n', DEBIAN_CONF):
        ini, messages = migrate(conf, SOURCE)
        assert settings(ini)['send_reuse_code'] == 'yes'
        assert load(tmp_path, ini).send_reuse_code is True
        assert [m for m in messages if 'send_reuse_code = yes is written' in m], messages


def test_the_open_file_note_matches_what_the_proxy_does(tmp_path):
    """The number migrate-config gives is the one the proxy aims for at start: under a
    lower hard limit the proxy warns with the same number."""
    _, messages = migrate('server_hostname x\ncache_size 2000\n', SOURCE)
    assert '(5024)' in about(messages, 'cache_size')[0]
    _, messages = migrate('server_hostname x\ncache_size 1000\n', SOURCE)
    assert about(messages, 'cache_size') == []          # 3024: no need to say anything
    ini = tmp_path / 'proxy.ini'
    ini.write_text('[gimapproxy]\nserver_hostname = 127.0.0.1\nlisten_port = %d\n'
                   'cache_size = 2000\n' % free_port())

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    proxy = subprocess.Popen([sys.executable, os.path.join(REPO, 'bin', 'gimapproxy'), '-c',
                              str(ini)], stderr=subprocess.PIPE, text=True,
                             preexec_fn=low_limit)
    lines = []
    try:
        for line in proxy.stderr:               # the warning comes before listening
            lines.append(line)
            if ' listening: ' in line:
                break
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)
    assert [line for line in lines if 'WARNING open file limit 4096 is below the 5024 that '
            'cache_size 2000 may need' in line], lines
