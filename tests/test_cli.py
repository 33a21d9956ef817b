"""The `imagegw` command line as a user runs it: real processes, real files, a real gateway."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from PIL import Image

from service.models import FAMILIES
from service.settings import KeyConfig
from tests.conftest import ROOT, GatewayFactory, local_config

KEY = "sk-cli-test"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGW_", "AWS_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def check_config(config: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    extra = {"IMAGEGW_CONFIG": str(config)} if config else {}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=cli_env(**extra, **env),
        timeout=60,
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "default_model: local\nproviders: {local: {type: local, options: {steps: 3}}}\n"
        "models: {local: {deployments: [{provider: local}]}}\nkeys: [{name: a, key_env: CLI_KEY}]\n"
    )
    done = check_config(config, CLI_KEY="secret")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{config}: OK, 1 models, 1 providers, 1 keys\n"


def test_check_config_names_every_problem(tmp_path: Path) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(
        json.dumps(
            {
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
                "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
            }
        )
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""\
providers:
  local: {{type: local, options: {{steps: 0}}}}
  comfy: {{type: comfyui, base_url: "http://127.0.0.1:9", api_key_env: CLI_UNSET_KEY}}
models:
  a:
    deployments: [{{provider: local}}]
  c:
    deployments:
      - provider: comfy
        options: {{workflow: {tmp_path}/missing.json, inputs: {{prompt: "6.text"}}}}
      - provider: comfy
        options: {{workflow: {workflow}, inputs: {{prompt: "9.text"}}}}
      - provider: comfy
        options: {{workflow: {workflow}, inputs: {{prompt: "6.text"}}, cfg: 7}}
keys:
  - {{name: ci, key_env: CLI_UNSET_SECRET}}
""")
    done = check_config(config, IMAGEGW_STORAGE="s3")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{config}: error: IMAGEGW_S3_BUCKET: IMAGEGW_STORAGE=s3 needs a bucket",
        f"{config}:16: error: keys.0.key_env: key 'ci': environment variable 'CLI_UNSET_SECRET' is not set",
        f"{config}:3: warning: providers.comfy.api_key_env: "
        "environment variable 'CLI_UNSET_KEY' is not set here",
        f"{config}:6: error: models.a.deployments.0.options.steps: "
        "Input should be greater than or equal to 1",
        f"{config}:9: error: models.c.deployments.0: workflow {tmp_path}/missing.json: cannot read: "
        "No such file or directory",
        f"{config}:11: error: models.c.deployments.1: workflow {workflow}: "
        "inputs.prompt: node '9' (SaveImage) has no input 'text'",
        f"{config}:14: error: models.c.deployments.2.options.cfg: Extra inputs are not permitted",
        "imagegw check-config: 6 error(s)",
    ]


def test_check_config_reports_cross_reference_errors_with_their_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "providers: {local: {type: local}}\nmodels:\n  a:\n    family: gpt-image-9\n"
        "    deployments: [{provider: local}]\n"
    )
    done = check_config(config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{config}:4: models.a.family: unknown model family 'gpt-image-9'; known: "
        + ", ".join(sorted(FAMILIES)),
        "imagegw check-config: 1 error(s)",
    ]


def test_check_config_reports_unparseable_files(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("models:\n  a: {deployments: [\n")
    done = check_config(config)
    assert done.returncode == 2
    assert done.stderr.startswith(f"{config}: invalid YAML: while parsing a flow node")
    assert done.stderr.endswith("imagegw check-config: 1 error(s)\n")
    done = check_config(tmp_path / "absent.yaml")
    assert done.returncode == 2 and "cannot read config file: No such file or directory" in done.stderr


async def run_generate(*args: str, stderr: int = subprocess.PIPE) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "generate",
        *args,
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), (err or b"").decode()


async def test_generate_follows_progress_and_writes_the_images(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    config = local_config(steps=6, step_delay=0.1).model_copy(
        update={"keys": [KeyConfig(name="cli", key=KEY)]}
    )
    gw = await gateway_factory(config=config)
    out = tmp_path / "pictures" / "harbour.webp"
    code, stdout, stderr = await run_generate(
        "a harbour at night",
        "-o",
        str(out),
        "--n",
        "2",
        "--size",
        "320x200",
        "--model",
        "imagegw-local",
        "--url",
        gw.url,
        "--api-key",
        KEY,
    )
    assert code == 0, stderr
    written = [tmp_path / "pictures" / "harbour-1.webp", tmp_path / "pictures" / "harbour-2.webp"]
    assert stdout.splitlines() == [str(p) for p in written]
    for path in written:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert image.format == "WEBP" and image.size == (320, 200)
    # not a terminal: one line per change, as Socket.IO delivered them
    lines = stderr.splitlines()
    percents = [int(line.split("%")[0]) for line in lines]
    assert lines[0] == "  0% queued" and percents[-1] == 100 and lines[-1].endswith("done")
    assert percents == sorted(percents) and any("painting 3/6" in line for line in lines), lines


async def test_generate_draws_a_bar_on_a_terminal(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    config = local_config(steps=4, step_delay=0.05).model_copy(
        update={"keys": [KeyConfig(name="cli", key=KEY)]}
    )
    gw = await gateway_factory(config=config)
    leader, follower = pty.openpty()
    try:
        code, stdout, _ = await run_generate(
            "a kite",
            "-o",
            str(tmp_path / "kite.png"),
            "--size",
            "64x64",
            "--url",
            gw.url,
            "--api-key",
            KEY,
            stderr=follower,
        )
        os.close(follower)
        screen = b""
        while chunk := await asyncio.to_thread(_read_pty, leader):
            screen += chunk
    finally:
        os.close(leader)
    assert code == 0 and stdout.strip() == str(tmp_path / "kite.png")
    text = screen.decode()
    assert "\r[" in text and "] 100% done" in text and "#" * 10 in text


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the writing side is closed and everything was read
        return b""


async def test_generate_explains_errors(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    config = local_config().model_copy(update={"keys": [KeyConfig(name="cli", key=KEY)]})
    gw = await gateway_factory(config=config)
    code, _, stderr = await run_generate(
        "a kite", "-o", str(tmp_path / "k.png"), "--url", gw.url, "--api-key", "sk-wrong"
    )
    assert code == 1
    assert stderr == "imagegw generate: Incorrect API key provided. (HTTP 401, invalid_api_key)\n"
    code, _, stderr = await run_generate(
        "a kite",
        "-o",
        str(tmp_path / "k.png"),
        "--url",
        gw.url,
        "--api-key",
        KEY,
        "--model",
        "dall-e-3",
        "--size",
        "256x256",
    )
    assert code == 1 and "(HTTP 400, invalid_value, param size)" in stderr
    assert not (tmp_path / "k.png").exists()
