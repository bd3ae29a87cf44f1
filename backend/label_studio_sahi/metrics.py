"""Prometheus metrics of the backend (served as text on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Buckets from 5 ms (health, setup) to 100 s (Label Studio's predict timeout).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)

REQUESTS = Counter(
    "ls_sahi_requests_total", "HTTP requests answered, by route and status.", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "ls_sahi_request_seconds", "HTTP request latency by route.", ["route"], buckets=LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "ls_sahi_stage_seconds",
    "Time per pipeline stage (fetch, slice, preprocess, detector, postprocess, merge, classifier).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
TASKS = Counter("ls_sahi_tasks_total", "Tasks predicted (including failed ones).")
TASK_ERRORS = Counter(
    "ls_sahi_task_errors_total", "Tasks whose prediction failed, by error.", ["error"]
)
MODEL_INFO = Gauge(
    "ls_sahi_model_info",
    "1 for the model version each project is served with.",
    ["project", "model_version"],
)
STORE_ERRORS = Counter(
    "ls_sahi_store_errors_total",
    "Object store (MODEL_STORE) calls that failed, and downloads that failed their checksums.",
    ["operation"],
)
