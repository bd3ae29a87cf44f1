"""Where bulk-prediction jobs queued before the move to ``jobs.bulk`` find their function.

rq stores a job's function as a dotted path (``label_studio_sahi.bulk_predict.predict_project``
until the package took subpackages); a job queued then must still run after an upgrade.
It now plans a run: its tasks in chunk jobs, pinned to the version live when it starts
(it was queued with no version). New jobs are enqueued under ``names.BULK_JOB``.
"""

from label_studio_sahi.jobs.bulk import predict_project

__all__ = ["predict_project"]
