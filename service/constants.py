"""Redis keys, channels and Socket.IO names shared by the front end and the workers."""

JOB_KEY = "imagegw:job:{}"
WAKE_CHANNEL = "imagegw:wake"
SOCKETIO_CHANNEL = "imagegw:socketio"
SIGNING_SECRET_KEY = "imagegw:signing-secret"
WORKER_HEARTBEAT_KEY = "imagegw:worker:{}"
STORAGE_SWEEP_KEY = "imagegw:storage-sweep"  # held by the one process deleting expired objects this interval

# API keys: the record under the SHA-256 of its secret, the index of ids, and the flag set with the first key
# created and never cleared (dev mode is over for good, even when every key is revoked again)
API_KEY = "imagegw:apikey:{}"
API_KEY_IDS = "imagegw:apikeys"
API_KEYS_IN_USE = "imagegw:apikeys-in-use"
# per-key admission state, by job owner: sliding-window logs, job leases, images charged against the budget
LIMIT_REQUESTS = "imagegw:limit:{}:requests"
LIMIT_IMAGES = "imagegw:limit:{}:images"
LIMIT_JOBS = "imagegw:limit:{}:jobs"
LIMIT_QUEUED = "imagegw:limit:{}:queued"
QUEUE_LEASES = "imagegw:limit:queue"  # every key's waiting jobs: what the queue cap counts
BUDGET_USED = "imagegw:budget:{}"
IDEMPOTENCY_KEY = "imagegw:idempotency:{}:{}"
SETTLED_KEY = "imagegw:settled:{}"  # set once when a job's end has been accounted for
USAGE_LOG = "imagegw:usage:{}"  # per key id: one JSON record per finished job, scored by its end time
USAGE_KEYS = "imagegw:usage-keys"
# cluster-wide counters written by workers, exported by every front end's /metrics
METRICS_JOBS = "imagegw:metrics:jobs"
METRICS_JOB_SECONDS = "imagegw:metrics:job-seconds"
METRICS_UPSTREAM_ERRORS = "imagegw:metrics:upstream-errors"

JOB_FUNCTION = "run_image_job"
WEBHOOK_FUNCTION = "deliver_webhook"
WEBHOOK_JOB_ID = "webhook:{}"

PROGRESS_NAMESPACE = "/image-progress"
JOB_ROOM = "job:{}"

EVENT_PROGRESS = "progress"
EVENT_PARTIAL_IMAGE = "partial_image"
EVENT_COMPLETED = "completed"
EVENT_FAILED = "failed"
TERMINAL_EVENTS = frozenset({EVENT_COMPLETED, EVENT_FAILED})
