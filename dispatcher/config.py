"""The configuration: TOML read through pydantic-settings, overridable from ``EVENTSWARM_*`` variables.

``load(path)`` returns a validated ``Config`` or raises ``ConfigError`` listing every problem
with its TOML path.

The sections' models are here, but for a function's (``function_config``); each source's own keys live with its
connector. Paths are taken from the config file's folder (``paths``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from dispatcher.errors import ConfigError
from dispatcher.filters import FilterSyntaxError, compile_filter
from dispatcher.function_config import FunctionConfig as FunctionConfig
from dispatcher.function_config import Mount as Mount
from dispatcher.function_config import WarmConfig as WarmConfig
from dispatcher.function_config import command_problems, unsupported
from dispatcher.paths import ConfigPath, config_folder, from_config
from dispatcher.plugins import connectors
from dispatcher.secrets import Secret
from dispatcher.section import Section
from dispatcher.units import Duration, Size

DEFAULT_PATH = "eventswarm.toml"
ENV_PREFIX = "EVENTSWARM_"


class _PathError(ValueError):
    """A problem found by a validator, with its absolute TOML path."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        self.loc = loc
        super().__init__(message)


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


class DaemonConfig(Section):
    state: str = "sqlite:///eventswarm.db"
    """Where the state store lives: ``sqlite:///relative/path`` (relative to the config file's folder),
    ``sqlite:////absolute/path`` (four slashes, as SQLAlchemy reads it), a plain path, or ``postgresql://…``."""
    listen: str = "127.0.0.1:8080"
    """host:port of the one HTTP server (webhooks, /metrics, /healthz, /readyz, /v1)."""
    log_format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` (one object a line) for machines."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace: Duration = 30.0
    """On SIGTERM/SIGINT: how long in-flight batches may take to finish before they are handed back."""
    keep_invocations: Duration = 7 * 86400.0
    """Invocation records (and their logs) older than this are deleted."""
    max_records_size: Size = 1024**3
    """The bytes invocation records and their logs may take in the state store (``docs/capacity.md``); past it the
    oldest go first, even younger than ``keep_invocations`` (a warning says so). ``0``: no size bound. Dead letters are
    not counted and never pruned."""
    client_timeout: Duration = 30.0
    """An HTTP client has this long to send a request's headers (from connecting, or from its last
    answer on a kept-alive connection), and again its body; then the connection is closed."""
    max_connections: int = Field(1000, ge=1, le=1_000_000)
    """Open HTTP connections at most; past it, a new connection is answered 503 and closed."""
    state_password_env: str = ""
    """With a ``postgresql://`` state: the environment variable holding the database password."""
    state_password_file: ConfigPath = ""
    """With a ``postgresql://`` state: a file holding the database password."""
    replica: str = Field("", max_length=200)
    """This daemon's name among the replicas sharing one PostgreSQL state (default: its host name and listen
    port). Each replica needs its own; a replica that restarts under the same name takes up its own work at once."""
    replica_timeout: Duration = 15.0
    """A replica whose heartbeat is older than this is taken as dead: another one takes over its work (its webhook
    events, its sources' leases, its containers). Leases of single-reader sources last this long between renewals."""
    api_token_env: str | list[str] = ""
    """Environment variable(s) holding the bearer token the ``/v1`` API (and ``/metrics``) requires; several
    during a rotation. The CLI sends it."""
    api_token_file: ConfigPath = ""
    """A file holding the token (one per line, several during a rotation)."""
    metrics_public: bool = False
    """Serve ``/metrics`` without the token (for a scraper that cannot send one)."""
    allow_unauthenticated: bool = False
    """Allow ``listen`` on an address beyond loopback without a token (on purpose: anyone who reaches it can read
    invocation logs and replay dead letters)."""

    @field_validator("state")
    @classmethod
    def _state(cls, value: str) -> str:
        if value.startswith("sqlite:///"):
            path = value.removeprefix("sqlite:///")
            return "sqlite:///" + (path if path == ":memory:" else from_config(path))
        if "://" in value or value == ":memory:" or not value:
            return value
        return "sqlite:///" + from_config(value)  # (a plain path)

    @field_validator("max_records_size")
    @classmethod
    def _max_records_size(cls, value: int) -> int:
        if 0 < value < 1024**2:
            raise ValueError(f"{value} bytes is too small: 1MiB at least (or 0, for no size bound)")
        return value

    @field_validator("replica_timeout")
    @classmethod
    def _replica_timeout(cls, value: float) -> float:
        if not 1.0 <= value <= 3600.0:
            raise ValueError(f"{value:g}s is out of range: from 1s to 1h (a replica is taken over when its heartbeat "
                             "is older than this)")
        return value

    @property
    def state_path(self) -> str:
        """The SQLite file, or the PostgreSQL URL."""
        return self.state.removeprefix("sqlite:///") if self.state.startswith("sqlite:///") else self.state

    @property
    def postgres(self) -> bool:
        return self.state.startswith(("postgresql://", "postgres://"))

    @property
    def state_password(self) -> str | None:
        """PostgreSQL's password, from ``state_password_env`` or ``state_password_file`` (None: the URL's, or none)."""
        secret = Secret.of(self.state_password_env, self.state_password_file)
        return secret.values()[0] if secret.given else None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @model_validator(mode="after")
    def _check(self) -> DaemonConfig:
        if self.state.startswith(("mysql", "redis", "mongodb")):
            raise ValueError(f"state: give sqlite:///PATH or postgresql://…, not {self.state!r}")
        if self.postgres:
            if urlsplit(self.state).password and (self.state_password_env or self.state_password_file):
                raise ValueError("state_password_env: the state URL has a password already: give one of them")
            if self.state_password_env or self.state_password_file:
                problem = Secret.of(self.state_password_env, self.state_password_file).problem("state_password")
                if problem:
                    raise ValueError(problem)
        elif self.state_password_env or self.state_password_file:
            key = "state_password_env" if self.state_password_env else "state_password_file"
            raise ValueError(f"{key}: a password is for a postgresql:// state, not SQLite")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen: {self.listen!r} is not host:port, e.g. \"127.0.0.1:8080\"")
        token = self.api_token
        if token.given:
            problem = token.problem("api_token")
            if problem:
                raise ValueError(problem)
        elif not _loopback(self.host_port[0]) and not self.allow_unauthenticated:
            raise ValueError(f"listen: {self.listen} is reachable beyond this machine, and the API has no token: set "
                             "api_token_env or api_token_file (or allow_unauthenticated = true, on purpose)")
        return self

    @property
    def api_token(self) -> Secret:
        return Secret.of(self.api_token_env, self.api_token_file)


class ExecutorConfig(Section):
    kind: Literal["auto", "swarm", "docker", "process"] = "auto"
    """``auto`` = swarm if the engine is an active Swarm manager, else docker; ``process`` runs local subprocesses."""
    docker_host: str = ""
    """Docker engine address; default: ``DOCKER_HOST``, then the local socket. A remote engine or Swarm manager:
    ``tcp://manager:2376`` with ``tls_ca``, ``tls_cert`` and ``tls_key``."""
    tls_ca: ConfigPath = ""
    """TLS to the engine: the CA that signed its certificate (Docker's ``ca.pem``); the engine is verified."""
    tls_cert: ConfigPath = ""
    """TLS to the engine: this client's certificate (Docker's ``cert.pem``), with ``tls_key``."""
    tls_key: ConfigPath = ""
    """TLS to the engine: this client's private key (Docker's ``key.pem``)."""
    max_in_flight: int = Field(16, ge=1, le=4096)
    """Invocations running at once, all triggers together."""
    network: str = "none"
    """Function containers' network: ``none``, ``host`` or a named network."""
    cleanup: Literal["always", "on-success", "never"] = "always"
    """Remove finished containers: always, only after success, or never (for debugging)."""
    input: Literal["auto", "bind", "copy", "stdin"] = "auto"
    """How the input file reaches a container besides stdin: ``bind`` mounts a file the daemon
    writes (daemon and engine share a file system), ``copy`` copies it in before start (not with
    ``read_only``), ``stdin`` gives no file; ``auto`` = bind for a local engine, else copy."""
    output_limit: Size = 1024 * 1024
    """Captured stdout and stderr per invocation, each; beyond it the middle is cut out."""
    scratch_dir: ConfigPath = ""
    """Where input files for ``bind`` are written; default: beside the state store."""
    start_timeout: Duration = 300.0
    """swarm: a job whose task has not started by then (no node has room) fails the attempt."""

    @model_validator(mode="after")
    def _check_tls(self) -> ExecutorConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both, or neither")
        if (self.tls_ca or self.tls_cert) and not self.docker_host.startswith(("tcp://", "https://")):
            raise ValueError(f"tls_ca, tls_cert and tls_key are for an engine reached over TCP: set docker_host to "
                             f"tcp://HOST:2376 (it is {self.docker_host or 'unset'!r})")
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ValueError(f"{key}: no such file: {path}")
        return self


class BatchConfig(Section):
    max_events: int = Field(100, ge=1, le=1_000_000)
    max_bytes: Size = 1024 * 1024
    max_wait: Duration = 0.2
    """How long a batch waits for more events after its first."""


class RetryConfig(Section):
    max_attempts: int = Field(5, ge=1, le=1000)
    initial: Duration = 1.0
    max: Duration = 60.0
    jitter: bool = True
    bisect: bool = True
    """Split a failed batch in halves (without using up attempts) to isolate poison events."""
    max_event_age: Duration = 86400.0
    """An event older than this is not retried again."""


class TriggerBase(Section):
    function: str
    filter: str = ""
    """Keep only events for which this expression holds, e.g. ``type == "vote.cast" and data.amount > 10``."""
    buffer: int = Field(10000, ge=1, le=10_000_000)
    """Events held in memory for this trigger before the source is paused."""
    max_in_flight: int = Field(4, ge=1, le=4096)
    """Batches of this trigger running at once."""
    ordering: Literal["partition", "key", "none"] = "partition"
    """What must not run concurrently: one partition (Kafka partition, file, chain), one key (subject), nothing."""
    batch: BatchConfig = BatchConfig()
    retry: RetryConfig = RetryConfig()
    on_exhausted: Literal["dead-letter", "drop", "stop"] = "dead-letter"

    @model_validator(mode="after")
    def _check_filter(self) -> TriggerBase:
        try:
            compile_filter(self.filter)
        except FilterSyntaxError as exc:
            raise ValueError(f"filter: {exc}") from None
        return self


class TelemetryConfig(Section):
    """``[telemetry]``: traces over OTLP/HTTP. The standard ``OTEL_*`` variables work as with any OpenTelemetry SDK."""

    enabled: bool | None = None
    """On, off, or (unset) on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
    (and ``OTEL_SDK_DISABLED`` is not ``true``)."""
    endpoint: str = ""
    """The collector's OTLP/HTTP traces URL; default: the ``OTEL_EXPORTER_OTLP_*`` variables, else
    ``http://localhost:4318/v1/traces``."""
    service_name: str = ""
    """``service.name``; default ``OTEL_SERVICE_NAME``, else ``eventswarm``."""
    max_queue: int = Field(2048, ge=1, le=1_000_000)
    """Spans waiting for export at most; past it they are dropped, and counted."""
    export_interval: Duration = 1.0
    """How long spans wait to be sent in a batch."""
    export_timeout: Duration = 10.0
    """One export at most (then its spans are dropped, and counted)."""

    def active(self) -> bool:
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        if self.enabled is not None:
            return self.enabled
        return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))

    def traces_url(self) -> str:
        if self.endpoint:
            return self.endpoint
        if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
        return base.rstrip("/") + "/v1/traces"


class ConfigBase(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False,
    )
    daemon: DaemonConfig = DaemonConfig()
    executor: ExecutorConfig = ExecutorConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    functions: dict[str, FunctionConfig] = {}
    triggers: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML document comes in as init arguments; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_references(self) -> ConfigBase:
        claimed: dict[str, str] = {}
        for name, trigger in self.triggers.items():
            for item in trigger.source.exclusive():
                if item in claimed:
                    raise _PathError(("triggers", name, "source"), f"{item} is already served by trigger {claimed[item]!r}")
                claimed[item] = name
        for name, trigger in self.triggers.items():
            if trigger.function not in self.functions:
                known = ", ".join(sorted(self.functions)) or "none defined"
                raise _PathError(("triggers", name, "function"), f"no function {trigger.function!r} (functions: {known})")
            function = self.functions[trigger.function]
            if self.executor.kind != "process" and not function.image:
                raise _PathError(("functions", trigger.function, "image"), "an image is required for the docker executor")
            if self.executor.kind == "process" and not function.command:
                raise _PathError(("functions", trigger.function, "command"), "a command is required for the process executor")
            for key, problem in unsupported(function, self.executor.kind):
                raise _PathError(("functions", trigger.function, key), problem)
        return self


def _config_model() -> type[ConfigBase]:
    kinds = connectors()
    models = tuple(cls.config_model for cls in kinds.values())
    source_type: Any = Annotated[Union[models], Field(discriminator="kind")] if len(models) > 1 else models[0]  # noqa: UP007
    trigger = create_model("TriggerConfig", __base__=TriggerBase, source=(source_type, ...))
    return create_model("Config", __base__=ConfigBase, triggers=(dict[str, trigger], {}))


class _DaemonOnly(ConfigBase):
    """``[daemon]`` and ``[executor]`` validated, the functions and triggers taken as they are."""

    functions: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_references(self) -> _DaemonOnly:
        return self


Config = ConfigBase
"""The validated configuration (its ``triggers`` hold each connector's own source model)."""


def schema() -> dict[str, Any]:
    """The config's JSON Schema, sources included (for editors)."""
    return _config_model().model_json_schema()


def default_path() -> str:
    return os.environ.get("EVENTSWARM_CONFIG") or DEFAULT_PATH


def _toml_path(loc: tuple[Any, ...], kinds: set[str]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # Discriminated unions add the tag to the location: triggers.x.source.<kind>.key
        if i > 0 and loc[i - 1] == "source" and item in kinds:
            continue
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        text = str(item)
        parts.append(text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else f'"{text}"')
    return ".".join(parts)


def _message(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        known = ", ".join(sorted(connectors()))
        return f"unknown source kind {error['input'].get('kind')!r} (known: {known})"
    if kind == "union_tag_not_found":
        return "required key is missing: kind"
    return str(msg).removeprefix("Value error, ")


def parse(document: dict[str, Any], file: str | None = None, *, daemon_only: bool = False) -> ConfigBase:
    """Validate a config document (a parsed TOML table), the environment overriding it. Relative paths are taken
    from ``file``'s folder. ``daemon_only``: only ``[daemon]`` and ``[executor]`` are validated (what the commands
    that read the state or call the daemon need: never a source's secrets)."""
    model = _DaemonOnly if daemon_only else _config_model()
    kinds = set(connectors())
    try:
        with config_folder(Path(file).absolute().parent if file else Path.cwd()):
            return model(**document)
    except SettingsError as exc:  # an environment override that is not JSON where JSON is expected
        found = re.search(r'field "([^"]+)"', str(exc))
        key = found.group(1) if found else ""
        variable = f"{ENV_PREFIX}{key.upper()}" if key else "an EVENTSWARM_* variable"
        raise ConfigError([(key, f"the environment variable {variable} is not valid JSON for this table: {exc}")],
                          file) from None
    except ValidationError as exc:
        problems = []
        origins: dict[int, str] = {}
        for error in exc.errors():
            loc = tuple(error["loc"])
            msg = _message(error)
            ctx = error.get("ctx") or {}
            inner = ctx.get("error")
            if isinstance(inner, _PathError):
                loc, msg = inner.loc, str(inner)
            elif msg.startswith("filter: "):
                loc, msg = (*loc, "filter"), msg.removeprefix("filter: ")
            elif re.match(r"^[a-z_]+: ", msg) and isinstance(error.get("input"), dict):
                key, _, msg = msg.partition(": ")  # a model's check about one of its keys (given or not): name it
                loc = (*loc, key)
            problems.append((_toml_path(loc, kinds), msg))
            overridden = _override(document, loc)
            if overridden is not None:
                origins[len(problems) - 1] = f"${overridden}"
        raise ConfigError(problems, file, origins) from None


def _override(document: dict[str, Any], loc: tuple[Any, ...]) -> str | None:
    """The ``EVENTSWARM_*`` variable that set the key at ``loc`` (or a table above it), when the file did not."""
    given: Any = document
    for depth, part in enumerate(loc):
        if not isinstance(given, dict) or part not in given:
            variables = {name.upper(): name for name in os.environ}
            for end in range(len(loc), depth, -1):
                name = ENV_PREFIX + "__".join(str(p) for p in loc[:end]).upper()
                if name in variables:
                    return variables[name]
            return None
        given = given[part]
    return None


def load(path: str | os.PathLike[str] | None = None, *, daemon_only: bool = False) -> ConfigBase:
    """Read, parse and validate the TOML file at ``path`` (default: ``$EVENTSWARM_CONFIG``, ``./eventswarm.toml``)."""
    file = str(path) if path is not None else default_path()
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", "config file not found (give one with -c FILE or $EVENTSWARM_CONFIG)")], file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read config file: {exc}")], file) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"invalid TOML: {exc}")], file) from None
    return parse(document, file, daemon_only=daemon_only)


def warnings(config: ConfigBase) -> list[tuple[str, str]]:
    """What ``validate`` points out without refusing the config: ``(toml_path, message)`` pairs."""
    found: list[tuple[str, str]] = []
    if not config.daemon.postgres:
        folder = Path(config.daemon.state_path).parent
        if not folder.is_dir():
            found.append(("daemon.state", f"the state store is {config.daemon.state_path}, in a folder that does not "
                                          f"exist yet ({folder}): `run` makes it"))
    for name, trigger in config.triggers.items():
        for key, message in trigger.source.warnings():
            found.append((f"triggers.{name}.source.{key}", message))
    if config.executor.kind == "process":
        for name, function in config.functions.items():
            found.extend((f"functions.{name}.{key}", message) for key, message in command_problems(function))
    for name, trigger in config.triggers.items():
        folders = trigger.source.folders()
        if not folders or config.executor.kind == "process":
            continue
        function = config.functions[trigger.function]
        for folder in folders:
            if not any(mount.covers(folder) for mount in function.volumes):
                found.append((f"functions.{trigger.function}.mounts",
                              f"no mount covers {folder}, the folder of trigger {name!r}: its function cannot read "
                              f"a file passed by path (over max_inline); add \"{folder}:{folder}\""))
    if config.executor.kind == "swarm" or config.executor.docker_host.startswith(("tcp://", "https://")):
        for name, function in config.functions.items():
            binds = [mount.source for mount in function.volumes if mount.bind]
            if binds and config.executor.kind != "process":
                found.append((f"functions.{name}.mounts",
                              f"{', '.join(binds)} is mounted from the host that runs the task: on a Swarm of several "
                              "nodes it must be at that path on every node that may run the function (shared "
                              "storage), or placement must pin the function to the nodes that have it (docs/swarm.md)"))
    return found
