"""gimapproxy: a connection-caching IMAP proxy for webmail, built on gevent.

Importing the package patches nothing and imports no socket, ssl or threading code, so a
host application can monkey-patch first. `ProxyServer` and `load_config` are loaded on
first use:

    from gimapproxy import ProxyServer, load_config
    server = ProxyServer(load_config('etc/proxy.ini'))
    server.start()
    ...
    server.stop(10)
"""

__version__ = '0.1.0'
__all__ = ['ProxyServer', 'load_config', 'make_config', 'ConfigError', '__version__']


def __getattr__(name):
    if name == 'ProxyServer':
        from .server import ProxyServer
        return ProxyServer
    if name in ('load_config', 'make_config', 'ConfigError'):
        from . import config
        return getattr(config, name)
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
