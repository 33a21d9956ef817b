"""The webhook delivery job: one signed POST per run, re-queued by arq with backoff until the receiver answers
2xx or `webhook_retry_for` seconds have passed since the job ended.

It is an arq job of its own (queued by the job's settlement, exactly once, under the id `webhook:<job id>`)
rather than a task beside the image job, so a delivery outlives the worker that finished the job: a worker
that dies mid-retry leaves it in the queue for another. Every attempt is appended to the job's `webhook`
field, which the job object shows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from arq import Retry

from service.jobs import TERMINAL, JobRecord
from service.logs import JOB_ID
from service.results import render_job
from service.schemas import WebhookAttempt, WebhookDelivery
from service.webhooks import backoff, signing_secret
from workers.resources import WorkerResources, resources

log = logging.getLogger(__name__)

# a bound on runs besides the time limit, so a clock gone wrong cannot retry forever
MAX_DELIVERY_RUNS = 200


async def deliver_webhook(ctx: dict[str, Any], job_id: str) -> None:
    """arq entry point: one attempt at delivering job `job_id`'s webhook."""
    res = resources(ctx)
    JOB_ID.set(job_id)
    record = await res.store.get(job_id)
    if record is None or record.webhook is None or record.webhook.status != "pending" or not record.terminal:
        return  # expired, delivered or given up by an earlier run
    delivery = record.webhook
    secret = await signing_secret(res.store.redis, res.settings, record.owner)
    if secret is None:
        attempt = WebhookAttempt(at=time.time(), error="the job's API key no longer exists")
        await _record(res, job_id, delivery, attempt, "failed")
        return
    body = await payload(res, record)
    attempt = await res.webhooks.post(delivery.url, body, secret, f"job.{record.status}")
    if attempt.error is None:
        await _record(res, job_id, delivery, attempt, "delivered")
        log.info("webhook delivered", extra={"attempts": len(delivery.attempts) + 1,
                                             "status": attempt.status})
        return
    tries = len(delivery.attempts) + 1
    delay = backoff(res.settings, tries)
    ended = record.finished_at or record.created_at
    out_of_time = time.time() + delay > ended + res.settings.webhook_retry_for
    if out_of_time or ctx.get("job_try", 1) >= MAX_DELIVERY_RUNS:
        await _record(res, job_id, delivery, attempt, "failed")
        log.warning("webhook given up", extra={"attempts": tries, "reason": attempt.error})
        return
    await _record(res, job_id, delivery, attempt, "pending")
    log.info("webhook attempt failed, retrying", extra={"attempts": tries, "reason": attempt.error,
                                                        "retry_in": delay})
    raise Retry(defer=delay)


async def payload(res: WorkerResources, record: JobRecord) -> bytes:
    """The job object; images as signed URLs, so a delivery stays small whatever the request asked for."""
    as_links = record.model_copy(update={"spec": record.spec.model_copy(update={"response_format": "url"})})
    return (await render_job(as_links, res.storage)).model_dump_json(exclude_none=True).encode()


async def _record(res: WorkerResources, job_id: str, delivery: WebhookDelivery, attempt: WebhookAttempt,
                  status: Literal["pending", "delivered", "failed"]) -> None:
    updated = WebhookDelivery(url=delivery.url, status=status, attempts=[*delivery.attempts, attempt])
    await res.store.transition(job_id, TERMINAL, {"webhook": updated.model_dump(mode="json")})
