"""Static checks of docker-compose.yaml, the Dockerfile and .env.example; each returns problems."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
)
REQUIRED_SERVICES = ("postgres", "redis", *AIRFLOW_SERVICES, "sandbox")
# Run to completion (init) or by hand (the debug CLI): no healthcheck.
ONE_SHOT_SERVICES = frozenset({"airflow-init", "airflow-cli"})
SANDBOX_MOUNT = "/opt/sandbox"
# The sandbox service writes the two API connections here; the image's entrypoint sources them.
SANDBOX_ENV_FILE = f"{SANDBOX_MOUNT}/connections.env"
# Dockerfile targets: the Airflow services' image (the last stage, the default) and the sandbox's.
PRODUCTION_TARGET = "production"
SANDBOX_TARGET = "sandbox"
# Repo folders the production image must not hold: the emulators and the developer tools.
NOT_IN_PRODUCTION = ("sandbox", "devtools")
STAGING_MOUNT = "/opt/airflow/staging"
# Mount target in every Airflow container -> the repo folder bound there (None: a named volume).
AIRFLOW_MOUNTS: dict[str, str | None] = {
    "/opt/airflow/dags": "dags",
    "/opt/airflow/plugins": "plugins",
    "/opt/airflow/include": "include",
    "/opt/airflow/config": "config",
    "/opt/airflow/logs": None,
    STAGING_MOUNT: None,
    SANDBOX_MOUNT: None,
}
# Variable -> the value it must have (None: any value).
REQUIRED_ENV: dict[str, str | None] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": None,
    "AIRFLOW__CELERY__BROKER_URL": None,
    "AIRFLOW__CELERY__RESULT_BACKEND": None,
    "AIRFLOW__CORE__FERNET_KEY": None,
    "AIRFLOW__API_AUTH__JWT_SECRET": None,
    "AIRFLOW__API__SECRET_KEY": None,
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://airflow-apiserver:8080/execution/",
    "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT": None,
    "AIRFLOW_CONN_DYNAMICS365_DEFAULT": None,
    "AIRFLOW_CONN_CRM_SYNC_STATE": None,
    "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK": None,
    "CRM_SYNC_STAGING": None,
    "CRM_SYNC_STATE_URL": None,
}
# Connection variable -> (conn_type, required fields, required extras); see architecture.md.
CONNECTIONS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT": ("http", frozenset({"host", "password"}), frozenset()),
    "AIRFLOW_CONN_DYNAMICS365_DEFAULT": (
        "http",
        frozenset({"host", "login", "password"}),
        frozenset({"tenant_id"}),
    ),
    "AIRFLOW_CONN_CRM_SYNC_STATE": ("generic", frozenset({"host"}), frozenset()),
    "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK": ("http", frozenset({"host", "password"}), frozenset()),
}
PLACEHOLDERS = frozenset({"", "change-me"})
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
# (`$${NAME}` is compose's escape for a literal `${NAME}` that the container's shell expands.)
REFERENCE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
URL_PASSWORD = re.compile(r"://[^/:@\s]*:(?P<password>[^@\s]+)@")
# Shapes of real secrets: a Fernet key, long hex or base64url tokens.
SECRET_SHAPES = re.compile(r"\b[A-Za-z0-9_-]{43}=|\b[0-9a-f]{32,}\b|\b[A-Za-z0-9_-]{40,}\b")
IN_IMAGE_FILE = re.compile(r"/opt/airflow/(?P<path>(?:scripts|config)/[\w./-]+)")
IMPORT_CHECK = re.compile(r"""python3? -c ["']import (?P<modules>[\w., ]+)["']""")


@dataclass(frozen=True)
class Mount:
    """One volume entry of a service, in either compose syntax."""

    source: str | None
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return bool(self.source) and self.source.startswith((".", "/", "~"))


@dataclass
class Stage:
    """One build stage of the Dockerfile: its name, what it starts from, its instructions."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages in order (an unnamed stage is named by its index, as in Docker)."""
    stages: list[Stage] = []
    for op, args in _instructions(text):
        if op == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(words[2] if named else str(len(stages)), words[0]))
        elif stages:
            stages[-1].instructions.append((op, args))
    return stages


def lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """`stage` and the earlier stages it is built on, the first one first."""
    earlier = {s.name: s for s in stages[: stages.index(stage)]}
    chain = [stage]
    while chain[-1].base in earlier:
        chain.append(earlier.pop(chain[-1].base))
    return chain[::-1]


def _copied(stage: Stage) -> list[str]:
    """The build-context sources a stage's COPY and ADD instructions take (no `--from`)."""
    sources = []
    for op, args in stage.instructions:
        words = shlex.split(args)
        if op in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def build_target(service: dict[str, Any]) -> str | None:
    """The Dockerfile target a service builds (None: the last stage)."""
    build = service.get("build")
    return build.get("target") if isinstance(build, dict) else None


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, from the mapping or the list syntax."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's volumes, from the short (`src:dst:ro`) or the long syntax."""
    found = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            found.append(
                Mount(entry.get("source"), entry["target"], bool(entry.get("read_only", False)))
            )
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            found.append(Mount(None, parts[0], False))
        else:
            found.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return found


def is_reference(value: str) -> bool:
    """True when `value` is exactly one `${VAR}` or `${VAR:?message}`, with no default."""
    match = REFERENCE.fullmatch(value.strip())
    return bool(match) and (match["op"] or "").lstrip(":") in ("", "?")


def substitute(value: str) -> str:
    """`value` with each reference replaced by a placeholder, to parse what it will become."""
    return REFERENCE.sub(lambda m: f"<{m['name']}>", value)


def interpolate(value: str, variables: dict[str, str]) -> str:
    """`value` as compose renders it from `variables` (an .env file), defaults included."""

    def render(match: re.Match[str]) -> str:
        name, op, arg = match["name"], (match["op"] or "").lstrip(":"), match["arg"] or ""
        found = variables.get(name, "")
        if op == "-" and not found:
            return arg
        if op == "?" and not found:
            raise KeyError(f"{name}: {arg}")
        return found

    return REFERENCE.sub(render, value)


def check_compose(compose: dict[str, Any], root: Path) -> list[str]:
    """Every problem with a parsed docker-compose.yaml whose relative paths are under `root`."""
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services") or {}
    declared_volumes = set(compose.get("volumes") or {})
    for name in REQUIRED_SERVICES:
        if name not in services:
            problems.append(f"missing service {name}")
    for name, service in services.items():
        problems += _check_service_basics(name, service, root, declared_volumes)
    for name in AIRFLOW_SERVICES:
        if name in services:
            problems += _check_airflow_service(name, services[name])
    if "sandbox" in services:
        airflow_images = {services[n].get("image") for n in AIRFLOW_SERVICES if n in services}
        problems += _check_sandbox(services["sandbox"], airflow_images - {None})
    return problems


def _check_service_basics(
    name: str, service: dict[str, Any], root: Path, declared_volumes: set[str]
) -> list[str]:
    problems = []
    healthcheck = service.get("healthcheck") or {}
    if name not in ONE_SHOT_SERVICES and (
        not healthcheck.get("test") or healthcheck.get("disable")
    ):
        problems.append(f"{name} has no healthcheck")
    for mount in mounts(service):
        if mount.is_bind and not (root / mount.source).exists():
            problems.append(f"{name} mounts {mount.source}, which does not exist in the repo")
        elif mount.source and not mount.is_bind and mount.source not in declared_volumes:
            problems.append(f"{name} mounts undeclared volume {mount.source}")
    build = service.get("build")
    if build is not None:
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        if not (root / context / dockerfile).is_file():
            problems.append(f"{name} builds from {context}/{dockerfile}, which does not exist")
        else:
            target = build_target(service)
            stages = {s.name for s in dockerfile_stages((root / context / dockerfile).read_text())}
            if target is not None and target not in stages:
                problems.append(
                    f"{name} builds target {target}, which {dockerfile} does not define"
                )
    env = environment(service)
    problems += [f"{name}: {problem}" for problem in _literal_secrets(env)]
    if "_PIP_ADDITIONAL_REQUIREMENTS" in env:
        problems.append(f"{name} installs packages at start (_PIP_ADDITIONAL_REQUIREMENTS)")
    for text in _strings(service):
        for match in IN_IMAGE_FILE.finditer(text):
            if not (root / match["path"]).exists():
                problems.append(f"{name} refers to {match['path']}, which does not exist")
    return problems


def _check_airflow_service(name: str, service: dict[str, Any]) -> list[str]:
    problems = []
    if not service.get("build"):
        problems.append(f"{name} is not built from the project's Dockerfile")
    target = build_target(service)
    if target not in (None, PRODUCTION_TARGET):
        problems.append(f"{name} builds the {target} target, expected {PRODUCTION_TARGET}")
    by_target = {mount.target: mount for mount in mounts(service)}
    for target, folder in AIRFLOW_MOUNTS.items():
        mount = by_target.get(target)
        if mount is None:
            problems.append(f"{name} does not mount {target}")
        elif folder is not None and (mount.source or "").rstrip("/") not in (
            folder,
            f"./{folder}",
        ):
            problems.append(f"{name} mounts {mount.source} at {target}, expected ./{folder}")
    sandbox = by_target.get(SANDBOX_MOUNT)
    if sandbox is not None and not sandbox.read_only:
        problems.append(f"{name} mounts the sandbox data read-write; it must be read-only")
    env = environment(service)
    for key, expected in REQUIRED_ENV.items():
        if key not in env:
            problems.append(f"{name} lacks environment variable {key}")
        elif expected is not None and env[key].lower() != expected.lower():
            problems.append(f"{name}: {key} is {env[key]!r}, expected {expected!r}")
    staging = REFERENCE.sub(lambda m: m["arg"] or "", env.get("CRM_SYNC_STAGING", ""))
    if staging and staging != STAGING_MOUNT:
        problems.append(f"{name}: CRM_SYNC_STAGING defaults to {staging}, not the shared volume")
    for key, (conn_type, fields, extras) in CONNECTIONS.items():
        if key in env:
            problems += [
                f"{name}: {p}" for p in _check_connection(key, env[key], conn_type, fields, extras)
            ]
    if name not in ONE_SHOT_SERVICES:
        init = (service.get("depends_on") or {}).get("airflow-init") or {}
        if init.get("condition") != "service_completed_successfully":
            problems.append(f"{name} does not wait for airflow-init to complete")
    return problems


def _check_connection(
    key: str, value: str, conn_type: str, fields: frozenset[str], extras: frozenset[str]
) -> list[str]:
    try:
        conn = json.loads(substitute(value))
        raw = json.loads(value)
    except json.JSONDecodeError as error:
        return [f"{key} is not valid JSON: {error}"]
    problems = []
    if conn.get("conn_type") != conn_type:
        problems.append(f"{key} has conn_type {conn.get('conn_type')!r}, expected {conn_type!r}")
    problems += [f"{key} lacks {field}" for field in sorted(fields - set(conn))]
    problems += [f"{key} lacks extra {e}" for e in sorted(extras - set(conn.get("extra") or {}))]
    if "password" in raw and not is_reference(str(raw["password"])):
        problems.append(f"{key} holds a literal password")
    return problems


def _check_sandbox(service: dict[str, Any], airflow_images: set[str]) -> list[str]:
    problems = []
    if "sandbox" not in (service.get("profiles") or []):
        problems.append("the sandbox service is not in the sandbox profile")
    if build_target(service) != SANDBOX_TARGET:
        problems.append(f"the sandbox service does not build the {SANDBOX_TARGET} target")
    if service.get("image") in airflow_images:
        problems.append(f"the sandbox service tags the Airflow services' image {service['image']}")
    command = service.get("command") or []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if words[:4] != ["python", "-m", "sandbox", "serve"] or "--host" not in words:
        problems.append(
            f"the sandbox service does not run `python -m sandbox serve --host`: {words}"
        )
    data = {m.target: m for m in mounts(service)}.get(SANDBOX_MOUNT)
    if data is None or data.read_only:
        problems.append(f"the sandbox service must mount its data dir {SANDBOX_MOUNT} read-write")
    elif "--data-dir" not in words or words[words.index("--data-dir") + 1] != SANDBOX_MOUNT:
        problems.append(f"the sandbox does not keep its data in {SANDBOX_MOUNT}")
    if "--env-file" not in words or words[words.index("--env-file") + 1] != SANDBOX_ENV_FILE:
        problems.append(f"the sandbox service does not write the connections to {SANDBOX_ENV_FILE}")
    return problems


def _literal_secrets(env: dict[str, str]) -> Iterator[str]:
    for key, value in env.items():
        if SECRET_NAME.search(key) and not is_reference(value):
            yield f"{key} holds a literal secret"
        for match in URL_PASSWORD.finditer(value):
            if not is_reference(match["password"]):
                yield f"{key} holds a URL with a literal password"
        if SECRET_SHAPES.search(substitute(value)):
            yield f"{key} holds something shaped like a secret"


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def pinned_airflow_version(requirements: str) -> str | None:
    """The `apache-airflow==X` pin of a requirements file."""
    match = re.search(r"^apache-airflow==(\S+)\s*$", requirements, re.MULTILINE)
    return match[1] if match else None


def check_dockerfile(text: str, root: Path, airflow_version: str, python_version: str) -> list[str]:
    """Every problem with the Dockerfile: base image, copied files, installs, secrets."""
    problems = []
    instructions = _instructions(text)
    stages = dockerfile_stages(text)
    bases = [s.base for i, s in enumerate(stages) if s.base not in {e.name for e in stages[:i]}]
    expected = f"apache/airflow:{airflow_version}-python{python_version}"
    if bases != [expected]:
        problems.append(
            f"the image is based on {bases}, expected {expected} (requirements.txt pin)"
        )
    if stages:
        problems += _check_targets(stages)
    for op, args in instructions:
        words = shlex.split(args)
        if op in ("COPY", "ADD"):
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                if not (root / source).exists():
                    problems.append(f"{op} {source}: does not exist in the repo")
        if op in ("ENV", "ARG"):
            for word in words:
                key, _, value = word.partition("=")
                if SECRET_NAME.search(key) or SECRET_SHAPES.search(value):
                    problems.append(f"{op} {key} puts a secret into the image")
        if op == "ENTRYPOINT":
            for match in IN_IMAGE_FILE.finditer(args):
                if not (root / match["path"]).is_file():
                    problems.append(f"the entrypoint {match['path']} does not exist in the repo")
    commands = [
        command.split()
        for op, args in instructions
        if op == "RUN"
        for command in args.split("&&")
        if command.split()[:2] == ["pip", "install"]
    ]
    if not any(
        _has(c, "-r", "requirements.txt") and _has(c, "-c", "constraints.txt") for c in commands
    ):
        problems.append("requirements.txt is not installed under the lock (-c constraints.txt)")
    if not any(_has(c, "-e", ".") for c in commands):
        problems.append("the project is not installed (pip install -e .)")
    if "_PIP_ADDITIONAL_REQUIREMENTS" in text:
        problems.append("the Dockerfile uses _PIP_ADDITIONAL_REQUIREMENTS")
    return problems


def _check_targets(stages: list[Stage]) -> list[str]:
    """The last stage (the default target) is the production image, without the emulators or the
    developer tools and checked to import the sync; the sandbox target adds the emulators."""
    problems = []
    production = stages[-1]
    if production.name != PRODUCTION_TARGET:
        problems.append(
            f"the last stage (the default target) is {production.name}, expected {PRODUCTION_TARGET}"
        )
    built = lineage(stages, production)
    for source in (s for stage in built for s in _copied(stage)):
        top = source.removeprefix("./").split("/")[0]
        if top in ("", ".") or top in NOT_IN_PRODUCTION:
            problems.append(f"the production image copies {source}")
    imported = [
        {m.strip() for m in match["modules"].split(",")}
        for stage in built
        for op, args in stage.instructions
        if op == "RUN"
        for match in IMPORT_CHECK.finditer(args)
    ]
    if not any({"crm_sync", "crm_connectors"} <= modules for modules in imported):
        problems.append("the production image does not check `import crm_sync, crm_connectors`")
    for modules in imported:
        problems += [
            f"the production image imports {m}" for m in sorted(modules) if m in NOT_IN_PRODUCTION
        ]
    sandbox = [s for s in stages if s.name == SANDBOX_TARGET]
    if not sandbox or not any(
        c.removeprefix("./").rstrip("/") == "sandbox"
        for stage in lineage(stages, sandbox[0])
        for c in _copied(stage)
    ):
        problems.append(f"no {SANDBOX_TARGET} target that adds sandbox/ to the image")
    return problems


def check_entrypoint(text: str) -> list[str]:
    """In sandbox mode the image's entrypoint sources the connections the sandbox service wrote,
    and never runs the sandbox package (the production image does not contain it)."""
    problems = []
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if re.search(r"-m\s+sandbox\b|import\s+sandbox\b|from\s+sandbox\b", code):
        problems.append("the entrypoint uses the sandbox package, which the image does not contain")
    if SANDBOX_ENV_FILE not in code:
        problems.append(f"the entrypoint does not read {SANDBOX_ENV_FILE}")
    return problems


def check_dockerignore(dockerignore: str, dockerfile: str) -> list[str]:
    """No file the Dockerfile copies is left out of the build context by .dockerignore."""
    patterns = [
        line.strip().rstrip("/")
        for line in dockerignore.splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    problems = []
    for op, args in _instructions(dockerfile):
        if op not in ("COPY", "ADD"):
            continue
        for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]:
            clean = source.rstrip("/")
            hits = [p for p in patterns if fnmatch.fnmatch(clean, p.removeprefix("**/"))]
            if hits:
                problems.append(f"{op} {source} is excluded by .dockerignore ({hits[0]})")
    return problems


def _has(words: list[str], flag: str, value: str) -> bool:
    return (flag, value) in itertools.pairwise(words)


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            found.append((op.upper(), args.strip()))
    return found


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=value lines of an env file (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def check_env_example(text: str, compose: dict[str, Any]) -> list[str]:
    """Every variable compose needs is in .env.example, and no secret there is real."""
    problems = []
    values = parse_env_file(text)
    needed = set()
    for string in _strings(compose):
        for match in REFERENCE.finditer(string):
            if (match["op"] or "").lstrip(":") != "-":
                needed.add(match["name"])
    problems += [f".env.example lacks {name}" for name in sorted(needed - set(values))]
    for key, value in values.items():
        if SECRET_NAME.search(key) and value not in PLACEHOLDERS:
            problems.append(f".env.example gives {key} a value; use a placeholder")
        for match in URL_PASSWORD.finditer(value):
            if not is_reference(match["password"]):
                problems.append(f".env.example: {key} holds a URL with a literal password")
        if SECRET_SHAPES.search(substitute(value)):
            problems.append(f".env.example: {key} holds something shaped like a secret")
    return problems


def check_pools(pools: dict[str, Any]) -> list[str]:
    """The pools file defines one pool per external API with a positive slot count."""
    problems = []
    for name in ("activecampaign_api", "dynamics365_api"):
        pool = pools.get(name)
        if not isinstance(pool, dict) or not {"slots", "description"} <= set(pool):
            problems.append(f"pool {name} is missing or lacks slots/description")
        elif not isinstance(pool["slots"], int) or pool["slots"] < 1:
            problems.append(f"pool {name} has {pool['slots']!r} slots")
    return problems


def check_script_references(root: Path) -> list[str]:
    """Files that the scripts copied into the image refer to by their in-image path exist."""
    problems = []
    for script in sorted((root / "scripts").glob("*")):
        for match in IN_IMAGE_FILE.finditer(script.read_text()):
            if not (root / match["path"]).exists():
                problems.append(f"{script.name} refers to {match['path']}, which does not exist")
    return problems
