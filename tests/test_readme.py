"""The README documents every setting (the contract that `loraplex serve --help` and the docs agree)."""

from __future__ import annotations

from pathlib import Path

from server.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_lists_every_setting_with_its_env_var():
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in README, name
        assert f"`LORAPLEX_{name.upper()}`" in README, name
