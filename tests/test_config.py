"""The config file: the README example loads as it is, bad files name the line and key at fault."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import ConfigError, load_config
from tests.conftest import ROOT


def readme_example(tmp_path: Path) -> Path:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "providers:" in b)
    path = tmp_path / "imagegw.yaml"
    path.write_text(block)
    return path


def test_readme_example_loads_and_checks(tmp_path: Path) -> None:
    path = readme_example(tmp_path)
    config = load_config(path)
    assert config.default_model == "imagegw-local" and "gpt-image-1" in config.models
    done = subprocess.run([sys.executable, "-m", "service.cli", "check-config"], capture_output=True, text=True,
                          env={"IMAGEGW_CONFIG": str(path), "PATH": "/usr/bin:/bin"}, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  m:\n    deployments: []\n", ":3: models.m.deployments"),
        ("providers:\n  p:\n    type: local\nmodels:\n  m:\n    deployments:\n      - provider: q\n",
         ":7: models.m.deployments.0.provider: unknown provider 'q'"),
        ("providers:\n  p:\n    type: local\n    timeout: -1\n", ":4: providers.p.timeout"),
        ("bogus_key: 1\n", ":1: bogus_key"),
        ("providers:\n  p:\n    type: dalle\n", ":3: providers.p.type: unknown provider type 'dalle'"),
        ("providers:\n  p: {type: local}\nmodels:\n  m:\n    family: sdxl\n    deployments: [{provider: p}]\n",
         ":5: models.m.family: unknown model family 'sdxl'"),
        ("default_model: nope\n", ":1: default_model"),
        ("models: [1, 2\n", "invalid YAML"),
        ("keys:\n  - name: a\n", "keys.0"),
    ],
)
def test_bad_config_names_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_bad_config_stops_serve_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    family: generic\n    deployments: []\n")
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], capture_output=True, text=True,
                          env={"IMAGEGW_CONFIG": str(path), "PATH": "/usr/bin:/bin"}, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert f"{path}:4: models.m.deployments" in done.stderr


def test_dev_mode_refuses_non_loopback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                "IMAGEGW_DATA_DIR": str(tmp_path)},
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr
