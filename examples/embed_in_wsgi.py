"""gimapproxy inside a gevent web application, in one process.

    python3 examples/embed_in_wsgi.py PROXY_INI HTTP_PORT

A host that already serves HTTP with gevent starts the proxy next to its WSGI app and
mounts the proxy's views under /proxy: /proxy/metrics (Prometheus), /proxy/stats (JSON),
and /proxy/admin/cache and /proxy/admin/flush (POST; only from the proxy's
admin_networks, loopback by default). The host owns the process: it monkey-patches first,
configures logging (the library never does, so without this its events are not seen),
installs the signal handlers, reloads the proxy's configuration on SIGHUP and stops the
proxy on SIGTERM.
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from gimapproxy import ConfigError, ProxyServer, load_config  # noqa: E402
from gimapproxy.wsgi import make_app  # noqa: E402


def host_app(proxy_app):
    """The host's own web app, with the proxy's views mounted under /proxy."""
    def app(environ, start_response):
        path = environ.get('PATH_INFO', '')
        if path.startswith('/proxy/'):
            environ = dict(environ, PATH_INFO=path[len('/proxy'):])
            return proxy_app(environ, start_response)
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'the host application\n']
    return app


def main(ini_path, http_port):
    config = load_config(ini_path)
    # The proxy logs under the 'gimapproxy' logger, one line per event; here they go to
    # stderr with the host's own lines, at the configured log_level.
    logging.basicConfig(format='%(asctime)s %(name)s %(levelname)s %(message)s',
                        level=logging.INFO)
    logging.getLogger('gimapproxy').setLevel(config.log_level_number)
    proxy = ProxyServer(config)
    proxy.start()
    web = WSGIServer(('127.0.0.1', int(http_port)), host_app(make_app(proxy)), log=None)
    web.start()
    print('web on 127.0.0.1:%d, IMAP proxy on 127.0.0.1:%d' % (web.server_port,
                                                               proxy.server_port),
          flush=True)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    # A signal handler must not block: the reload runs in a greenlet of its own.
    gevent.signal_handler(signal.SIGHUP, gevent.spawn, reload, proxy, ini_path)
    stop.wait()
    web.stop(1)
    proxy.stop(5)
    return 0


def reload(proxy, ini_path):
    try:
        changed, restart = proxy.reload(load_config(ini_path))
    except (ConfigError, OSError) as exc:    # the running configuration stays
        print('reload failed: %s' % exc, flush=True)
        return
    print('reloaded: changed=%s restart_needed=%s' % (','.join(changed) or '-',
                                                    ','.join(restart) or '-'), flush=True)


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:3]))
