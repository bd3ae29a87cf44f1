"""The README stays true to the code: every setting documented, the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from label_studio_sahi.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        name.upper() for name in Settings.model_fields if f"| `{name.upper()}` |" not in readme
    ]
    assert not missing, f"settings missing from the README table: {missing}"


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test" in readme
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_list_settings_read_comma_separated_environment_values(monkeypatch: object) -> None:
    import pytest

    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    mp.setenv("ALLOWED_IMAGE_FORMATS", "jpeg, PNG")
    mp.setenv("SLICE_WIDTH", "auto")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allowed_image_formats == ["JPEG", "PNG"] and settings.slice_width is None


def _settings_groups() -> list[tuple[str, list[str]]]:
    """settings.py's ``# --- name ---`` sections, each with its fields in order."""
    groups: list[tuple[str, list[str]]] = []
    source = (ROOT / "backend" / "label_studio_sahi" / "settings.py").read_text()
    body = source[source.index("class Settings(BaseSettings):") :]
    for line in body.splitlines()[1:]:
        section = re.match(r"    # --- (.+?)\s*(\(.*\))?\s*-{3,}$", line)
        field = re.match(r"    ([a-z_0-9]+): ", line)
        if section:
            groups.append((section.group(1).strip(), []))
        elif field and groups:
            groups[-1][1].append(field.group(1))
        elif line and not line.startswith(" "):
            break
    return groups


def test_the_readme_groups_the_settings_as_settings_py_does() -> None:
    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index("## Settings") : readme.index("\n## ", readme.index("## Settings"))]
    tables = re.split(r"^### ", part, flags=re.M)[1:]
    documented = [
        (table.splitlines()[0].strip(), re.findall(r"^\| `([A-Z_0-9]+)` \|", table, flags=re.M))
        for table in tables
    ]
    groups = _settings_groups()
    assert sum(len(names) for _, names in groups) == len(Settings.model_fields)
    assert documented == [
        (title[0].upper() + title[1:], [name.upper() for name in names]) for title, names in groups
    ]


def test_the_readme_contents_link_every_section() -> None:
    readme = (ROOT / "README.md").read_text()
    contents = next(line for line in readme.splitlines() if line.startswith("**Contents**"))
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert re.findall(r"\[([^\]]+)\]\(#", contents) == [s.replace("`", "") for s in sections]
