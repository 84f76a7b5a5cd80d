"""Security properties as tests: a tampered pickle is refused before it is unpickled, published
ports are local by default, no secret is committed, job containers are unprivileged and offline.

tests/unit/test_dags.py already checks, through a DagBag with the host environment set, that
each task has `user == RTB_HOST_UID:RTB_HOST_GID` and `network_mode == "none"`. What is added
here is static: the defaults when that environment is missing, and the absence of escape
hatches (privileged, host network, the docker socket) anywhere in the DAG files.
"""

from __future__ import annotations

import ast
import pathlib
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import joblib
import pytest
import yaml

from .faultkit import error_line

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "airflow" / "dags"
COMMON = DAGS_DIR / "pipeline" / "common.py"
TARGETS = DAGS_DIR / "pipeline" / "targets.py"
LOCAL_ONLY = {"127.0.0.1", "::1", "[::1]"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|FERNET|JWT|PRIVATE|API_?KEY", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# A malicious pickle


class _Payload:
    """Unpickling this creates `marker`: stands in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: loading the pickle the way predict would does run the payload."""
    marker = tmp_path / "marker"
    joblib.load(_malicious_pickle(tmp_path / "evil.pkl", marker))
    assert marker.exists()


def test_replaced_scoring_tables_are_never_unpickled(trained, run_cli, tmp_path: Path) -> None:
    """The tables beside a model are a pickle too: checked against the report's sha256 before
    loading; a replaced file is said and skipped, and the verified model scores instead."""
    paths = trained.paths
    marker, tables = tmp_path / "marker", paths.scoring_tables(trained.champion.version)
    assert tables.exists()
    _malicious_pickle(tables, marker)

    result = run_cli("predict", "--project-dir", str(paths.root))

    assert result.code == 0, result.stderr
    assert f"{tables}: changed since training (sha256 differs)" in result.log
    assert not marker.exists(), "the tables' pickle was unpickled"
    assert len(list(paths.predictions_dir.glob("predictions_*.npy"))) == 1


@pytest.mark.parametrize(
    "how",
    ["champion file replaced", "--model without a report", "--model with another model's report"],
)
def test_tampered_pickle_is_refused_before_unpickling(trained, run_cli, tmp_path: Path, how) -> None:
    paths = trained.paths
    marker = tmp_path / "marker"
    args = ["predict", "--project-dir", str(paths.root)]
    if how == "champion file replaced":
        _malicious_pickle(trained.champion.path, marker)
        expected = "does not match the recorded"
    else:
        stray = _malicious_pickle(paths.models_dir / "pipeline_20300101T000000Z.pkl", marker)
        args += ["--model", str(stray)]
        expected = "no training report"
        if how == "--model with another model's report":
            shutil.copy(paths.report(trained.champion.version), paths.report("20300101T000000Z"))
            expected = "does not match the recorded"

    result = run_cli(*args)

    assert result.code == 1
    line = error_line(result.stderr)
    assert expected in line, line
    assert not marker.exists(), "the pickle was unpickled"
    assert not paths.predictions_dir.exists() or not list(paths.predictions_dir.iterdir())
    if how == "champion file replaced":
        assert run_cli("check-model", "--project-dir", str(paths.root)).code == 1
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# docker-compose.yaml: what is published, and to whom


def _env_file(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip().strip("'\"")
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` (enough of it)."""

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return _interpolate(arg, env)
        if op in (":?", "?") and not value:
            return f"<{name} required>"
        return value or ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, text)


def _host_ips(compose: dict, env: dict[str, str]) -> dict[str, list[str]]:
    """Host address of every published port, per service (`0.0.0.0` when none is given)."""
    found: dict[str, list[str]] = {}
    for name, service in (compose.get("services") or {}).items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                ip = _interpolate(str(port.get("host_ip", "")), env) or "0.0.0.0"
            else:
                parts = _interpolate(str(port), env).rsplit(":", 2)
                ip = parts[0] if len(parts) == 3 and parts[0] else "0.0.0.0"
            found.setdefault(name, []).append(ip)
    return found


def test_published_ports_bind_to_localhost_by_default() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    committed_env = _env_file((REPO / ".env").read_text()) if (REPO / ".env").exists() else {}
    for label, env in (("compose defaults", {}), ("the committed .env", committed_env)):
        ips = _host_ips(compose, env)
        assert ips, "no published port found: is the parser still right?"
        public = {name: found for name, found in ips.items() if set(found) - LOCAL_ONLY}
        assert not public, f"with {label}, published beyond this machine: {public}"
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name


def _git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if result.returncode != 0 and "not a git repository" in result.stderr:
        pytest.skip(f"{REPO} is not a git checkout")
    return result


def test_no_secret_is_committed() -> None:
    tracked = _git("ls-files", "-z").stdout.split("\0")
    names = {Path(path).name for path in tracked if path}
    assert ".env.local" not in names
    assert "simple_auth_manager_passwords.json" not in names
    assert _git("check-ignore", "-q", ".env.local").returncode == 0, ".env.local is not ignored"
    for label, text in (
        ("committed .env", _git("show", "HEAD:.env").stdout),
        ("working .env", (REPO / ".env").read_text() if (REPO / ".env").exists() else ""),
    ):
        secrets = {k: v for k, v in _env_file(text).items() if SECRET_NAME.search(k) and v}
        assert not secrets, f"{label} sets {sorted(secrets)}"
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment if "=" in item)
        for key, value in environment.items():
            if "JWT" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{key} has a literal value in docker-compose.yaml"


# ----------------------------------------------------------------------------------------------
# Job containers: a user, no network, no way out


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_job_containers_default_to_a_non_root_user_and_no_network() -> None:
    tree = ast.parse(COMMON.read_text(), filename=str(COMMON))
    defaults = {
        call.args[0].value: call.args[1].value
        for call in _calls(tree)
        if _name(call.func) == "get"
        and len(call.args) == 2
        and all(isinstance(arg, ast.Constant) for arg in call.args)
    }
    assert defaults.get("RTB_HOST_UID") not in (None, "0", "root"), defaults

    # Stages are built by the target factory (targets.py: the DockerOperator, or a pod), once
    # plus the mapped form, and always from job_settings. The one stage on a network is
    # `publish` (rtb_publish_task: it must reach Redis): job_settings() with its network set to
    # the stack's and nothing else loosened.
    builders = [call for call in _calls(tree) if _name(call.func) in ("stage_operator", "stage_partial")]
    expected = ["stage_operator", "stage_operator", "stage_partial"]
    assert sorted(_name(call.func) for call in builders) == expected
    (publish,) = [node for node in ast.walk(tree)
                  if isinstance(node, ast.FunctionDef) and node.name == "rtb_publish_task"]
    for call in builders:
        (value,) = [kw.value for kw in call.keywords if kw.arg == "settings"]
        if isinstance(value, ast.Call):
            assert _name(value.func) == "job_settings", "settings: job_settings()"
        else:
            assert any(call is inner for inner in _calls(publish)), "settings: job_settings()"
    assigned = [node for node in ast.walk(publish) if isinstance(node, ast.Assign)]
    assert [_name(node.value.func) for node in assigned if isinstance(node.value, ast.Call)] == [
        "job_settings"]
    changed = [(node.targets[0].slice.value, node.value.id) for node in assigned
               if isinstance(node.targets[0], ast.Subscript)]
    assert changed == [("network_mode", "PUBLISH_NETWORK")]
    targets = ast.parse(TARGETS.read_text(), filename=str(TARGETS))
    for call in _calls(targets):  # the docker target passes the settings on unchanged
        if _name(call.func) in ("docker_class", "partial"):
            assert not {kw.arg for kw in call.keywords} & {"network_mode", "user", "privileged"}
    (settings,) = [node for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef) and node.name == "job_settings"]
    (literal,) = [node.value for node in ast.walk(settings)
                  if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict)]
    spread = [value for key, value in zip(literal.keys, literal.values, strict=True) if key is None]
    assert [_name(value.func) for value in spread] == ["docker_engine"]  # the engine's url and TLS
    keywords = {key.value: value for key, value in zip(literal.keys, literal.values, strict=True)
                if key is not None}
    assert isinstance(keywords.get("network_mode"), ast.Constant)
    assert keywords["network_mode"].value == "none"
    assert isinstance(keywords.get("user"), ast.Name) and keywords["user"].id == "HOST_USER"
    for risky in ("privileged", "cap_add", "devices", "ipc_mode", "pid_mode", "extra_hosts"):
        assert risky not in keywords, risky


def test_dag_files_have_no_escape_hatch() -> None:
    files = sorted(DAGS_DIR.rglob("*.py"))
    assert files
    for path in files:
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        for call in _calls(tree):
            if path not in (COMMON, TARGETS):
                assert not _name(call.func).endswith("Operator"), f"{path.name}: use rtb_task()"
            for kw in call.keywords:
                if kw.arg == "privileged":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False
                if kw.arg == "network_mode":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value == "none"
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        mounted_socket = [
            s for s in strings if isinstance(s, str) and "docker.sock" in s and not s.startswith("unix://")
            and "\n" not in s  # docstrings may name it; a mount source is one line
        ]
        assert not mounted_socket, f"{path.name} mentions the docker socket as a path: {mounted_socket}"


def test_job_image_and_scoring_service_run_unprivileged() -> None:
    dockerfile = (DAGS_DIR / "pipeline" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        volumes = [
            str(v.get("source")) if isinstance(v, dict) else str(v) for v in service.get("volumes") or []
        ]
        if any("docker.sock" in v for v in volumes):
            # The services that run tasks: the scheduler (LocalExecutor), the Celery workers.
            assert name in ("airflow-scheduler", "airflow-worker"), f"{name} mounts the docker socket"
    scoring = compose["services"]["scoring"]
    uid = _interpolate(str(scoring["user"]), {}).split(":")[0]
    assert uid not in ("", "0", "root"), scoring["user"]
    # Read-only, but for the folder of its shadow log (reports/shadow, see rtb.serving.shadow).
    writable = [str(v) for v in scoring.get("volumes") or [] if not str(v).endswith(":ro")]
    assert writable == ["./reports/shadow:/project/reports/shadow"], scoring.get("volumes")
