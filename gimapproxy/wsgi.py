"""HTTP views of a running proxy, as a WSGI app: metrics, stats and admin.

    from gimapproxy.wsgi import make_app
    app = make_app(server)        # mount it in the host's gevent web app, or serve it

GET /metrics (Prometheus text format; 501 with a text that says what to install when
prometheus_client, the `metrics` extra, is missing), GET /stats (JSON), and, from
`admin_networks` only: GET /admin/cache (cached connections per user, no secrets), POST
/admin/flush (all) and POST /admin/flush?user=NAME (one user). Another method on one of
these paths gets 405 with an Allow header; any other path 404. Nothing admin-related is
reachable on the IMAP port.
"""
from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

from .forward import is_trusted
from .stats import MetricsUnavailable

__all__ = ['make_app']

# The methods each path answers; another method gets 405 with an Allow header.
_METHODS = {'/metrics': 'GET', '/stats': 'GET', '/admin/cache': 'GET', '/admin/flush': 'POST'}

log = logging.getLogger('gimapproxy.admin')


def make_app(server):
    """Return a WSGI application serving `server`'s metrics, stats and admin views."""

    def respond(start_response, status, body, content_type='application/json', headers=()):
        if not isinstance(body, bytes):
            body = (json.dumps(body, indent=1, sort_keys=True) + '\n').encode()
        start_response(status, [('Content-Type', content_type),
                                ('Content-Length', str(len(body))), *headers])
        return [body]

    def app(environ, start_response):
        path = environ.get('PATH_INFO', '')
        method = environ.get('REQUEST_METHOD', 'GET')
        if path == '/metrics' and method == 'GET':
            # prometheus_client is loaded on the first scrape, not with the package.
            try:
                registry = server.metrics.registry()
            except MetricsUnavailable as exc:
                # Not an outage that will pass (503): this install cannot serve it.
                return respond(start_response, '501 Not Implemented',
                               ('%s\n' % exc).encode(), 'text/plain; charset=utf-8')
            from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
            return respond(start_response, '200 OK', generate_latest(registry),
                           CONTENT_TYPE_LATEST)
        if path == '/stats' and method == 'GET':
            return respond(start_response, '200 OK', server.stats())
        if path.startswith('/admin/'):
            peer = environ.get('REMOTE_ADDR', '')
            if not is_trusted(peer, server.config.admin_networks):
                log.warning('admin refused: peer=%s path=%s', peer, path)
                return respond(start_response, '403 Forbidden', {'error': 'forbidden'})
            if path == '/admin/cache' and method == 'GET':
                return respond(start_response, '200 OK', server.cache.listing())
            if path == '/admin/flush' and method == 'POST':
                user = parse_qs(environ.get('QUERY_STRING', '')).get('user', [None])[0]
                count = server.flush(user.encode() if user is not None else None)
                log.info('admin flush: peer=%s user=%s flushed=%d', peer,
                         user if user is not None else '*', count)
                return respond(start_response, '200 OK', {'flushed': count})
        if path in _METHODS:
            return respond(start_response, '405 Method Not Allowed',
                           {'error': 'method not allowed', 'allow': _METHODS[path]},
                           headers=[('Allow', _METHODS[path])])
        return respond(start_response, '404 Not Found', {'error': 'not found'})

    return app
