"""Prometheus metrics that survive a short-lived init container.

An init container exits long before Prometheus scrapes it, so metrics leave the
process three ways: `--metrics-textfile` (node_exporter's textfile collector,
written atomically), `--pushgateway` (pushed at the end, success or failure), and
`--metrics-port` for the long-running `serve` mode. Names follow Prometheus
conventions; labels are bounded (source kind, model name, result) and carry no
secrets. prometheus_client is imported only when metrics are asked for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("weightsync")


@dataclass(frozen=True)
class MetricsOptions:
    textfile: str | None = None
    pushgateway: str | None = None
    port: int | None = None

    @property
    def wanted(self) -> bool:
        return bool(self.textfile or self.pushgateway or self.port)


class SyncMetrics:
    """The metrics of this process, in a registry of their own."""

    def __init__(self, source_kind: str, model: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

        disable_created_metrics()  # *_created series only add noise to a textfile or a push
        self.registry = CollectorRegistry()
        self.labels = {"source_kind": source_kind, "model": model}
        names = list(self.labels)
        self.download_bytes = Counter("weightsync_download_bytes", "Bytes downloaded from the source.", names,
                                      registry=self.registry)
        self.reused_bytes = Counter("weightsync_reused_bytes", "Bytes taken from the volume instead of the network "
                                    "(reused from another revision or resumed from staging).", names,
                                    registry=self.registry)
        self.files = Counter("weightsync_files", "Files verified and published.", names, registry=self.registry)
        self.retries = Counter("weightsync_retries", "Transient network errors retried.", names,
                               registry=self.registry)
        self.verify_failures = Counter("weightsync_verify_failures", "Checksum or size mismatches detected.", names,
                                       registry=self.registry)
        self.syncs = Counter("weightsync_syncs", "Syncs by result.", [*names, "result"], registry=self.registry)
        self.lock_wait = Gauge("weightsync_lock_wait_seconds", "Seconds the last sync waited for another "
                               "process's download.", names, registry=self.registry)
        self.duration = Gauge("weightsync_sync_duration_seconds", "Duration of the last sync.", [*names, "result"],
                              registry=self.registry)
        self.last_success = Gauge("weightsync_last_success_timestamp_seconds", "Unix time of the last successful "
                                  "sync.", names, registry=self.registry)
        self.verified_files = Gauge("weightsync_published_files", "Files of the published revision by what they "
                                    "were verified against (evidence: crc64nvme, crc32-composite, md5-multipart, "
                                    "sha256, git-sha1, size-only, ...).", [*names, "evidence"],
                                    registry=self.registry)
        self.from_fallback = Gauge("weightsync_from_fallback", "1 when the revision the last sync published (or "
                                   "found published) came from a --fallback source, not the primary --source.",
                                   names, registry=self.registry)
        self.source_fallbacks = Counter("weightsync_source_fallbacks", "Sources given up on for the next "
                                        "--fallback (unreachable, missing, denied, failed verification).", names,
                                        registry=self.registry)
        self.ready = Gauge("weightsync_ready", "1 once a verified model is published (serve mode).", names,
                           registry=self.registry)

    def record_success(self, result: Any) -> None:
        labels = self.labels
        self.download_bytes.labels(**labels).inc(result.bytes_fetched)
        self.reused_bytes.labels(**labels).inc(result.bytes_reused + result.bytes_resumed)
        if not result.warm:
            self.files.labels(**labels).inc(result.files)
        self.retries.labels(**labels).inc(result.retries)
        for kind, count in result.evidence_kinds.items():
            self.verified_files.labels(**labels, evidence=kind).set(count)
        self.lock_wait.labels(**labels).set(result.lock_wait_seconds)
        self.from_fallback.labels(**labels).set(1 if result.from_fallback else 0)
        self.source_fallbacks.labels(**labels).inc(len(result.skipped))
        self.syncs.labels(**labels, result="success").inc()
        self.duration.labels(**labels, result="success").set(result.seconds)
        self.last_success.labels(**labels).set(time.time())
        self.ready.labels(**labels).set(1)

    def record_failure(self, error: BaseException, seconds: float) -> None:
        from weightsync.errors import IntegrityError

        if isinstance(error, IntegrityError):
            self.verify_failures.labels(**self.labels).inc()
        self.syncs.labels(**self.labels, result="error").inc()
        self.duration.labels(**self.labels, result="error").set(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def export(self, options: MetricsOptions) -> None:
        """Write the textfile and push to the gateway; failures here are logged, never fatal."""
        if options.textfile:
            from prometheus_client import write_to_textfile

            try:
                write_to_textfile(options.textfile, self.registry)
            except OSError as exc:
                log.warning("could not write metrics to %s: %s", options.textfile, exc.strerror)
        if options.pushgateway:
            from prometheus_client import push_to_gateway

            try:
                push_to_gateway(options.pushgateway, job="weightsync", registry=self.registry,
                                grouping_key={"model": self.labels["model"]}, timeout=10)
            except Exception as exc:  # a metrics outage must not fail a model start
                log.warning("could not push metrics to the Pushgateway: %s", exc)
