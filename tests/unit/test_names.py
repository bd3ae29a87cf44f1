"""Every name that outlives a process is spelled once, in ``names.py``.

Redis keys, job ids, queue names, job paths, the folder layout under MODEL_DIR and the
version formats are data: a copy that drifts from ``names.py`` strands queued jobs or hides
stored versions. The scan below reads the string literals and f-strings of the backend and
the plugin (with ``ast``, so docstrings and comments may still mention the names) and
fails on any that spells one of these formats itself, naming the file and line.
"""

from __future__ import annotations

import ast
import importlib
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import pytest

from label_studio_sahi import names

ROOT = Path(__file__).resolve().parents[2]
NAMES_PY = ROOT / "backend" / "label_studio_sahi" / "names.py"

# A Redis key or channel: "ls-sahi:" not followed by a space ("ls-sahi: error: ..." is the
# command line's prefix for its messages).
REDIS_KEY = re.compile(r"ls-sahi:(?!\s)")
REDIS_WHY = "a Redis key or channel (names.*_KEY, names.LIVE_CHANNEL)"
# Fragments that no string literal outside names.py may contain.
CONTAINS = {
    "ls-sahi-train": "the training queue or job id (names.TRAIN_QUEUE, names.train_job_id)",
    "ls-sahi-predict": "the bulk queue or job id (names.PREDICT_QUEUE, names.bulk_job_id)",
    "label_studio_sahi.training.job": "a job path (names.TRAIN_JOB)",
    "label_studio_sahi.jobs.bulk": "a job path (names.BULK_JOB)",
}
# Path segments (a literal split on '/') that only names.py may spell; a segment right after
# "api" is a Label Studio API path ("/api/projects/{id}"), not a folder.
SEGMENTS = {
    "projects": "the projects folder (names.PROJECTS_DIR, names.projects_root)",
    "meta.json": "a version's metadata file (names.META_FILE)",
    "curves.png": "a version's training curves (names.CURVES_FILE)",
    "redis.sock": "the embedded Redis socket (names.REDIS_SOCKET)",
}
SEGMENT_PREFIXES = {
    ".tmp-": "an unfinished write (names.TMP_PREFIX)",
    ".trash-": "a deletion in progress (names.TRASH_PREFIX)",
}
# A version or model-version format: "v{n}", ".../v{n}", "p{project}-...", "v%d", "v{}".
VERSION_HEAD = re.compile(r"(?:^|[^A-Za-z0-9])[pv]$")
VERSION_TEMPLATE = re.compile(r"(?:^|[^A-Za-z0-9])[pv](?:%[ds]|\{\})")
VERSION_REGEX = re.compile(r"v\(?\\d")
VERSION_WHY = "a version or model-version format (names.version_name, names.model_version)"


@dataclass(frozen=True)
class Stray:
    line: int
    literal: str
    why: str


def _literal_problems(text: str) -> list[str]:
    """Why a string literal (or one constant part of an f-string) spells a stored name."""
    found = [REDIS_WHY] if REDIS_KEY.search(text) else []
    found += [why for fragment, why in CONTAINS.items() if fragment in text]
    parts = text.split("/")
    segments = [part for i, part in enumerate(parts) if i == 0 or parts[i - 1] != "api"]
    found += [why for name, why in SEGMENTS.items() if name in segments]
    found += [
        why
        for prefix, why in SEGMENT_PREFIXES.items()
        if any(segment.startswith(prefix) for segment in segments)
    ]
    if VERSION_TEMPLATE.search(text) or VERSION_REGEX.search(text):
        found.append(VERSION_WHY)
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string statements (docstrings and bare strings): prose, not names."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def stray_literals(source: str, filename: str = "<source>") -> list[Stray]:
    """String literals and f-strings in ``source`` that spell a name ``names.py`` owns."""
    tree = ast.parse(source, filename)
    prose = _docstrings(tree)
    in_fstring = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in node.values
    }
    strays: list[Stray] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            literal = ast.unparse(node)
            whys = [
                why
                for part in node.values
                if isinstance(part, ast.Constant) and isinstance(part.value, str)
                for why in _literal_problems(part.value)
            ]
            for part, after in zip(node.values, node.values[1:], strict=False):
                if (
                    isinstance(part, ast.Constant)
                    and isinstance(part.value, str)
                    and isinstance(after, ast.FormattedValue)
                    and VERSION_HEAD.search(part.value)
                ):
                    whys.append(VERSION_WHY)
            strays += [Stray(node.lineno, literal, why) for why in dict.fromkeys(whys)]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in prose
            and id(node) not in in_fstring
        ):
            strays += [
                Stray(node.lineno, repr(node.value), why) for why in _literal_problems(node.value)
            ]
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and isinstance(node.left, ast.Constant)
            and node.left.value in ("v", "p")
        ):
            strays.append(Stray(node.lineno, ast.unparse(node), VERSION_WHY))
    return sorted(strays, key=lambda stray: stray.line)


def _sources() -> list[Path]:
    files = sorted((ROOT / "backend").rglob("*.py")) + sorted((ROOT / "plugin").rglob("*.py"))
    return [path for path in files if path != NAMES_PY]


def test_the_scan_sees_the_code_it_guards() -> None:
    relative = {path.relative_to(ROOT).as_posix() for path in _sources()}
    assert {
        "backend/label_studio_sahi/versions/registry.py",
        "backend/label_studio_sahi/jobs/trigger.py",
        "plugin/label_studio_sahi_plugin/connect.py",
    } <= relative
    assert "backend/label_studio_sahi/names.py" not in relative


def test_no_stored_name_is_spelled_outside_names_py() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{stray.line}: {stray.literal} looks like {stray.why}"
        for path in _sources()
        for stray in stray_literals(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not found, "use label_studio_sahi.names instead:\n" + "\n".join(found)


def test_every_format_the_scan_looks_for_is_one_names_py_defines() -> None:
    """The scan's list stays in step with names.py: each fragment is a name defined there."""
    values = [value for value in vars(names).values() if isinstance(value, str)]
    values += [
        names.train_job_id("1"),
        names.bulk_job_id("1"),
        names.version_name(1),
        names.model_version("1", "v1"),
    ]
    for fragment in ["ls-sahi:", *CONTAINS, *SEGMENTS, *SEGMENT_PREFIXES]:
        assert any(fragment in value for value in values), fragment
    assert all(REDIS_KEY.match(key) for key in (names.CHANGES_KEY, names.LIVE_CHANNEL))
    assert names.VERSION_DIR.match(names.version_name(7))


@pytest.mark.parametrize(
    "source",
    [
        'KEY = f"ls-sahi:live:{project}"',
        'QUEUE = "ls-sahi-train"',
        'CHANNEL = "ls-sahi:live"',
        'key = "ls-sahi:" + project',
        'job_id = f"ls-sahi-predict-{project}"',
        'queue.enqueue("label_studio_sahi.training.job.train_project")',
        'path = folder / "meta.json"',
        'path = model_dir / "projects" / project',
        'path = f"{model_dir}/projects/{project}"',
        'plot.savefig(folder / "curves.png")',
        'sock = f"{folder}/redis.sock"',
        'tmp = root / f".tmp-{uuid}"',
        'trash = root / (".trash-" + name)',
        'name = f"v{number}"',
        'folder = root / f"{project}/v{number}"',
        'version = f"p{project}-{name}"',
        'name = "v" + str(number)',
        'name = "v%d" % number',
        'name = "v{}".format(number)',
        r'pattern = re.compile(r"^v(\d+)$")',
    ],
)
def test_the_scan_catches_each_kind_of_stray(source: str) -> None:
    assert [stray.line for stray in stray_literals(source)] == [1]


def test_the_scan_leaves_prose_and_lookalikes_alone() -> None:
    source = '''
"""Module docstring: ls-sahi:live:<project>, projects/<p>/v<N>/meta.json, f"v{n}"."""
# a comment: "ls-sahi-train" label_studio_sahi.training.job


def f(n: int) -> str:
    """ls-sahi-predict-<project> and curves.png and .tmp-* folders."""
    "a bare string statement: redis.sock"
    message = f"meta.json of {n} is unreadable"  # a message naming the file, not a path
    cli = "ls-sahi predict"  # the command line, not a queue
    error = f"ls-sahi: error: {message}"  # the command line's message prefix
    url = f"/api/projects/{n}/export"  # Label Studio's API, not the projects folder
    rev = f"rev{n}"  # a 'v' inside a word
    return f"{message} {cli} {rev} {error} {url} {n}v"
'''
    assert stray_literals(source) == []


def test_job_paths_resolve_to_the_functions_rq_will_import() -> None:
    for path in (names.TRAIN_JOB, names.BULK_JOB):
        module_name, _, attribute = path.rpartition(".")
        function = getattr(importlib.import_module(module_name), attribute)
        assert callable(function), path
        assert f"{function.__module__}.{function.__qualname__}" == path


def _valid_project_ids() -> list[str]:
    alphabet = string.ascii_letters + string.digits + "_-"
    rng = random.Random(0)
    generated = ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(200)]
    return ["1", "42", "0", "-", "_", "abc_DEF-9", "9" * 30, *generated]


def test_job_ids_never_contain_a_colon_and_never_collide() -> None:
    ids = _valid_project_ids()
    assert all(names.PROJECT_ID.match(project) for project in ids)
    train = [names.train_job_id(project) for project in ids]
    bulk = [names.bulk_job_id(project) for project in ids]
    for job_id in train + bulk:
        assert ":" not in job_id, job_id
    assert len(set(train)) == len(set(ids)) == len(set(bulk))
    assert not set(train) & set(bulk)


@pytest.mark.parametrize("project", ["", "a:b", "a/b", "../x", "1 2", "ü"])
def test_project_ids_that_would_break_a_key_or_folder_are_not_valid(project: str) -> None:
    assert not names.PROJECT_ID.match(project)
