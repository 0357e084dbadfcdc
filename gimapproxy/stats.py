"""Counters of a running proxy, as a JSON-able snapshot and as Prometheus metrics.

The hot paths only add to a plain dict (`Stats.counters`); the Prometheus text is made by
prometheus_client at scrape time from a collector that reads those numbers, so a proxy
whose stats nobody reads pays nothing more. prometheus_client itself is imported only when
metrics are served: by `Stats.registry()`, on the first scrape of /metrics. It is the
`metrics` extra (`pip install gimapproxy[metrics]`); without it the JSON snapshot still
works, and `registry()` raises MetricsUnavailable.
"""
from __future__ import annotations

import bisect
import collections
import importlib.util
import time

from .cache import State

__all__ = ['Stats', 'reason_class', 'MetricsUnavailable', 'metrics_available',
           'METRICS_MISSING']

# Why there are no Prometheus metrics, and what to do: /metrics answers it, and the
# server warns with it at start.
METRICS_MISSING = 'prometheus_client is not installed: pip install gimapproxy[metrics]'

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class MetricsUnavailable(Exception):
    """There are no Prometheus metrics: prometheus_client (the `metrics` extra) cannot be
    imported. The message says what to install."""


def metrics_available() -> bool:
    """Return True when prometheus_client can be imported. It is looked for, not
    imported, so that it is still loaded only on the first scrape."""
    try:
        return importlib.util.find_spec('prometheus_client') is not None
    except ValueError:          # imported already, by something that left no spec
        return True


def reason_class(reason: str) -> str:
    """The fixed phrase of a close reason, without its details (a bounded label set)."""
    return reason.split(':', 1)[0].strip()[:40] or 'unknown'


class Stats:
    """The numbers of one ProxyServer: of its `cache` (a ConnectionCache, whose entries
    are the backend connections) and its sessions (`clients()` says how many are open).

    `counters` keys: clients, clients_refused, login_new, login_reused, login_failed,
    expired, cached_died, bytes_in (client to server), bytes_out.
    """

    def __init__(self, cache, clients) -> None:
        self.cache = cache
        self.clients = clients
        self.started = time.time()
        self.counters: collections.Counter = collections.Counter()
        self.closed: collections.Counter = collections.Counter()    # by reason class
        self.unclean: collections.Counter = collections.Counter()   # not cached, by reason
        self.refusals: collections.Counter = collections.Counter()  # failed logins, by why
        self._latency = {result: [0] * (len(LATENCY_BUCKETS) + 1)
                         for result in ('new', 'reused', 'failed')}
        self._latency_sum = collections.Counter()
        self._registry = None

    # -- recording (cheap) -------------------------------------------------------------

    def observe_login(self, result: str, seconds: float) -> None:
        self._latency[result][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum[result] += seconds

    def backend_closed(self, reason: str) -> None:
        self.closed[reason_class(reason)] += 1

    def login_failed(self, kind: str, reason: str) -> None:
        """A login that failed: `kind` and `reason` as in gimapproxy.lease.LoginFailed."""
        self.refusals[{'refused': 'refused by the server',
                       'unavailable': 'server unavailable'}.get(kind)
                      or reason_class(reason)] += 1

    def not_reusable(self, reason: str) -> None:
        """A connection closed instead of cached, for the tracker's `reason`."""
        self.unclean[reason_class(reason)] += 1

    # -- reading -------------------------------------------------------------------------

    def states(self) -> dict:
        """Backend connections not closed, by state: created equals these plus every
        close counted by reason, at any moment."""
        return self.cache.counts()

    def snapshot(self) -> dict:
        """The numbers as a JSON-able dict (no user names, no secrets)."""
        counters = self.counters
        logins = counters['login_new'] + counters['login_reused']
        return {
            'uptime_seconds': round(time.time() - self.started, 1),
            'clients': {'current': self.clients(), 'total': counters['clients'],
                        'refused': counters['clients_refused']},
            'logins': {'new': counters['login_new'], 'reused': counters['login_reused'],
                       'failed': counters['login_failed'],
                       'failed_by_reason': dict(self.refusals)},
            'cache_hit_ratio': round(counters['login_reused'] / logins, 4) if logins else 0.0,
            'backend_connections': dict(
                self.states(), created=self.cache.created,
                expired=counters['expired'], died_while_cached=counters['cached_died'],
                closed_by_reason=dict(self.closed),
                not_reusable_by_reason=dict(self.unclean)),
            'bytes_relayed': {'client_to_server': counters['bytes_in'],
                              'server_to_client': counters['bytes_out']},
        }

    def registry(self):
        """Return the prometheus_client CollectorRegistry that holds this collector, made
        (and prometheus_client imported) on first use.

        Raises:
            MetricsUnavailable: prometheus_client is not installed (METRICS_MISSING).
        """
        if self._registry is None:
            try:
                from prometheus_client import CollectorRegistry
            except ImportError:
                raise MetricsUnavailable(METRICS_MISSING) from None
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            self._registry = registry
        return self._registry

    def collect(self):
        """prometheus_client's collector protocol: yield the metric families."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        snap = self.snapshot()
        counters = self.counters
        yield GaugeMetricFamily('gimapproxy_client_connections',
                                'Client connections open now.', snap['clients']['current'])
        yield CounterMetricFamily('gimapproxy_client_connections',
                                  'Client connections accepted.', counters['clients'])
        yield CounterMetricFamily('gimapproxy_client_connections_refused',
                                  'Client connections refused at max_clients.',
                                  counters['clients_refused'])
        logins = CounterMetricFamily('gimapproxy_logins', 'Logins by result.',
                                     labels=['result'])
        for result in ('new', 'reused', 'failed'):
            logins.add_metric([result], counters['login_' + result])
        yield logins
        yield GaugeMetricFamily('gimapproxy_cache_hit_ratio',
                                'Reused logins over successful logins.',
                                snap['cache_hit_ratio'])
        backends = GaugeMetricFamily('gimapproxy_backend_connections',
                                     'Server connections now, by state.', labels=['state'])
        for state in State:
            if state is not State.CLOSED:
                backends.add_metric([state.value], snap['backend_connections'][state.value])
        yield backends
        yield CounterMetricFamily('gimapproxy_backend_connections_created',
                                  'Server connections opened.', self.cache.created)
        yield CounterMetricFamily('gimapproxy_backend_connections_expired',
                                  'Cached server connections logged out by the sweep.',
                                  counters['expired'])
        yield CounterMetricFamily('gimapproxy_backend_connections_died_while_cached',
                                  'Cached server connections the server closed or spoke '
                                  'on.', counters['cached_died'])
        closed = CounterMetricFamily('gimapproxy_backend_connections_closed',
                                     'Server connections closed, by reason.',
                                     labels=['reason'])
        for reason, count in sorted(self.closed.items()):
            closed.add_metric([reason], count)
        yield closed
        refusals = CounterMetricFamily('gimapproxy_login_failures',
                                       'Failed logins, by why.', labels=['reason'])
        for reason, count in sorted(self.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        unclean = CounterMetricFamily('gimapproxy_backend_not_reusable',
                                      'Server connections closed instead of cached, by why '
                                      'they were not clean.', labels=['reason'])
        for reason, count in sorted(self.unclean.items()):
            unclean.add_metric([reason], count)
        yield unclean
        latency = HistogramMetricFamily('gimapproxy_login_seconds',
                                        'Time from LOGIN to its answer.', labels=['result'])
        for result, counts in self._latency.items():
            running, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS + (float('inf'),), counts):
                running += count
                buckets.append(('+Inf' if bound == float('inf') else repr(bound), running))
            latency.add_metric([result], buckets, self._latency_sum[result])
        yield latency
        relayed = CounterMetricFamily('gimapproxy_relayed_bytes',
                                      'Bytes relayed after login.', labels=['direction'])
        relayed.add_metric(['client_to_server'], counters['bytes_in'])
        relayed.add_metric(['server_to_client'], counters['bytes_out'])
        yield relayed
