"""Redis keys, channels and Socket.IO names shared by the front end and the workers."""

JOB_KEY = "imagegw:job:{}"
WAKE_CHANNEL = "imagegw:wake"
SOCKETIO_CHANNEL = "imagegw:socketio"
SIGNING_SECRET_KEY = "imagegw:signing-secret"
WORKER_HEARTBEAT_KEY = "imagegw:worker:{}"
STORAGE_SWEEP_KEY = "imagegw:storage-sweep"  # held by the one process deleting expired objects this interval

JOB_FUNCTION = "run_image_job"

PROGRESS_NAMESPACE = "/image-progress"
JOB_ROOM = "job:{}"

EVENT_PROGRESS = "progress"
EVENT_PARTIAL_IMAGE = "partial_image"
EVENT_COMPLETED = "completed"
EVENT_FAILED = "failed"
TERMINAL_EVENTS = frozenset({EVENT_COMPLETED, EVENT_FAILED})
