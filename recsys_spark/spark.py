"""The one Spark session factory.

Local runs (``master: local[*]``, the embedded default) get the hygiene they need on a laptop or a
CI box: loopback networking, no UI, UTC, scratch space under the lakehouse instead of ``/tmp``,
quiet JVM logs. On clusters ``master: null`` leaves everything to spark-submit and only the
project's required properties and ``spark.conf`` from config are applied.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_spark.config import Settings
from recsys_spark.errors import ConfigError, EngineUnavailableError
from recsys_spark.logs import get_logger, log_event

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Row, SparkSession

log = get_logger("spark")

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
DELTA_TABLE_CLASS = "io.delta.tables.DeltaTable"
# The Kafka connector's jars among those jars/pom.xml fetches into spark.jars_dir (file-name
# prefixes); the others there are Delta's.
KAFKA_CONNECTOR_JARS = ("spark-sql-kafka-0-10_", "spark-token-provider-kafka-0-10_", "kafka-clients-", "commons-pool2-")
MASTER_CONNECT_SECONDS = 5.0

# Properties every stage relies on, local or cluster (config's spark.conf may still override the
# tuning ones): UTC everywhere, and Parquet timestamps as INT64 micros (INT96 carries no
# statistics, which Delta's data skipping needs).
REQUIRED_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Id dictionaries of about a million entries still join by broadcast, not by shuffle.
    "spark.sql.autoBroadcastJoinThreshold": "64MB",
    # Date-partitioned writes keep a few files open per task instead of sorting every row by
    # the partition column first (halves the silver write here).
    "spark.sql.maxConcurrentOutputFileWriters": "64",
    # Local files without Hadoop's ".<name>.crc" side files: the checksum layer cannot open a
    # file whose name holds ':' (the ".crc" name parses as a URI with a scheme), which failed
    # an ingest, and stopped the stream, on such a name.
    "spark.hadoop.fs.file.impl": "org.apache.hadoop.fs.RawLocalFileSystem",
}


def work_dir(settings: Settings) -> Path:
    """Scratch space of local runs (Spark spill, Ivy cache, torchrun folders), under the root.

    A remote root (``s3a://...``) driven by a local session, or a root this process may not
    write to (a read-only mount, to be read), keeps its scratch in the temp folder.
    """
    root = Path(settings.root)
    if "://" in settings.root or (root.is_dir() and not os.access(root, os.W_OK)):
        return Path(tempfile.gettempdir()) / "recsys-spark" / "_work"
    return root / "_work"


def is_local(settings: Settings) -> bool:
    return (settings.spark.master or "").startswith("local")


def submitted() -> bool:
    """Whether spark-submit started this driver (its JVM is up, waiting for pyspark to connect)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _submitted_master() -> str | None:
    """The --master spark-submit was given (read from its JVM's properties)."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # noqa: SLF001 - connects to spark-submit's JVM; starts no context
    return SparkConf().get("spark.master", None)


def check_master_reachable(master: str) -> None:
    """Fail at once on a standalone master URL nothing listens at.

    Spark itself retries the registration for a minute, then stops the context in the background,
    and the first job fails with "SparkContext was shut down" (or waits forever for resources).
    """
    if not master.startswith("spark://"):
        return
    errors = []
    for address in master.removeprefix("spark://").split(","):  # HA: several masters
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=MASTER_CONNECT_SECONDS):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{address}: {getattr(exc, 'strerror', None) or exc}")
    raise EngineUnavailableError(
        f"Spark master {master} is unreachable ({'; '.join(errors)}); check spark.master "
        "(or spark-submit --master) and that the cluster runs"
    )


def session_conf(settings: Settings) -> dict[str, str]:
    """All properties the factory sets, in the order later ones win."""
    conf = dict(REQUIRED_CONF)
    conf["spark.app.name"] = settings.spark.app_name
    conf["spark.sql.shuffle.partitions"] = str(settings.spark.shuffle_partitions)
    if is_local(settings):
        scratch = work_dir(settings)
        log4j = resources.files("recsys_spark") / "resources" / "log4j2.properties"
        conf.update(
            {
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower(),
                "spark.sql.warehouse.dir": str(scratch / "warehouse"),
                "spark.jars.ivy": str(scratch / "ivy"),
                "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}",
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                # Parquet's vectored reads buffer whole column-chunk ranges in direct memory,
                # outside the heap and its limit: ~400 MB more resident memory at 10M events,
                # and no faster on local disks. Plain reads use the heap.
                "spark.hadoop.parquet.hadoop.vectored.io.enabled": "false",
            }
        )
        if settings.spark.driver_memory:
            conf["spark.driver.memory"] = settings.spark.driver_memory
    conf.update(
        {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.spark.conf.items()}
    )
    # Under spark-submit the driver's classpath is fixed already: jars come from --jars/--packages,
    # and setting spark.jars here would replace spark-submit's list for the executors.
    extra = [] if submitted() else project_jars(settings, delta=settings.storage.engine == "delta-spark",
                                                   kafka=settings.serving.stream.source == "kafka")
    if extra:
        conf["spark.jars"] = ",".join([*filter(None, conf.get("spark.jars", "").split(",")), *extra])
    if settings.storage.engine == "delta-spark" or (
        settings.storage.engine == "auto" and delta_jars_configured(conf)
    ):
        conf.setdefault("spark.sql.extensions", DELTA_EXTENSION)
        conf.setdefault("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
        # New tables without deletion vectors stay readable by the delta-rs engine.
        conf.setdefault("spark.databricks.delta.properties.defaults.enableDeletionVectors", "false")
        # Delta rebuilds a table's state from its log in 50 tasks by default, each read or write:
        # on small tables that is most of a stage's time (~700 one-second tasks in one score-batch
        # on the standalone cluster). As many as the shuffle's, at most Delta's 50.
        conf.setdefault("spark.databricks.delta.snapshotPartitions",
                        str(min(50, settings.spark.shuffle_partitions)))
        # VACUUM lists a table's folders in this many tasks (Spark's default: 10,000, which took
        # 99 s of a 187 s `recsys maintain` of one small table on the standalone cluster).
        conf.setdefault("spark.sql.sources.parallelPartitionDiscovery.parallelism",
                        str(settings.spark.shuffle_partitions))
    return conf


def project_jars(settings: Settings, *, delta: bool, kafka: bool) -> list[str]:
    """The jars of ``spark.jars_dir`` a session needs: Delta's (``delta``) and/or the Kafka
    connector's (``kafka``). A Kafka stream alone gets no Delta jars, or ``storage.engine: auto``
    would switch it to the delta-spark engine."""
    if not settings.spark.jars_dir:
        return []
    wanted = []
    for jar in sorted(Path(settings.spark.jars_dir).glob("*.jar")):
        if kafka if jar.name.startswith(KAFKA_CONNECTOR_JARS) else delta:
            wanted.append(str(jar.resolve()))
    return wanted


def delta_jars_configured(conf: dict[str, str]) -> bool:
    """Whether Delta's jars will be on the classpath of a session started with ``conf``.

    Checked before the JVM starts, because the Delta catalog must be configured up front and a
    configured-but-missing catalog class breaks every later table lookup.
    """
    if "io.delta" in conf.get("spark.jars.packages", ""):
        return True
    if "delta-spark" in conf.get("spark.jars", ""):
        return True
    jar_dirs = [os.path.join(os.environ.get("SPARK_HOME", ""), "jars")]
    try:
        import pyspark

        jar_dirs.append(os.path.join(os.path.dirname(pyspark.__file__), "jars"))
    except ImportError:  # pragma: no cover - pyspark is a hard dependency
        pass
    return any(glob.glob(os.path.join(d, "delta-spark_*.jar")) for d in jar_dirs if d)


def worker_python(settings: Settings) -> str | None:
    """The Python a session started here gives its executors, or None for Spark's default.

    PySpark reads it from ``PYSPARK_PYTHON`` only; ``spark.pyspark.python`` is honoured by
    spark-submit alone. So the config's ``spark.conf.spark.pyspark.python`` is passed on here,
    and a local session's workers use this very interpreter (the venv's), not "python3".
    """
    configured = settings.spark.conf.get("spark.pyspark.python")
    if configured is not None:
        return str(configured)
    return sys.executable if is_local(settings) else None


def get_spark(settings: Settings) -> SparkSession:
    """Return the active session, creating it from ``settings`` on first use.

    A session started here sets ``PYSPARK_PYTHON`` (``worker_python``), and a local one also
    ``SPARK_LOCAL_IP``, ``PYSPARK_DRIVER_PYTHON`` and ``SPARK_LOCAL_DIRS``, in this process's
    environment (unless already set; ``spark.pyspark.python`` from the config always wins) and
    leaves them: the JVM and the Python workers it starts read them for as long as the session
    lives.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if submitted():
        master = _submitted_master()
        if master and master != settings.spark.master:
            settings.spark.master = master  # spark-submit's --master wins over the config's
    if settings.spark.master:
        check_master_reachable(settings.spark.master)
    python = worker_python(settings)
    if python is not None:
        if "spark.pyspark.python" in settings.spark.conf:
            os.environ["PYSPARK_PYTHON"] = python
        else:
            os.environ.setdefault("PYSPARK_PYTHON", python)
    if is_local(settings):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # loopback only
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        # Spill and shuffle files under the lakehouse, not /tmp (env, not spark.local.dir, which
        # Spark warns it may override).
        os.environ.setdefault("SPARK_LOCAL_DIRS", str(work_dir(settings) / "spark"))
        try:
            work_dir(settings).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {work_dir(settings)}: {exc.strerror or exc}") from exc
    builder = SparkSession.builder
    if settings.spark.master:
        builder = builder.master(settings.spark.master)
    conf = session_conf(settings)
    if settings.storage.engine == "delta-spark" and not submitted() and not delta_jars_configured(conf):
        # Before the JVM starts (and anything is written): a session without the jars would only
        # fail once it opened the lakehouse.
        raise EngineUnavailableError(
            f"storage.engine is delta-spark but spark.jars_dir ({settings.spark.jars_dir}) holds no "
            "Delta jars: run `make setup` (it fetches them), point spark.jars_dir at them, or use "
            "storage.engine=delta-rs"
        )
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # the JVM failed to start; say what usually causes it
        hint = (
            "the JVM's own message is above; check spark.master, spark.driver_memory and spark.conf"
            if os.environ.get("JAVA_HOME") or shutil.which("java")
            else "Spark needs Java 17 on PATH or JAVA_HOME"
        )
        raise EngineUnavailableError(
            f"could not start Spark ({type(exc).__name__}: {' '.join(str(exc).split())}); {hint}"
        ) from exc
    spark.sparkContext.setLogLevel(settings.spark.log_level)
    if not is_local(settings):
        try:
            wait_for_slots(spark, 1, settings.spark.executor_wait_seconds, need="a Spark session")
        except EngineUnavailableError:
            spark.stop()
            raise
    log_event(
        log,
        "spark.session",
        master=spark.sparkContext.master,
        app_id=spark.sparkContext.applicationId,
        version=spark.version,
        shuffle_partitions=conf["spark.sql.shuffle.partitions"],
    )
    return spark


def task_slots(spark: SparkSession) -> int:
    """How many tasks the executors registered now can run at once (what a barrier stage needs)."""
    sc = spark.sparkContext._jsc.sc()  # noqa: SLF001 - py4j: the scheduler's own count
    return int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile()))


def wait_for_slots(spark: SparkSession, slots: int, seconds: float, *, need: str) -> None:
    """Wait until the cluster's executors offer ``slots`` concurrent tasks, or fail naming why.

    Without this a job on a cluster without (enough) live workers waits for resources forever,
    and a barrier stage (training's ranks) fails only after Spark's 40 checks 15 s apart.
    """
    if spark.conf.get("spark.dynamicAllocation.enabled", "false") == "true" and slots <= 1:
        return  # executors come with the first job
    deadline = time.monotonic() + seconds
    while (found := task_slots(spark)) < slots:
        if time.monotonic() > deadline:
            master = spark.sparkContext.master
            cpus = spark.conf.get("spark.task.cpus", "1")
            raise EngineUnavailableError(
                f"{need} needs {slots} concurrent task slot{'s' if slots > 1 else ''} but the executors of "
                f"{master} offer {found} after {seconds:.0f} s (spark.task.cpus={cpus}): too few live "
                "workers with free cores and memory; check the cluster, spark.conf (spark.executor.cores, "
                "spark.executor.memory) and spark.executor_wait_seconds"
            )
        time.sleep(0.25)


def delta_spark_loaded(spark: SparkSession) -> bool:
    """Whether Delta's Spark classes can be loaded in this (running) session."""
    try:
        gateway = jvm(spark)
        loader = gateway.java.lang.Thread.currentThread().getContextClassLoader()
        gateway.java.lang.Class.forName(DELTA_TABLE_CLASS, False, loader)
    except Exception:  # noqa: BLE001 - py4j surfaces ClassNotFoundException as a generic Py4JJavaError
        return False
    return True


def one_row(df: DataFrame) -> Row:
    """The first row of ``df``, which must have one (an aggregate's only row)."""
    row = df.first()
    if row is None:
        raise ValueError("expected a row, got an empty DataFrame")
    return row


def jvm(spark: SparkSession) -> Any:
    """The driver's JVM gateway (py4j), for the Hadoop and Delta APIs Python does not wrap."""
    gateway = spark.sparkContext._jvm  # noqa: SLF001 - py4j is the only way to reach them
    if gateway is None:
        raise RuntimeError("this Spark session has no JVM gateway (it was stopped)")
    return gateway


def hadoop_conf(spark: SparkSession) -> Any:
    """The session's Hadoop configuration (a py4j object)."""
    return spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001


def literal_path(path: str) -> str:
    """``path`` escaped for Spark's file readers, which take a path as a Hadoop glob pattern:
    unescaped, ``log[2].csv`` reads ``log2.csv`` and ``x{1}.csv`` is "not found"."""
    return re.sub(r"([\\{}\[\]*?])", r"\\\1", path)
