"""Configuration: defaults, and errors that name the file, the key and the problem."""
import os
import pwd
import re

import pytest

from gimapproxy.config import KEYS, ConfigError, load_config, make_config

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, '..', 'etc', 'proxy.ini')


def write(tmp_path, text):
    path = tmp_path / 'proxy.ini'
    path.write_text(text)
    return str(path)


def test_minimal_file_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, '[gimapproxy]\nserver_hostname = imap.example\n'))
    assert config.server_hostname == 'imap.example'
    assert config.server_port == 143
    assert config.listen_address == '127.0.0.1'
    assert config.listen_port == 1143
    assert config.cache_expiration_time == 300
    assert config.expiry_interval == 60
    assert config.log_level == 'info'


def load_shipped(tmp_path):
    """Load etc/proxy.ini. It runs as the system user gimapproxy, which a test machine may
    lack: then the load must fail on that key alone, and the same file with nobody (who
    exists everywhere) is loaded instead."""
    text = open(SHIPPED).read()
    assert re.search(r'^proc_username = gimapproxy$', text, re.M)
    try:
        pwd.getpwnam('gimapproxy')
        return load_config(SHIPPED)
    except KeyError:
        pass
    with pytest.raises(ConfigError) as error:
        load_config(SHIPPED)
    assert str(error.value) == ("%s: [gimapproxy] proc_username: no such user 'gimapproxy'"
                                % SHIPPED)
    return load_config(write(tmp_path, text.replace('proc_username = gimapproxy',
                                                    'proc_username = nobody')))


def test_shipped_file_runs_unprivileged(tmp_path):
    assert load_shipped(tmp_path).proc_username in ('gimapproxy', 'nobody')


def test_shipped_file_is_valid_and_documents_every_default(tmp_path):
    config = load_shipped(tmp_path)
    text = open(SHIPPED).read()
    for key in KEYS:
        if key.default is None:
            assert re.search(r'^%s = ' % key.name, text, re.M), key.name
        else:
            # Documented as a commented line with the real default.
            documented = r'^#%s =%s$' % (key.name, ' ' + re.escape(key.default)
                                         if key.default else '')
            assert re.search(documented, text, re.M), key.name
            if key.name != 'proc_username':       # set: see load_shipped
                assert getattr(config, key.name) == key.parse(key.default)


@pytest.mark.parametrize('body, key, problem', [
    ('server_hostname = x\nserver_port = abc\n', 'server_port', "'abc' is not a whole number"),
    ('server_hostname = x\nserver_port = 0\n', 'server_port', 'out of range'),
    ('server_hostname = x\nlisten_port = 70000\n', 'listen_port', 'out of range'),
    ('server_hostname = x\ncache_size = -1\n', 'cache_size', 'out of range'),
    ('server_hostname = x\ncache_expiration_time = soon\n', 'cache_expiration_time',
     'not a number of seconds'),
    ('server_hostname = x\nexpiry_interval = 0\n', 'expiry_interval', 'out of range'),
    ('server_hostname = x\nconnect_timeout = nan\n', 'connect_timeout', 'out of range'),
    ('server_hostname = x\nlog_level = loud\n', 'log_level', 'is not one of'),
    ('server_hostname = x\nlisten_address = localhost\n', 'listen_address',
     'is not an IP address'),
    ('server_hostname = x\nthis_is_not_an_option = 42\n', 'this_is_not_an_option',
     'unknown key'),
    ('server_port = 143\n', 'server_hostname', 'required key is missing'),
    ('server_hostname =\n', 'server_hostname', 'is not a host name'),
    ('server_hostname = x\nserver_port = 1\nserver_port = 2\n', 'server_port', 'given twice'),
    ('server_hostname = x\nserver_tls = yes\n', 'server_tls', "'yes' is not one of off, starttls, implicit"),
    ('server_hostname = x\ntls_ca_file = /no/such/ca.pem\n', 'tls_ca_file', "cannot read file '/no/such/ca.pem'"),
    ('server_hostname = x\ntls_cert_file = %(file)s\n', 'tls_cert_file', 'needs tls_key_file as well'),
    ('server_hostname = x\nclient_tls_key_file = %(file)s\n', 'client_tls_key_file',
     'needs client_tls_cert_file as well'),
    ('server_hostname = x\nlisten_tls_port = 1993\n', 'listen_tls_port', 'needs client_tls_cert_file'),
    ('server_hostname = x\nclient_starttls = yes\n', 'client_starttls', 'needs client_tls_cert_file'),
    ('server_hostname = x\nrequire_client_tls = yes\n', 'require_client_tls', 'needs STARTTLS offered'),
    ('server_hostname = x\ntrusted_networks = 10.0.0.0/8 webmail\n', 'trusted_networks',
     "'webmail' is not a network"),
    ('server_hostname = x\ntls_min_version = ssl3\n', 'tls_min_version', 'is not one of'),
    ('server_hostname = x\nusername_case = upper\n', 'username_case',
     "'upper' is not one of lower, exact"),
    ('server_hostname = x\nforward_client_ip = maybe\n', 'forward_client_ip', "'maybe' is not yes or no"),
])
def test_errors_name_file_key_and_problem(tmp_path, body, key, problem):
    pem = tmp_path / 'some.pem'
    pem.write_text('x')
    path = write(tmp_path, '[gimapproxy]\n' + body % {'file': pem})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path + ': [gimapproxy] ' + key + ': '), message
    assert problem in message


@pytest.mark.parametrize('text, problem', [
    ('server_hostname = x\n', 'File contains no section headers'),
    ('[other]\nserver_hostname = x\n', '[other]: unknown section'),
    ('', '[gimapproxy]: section is missing'),
    ('[gimapproxy]\nserver_hostname\n', 'server_hostname'),
])
def test_file_level_errors(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path + ': ')
    assert problem in str(info.value)


def test_unreadable_file(tmp_path):
    missing = str(tmp_path / 'nope.ini')
    with pytest.raises(ConfigError, match=re.escape(missing) + ': cannot read'):
        load_config(missing)
    path = tmp_path / 'bin.ini'
    path.write_bytes(b'[gimapproxy]\nserver_hostname = \xff\n')
    with pytest.raises(ConfigError, match='not valid UTF-8'):
        load_config(str(path))


def test_make_config_for_embedding():
    config = make_config({'server_hostname': 'h', 'listen_port': '0'})
    assert config.listen_port == 0 and config.server_hostname == 'h'
    with pytest.raises(ConfigError, match=r'<dict>: \[gimapproxy\] listen_port: '):
        make_config({'server_hostname': 'h', 'listen_port': 'x'})
    assert make_config({'server_hostname': 'h', 'listen_address': '*'}).listen_address == ''


def test_tls_defaults_and_networks():
    config = make_config({'server_hostname': 'h', 'trusted_networks': '10.0.0.0/8, ::1'})
    assert config.server_tls == 'off' and config.tls_verify_server is True
    assert config.forward_client_ip is True and config.offer_starttls is False
    assert [str(n) for n in config.trusted_networks] == ['10.0.0.0/8', '::1/128']
