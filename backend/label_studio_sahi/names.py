"""Names that live outside the code: in Redis, on disk and in Label Studio.

Every Redis key, job id, queue name, folder layout and version format the backend writes
is defined here and nowhere else (a test greps the code for stray copies). Each outlives
the process that wrote it, so renaming one is a data migration, not a refactor: the line
above each name says what breaks.
"""

from __future__ import annotations

import re
from pathlib import Path

# --- rq: what a queued job stores --------------------------------------------------------
# rq stores the dotted path of the function in every queued job and imports it in the
# worker: moving or renaming either function strands jobs already queued (they fail with
# an import error).
TRAIN_JOB = "label_studio_sahi.training.job.train_project"
BULK_JOB = "label_studio_sahi.jobs.bulk.predict_project"
# One chunk of a bulk run (BULK_CHUNK_TASKS tasks), queued by BULK_JOB's planner.
BULK_CHUNK_JOB = "label_studio_sahi.jobs.bulk.predict_chunk"

# Default queue names (settings TRAIN_QUEUE / PREDICT_QUEUE): workers listen by name, so
# a worker and a server that disagree never meet.
TRAIN_QUEUE = "ls-sahi-train"
PREDICT_QUEUE = "ls-sahi-predict"


def train_job_id(project: str) -> str:
    """The one fine-tuning job id a project has. Changing it lets a project have two jobs
    at once (the queued one under the old id is no longer found). rq splits ids on ``:``,
    so an id never contains one."""
    return f"ls-sahi-train-{project}"


def bulk_job_id(project: str) -> str:
    """The one bulk-prediction job id a project has (same rule as ``train_job_id``)."""
    return f"ls-sahi-predict-{project}"


def bulk_chunk_job_id(project: str, run: str, index: int) -> str:
    """Chunk ``index`` of bulk run ``run`` (hex, no '-') of a project. Its own prefix, and
    run and index read from the right, so it never equals another project's job id or
    chunk; renaming it loses track of a run's chunks still queued."""
    return f"ls-sahi-bulk-{project}-{run}-{index}"


# --- Redis keys and channels -------------------------------------------------------------
# Annotation changes counted towards TRAIN_AFTER_ANNOTATIONS: renaming forgets the counts.
CHANGES_KEY = "ls-sahi:changes:{project}"
# Short lock around check-then-enqueue, shared by every serving process: all must agree.
ENQUEUE_LOCK_KEY = "ls-sahi:enqueue-lock:{job_id}"
# Held by a training run for its whole length: a second run of a project waits, so it
# never deletes the first's temporary folder or publishes between its steps.
RUN_LOCK_KEY = "ls-sahi:run-lock:{project}"
# The live version of a project: renaming sends every project back to its base model.
LIVE_KEY = "ls-sahi:live:{project}"
LIVE_PATTERN = LIVE_KEY.format(project="*")
# Its value after a rollback to the base models. No key at all means Redis lost it (a new
# or flushed Redis): the project then serves its newest accepted version. Before this
# value existed, a rollback to base deleted the key.
LIVE_BASE = "base"
# Announcements of live-version changes: servers on another name only notice by polling.
LIVE_CHANNEL = "ls-sahi:live"

# --- on disk, under MODEL_DIR ------------------------------------------------------------
# MODEL_DIR/projects/<project>/v<N>/{detector,classifier,meta.json,curves.png}. Existing
# versions are only found under these names: renaming any hides them (and rollback too).
PROJECTS_DIR = "projects"
DETECTOR_DIR = "detector"
CLASSIFIER_DIR = "classifier"
META_FILE = "meta.json"
CURVES_FILE = "curves.png"
VERSION_DIR = re.compile(r"^v(\d+)$")
# In an object store (MODEL_STORE), beside a version's files under the same layout: the
# list of them with sizes and checksums, written last. A version without one is invisible.
MANIFEST_FILE = "manifest.json"
# Unfinished writes and deletions: never listed, cleaned by the next run.
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# The embedded Redis (socket and AOF) of a MODEL_DIR: renaming starts an empty queue.
REDIS_DIR = "redis"
REDIS_SOCKET = "redis.sock"
# Locks beside it: one process at a time checks for and starts the server; every process
# using it holds the users lock shared, and the last one out shuts it down.
REDIS_START_LOCK = "start.lock"
REDIS_USERS_LOCK = "users.lock"
# The generated basic-auth login of a MODEL_DIR: renaming generates a new password, and
# Label Studio's stored one stops working until ls-sahi-connect runs again.
AUTH_FILE = "auth.json"
# A project id as a folder and key part: digits, letters, '_' and '-' (never ':' or '/').
PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def projects_root(model_dir: Path) -> Path:
    return model_dir / PROJECTS_DIR


def version_name(number: int) -> str:
    return f"v{number}"


# --- what Label Studio sees --------------------------------------------------------------
def model_version(project: str, name: str) -> str:
    """``p<project>-v<N>``: Label Studio stores it with every prediction and compares it
    with /setup's answer to decide what to re-predict; a new format makes every stored
    prediction look stale."""
    return f"p{project}-{name}"


# --- meta.json fields (read by the registry, the CLI, /versions and the rollback) --------
# Renaming a field makes old versions read as if it were missing.
META_STATUS = "status"  # "accepted" | "rejected"
META_RUN_ID = "run_id"  # rq retries of one run find the version it already published
META_PARENT = "parent"
# The live version a run started from (None: the base): a retry after a crash between
# publish and set_live promotes only if the project is still there.
META_PARENT_LIVE = "parent_live"
META_CREATED_AT = "created_at"
META_METRICS = "metrics"
