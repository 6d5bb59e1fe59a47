"""A local single-node Apache Kafka broker for trials and tests: ``recsys broker up|down|status``
(``make kafka-up`` / ``make kafka-down``).

It is Apache Kafka's own broker (``kafka.Kafka``, from the jars ``make setup`` fetches into
``broker.jars_dir``) in KRaft mode: one process that is both broker and controller, listening on
127.0.0.1 only. ``broker.folder`` holds the generated ``server.properties``, the data (formatted
on the first start, kept across restarts), the logs and the pid file. ``up`` returns once the
broker answers a metadata request; ``up`` on a running broker and ``down`` on a stopped one change
nothing. One replica and no authentication: not a production cluster.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from recsys_spark.config import Settings
from recsys_spark.errors import BrokerError
from recsys_spark.logs import get_logger, log_event

log = get_logger("broker")

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
STOP_SECONDS = 60.0  # a controlled shutdown takes ~2.5 s here; SIGKILL after this
_JAR_GLOB = "kafka_2.13-*.jar"

# One node, one replica: the internal topics must not ask for three, and need no more than one
# partition each on a laptop (50 for __consumer_offsets would cost seconds on the first consumer).
_SERVER_PROPERTIES = """\
# Written by `recsys broker up` on every start: edit broker.* in the recsys config instead.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
"""

# The broker's own log4j2 setup (Kafka's distribution ships one with its scripts; the Maven
# artifacts do not). Its JVM shutdown hook is off: the broker stops its own logging last, and
# log4j's hook would close the appenders before the broker's last lines.
_LOG4J2_PROPERTIES = """\
status = error
shutdownHook = disable
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = {logs}/server.log
appender.server.filePattern = {logs}/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 20MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
"""


@dataclass
class BrokerStatus:
    running: bool
    action: str  # started | already running | stopped | not running | running
    bootstrap_servers: str
    folder: str
    pid: int | None = None
    seconds: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class LocalBroker:
    """One local broker: its folder, ports and jars (see the module docstring)."""

    folder: Path
    port: int
    controller_port: int
    jars_dir: Path
    heap: str = "512m"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBroker:
        cfg = settings.broker
        return cls(Path(cfg.folder).resolve(), cfg.port, cfg.controller_port, Path(cfg.jars_dir).resolve(), cfg.heap)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties(self) -> Path:
        return self.folder / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.folder / "logs" / "server.log"

    @property
    def _pid_file(self) -> Path:
        return self.folder / "broker.pid"

    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        return self._status(pid is not None, "running" if pid else "not running", pid)

    def up(self, timeout: float = 120.0, *, follow_parent: bool = False) -> BrokerStatus:
        """Start the broker (formatting its storage the first time) and wait until it answers.

        Args:
            timeout: seconds to wait for the first answer.
            follow_parent: stop the broker when this process dies (tests, benchmarks); otherwise
                it runs on after the command that started it, until ``down``.

        Raises:
            BrokerError: no Java or no jars, a port taken by another process, or a broker that
                exits or stays silent; the message says which, with the log's last error.
        """
        with self._locked():
            pid = self._running_pid()
            if pid is not None:
                self._wait_ready(pid, timeout)
                return self._status(True, "already running", pid)
            started = time.monotonic()
            java = _java()
            self._check_jars()
            for port in (self.port, self.controller_port):
                _check_port_free(port)
            self._write_config()
            if not (self.folder / "data" / "meta.properties").exists():
                self._format(java)
            command = [java, f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
                       f"-Dlog4j2.configurationFile=file:{self.folder / 'log4j2.properties'}",
                       f"-Dkafka.logs.dir={self.folder / 'logs'}", "-cp", f"{self.jars_dir}/*", KAFKA_MAIN,
                       str(self.properties)]
            if follow_parent:  # the processes supervisor stops the broker when this process dies
                command = [sys.executable, "-m", "recsys_spark.processes", str(os.getpid()), "--", *command]
            with (self.folder / "logs" / "console.log").open("ab") as console:
                process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            self._pid_file.write_text(f"{process.pid}\n")
            try:
                self._wait_ready(process.pid, timeout)
            except BrokerError:
                _stop_group(process.pid, STOP_SECONDS)
                self._pid_file.unlink(missing_ok=True)
                raise
            seconds = round(time.monotonic() - started, 1)
            log_event(log, "broker.started", bootstrap_servers=self.bootstrap_servers, pid=process.pid,
                      seconds=seconds, folder=str(self.folder))
            return self._status(True, "started", process.pid, seconds)

    def down(self, timeout: float = STOP_SECONDS) -> BrokerStatus:
        """Stop the broker (SIGTERM: a controlled shutdown; SIGKILL after ``timeout`` seconds)."""
        with self._locked():
            pid = self._running_pid()
            if pid is None:
                return self._status(False, "not running")
            started = time.monotonic()
            _stop_group(pid, timeout)
            self._pid_file.unlink(missing_ok=True)
            seconds = round(time.monotonic() - started, 1)
            log_event(log, "broker.stopped", pid=pid, seconds=seconds)
            return self._status(False, "stopped", pid, seconds)

    def _status(self, running: bool, action: str, pid: int | None = None, seconds: float | None = None
                ) -> BrokerStatus:
        return BrokerStatus(running, action, self.bootstrap_servers, str(self.folder), pid, seconds)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One ``up``/``down`` at a time per folder (two terminals, two test workers)."""
        try:
            (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BrokerError(f"cannot create the broker folder {self.folder}: {exc.strerror or exc}") from exc
        with (self.folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _running_pid(self) -> int | None:
        """The pid of this folder's broker if it is alive (a stale pid file is removed)."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _alive(pid) and str(self.properties) in _command_line(pid):
            return pid
        self._pid_file.unlink(missing_ok=True)
        return None

    def _check_jars(self) -> None:
        if not any(self.jars_dir.glob(_JAR_GLOB)):
            raise BrokerError(f"Apache Kafka's jars are not in {self.jars_dir} (broker.jars_dir): run `make setup`, "
                              "which fetches them from Maven Central")

    def _write_config(self) -> None:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        self.properties.write_text(_SERVER_PROPERTIES.format(
            port=self.port, controller_port=self.controller_port, data=self.folder / "data"))
        (self.folder / "log4j2.properties").write_text(_LOG4J2_PROPERTIES.format(logs=self.folder / "logs"))

    def _format(self, java: str) -> None:
        """Format the data folder for a new single-node cluster (KRaft needs it before the first start)."""
        result = subprocess.run(
            [java, "-Xmx256m", f"-Dlog4j2.configurationFile=file:{self.folder / 'log4j2.properties'}",
             "-cp", f"{self.jars_dir}/*", STORAGE_TOOL, "format", "-t", cluster_id(), "-c", str(self.properties)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            message = " ".join((result.stderr or result.stdout).split())[-500:]
            raise BrokerError(f"formatting the broker's storage in {self.folder / 'data'} failed: {message}")

    def _wait_ready(self, pid: int, timeout: float) -> None:
        """Until the broker answers a metadata request listing itself; fails early if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise BrokerError(f"the Kafka broker exited during start: {self._last_error()} "
                                  f"(log: {self.log_file})")
            if _answers(self.port) and _metadata_ok(self.bootstrap_servers):
                return
            time.sleep(0.25)
        raise BrokerError(f"the Kafka broker did not answer on {self.bootstrap_servers} within {timeout:g} s "
                          f"(log: {self.log_file})")

    def _last_error(self) -> str:
        """The last ERROR line of the broker's logs, else the console's last line."""
        lines: list[str] = []
        for path in (self.log_file, self.folder / "logs" / "console.log"):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()[-200:]
        errors = [line for line in lines if " ERROR " in line or "Exception" in line]
        return " ".join((errors or lines or ["no log lines"])[-1].split())[:500]


def cluster_id() -> str:
    """A new KRaft cluster id, as Kafka's ``Uuid.randomUuid()`` makes them: 16 random bytes in
    URL-safe base64 without padding, never starting with '-' (a command-line flag)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def free_port(start: int, *, taken: tuple[int, ...] = ()) -> int:
    """The first port from ``start`` up that nothing listens on at 127.0.0.1 (tests, benchmarks)."""
    for port in range(start, 65536):
        if port not in taken and not _answers(port) and _bindable(port):
            return port
    raise BrokerError(f"no free port from {start} up")


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise BrokerError("the Kafka broker needs Java 17 (java is not on PATH or in JAVA_HOME)")
    return java


def _check_port_free(port: int) -> None:
    if _answers(port) or not _bindable(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is taken by another process: choose another "
                          "broker.port / broker.controller_port")


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _metadata_ok(bootstrap_servers: str) -> bool:
    from confluent_kafka.admin import AdminClient

    # log_level 3 (errors only): refused connections while the broker starts are expected
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 3})
    try:
        return bool(admin.list_topics(timeout=2).brokers)
    except Exception:  # noqa: BLE001 - KafkaException while it starts: not ready yet
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a child of ours that exited is reaped here, not left a zombie)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_group(pid: int, timeout: float) -> None:
    """SIGTERM to the broker's process group, SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
