"""The README stays true to the code: every setting documented, the test command CI runs."""

from __future__ import annotations

from pathlib import Path

from label_studio_sahi.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


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
