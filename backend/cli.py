"""``ls-sahi``: serve the backend, or predict local images from the shell.

ls-sahi serve                       # the ML backend on $PORT (9090)
ls-sahi predict big.jpg --slice 512 --overlap 0.2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from backend.errors import BackendError
from backend.settings import Settings


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
    return Settings(**overrides)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend import logs
    from backend.server import create_app

    settings = _settings(args)
    logs.configure(settings.log_level)
    if settings.workers > 1:
        # Each worker process builds its own app (and loads the models once).
        uvicorn.run(
            "backend.server:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
        )
        return 0
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None)
    return 0


def default_label_config(detector_classes: Sequence[str], classifier_classes: Sequence[str]) -> str:
    """A config naming every model class, for predicting without a Label Studio project."""
    labels = "".join(f'<Label value="{name}"/>' for name in detector_classes)
    choices = "".join(f'<Choice value="{name}"/>' for name in classifier_classes)
    parts = ['<View><Image name="image" value="$image"/>']
    if labels:
        parts.append(f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels>')
    if choices:
        parts.append(f'<Choices name="class" toName="image">{choices}</Choices>')
    return "".join(parts) + "</View>"


def cmd_predict(args: argparse.Namespace) -> int:
    from backend.images import load_local_image
    from backend.labeling import parse_label_config
    from backend.predict import Predictor
    from backend.service import load_base_bundle

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
    failed = 0
    try:
        for path in args.images:
            prediction = predictor.predict_task(
                {"data": {key: path for key in config.image_keys}}, config
            )
            record = {"image": path, **prediction.to_json()}
            if prediction.error is not None:
                failed += 1
            print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2))
    finally:
        predictor.close()
    return 1 if failed else 0


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
    predict.add_argument("--slice", type=int, help="window size in px (0: automatic)")
    predict.add_argument("--overlap", type=float, help="window overlap ratio, 0-1")
    predict.add_argument(
        "--threshold", dest="score_threshold", type=float, help="minimum box score"
    )
    predict.add_argument(
        "--merge", choices=["NMS", "NMM", "GREEDYNMM"], help="how window boxes merge"
    )
    predict.add_argument("--no-full-image", action="store_true", help="skip the whole-image pass")
    predict.add_argument("--label-config", help="a Label Studio labeling config (XML file)")
    predict.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BackendError as exc:
        # One clear line (e.g. the hub is unreachable: where to point DETECTOR_MODEL instead).
        print(f"ls-sahi: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
