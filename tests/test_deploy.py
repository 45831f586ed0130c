"""The deployment files under deploy/, checked as far as this machine can without a container
runtime or a cluster: the Kubernetes manifests against Kubernetes' own schemas, the Compose file
against the Compose specification's, the scripts by bash, and every credential kept out of
files and command lines. tests/test_topology.py runs what compose.yaml describes."""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
# Environment variables that hold a credential wherever they appear.
SECRETS = {
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "MINIO_ROOT_USER",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
}
# A URL with a password in it: scheme://user:password@host.
URL_PASSWORD = re.compile(r"://[^\s/:@]+:[^\s/@]+@")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolated(value: str, environment: dict[str, str]) -> str:
    """Compose's interpolation of ${NAME}, ${NAME:-default} and ${NAME:?error} in `value`."""

    def replace(match: re.Match) -> str:
        name, operator, word = match["name"], match["operator"], match["word"] or ""
        if environment.get(name):
            return environment[name]
        if operator == ":?":
            raise KeyError(f"{name}: {word}")
        return word

    pattern = r"\$\{(?P<name>\w+)(?:(?P<operator>:-|:\?)(?P<word>[^}]*))?\}"
    return re.sub(pattern, replace, value)


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return template.get("containers", [])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_kubernetes_manifest_is_valid_for_kubernetes(path):
    for document in documents(path):
        # Strict: a misspelt field is an error, as `kubectl apply --validate=strict` makes it.
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_a_misspelt_field_is_caught_by_the_same_check():
    """The check above can fail: the tuner Job with one field misspelt does not pass."""
    (job,) = documents(DEPLOY / "k8s" / "tuner-job.yaml")
    job["spec"]["paralelism"] = job["spec"].pop("parallelism")
    with pytest.raises(kubernetes_validate.ValidationError, match="paralelism"):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_the_compose_file_is_valid_compose_before_and_after_interpolation():
    validator = jsonschema.Draft7Validator(compose_schema())
    document = compose()
    assert [error.message for error in validator.iter_errors(document)] == []
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    example = {key: value or "x" * 16 for key, value in example.items()}
    filled = yaml.safe_load(interpolated((DEPLOY / "compose.yaml").read_text(), example))
    assert [error.message for error in validator.iter_errors(filled)] == []
    assert filled["services"]["tuner"]["deploy"]["replicas"] == 3
    # A service misspelt is caught by the same check.
    filled["services"]["tuner"]["deploy"]["replica"] = 3
    assert list(validator.iter_errors(filled))


def test_the_compose_file_has_the_topology_the_readme_describes():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "tuner", "register", "dashboard", "serve"} <= set(
        services
    )
    tuner = services["tuner"]
    assert tuner["command"][:2] == ["digitune", "tune"] and "--no-register" in tuner["command"]
    assert "replicas" in tuner["deploy"]
    assert services["register"]["command"][:2] == ["digitune", "register"]
    assert services["register"]["depends_on"]["tuner"]["condition"] == (
        "service_completed_successfully"
    )
    assert "/health" in " ".join(services["serve"]["healthcheck"]["test"])
    server = services["mlflow"]["command"]
    assert server[server.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--auth" in server and server[server.index("--host") + 1] == "0.0.0.0"


def test_the_kubernetes_workers_run_in_parallel_and_the_gpu_variant_asks_for_a_gpu():
    (job,) = documents(DEPLOY / "k8s" / "tuner-job.yaml")
    assert job["kind"] == "Job" and job["spec"]["parallelism"] >= 2
    (gpu,) = documents(DEPLOY / "k8s" / "tuner-job-gpu.yaml")
    (container,) = containers(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    serve = next(d for d in documents(DEPLOY / "k8s" / "serve.yaml") if d["kind"] == "Deployment")
    assert containers(serve)[0]["readinessProbe"]["httpGet"]["path"] == "/health"
    (register,) = documents(DEPLOY / "k8s" / "register-job.yaml")
    assert containers(register)[0]["command"][:2] == ["digitune", "register"]


def test_no_credential_is_written_in_a_file_or_a_command_line():
    """Every credential comes from the environment (Compose's ${...} from deploy/.env) or a
    Kubernetes Secret; none is in a command, and the Secret's manifest holds placeholders."""
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRETS:
                assert str(value).startswith("${"), (name, key)
            assert not URL_PASSWORD.search(re.sub(r"\$\{\w+[^}]*\}", "", str(value))), (name, key)
        command = " ".join(service.get("command") or service.get("entrypoint") or [])
        assert not URL_PASSWORD.search(command) and "password" not in command.lower(), name
    for path in MANIFESTS:
        for document in documents(path):
            if document["kind"] == "Secret":
                values = document["stringData"].values()
                assert all(re.fullmatch(r"\$\{\w+\}", value) for value in values), path
                continue
            for container in containers(document):
                for variable in container.get("env", []):
                    if variable["name"] in SECRETS:
                        assert "secretKeyRef" in variable.get("valueFrom", {}), (path, variable)
                    value = re.sub(r"\$\(\w+\)", "", variable.get("value", ""))
                    assert not URL_PASSWORD.search(value), (path, variable)
                command = " ".join(container.get("command", []) + container.get("args", []))
                assert not URL_PASSWORD.search(command), path
    assert "deploy/.env" in (DEPLOY.parent / ".gitignore").read_text().split()


@pytest.mark.parametrize("script", ["k8s/run.sh", "slurm/tune.sbatch"])
def test_the_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_what_the_dockerfiles_copy_is_in_the_build_context(dockerfile):
    """deploy/Dockerfile* build from the repository's root: every COPY source is there, and
    .dockerignore leaves it in."""
    root = DEPLOY.parent
    ignored = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [
        line.split()[1:-1]
        for line in (DEPLOY / dockerfile).read_text().splitlines()
        if line.startswith("COPY ")
    ]
    sources = [source for sources in copies for source in sources]
    assert {"pyproject.toml", "src", "studies"} <= set(sources)
    for source in sources:
        assert (root / source).exists(), source
        assert source not in ignored, source
