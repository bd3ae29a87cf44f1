"""docker-compose.yml, Dockerfile and .dockerignore, checked statically (no Docker needed).

The compose file is where settings, CLI commands, ports and paths of the backend meet Label
Studio and Redis: a typo there fails only at deploy time, so these tests hold it to
backend/label_studio_sahi/settings.py and backend/label_studio_sahi/cli.py.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # PyYAML: a dependency of transformers and huggingface-hub

from label_studio_sahi.cli import build_parser
from label_studio_sahi.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Variables the backend and workers may set that are not Settings fields: read by libraries.
NON_SETTINGS_ENV = {
    "HF_HOME",  # Hugging Face cache (hub downloads)
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    # boto3's standard configuration of the object store client (MODEL_STORE)
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
}
BACKEND_SERVICES = ("backend", "worker")

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: object) -> str:
    """``value`` as compose would see it with an empty shell: defaults applied, required
    variables as ``<NAME>``."""

    def replace(match: re.Match[str]) -> str:
        op = match["op"] or ""
        if op.endswith("-"):
            return match["arg"]
        if op.endswith("?"):
            return f"<{match['name']}>"
        return ""

    return _VARIABLE.sub(replace, str(value)).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def raw_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment (map or list form), values uninterpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(v) for k, v in raw_env(service).items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(source, target, read_only)`` of each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((str(volume.get("source")), volume["target"], bool(volume.get("read_only"))))
            continue
        parts = interpolate(volume).split(":")
        if len(parts) == 1:  # anonymous volume
            out.append(("", parts[0], False))
        else:
            mode = parts[2] if len(parts) > 2 else "rw"
            out.append((parts[0], parts[1], "ro" in mode.split(",")))
    return out


def mount_at(service: dict[str, Any], target: str) -> tuple[str, str, bool] | None:
    found = [m for m in mounts(service) if m[1].rstrip("/") == target.rstrip("/")]
    return found[0] if found else None


def container_ports(service: dict[str, Any]) -> list[int]:
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(int(port["target"]))
        else:
            out.append(int(interpolate(port).split("/")[0].rsplit(":", 1)[-1]))
    return out


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def cli_subcommand(argv: list[str]) -> str:
    """The ``ls-sahi`` subcommand that ``argv`` runs; raises SystemExit when it does not parse."""
    assert argv[0] == "ls-sahi", argv
    return build_parser().parse_args(argv[1:]).command


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}`` for list or map syntax."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(map(str, test))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def dockerfile_env() -> dict[str, str]:
    out: dict[str, str] = {}
    for args in dockerfile("ENV"):
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            out[name] = value
    return out


# --- services --------------------------------------------------------------------------------


def test_stack_has_label_studio_redis_backend_and_worker(compose: dict[str, Any]) -> None:
    assert {"label-studio", "redis", "backend", "worker"} <= set(compose["services"])
    assert "version" not in compose, "the compose spec has no version key (compose warns)"


def test_label_studio_image_is_pinned_to_1_23(services: dict[str, dict[str, Any]]) -> None:
    # The protocol notes (tokens, SSRF settings, routes) were checked against 1.23.x.
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", services["label-studio"]["image"])


def test_redis_keeps_jobs_with_aof_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    argv = command_argv(redis)
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert options.get("--appendonly") == "yes"
    assert options.get("--maxmemory-policy") == "noeviction"
    assert mount_at(redis, "/data") is not None, "the AOF file needs a volume to survive"


@pytest.mark.parametrize(("service", "subcommand"), [("backend", "serve"), ("worker", "worker")])
def test_backend_and_worker_commands_are_valid_cli_commands(
    services: dict[str, dict[str, Any]], service: str, subcommand: str
) -> None:
    assert cli_subcommand(command_argv(services[service])) == subcommand


@pytest.mark.parametrize("service", BACKEND_SERVICES)
def test_every_variable_is_a_setting_or_explicitly_allowed(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    settings_names = {name.upper() for name in Settings.model_fields}
    unknown = set(raw_env(services[service])) - settings_names - NON_SETTINGS_ENV
    assert not unknown, f"{service} sets variables the backend never reads: {sorted(unknown)}"


@pytest.mark.parametrize("service", BACKEND_SERVICES)
def test_compose_settings_are_valid_and_defaults_match_settings(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    values = {
        k.lower(): v
        for k, v in env(services[service]).items()
        if k.lower() in Settings.model_fields
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]  # validates each value
    defaults = Settings(_env_file=None)
    # ${VAR:-default}: the default the compose file gives is the backend's own default.
    for name, value in raw_env(services[service]).items():
        match = _VARIABLE.fullmatch(value)
        if match and (match["op"] or "").endswith("-") and name.lower() in Settings.model_fields:
            assert getattr(settings, name.lower()) == getattr(defaults, name.lower()), name


def test_label_studio_token_must_be_given(services: dict[str, dict[str, Any]]) -> None:
    for service in BACKEND_SERVICES:
        token = raw_env(services[service])["LABEL_STUDIO_API_KEY"]
        assert token.startswith("${LABEL_STUDIO_API_KEY:?"), "refuse to start without a token"


def test_redis_url_points_at_the_redis_service(services: dict[str, dict[str, Any]]) -> None:
    for service in BACKEND_SERVICES:
        url = urlsplit(env(services[service])["REDIS_URL"])
        assert url.scheme == "redis"
        assert url.hostname == "redis" and "redis" in services
        assert (url.port or 6379) == 6379


def test_label_studio_url_points_at_the_label_studio_service_port(
    services: dict[str, dict[str, Any]],
) -> None:
    ls_ports = container_ports(services["label-studio"])
    for service in BACKEND_SERVICES:
        url = urlsplit(env(services[service])["LABEL_STUDIO_URL"])
        assert url.hostname == "label-studio"
        assert url.port in ls_ports


def test_label_studio_accepts_a_backend_on_the_private_compose_network(
    services: dict[str, dict[str, Any]],
) -> None:
    ls_env = env(services["label-studio"])
    for name in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
        value = ls_env.get(f"LABEL_STUDIO_{name}", ls_env.get(name))
        assert value is not None and value.lower() == "false", name


# --- ports, volumes, paths ---------------------------------------------------------------------


def test_backend_port_matches_settings_and_dockerfile_expose(
    services: dict[str, dict[str, Any]],
) -> None:
    port = Settings(_env_file=None).port
    assert (
        "PORT" not in raw_env(services["backend"]) or int(env(services["backend"])["PORT"]) == port
    )
    assert container_ports(services["backend"]) == [port]
    exposed = [int(p.split("/")[0]) for args in dockerfile("EXPOSE") for p in args.split()]
    assert exposed == [port]
    assert f":{port}/health" in healthcheck_text(services["backend"])


def test_only_label_studio_is_published_beyond_the_hosts_loopback(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for port in service.get("ports") or []:
            text = interpolate(port) if isinstance(port, str) else str(port.get("host_ip", ""))
            if name != "label-studio":
                assert text.startswith("127.0.0.1:"), f"{name} publishes {port} to the network"
    assert not services["redis"].get("ports") and not services["worker"].get("ports")


def test_backend_and_worker_share_the_models_volume_at_model_dir(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    model_dirs = {env(services[s])["MODEL_DIR"] for s in BACKEND_SERVICES}
    assert len(model_dirs) == 1
    model_dir = model_dirs.pop()
    found = [mount_at(services[s], model_dir) for s in BACKEND_SERVICES]
    assert all(found), f"MODEL_DIR={model_dir} is not a mounted volume"
    assert len({m[0] for m in found if m}) == 1, "backend and worker mount different volumes"
    assert not any(m[2] for m in found if m), "workers publish checkpoints there"
    assert found[0] and found[0][0] in (compose.get("volumes") or {})
    # Hub downloads persist with the checkpoints instead of on each container's layer.
    for service in BACKEND_SERVICES:
        assert env(services[service])["HF_HOME"].startswith(model_dir.rstrip("/") + "/")


def test_local_files_root_is_label_studios_document_root_mounted_in_all_three(
    services: dict[str, dict[str, Any]],
) -> None:
    ls_env = env(services["label-studio"])
    assert ls_env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"].lower() == "true"
    root = ls_env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    for service in BACKEND_SERVICES:
        assert env(services[service])["LOCAL_FILES_DOCUMENT_ROOT"] == root
    found = {s: mount_at(services[s], root) for s in ("label-studio", *BACKEND_SERVICES)}
    assert all(found.values()), (
        f"{root} is not mounted in: {[s for s, m in found.items() if not m]}"
    )
    assert len({m[0] for m in found.values() if m}) == 1, "not the same datasets volume"
    assert all(found[s] and found[s][2] for s in BACKEND_SERVICES), "the backend only reads it"


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _target, _ro in mounts(service):
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


# --- workers -----------------------------------------------------------------------------------


def test_worker_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]
    assert len(gpus) == 1
    assert gpus[0].get("count") == 1 or gpus[0].get("device_ids")


def test_worker_scales_with_no_container_name_or_host_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port clashes between replicas"


def test_every_service_others_depend_on_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert healthcheck_text(services[dependency]), f"{dependency} has no healthcheck"
            assert condition in {"service_started", "service_healthy"}
    for service in BACKEND_SERVICES:
        assert depends_on(services[service]).get("redis") == "service_healthy"


def test_healthchecks_use_tools_the_images_have(services: dict[str, dict[str, Any]]) -> None:
    assert "redis-cli" in healthcheck_text(services["redis"])
    for name in ("backend", "label-studio"):
        check = healthcheck_text(services[name])
        assert "/health" in check
        if re.search(r"\b(curl|wget)\b", check):  # slim Python images have neither
            assert name == "backend" and re.search(
                r"apt-get install.*\b(curl|wget)\b", " ".join(dockerfile("RUN"))
            )


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_installs_the_package_on_python_311_slim() -> None:
    assert dockerfile("FROM") == ["python:3.11-slim"]
    runs = dockerfile("RUN")
    assert any(re.search(r"pip install --no-cache-dir (--no-deps )?\.(\s|$)", r) for r in runs)
    assert "/app" in dockerfile("WORKDIR")
    # Models download at run time into HF_HOME (a volume), never into an image layer.
    assert "HF_HOME" in dockerfile_env()
    assert not any(
        re.search(r"from_pretrained|snapshot_download|hf download|huggingface-cli", r) for r in runs
    )


def test_dockerfile_copies_the_source_roots_as_they_are() -> None:
    copies = [c.split() for c in dockerfile("COPY")]
    assert ["backend", "./backend"] in copies and ["plugin", "./plugin"] in copies
    runs = " ".join(dockerfile("RUN"))
    # No package folder recreated by hand: the layout is the checkout's.
    assert not re.search(r"mkdir[^&;]*\b(backend|plugin)\b|touch[^&;]*__init__\.py", runs)


def test_dockerfile_runs_as_a_non_root_user_who_can_write_model_dir(
    services: dict[str, dict[str, Any]],
) -> None:
    users = dockerfile("USER")
    assert users, "no USER: the container runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    runs = " ".join(dockerfile("RUN"))
    assert re.search(rf"(useradd|adduser)\b[^&;]*\b{re.escape(user)}\b", runs) or user.isdigit()
    # A fresh named volume takes the owner of the image folder it is mounted on.
    model_dir = env(services["worker"])["MODEL_DIR"]
    assert re.search(rf"chown \S*{re.escape(user)}\S* {re.escape(model_dir)}\b", runs)


def test_dockerfile_cmd_is_a_valid_cli_command() -> None:
    (cmd,) = dockerfile("CMD")
    assert cli_subcommand(json.loads(cmd)) == "serve"  # exec form: signals reach ls-sahi


def test_dockerignore_keeps_secrets_and_caches_out_of_the_build_context() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for pattern in (".git", ".env", ".venv", ".pytest_cache"):
        assert pattern in patterns, pattern
    assert not {"README.md", "pyproject.toml", "backend", "plugin"} & patterns


def test_the_s3_profile_runs_a_store_the_backend_can_be_pointed_at(
    services: dict[str, dict[str, Any]],
) -> None:
    store = services["seaweedfs"]
    assert store["profiles"] == ["s3"], "off unless asked for: one machine needs no store"
    command = store["command"]
    assert command[0] == "mini" and "-bucket=models" in command
    assert "ports" not in store, "reached on the compose network only"
    # The keys it accepts are the ones the backend signs with.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in raw_env(store) and name in raw_env(services["backend"])
    backend = env(services["backend"])
    assert backend["MODEL_STORE"] == "", "empty by default: MODEL_DIR, as on one machine"
    assert Settings(_env_file=None, model_store="s3://models/ls-sahi").model_store  # type: ignore[call-arg]
    assert any(v.startswith("store-data:") for v in store["volumes"])
