"""The proxy's own ID for the server: pure functions."""
import ipaddress

from gimapproxy.forward import id_fields, is_trusted, originating_ip

NETS = (ipaddress.ip_network('192.168.1.0/24'), ipaddress.ip_network('::1/128'))


def test_is_trusted():
    assert is_trusted('192.168.1.7', NETS)
    assert is_trusted('::1', NETS)
    assert is_trusted('::ffff:192.168.1.7', NETS)
    assert not is_trusted('192.168.2.7', NETS)
    assert not is_trusted('not an address', NETS)
    assert not is_trusted('192.168.1.7', ())


def test_untrusted_client_cannot_forge_its_address():
    client = [(b'name', b'webmail'), (b'X-Originating-IP', b'192.0.2.7'),
              (b'x-forward-user', b'x'), (b'x-session-id', b'forged'), (b'version', None)]
    fields = dict(id_fields(client, ('10.0.0.5', 40000), ('10.0.0.1', 1143), 'abc', False))
    assert fields == {b'name': b'webmail', b'x-originating-ip': b'10.0.0.5',
                      b'x-originating-port': b'40000', b'x-connected-ip': b'10.0.0.1',
                      b'x-connected-port': b'1143', b'x-session-ext-id': b'abc'}
    assert originating_ip(client, '10.0.0.5', False) == '10.0.0.5'


def test_trusted_client_passes_the_browsers_address():
    client = [(b'x-originating-ip', b'192.0.2.7'), (b'x-originating-port', b'5555')]
    fields = id_fields(client, ('192.168.1.7', 40000), ('10.0.0.1', 1143), 'abc', True)
    assert fields[:2] == client                      # the client's fields first
    assert dict(fields)[b'x-connected-ip'] == b'10.0.0.1'
    assert [key for key, _ in fields].count(b'x-originating-ip') == 1
    assert originating_ip(client, '192.168.1.7', True) == '192.0.2.7'
