"""The rq worker that ``ls-sahi worker`` runs: rq's, with a cold stop that loses no job."""

from __future__ import annotations

import logging
from types import FrameType
from typing import Any

from rq import Queue, Worker
from rq.job import Job, JobStatus

log = logging.getLogger(__name__)


class RequeueingWorker(Worker):
    """rq's ``Worker``, except that a job its cold stop cuts short goes back on its queue
    (at the front) at once: rq alone leaves it "started" until a maintenance pass, a
    minute or more later, declares it abandoned, and then re-runs it only if it has rq
    ``Retry`` (training jobs and bulk chunks do). A stop is not the job's fault,
    so it does not use up one of its retries."""

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        execution = self.execution if self.horse_pid else None
        job = self.get_current_job() if execution is not None else None
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            if job is not None and execution is not None:
                self._requeue(job, execution)
            raise

    def _requeue(self, job: Job, execution: Any) -> None:
        if job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED):
            return  # it ended while the work horse was being stopped
        queue = Queue(job.origin, connection=self.connection, serializer=self.serializer)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        queue.enqueue_job(job, at_front=True)
        log.warning("job_requeued_on_cold_stop job=%s queue=%s", job.id, job.origin)
