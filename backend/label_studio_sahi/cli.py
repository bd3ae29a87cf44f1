"""``ls-sahi``: serve the backend, or predict local images from the shell.

ls-sahi serve                       # the ML backend on $PORT (9090)
ls-sahi predict big.jpg --slice 512 --overlap 0.2
ls-sahi predict a.jpg b.jpg | jq    # piped: one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from label_studio_sahi.errors import BackendError
from label_studio_sahi.labelstudio.client import project_id
from label_studio_sahi.lifecycle import StopSignals, die_with_parent, stop_worker
from label_studio_sahi.private_files import private_dir, use_private_umask
from label_studio_sahi.settings import Settings, read_settings

log = logging.getLogger(__name__)

# Run by main() however the command ends, a stop signal included (the embedded Redis's stop).
_at_stop: list[Callable[[], None]] = []
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1`'s yes


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    for name in ("detector_model", "classifier_model", "device", "score_threshold", "host", "port"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "slice", None) is not None:
        size = None if args.slice == 0 else args.slice
        overrides.update(slice_height=size, slice_width=size)
    if getattr(args, "overlap", None) is not None:
        overrides.update(overlap_height_ratio=args.overlap, overlap_width_ratio=args.overlap)
    if getattr(args, "no_full_image", False):
        overrides["full_image_pass"] = False
    if getattr(args, "merge", None):
        overrides["merge_type"] = args.merge
    # An unusable value is one line naming the setting (main prints it), not a traceback.
    return read_settings(**overrides)


def _log_settings(settings: Settings) -> None:
    """The effective settings, once at start, as ``key=value`` (secrets redacted)."""
    pairs = (
        f"{key}={json.dumps(value, default=str, separators=(',', ':'))}"
        for key, value in settings.redacted.items()
    )
    log.info("settings %s", " ".join(pairs))


def _redis(settings: Settings) -> tuple[str, Any, Any]:
    """``(url, client, embedded server or None)`` for REDIS_URL or the embedded Redis."""
    from label_studio_sahi.jobs.redis_server import connect, ensure_redis

    private_dir(settings.model_dir)
    url, server = ensure_redis(settings.redis_url, settings.model_dir)
    if server is not None:
        _at_stop.append(server.stop)
    return url, connect(url), server


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from label_studio_sahi import logs
    from label_studio_sahi.serving.http_limits import uvicorn_options
    from label_studio_sahi.serving.routes import create_app
    from label_studio_sahi.serving.state import Service

    settings = _settings(args)
    logs.configure(settings.log_level)
    _log_settings(settings)
    url, client, _server = _redis(settings)
    if settings.workers > 1:
        # Each worker process builds its own app (and loads the models once); they share
        # this process's Redis, embedded or not.
        os.environ["REDIS_URL"] = url
        uvicorn.run(
            "label_studio_sahi.serving.routes:create_app", factory=True, workers=settings.workers,
            **uvicorn_options(settings),
        )  # fmt: skip
        return 0
    app = create_app(settings, Service.from_settings(settings, client))
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        # Before torch is imported anywhere in this process (and its forked work horses).
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    from label_studio_sahi import logs
    from label_studio_sahi.jobs.worker import RequeueingWorker

    settings = _settings(args)
    logs.configure(settings.log_level)
    _log_settings(settings)
    _url, client, _server = _redis(settings)
    queues = [settings.train_queue, settings.predict_queue]
    interval = settings.worker_maintenance_interval
    worker = RequeueingWorker(
        queues,
        connection=client,
        name=args.name,
        maintenance_interval=interval,
        # An idle worker blocks on the queue for worker_ttl - 15 s before it looks after its
        # registries again (rq's default: 405 s); tie that wait to the maintenance interval
        # so that a job abandoned by a dead worker is re-queued within it.
        worker_ttl=interval + 15,
        # The work horse's heartbeat; rq declares a job abandoned 60 s after the last one.
        job_monitoring_interval=min(30, interval),
    )
    # rq handles SIGTERM/SIGINT: the first finishes the current job (warm shutdown), a second
    # stops it now (cold) and RequeueingWorker puts the job back on its queue. main() then
    # stops the embedded Redis, if this process started it.
    worker.work(with_scheduler=True, burst=args.burst, logging_level=settings.log_level)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Server, one worker and an embedded Redis in one command."""
    import subprocess

    from label_studio_sahi.jobs.redis_server import ensure_redis

    settings = _settings(args)
    private_dir(settings.model_dir)
    url, server = ensure_redis(settings.redis_url, settings.model_dir)
    env = {**os.environ, "REDIS_URL": url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", "worker"],
        env=env,
        # Its own process group: a Ctrl-C at the terminal reaches this process only, which
        # passes one SIGTERM on (two would be rq's cold stop). It gets SIGTERM from the
        # kernel should this process be killed outright.
        process_group=0,
        preexec_fn=die_with_parent,
        pass_fds=_users_fds(server),
    )
    os.environ["REDIS_URL"] = url
    signals: StopSignals = args.stop_signals
    try:
        return cmd_serve(args)
    finally:
        signals.cleaning_up()  # a second SIGTERM from here on: the worker's cold stop
        stop_worker(worker, settings.worker_stop_timeout, signals.hurry)
        if server is not None:
            server.stop()


def _users_fds(server: Any) -> list[int]:
    """The embedded Redis's users lock, handed to the worker: held while either runs."""
    fd = None if server is None else server.users_fd()
    return [] if fd is None else [fd]


def cmd_train(args: argparse.Namespace) -> int:
    from label_studio_sahi.jobs.trigger import TrainingTrigger

    project = project_id(args.project)
    settings = _settings(args)
    _url, client, _server = _redis(settings)
    job = TrainingTrigger(client, settings).enqueue(project, reason="command line", delay=0)
    print(json.dumps({"job": job.id, "status": str(job.get_status())}), flush=True)
    if not args.wait:
        return 0
    from label_studio_sahi.jobs.progress import follow, show_training
    from label_studio_sahi.jobs.queueing import job_state

    state = follow(lambda: job_state(client, job.id), show_training, "training", sys.stdout)
    print(json.dumps(state), flush=True)  # the outcome: version, decision, metrics
    return 0 if state["status"] == "finished" else 1


def cmd_predict_project(args: argparse.Namespace) -> int:
    from label_studio_sahi.jobs.bulk import enqueue_bulk, job_progress
    from label_studio_sahi.jobs.progress import follow, show_bulk

    project = project_id(args.project)
    settings = _settings(args)
    _url, client, _server = _redis(settings)
    job = enqueue_bulk(client, settings, project, only_missing=not args.all)
    # The run's status: a run reused while its chunks go on has a finished planner.
    print(
        json.dumps({"job": job.id, "status": job_progress(client, project)["status"]}), flush=True
    )
    if not args.wait:
        return 0
    state = follow(lambda: job_progress(client, project), show_bulk, "predicting", sys.stdout)
    print(json.dumps(state), flush=True)
    return 0 if state["status"] == "finished" else 1


def cmd_versions(args: argparse.Namespace) -> int:
    from label_studio_sahi.versions.registry import Registry

    project = project_id(args.project)
    settings = _settings(args)
    _url, client, _server = _redis(settings)
    registry = Registry.for_settings(settings, client)
    live = registry.live(project)
    rows = []
    for version in registry.versions(project):
        candidate = version.held_out
        rows.append(
            {
                "version": version.name,
                "model_version": version.model_version,
                "live": version.name == live,
                "status": version.status,
                "parent": version.meta.get("parent"),
                "created_at": version.meta.get("created_at"),
                "map": candidate.get("map"),
                "map_50": candidate.get("map_50"),
            }
        )
    print(json.dumps({"project": project, "live": live or "base", "versions": rows}, indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from label_studio_sahi.versions.registry import Registry

    project = project_id(args.project)
    settings = _settings(args)
    _url, client, _server = _redis(settings)
    registry = Registry.for_settings(settings, client)
    target = None if args.version in ("base", "none") else registry.get(project, args.version).name
    registry.set_live(project, target)
    print(json.dumps({"project": project, "live": target or "base"}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from label_studio_sahi.images.fetch import load_local_image
    from label_studio_sahi.jobs.progress import Bar
    from label_studio_sahi.labelstudio.label_config import default_label_config, parse_label_config
    from label_studio_sahi.serving.pipeline import Predictor
    from label_studio_sahi.versions.bundles import load_base_bundle

    settings = _settings(args)
    bundle = load_base_bundle(settings)
    if args.label_config:
        xml = Path(args.label_config).read_text()
    else:
        xml = default_label_config(
            [n for _, n in sorted(bundle.detector.id2label.items())] if bundle.detector else [],
            [n for _, n in sorted(bundle.classifier.id2label.items())] if bundle.classifier else [],
        )
    config = parse_label_config(xml)
    predictor = Predictor(bundle, settings, lambda url, _task: load_local_image(url, settings))
    lines = args.jsonl or not sys.stdout.isatty()
    failed = 0
    records: list[dict[str, Any]] = []
    bar = Bar("images", total=len(args.images))  # on stderr, when it is a terminal
    try:
        for i, path in enumerate(args.images, 1):
            prediction = predictor.predict_task(
                {"data": {key: path for key in config.image_keys}}, config
            )
            record = {"image": path, **prediction.to_json()}
            if prediction.error is not None:
                failed += 1
            bar.update(i, failed=failed or None)
            if lines:
                print_records([record], sys.stdout, lines=True)  # each as soon as it is done
            else:
                records.append(record)
    finally:
        bar.close()
        predictor.close()
    if not lines:
        print_records(records, sys.stdout, lines=False)
    return 1 if failed else 0


def print_records(records: Sequence[dict[str, Any]], out: TextIO, *, lines: bool) -> None:
    """JSON lines (one compact object per line: for pipes, ``jq``, ``grep``) or, for people
    at a terminal, one indented JSON array. Either way the output as a whole parses."""
    if lines:
        for record in records:
            out.write(json.dumps(record) + "\n")
    else:
        out.write(json.dumps(list(records), indent=2) + "\n")
    out.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ls-sahi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--detector", dest="detector_model", help="hub id or folder (DETECTOR_MODEL)"
        )
        p.add_argument(
            "--classifier",
            dest="classifier_model",
            help="hub id or folder; '' disables (CLASSIFIER_MODEL)",
        )
        p.add_argument("--device", help="auto, cpu, cuda, cuda:1 (DEVICE)")

    serve = sub.add_parser("serve", help="run the ML backend HTTP server")
    model_args(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    predict = sub.add_parser("predict", help="print Label Studio results for local images")
    model_args(predict)
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument(
        "--slice",
        type=int,
        help="window size in px (default, or 0: the detector's input size, at most 512)",
    )
    predict.add_argument("--overlap", type=float, help="window overlap ratio, 0-1")
    predict.add_argument(
        "--threshold", dest="score_threshold", type=float, help="minimum box score"
    )
    predict.add_argument(
        "--merge", choices=["NMS", "NMM", "GREEDYNMM"], help="how window boxes merge"
    )
    predict.add_argument("--no-full-image", action="store_true", help="skip the whole-image pass")
    predict.add_argument("--label-config", help="a Label Studio labeling config (XML file)")
    predict.add_argument(
        "--jsonl",
        action="store_true",
        help="one JSON object per line (the default when stdout is not a terminal); "
        "on a terminal the output is one JSON array",
    )
    predict.set_defaults(func=cmd_predict)

    worker = sub.add_parser("worker", help="run an rq worker for fine-tuning and bulk prediction")
    worker.add_argument("--gpu", help="GPU index for this worker (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--name", help="worker name (default: rq's)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)

    up = sub.add_parser("up", help="server + worker + embedded Redis")
    model_args(up)
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.set_defaults(func=cmd_up)

    train = sub.add_parser("train", help="queue fine-tuning of a project now")
    train.add_argument("project")
    train.add_argument(
        "--wait",
        action="store_true",
        help="follow the job (stage, step, loss, ETA) until it ends; a bar on a terminal",
    )
    train.set_defaults(func=cmd_train)

    bulk = sub.add_parser("predict-project", help="queue predictions for every task of a project")
    bulk.add_argument("project")
    bulk.add_argument(
        "--all", action="store_true", help="also tasks that have a prediction of the live version"
    )
    bulk.add_argument(
        "--wait", action="store_true", help="follow the job until it ends; a bar on a terminal"
    )
    bulk.set_defaults(func=cmd_predict_project)

    versions = sub.add_parser("versions", help="list a project's checkpoint versions")
    versions.add_argument("project")
    versions.set_defaults(func=cmd_versions)

    rollback = sub.add_parser("rollback", help="make a project's earlier version live")
    rollback.add_argument("project")
    rollback.add_argument("version", help="v3, p1-v3, or 'base' for the base models")
    rollback.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_private_umask()  # what it writes under MODEL_DIR (checkpoints, Redis) is 0600/0700
    # SIGTERM/SIGINT become SystemExit, so the finally below (and the commands') runs.
    args.stop_signals = StopSignals().install()
    try:
        return int(args.func(args))
    except BackendError as exc:
        # One clear line (e.g. the hub is unreachable: where to point DETECTOR_MODEL instead).
        print(f"ls-sahi: error: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`ls-sahi predict *.png | head -1`): stop quietly, as `yes | head`
        # does. Python flushes stdout again at exit and would fail once more, so stdout
        # points at /dev/null from here (the recipe in the docs of the signal module).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        args.stop_signals.cleaning_up()
        while _at_stop:
            _at_stop.pop()()


if __name__ == "__main__":
    sys.exit(main())
