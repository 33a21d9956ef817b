"""Prometheus metrics. Two kinds, because jobs run in other processes than the HTTP front ends:

- per front end, in its own registry: HTTP requests and latency by route, active Socket.IO subscribers;
- per cluster, kept in Redis: jobs by model, provider and status, job duration, upstream errors by provider
  and kind. Workers add to Redis hashes (job counts once per job, inside its settlement; see
  service/settlement.py), and every front end's /metrics reads them at scrape time along with the queue depth.
  A counter therefore survives worker restarts and does not depend on which front end is scraped; with
  several front ends scraped, aggregate these series with max(), not sum().
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator

from arq.connections import ArqRedis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from service.constants import METRICS_JOB_SECONDS, METRICS_JOBS, METRICS_UPSTREAM_ERRORS
from service.errors import GatewayError

log = logging.getLogger(__name__)

JOB_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                        300.0)
SEP = "\t"  # joins label values in Redis hash fields; never part of a model or provider name
INF = "+Inf"


def job_fields(model: str, provider: str, status: str, seconds: float | None) -> list[str]:
    """The Redis hash fields one finished job increments: [job count, duration bucket, duration sum], the
    duration ones empty when the job never ran. Buckets are stored alone and made cumulative when read."""
    count = SEP.join((model, provider, status))
    if seconds is None:
        return [count, "", ""]
    index = bisect.bisect_left(JOB_SECONDS_BUCKETS, seconds)
    bound = str(JOB_SECONDS_BUCKETS[index]) if index < len(JOB_SECONDS_BUCKETS) else INF
    series = SEP.join((model, provider))
    return [count, SEP.join((series, "le", bound)), SEP.join((series, "sum"))]


class UpstreamErrorCounter:
    """The router's failure listener in a worker: one count per failed upstream call, by provider account and
    error code. Best effort: losing a count to a Redis outage must not fail the job."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    async def __call__(self, provider: str, error: GatewayError) -> None:
        try:
            await self.redis.hincrby(METRICS_UPSTREAM_ERRORS,  # type: ignore[misc]
                                     SEP.join((provider, error.code or type(error).__name__)), 1)
        except RedisError as exc:
            log.warning("upstream error not counted: %s", exc)


class ClusterSnapshot:
    """The Redis side of one scrape, read before the exposition is rendered."""

    def __init__(self, jobs: dict[bytes, bytes], seconds: dict[bytes, bytes], errors: dict[bytes, bytes],
                 queue_depth: int, subscribers: int) -> None:
        self.jobs = {k.decode(): int(v) for k, v in jobs.items()}
        self.seconds = {k.decode(): float(v) for k, v in seconds.items()}
        self.errors = {k.decode(): int(v) for k, v in errors.items()}
        self.queue_depth = queue_depth
        self.subscribers = subscribers


class ClusterCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: ClusterSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        queue = GaugeMetricFamily("imagegw_queue_depth", "Jobs waiting in the queue, ready to run")
        queue.add_metric([], snap.queue_depth)
        yield queue
        subscribers = GaugeMetricFamily("imagegw_socketio_subscribers",
                                        "Socket.IO job subscriptions open on this front end")
        subscribers.add_metric([], snap.subscribers)
        yield subscribers
        jobs = CounterMetricFamily("imagegw_jobs", "Finished jobs", labels=["model", "provider", "status"])
        for field, value in sorted(snap.jobs.items()):
            jobs.add_metric(field.split(SEP), value)
        yield jobs
        errors = CounterMetricFamily("imagegw_upstream_errors", "Failed upstream calls (each retry counts)",
                                     labels=["provider", "kind"])
        for field, value in sorted(snap.errors.items()):
            errors.add_metric(field.split(SEP), value)
        yield errors
        yield self._durations(snap.seconds)

    @staticmethod
    def _durations(fields: dict[str, float]) -> HistogramMetricFamily:
        family = HistogramMetricFamily("imagegw_job_duration_seconds", "Time from a job's start to its end",
                                       labels=["model", "provider"])
        series = sorted({tuple(f.split(SEP)[:2]) for f in fields})
        for model, provider in series:
            prefix = SEP.join((model, provider))
            cumulative, buckets = 0.0, []
            for bound in [*map(str, JOB_SECONDS_BUCKETS), INF]:
                cumulative += fields.get(SEP.join((prefix, "le", bound)), 0.0)
                buckets.append((bound, cumulative))
            family.add_metric([model, provider], buckets, fields.get(SEP.join((prefix, "sum")), 0.0))
        return family


class Metrics:
    """One front end's registry (not the global one: several apps may share a test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imagegw_http_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("imagegw_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route", "method"], buckets=HTTP_SECONDS_BUCKETS, registry=self.registry)
        self.cluster = ClusterCollector()
        self.registry.register(self.cluster)
        # each label set's series, found once: `labels()` checks and joins its labels on every call
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        series = self._series.get((route, method, status))
        if series is None:
            series = self._series[route, method, status] = (self.requests.labels(route, method, str(status)),
                                                            self.latency.labels(route, method))
        series[0].inc()
        series[1].observe(seconds)

    async def exposition(self, redis: ArqRedis, queue_name: str, subscribers: int) -> bytes:
        """The text format; without Redis only this front end's series, so a scrape still tells something."""
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(METRICS_JOBS)
                pipe.hgetall(METRICS_JOB_SECONDS)
                pipe.hgetall(METRICS_UPSTREAM_ERRORS)
                pipe.zcount(queue_name, "-inf", int(time.time() * 1000))
                jobs, seconds, errors, depth = await pipe.execute()
            snapshot: ClusterSnapshot | None = ClusterSnapshot(jobs, seconds, errors, int(depth), subscribers)
        except RedisError as exc:
            log.warning("cluster metrics unavailable: %s", exc)
            snapshot = None
        # no await between taking the snapshot and rendering it: concurrent scrapes cannot mix
        self.cluster.snapshot = snapshot
        return generate_latest(self.registry)
