"""Every setting of the backend, read once from the environment (or a .env file).

Names follow Label Studio's ML backend conventions where one exists (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``MODEL_DIR``, ``PORT``...). Everything else is named after what
it controls. Code receives a ``Settings`` object; nothing below reads ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from label_studio_sahi import names
from label_studio_sahi.errors import BackendError

# How boxes found in overlapping windows are merged (sahi's names; slicing.py implements
# them): non-maximum suppression, non-maximum merging, greedy NMM; and the overlap measure,
# intersection over union or over the smaller box. Defined here, free of torch, so that
# settings never import the geometry.
MergeType = Literal["NMS", "NMM", "GREEDYNMM"]
MatchMetric = Literal["IOU", "IOS"]
# What runs the detector's forward pass (inference.onnx_engine): `auto` is ONNX Runtime on a CPU and
# PyTorch on CUDA.
Engine = Literal["auto", "torch", "onnxruntime"]
# The smallest MAX_REQUEST_BYTES accepted: below it, ordinary /setup and /predict bodies (a
# labeling config with a few dozen labels is several KiB) would all be refused.
MIN_REQUEST_BYTES = 64 * 2**10
# What a task's prediction score measures (scores.py says how each is computed).
TaskScore = Literal[
    "least_confidence", "margin", "mean_confidence", "total_uncertainty", "disagreement"
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # --- server -------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Bind address of the HTTP server.")
    port: int = Field(9090, description="HTTP port (Label Studio's ML backend default).")
    workers: int = Field(
        1, ge=1, description="uvicorn worker processes; each loads the models once."
    )
    threads: int = Field(4, ge=1, description="Concurrent /predict requests per process.")
    log_level: str = Field("INFO", description="Python log level.")
    auth: Literal["auto", "basic", "off"] = Field(
        "auto",
        description="HTTP basic auth: `auto` = on unless HOST is a loopback address; `basic` = "
        "always; `off` = never (only behind a proxy that authenticates).",
    )
    basic_auth_user: str | None = Field(
        None,
        description="Basic-auth user; unset with auth on: `label-studio` and a generated "
        "password, kept in MODEL_DIR/auth.json.",
    )
    basic_auth_pass: SecretStr | None = Field(
        None, description="Basic-auth password (required, non-empty, with BASIC_AUTH_USER)."
    )
    metrics_open: bool = Field(
        False,
        description="Serve /metrics without auth (a Prometheus scraper on a private network).",
    )
    # NoDecode: the environment gives "localhost,ml.example.org:9090"; the validator splits it.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [],
        description="Host headers served (names on any port, host:port, `*` = any); others "
        "get 400, on every route (/health too: probes of a loopback bind say localhost). "
        "Unset: on a loopback HOST `localhost,127.0.0.1,[::1]` (a page whose DNS name is "
        "rebound to 127.0.0.1 gets nothing); on any other HOST any host (Label Studio "
        "reaches the backend by whatever name the deployer chose; the login guards it).",
    )

    # --- Label Studio -------------------------------------------------------------------
    label_studio_url: str | None = Field(
        None, description="Base URL of Label Studio, for /data/upload URLs, presigning and the API."
    )
    label_studio_api_key: SecretStr | None = Field(
        None, description="Legacy token or personal access token (PAT) of a Label Studio user."
    )
    local_files_document_root: Path | None = Field(
        None, description="Read /data/local-files/?d= paths directly under this folder."
    )

    # --- models -------------------------------------------------------------------------
    detector_model: str = Field(
        "facebook/detr-resnet-50", description="Hub id or local folder of an object detector."
    )
    classifier_model: str = Field(
        "google/vit-base-patch16-224",
        description="Hub id or local folder of an image classifier; empty disables Choices.",
    )
    model_dir: Path = Field(
        Path("~/.local/share/label-studio-sahi").expanduser(),
        description="Checkpoints, the embedded Redis socket and job files live here.",
    )
    model_store: str = Field(
        "",
        description="Where versions live for several machines: s3://bucket/prefix on any "
        "S3-compatible store (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID... configure the client); "
        "empty: MODEL_DIR itself.",
    )
    model_cache_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="With MODEL_STORE: bytes of downloaded versions kept under MODEL_DIR (the "
        "live ones are always kept).",
    )
    store_timeout_seconds: float = Field(
        10.0, gt=0, description="Connect and read timeout of each object store call."
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'..."
    )
    half_precision: bool = Field(True, description="Run models in float16 on CUDA.")
    torch_threads: int | None = Field(
        None, description="torch intra-op threads on CPU (None: torch's default)."
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the models' forward on CUDA (slow first requests; eager "
        "again if it fails).",
    )
    detector_engine: Engine = Field(
        "auto",
        description="What runs the detector: `torch`, `onnxruntime` (CPU: exported at load or "
        "by the worker at publish, used only if its boxes equal PyTorch's), `auto` = "
        "onnxruntime on CPU, torch on CUDA.",
    )

    # --- prediction ---------------------------------------------------------------------
    score_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Drop boxes below this score (a tag's model_score_threshold wins).",
    )
    task_score: TaskScore = Field(
        "total_uncertainty",
        description="What a task's prediction score measures: `total_uncertainty`, "
        "`mean_confidence`, `least_confidence`, `margin` or `disagreement` (a labeling "
        "config's task_score attribute wins).",
    )
    classifier_top_k: int = Field(
        1, ge=1, description="Choices suggested for multiple-choice tags."
    )
    classifier_threshold: float = Field(
        0.0, ge=0, le=1, description="Drop class suggestions below this."
    )

    # --- slicing (sahi's get_sliced_prediction defaults, but for the window size) ---------
    slice_height: int | None = Field(
        None,
        ge=32,
        description="Window height in px; `auto`: the detector's input size, at most 512 "
        "(a window is never shrunk into the model: fine-tuning stops paying there).",
    )
    slice_width: int | None = Field(
        None, ge=32, description="Window width in px; `auto`: as SLICE_HEIGHT."
    )
    overlap_height_ratio: float = Field(0.2, ge=0, lt=1, description="Vertical overlap of windows.")
    overlap_width_ratio: float = Field(
        0.2, ge=0, lt=1, description="Horizontal overlap of windows."
    )
    full_image_pass: bool = Field(True, description="Also run the model on the whole image.")
    merge_type: MergeType = Field("GREEDYNMM", description="How boxes from windows are merged.")
    merge_metric: MatchMetric = Field("IOS", description="Overlap measure used when merging.")
    merge_threshold: float = Field(0.5, ge=0, le=1, description="Overlap above which boxes merge.")
    merge_class_agnostic: bool = Field(False, description="Merge boxes of different classes too.")
    native_window_size: bool = Field(
        False,
        description="Windows go to the detector at their own size, not resized to the "
        "processor's (512 px windows not upscaled to 800: 2.4x fewer pixels).",
    )
    window_batch_size: int | None = Field(
        None,
        ge=1,
        description="Windows per forward pass; `auto`: 1 on CPU (larger batches only cost "
        "memory and time there), on CUDA as many as half the free memory holds (measured "
        "once, at most 32).",
    )

    # --- limits ---------------------------------------------------------------------------
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="Largest image download, bytes.")
    max_image_pixels: int = Field(200_000_000, ge=1, description="Largest image, width x height.")
    max_request_pixels: int = Field(
        600_000_000,
        ge=1,
        description="Most image pixels one /predict request loads, all tasks together.",
    )
    # NoDecode: the environment gives "JPEG,PNG"; the validator below splits it.
    allowed_image_formats: Annotated[list[str], NoDecode] = Field(
        ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO"],
        description="PIL format names accepted.",
    )
    image_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to connect to an image host."
    )
    image_read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for image bytes.")
    image_download_deadline: float = Field(
        120.0, gt=0, description="Seconds one image download may take in all, redirects included."
    )
    image_min_bytes_per_second: int = Field(
        4096,
        ge=0,
        description="Slowest image download kept 5 s after its first byte (0: no floor).",
    )
    egress_allow: Annotated[list[str], NoDecode] = Field(
        [],
        description="Private, loopback or link-local image hosts that may be fetched: hosts, "
        "host:port or networks (LABEL_STUDIO_URL's host always may).",
    )
    max_tasks_per_request: int = Field(64, ge=1, description="Largest /predict batch.")
    max_request_bytes: int = Field(
        16 * 2**20,
        ge=MIN_REQUEST_BYTES,
        description="Largest request body, bytes (at least 65536: a labeling config is sent "
        "with every /setup and /predict).",
    )
    max_waiting_requests: int = Field(
        32,
        ge=0,
        description="/predict requests that may wait for a free thread; more get 503 (0: "
        "none wait, a request runs only if a thread is free).",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's headers, from connecting or "
        "from the end of its previous request; then the connection is closed (408).",
    )
    body_deadline: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's whole body, from the end of "
        "its headers; then 408 and the connection is closed.",
    )
    max_project_models: int = Field(
        16,
        ge=1,
        description="Fine-tuned projects kept loaded per process (least recently used unloaded).",
    )
    config_cache_bytes: int = Field(
        8 * 2**20,
        ge=0,
        description="Labeling configs kept per project from /setup, bytes of XML in all.",
    )
    image_fetch_concurrency: int = Field(
        8, ge=1, description="Images downloaded at once per request."
    )

    # --- queue ------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis for jobs and live pointers; unset: an embedded Redis under MODEL_DIR.",
    )
    train_queue: str = Field(names.TRAIN_QUEUE, description="rq queue of fine-tuning jobs.")
    predict_queue: str = Field(names.PREDICT_QUEUE, description="rq queue of bulk prediction jobs.")
    bulk_chunk_tasks: int = Field(
        50,
        ge=1,
        description="Tasks per bulk-prediction job: a project's tasks are split into jobs of "
        "this many, which free workers take (each loads the models once).",
    )
    job_timeout: int = Field(
        6 * 3600, ge=60, description="Seconds a job may run before rq stops it."
    )
    job_retries: int = Field(3, ge=0, description="Times rq re-runs a failed or abandoned job.")
    worker_maintenance_interval: int = Field(
        30,
        ge=1,
        description="Seconds between a worker's checks for jobs abandoned by a dead worker.",
    )
    worker_stop_timeout: float = Field(
        90.0,
        gt=0,
        description="Seconds `ls-sahi up` lets its worker finish the running job on SIGTERM; "
        "then it stops the job and puts it back on the queue.",
    )

    # --- training trigger ---------------------------------------------------------------------
    train_after_annotations: int = Field(
        10, ge=1, description="New or changed annotations that start fine-tuning of a project."
    )
    train_debounce_seconds: float = Field(
        30.0, ge=0, description="Wait this long after the trigger so a burst of labels trains once."
    )

    # --- fine-tuning --------------------------------------------------------------------------
    train_epochs: float = Field(
        3.0, gt=0, description="Passes over the training windows per fine-tuning job."
    )
    train_min_steps: int = Field(
        200, ge=1, description="Fewest optimizer steps per job, however few the windows."
    )
    # 5000 gives 100 labels of the benchmark (about 6,000 windows at 128 px) their 3 passes;
    # at 2000 the rounds at 50 and 100 labels rose on 1 seed of 3, at 5000 on 2 (bench/LOG.md,
    # "Geometry"). A 4,500-step job of the tiny model takes about 8 minutes on a shared CPU
    # core: lower it on a CPU-only worker if a round must be quick.
    train_steps: int = Field(
        5000, ge=1, description="Most optimizer steps per job, however many the windows."
    )
    train_batch_size: int = Field(4, ge=1, description="Training windows per step.")
    learning_rate: float = Field(
        1e-4, gt=0, description="AdamW learning rate (transformer and heads)."
    )
    backbone_learning_rate: float = Field(
        1e-5, gt=0, description="AdamW learning rate of the backbone."
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(0.1, gt=0, description="Gradient norm clip (DETR's recipe).")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of labelled tasks held out for evaluation."
    )
    min_area_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Keep a box in a training window when this share of it is inside (sahi's default).",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Learning rate over a job: constant, or a 10 % warm-up then cosine decay.",
    )
    train_full_image: bool = Field(
        True,
        description="Train on each whole image as one more window (the full-image pass's scale).",
    )
    parent_weight_share: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of the parent's weights in a second candidate, the fine-tuned one "
        "averaged with its parent (WiSE-FT), which the held-out tasks weigh against the "
        "fine-tuned one; 0: no second candidate.",
    )
    train_augment: bool = Field(
        True,
        description="Train on windows at random places around objects too, flipped and colour-jittered.",
    )
    # 0.95, the conventional level, not 0.8: candidates better in 82-84 % of the draws of 6
    # held-out images scored below their parent on the test split (bench/LOG.md, Geometry).
    promote_confidence: float = Field(
        0.95,
        ge=0,
        lt=1,
        description="Promote a candidate only when a paired bootstrap over held-out images finds it better this often (on a mAP tie: fewer corrections, also by a sign test over the images).",
    )
    negative_window_ratio: float = Field(
        0.25, ge=0, le=1, description="Share of windows without boxes kept as negatives."
    )
    keep_versions: int = Field(
        5,
        ge=1,
        description="Accepted versions kept per project, and as many rejected ones (the live one always).",
    )
    swap_poll_seconds: float = Field(
        10.0,
        gt=0,
        description="Serving processes check the live version this often if pub/sub is lost.",
    )

    @field_validator("egress_allow", "allowed_image_formats", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object, info: ValidationInfo) -> object:
        # Environment variables are plain strings: accept "JPEG,PNG" as well as JSON lists.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            return (
                [p.upper() for p in parts] if info.field_name == "allowed_image_formats" else parts
            )
        return value

    @model_validator(mode="after")
    def _password_with_user(self) -> Settings:
        # An empty password is as good as none: refuse it rather than accept ":" as a login.
        if self.basic_auth_user and not (
            self.basic_auth_pass and self.basic_auth_pass.get_secret_value()
        ):
            raise ValueError("BASIC_AUTH_USER is set but BASIC_AUTH_PASS is empty: set both")
        return self

    @field_validator("slice_height", "slice_width", "window_batch_size", mode="before")
    @classmethod
    def _auto_is_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "auto", "none"}:
            return None
        return value

    @field_validator("model_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value:
            from label_studio_sahi.versions.store import StoreLocation

            StoreLocation.parse(value)  # a clear error at start, not at the first publish
        return value

    @property
    def redacted(self) -> dict[str, object]:
        """Settings as a dict safe to log: secrets (the API key, the basic-auth password)
        appear as ``**********``, and so does the user:password part of any URL
        (``REDIS_URL=redis://:pw@host`` becomes ``redis://**********@host``)."""
        return {k: _redact_value(v) for k, v in self}


REDACTED = "**********"


def _redact_value(value: object) -> object:
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, str) and "@" in value and "://" in value:
        scheme, rest = value.split("://", 1)
        authority, sep, path = rest.partition("/")
        if "@" in authority:
            return f"{scheme}://{REDACTED}@{authority.rsplit('@', 1)[1]}{sep}{path}"
    return value


# The settings that shape a fine-tuned version (what it learns from, how, and how it is
# judged); each version's meta.json records their values.
VERSION_SETTINGS = (
    "slice_height",
    "slice_width",
    "overlap_height_ratio",
    "overlap_width_ratio",
    "full_image_pass",
    "merge_type",
    "merge_metric",
    "merge_threshold",
    "merge_class_agnostic",
    "train_epochs",
    "train_min_steps",
    "train_steps",
    "train_batch_size",
    "train_augment",
    "parent_weight_share",
    "train_full_image",
    "lr_schedule",
    "promote_confidence",
    "learning_rate",
    "backbone_learning_rate",
    "weight_decay",
    "grad_clip",
    "holdout_fraction",
    "min_area_ratio",
    "negative_window_ratio",
)


class SettingsError(BackendError):
    """A setting the backend cannot start with (a limit that would refuse every request, a
    timeout of 0...); the message names the setting as the environment spells it."""

    code = "bad_setting"


def read_settings(**overrides: object) -> Settings:
    """Settings from the environment and ``overrides``; an invalid value raises
    :class:`SettingsError` with one line naming each bad setting (what ``ls-sahi`` prints)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        if not field:  # a rule across settings: its message names them
            parts.append(message)
            continue
        value = err.get("input")
        info = Settings.model_fields.get(field)
        secret = info is not None and "SecretStr" in str(info.annotation)  # never echo one
        shown = "" if secret or isinstance(value, dict) else f"={_redact_value(value)}"
        parts.append(f"{field.upper()}{shown}: {message}")
    return "invalid settings: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
