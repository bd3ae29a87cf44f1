"""The layout: every module sits where its dotted name says, and the parts import one way."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from rq.utils import import_attribute

import label_studio_sahi
import label_studio_sahi_plugin
from label_studio_sahi import names
from label_studio_sahi.jobs import bulk
from label_studio_sahi.training import job

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {"label_studio_sahi": ROOT / "backend", "label_studio_sahi_plugin": ROOT / "plugin"}


def _modules(package: object) -> list[str]:
    name = package.__name__  # type: ignore[attr-defined]
    found = pkgutil.walk_packages(package.__path__, prefix=f"{name}.")  # type: ignore[attr-defined]
    return [name, *(m.name for m in found)]


@pytest.mark.parametrize("package", [label_studio_sahi, label_studio_sahi_plugin])
def test_every_module_sits_at_the_path_its_dotted_name_spells(package: object) -> None:
    modules = _modules(package)
    assert len(modules) > 1
    for name in modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        folder = SOURCE_ROOTS[name.split(".")[0]] / Path(*name.split("."))
        expected = folder / "__init__.py" if spec.submodule_search_locations else None
        assert Path(spec.origin) in {expected, folder.with_suffix(".py")}, (name, spec.origin)


def test_the_package_imports_from_its_source_root_with_no_install() -> None:
    # -S: no site-packages, so no editable install; the source root is the working folder.
    done = subprocess.run(
        [sys.executable, "-S", "-c", "import label_studio_sahi; print(label_studio_sahi.__file__)"],
        cwd=ROOT / "backend", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(done.stdout.strip()) == ROOT / "backend" / "label_studio_sahi" / "__init__.py"


def test_a_module_added_under_the_package_imports_without_a_reinstall() -> None:
    added = ROOT / "backend" / "label_studio_sahi" / "inference" / "_added_by_a_test.py"
    added.write_text("ANSWER = 42\n")
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from label_studio_sahi.inference._added_by_a_test import ANSWER; print(ANSWER)"],
            cwd=ROOT.parent, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        added.unlink()
    assert done.stdout.strip() == "42"


def test_jobs_queued_under_the_paths_of_the_previous_layout_find_their_function() -> None:
    # rq stores the dotted path; these are the paths jobs were queued under before the move.
    assert import_attribute("label_studio_sahi.training.job.train_project") is job.train_project
    assert (
        import_attribute("label_studio_sahi.bulk_predict.predict_project") is bulk.predict_project
    )
    assert import_attribute(names.TRAIN_JOB) is job.train_project
    assert import_attribute(names.BULK_JOB) is bulk.predict_project


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules a file imports (absolute imports only)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize(
    ("folder", "never"),
    [
        ("tests", {"bench"}),
        ("bench", {"tests"}),  # bench/tests (the benchmarks' own tests) included
        ("testkit", {"tests", "bench"}),
        ("backend", {"tests", "bench", "testkit", "label_studio_sahi_plugin"}),
        ("plugin", {"tests", "bench", "testkit"}),
    ],
)
def test_the_parts_import_one_way(folder: str, never: set[str]) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    wrong = {f.relative_to(ROOT).as_posix(): sorted(_imports(f) & never) for f in files}
    assert {f: names for f, names in wrong.items() if names} == {}


def test_the_readme_code_map_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("## Code map") :]
    code_map = code_map[: code_map.find("\n## ", 1)]
    missing = [
        name
        for package in (label_studio_sahi, label_studio_sahi_plugin)
        for name in _modules(package)
        if f"`{name.removeprefix('label_studio_sahi.')}`" not in code_map
        and f"`{name}`" not in code_map
    ]
    assert missing == []


def test_test_files_import_helpers_never_one_another() -> None:
    tests = [*(ROOT / "tests").rglob("test_*.py"), *(ROOT / "bench" / "tests").rglob("test_*.py")]
    wrong = {
        f.relative_to(ROOT).as_posix(): sorted(m for m in _imports(f) if m.startswith("test_"))
        for f in tests
    }
    assert {f: names for f, names in wrong.items() if names} == {}


def test_unit_tests_mirror_the_package() -> None:
    for folder in (ROOT / "tests" / "unit").iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert (ROOT / "backend" / "label_studio_sahi" / folder.name).is_dir(), folder.name


def test_test_file_names_are_unique_across_the_test_folders() -> None:
    # pytest imports test files by their base name (rootdir-relative, no packages): two
    # test_x.py in different folders stop the whole collection with "import file mismatch".
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")) + sorted(
        (ROOT / "bench" / "tests").rglob("test_*.py")
    ):
        assert path.name not in seen, f"{path} has the name of {seen[path.name]}"
        seen[path.name] = path
