from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from recsys_spark.config import Settings, describe_settings, load_settings
from recsys_spark.errors import ConfigError
from recsys_spark.spark import work_dir
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[1]


def test_local_yaml_equals_builtin_defaults(tmp_path: Path) -> None:
    from_file = load_settings(REPO / "conf" / "local.yaml", root=tmp_path, environ={})
    builtin = Settings(root=str(tmp_path))
    assert from_file.model_dump() == builtin.model_dump()


def test_cluster_example_is_valid() -> None:
    cluster = load_settings(REPO / "conf" / "cluster.yaml", environ={})
    assert cluster.storage.engine == "delta-spark"
    assert cluster.spark.master is None
    assert cluster.root == "s3a://shop-lakehouse/recsys"


def test_precedence_yaml_env_set_root(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("spark:\n  shuffle_partitions: 3\nfeatures:\n  max_sequence_length: 10\n")
    settings = load_settings(
        config,
        overrides=["features.max_sequence_length=30"],
        root=tmp_path / "r",
        environ={
            "RECSYS__SPARK__SHUFFLE_PARTITIONS": "5",
            "RECSYS__FEATURES__MAX_SEQUENCE_LENGTH": "20",
            "RECSYS__ROOT": "/elsewhere",
        },
    )
    assert settings.spark.shuffle_partitions == 5  # env beats YAML
    assert settings.features.max_sequence_length == 30  # --set beats env
    assert settings.root == str((tmp_path / "r").resolve())  # --root beats everything


def test_set_parses_lists_null_and_nested_sections(tmp_path: Path) -> None:
    settings = load_settings(
        overrides=[
            "features.windows_days=[7, 1]",
            "features.as_of=2017-12-01T00:00:00",
            "features.split.protocol=leave-one-out",
            "spark.master=null",
        ],
        root=tmp_path,
        environ={},
    )
    assert settings.features.windows_days == [1, 7]
    assert settings.features.as_of == datetime(2017, 12, 1, tzinfo=UTC)  # naive means UTC
    assert settings.features.split.protocol == "leave-one-out"
    assert settings.spark.master is None


def test_spark_conf_keys_keep_their_dots(tmp_path: Path) -> None:
    settings = load_settings(
        overrides=["spark.conf.spark.sql.adaptive.enabled=false"], root=tmp_path, environ={}
    )
    assert settings.spark.conf["spark.sql.adaptive.enabled"] == "false"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("features.max_seq_len=5", "features.max_seq_len"),
        ("nonsense=1", "nonsense"),
        ("features.split.protocl=temporal", "features.split.protocl"),
    ],
)
def test_unknown_keys_fail_naming_the_key(tmp_path: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{named}'"):
        load_settings(overrides=[override], root=tmp_path, environ={})


def test_unknown_key_in_yaml_fails_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("storage:\n  engin: delta-rs\n")
    with pytest.raises(ConfigError, match=r"storage\.engin"):
        load_settings(config, environ={})


def test_unknown_env_variable_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RECSYS__SPARK__MASTR"):
        load_settings(root=tmp_path, environ={"RECSYS__SPARK__MASTR": "local"})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("features.max_sequence_length=0", "features.max_sequence_length"),
        ("features.max_sequence_length=ten", "features.max_sequence_length"),
        ("storage.engine=parquet", "storage.engine"),
        ("features.windows_days=[0]", "features.windows_days"),
        ("features.split.test_fraction=0.95", "features.split"),
    ],
)
def test_wrong_values_fail_naming_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(overrides=[override], root=tmp_path, environ={})


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_settings(overrides=["features.max_sequence_length"], root=tmp_path, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_default_root_is_absolute_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside the repo there is no conf/local.yaml: the built-in default root must still be
    # resolved, or Spark (its Ivy folder) and the workers would each see a different path.
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).root == str(tmp_path.resolve() / "lakehouse")


def test_sections_with_every_key_commented_out_are_empty(tmp_path: Path) -> None:
    # "conf:" or "spark:" whose lines are all commented out is YAML null, not an error.
    config = tmp_path / "c.yaml"
    config.write_text("spark:\n  conf:\n    # spark.executor.memory: 8g\nserving:\n  # k: 20\n")
    settings = load_settings(config, overrides=["spark.conf.spark.executor.memory=8g"],
                             root=tmp_path, environ={})
    assert settings.spark.conf == {"spark.executor.memory": "8g"}
    assert settings.serving.k == Settings(root=str(tmp_path)).serving.k


def test_repeated_yaml_key_fails_naming_it(tmp_path: Path) -> None:
    # YAML keeps the last of a repeated key: the first "spark" section would vanish silently.
    config = tmp_path / "c.yaml"
    config.write_text("spark:\n  shuffle_partitions: 2\nfeatures: {}\nspark:\n  app_name: x\n")
    with pytest.raises(ConfigError, match="repeats the key 'spark'"):
        load_settings(config, environ={})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config file"),  # a folder
        (b"\xff\xfespark: {}\n", "cannot read config file"),
        (b"spark: [\n", "not valid YAML"),
    ],
)
def test_unreadable_config_is_one_line_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.mkdir() if content is None else config.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(config, environ={})
    assert "\n" not in str(caught.value)


def test_override_values_keep_empty_strings_and_flatten_yaml_errors(tmp_path: Path) -> None:
    settings = load_settings(overrides=["spark.app_name="], root=tmp_path, environ={})
    assert settings.spark.app_name == ""
    with pytest.raises(ConfigError, match="cannot parse") as caught:
        load_settings(overrides=["spark.conf.a={x"], root=tmp_path, environ={})
    assert "\n" not in str(caught.value)


def test_root_that_is_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "lake").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        load_settings(root=tmp_path / "lake", environ={})


def test_read_only_root_keeps_its_scratch_in_the_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(root=tmp_path, environ={})
    assert work_dir(settings) == tmp_path / "_work"
    # a read-only mount (as root, permission bits would not show it: the check asks the OS)
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path)
    assert work_dir(settings).is_relative_to(tempfile.gettempdir())


def test_root_with_a_percent_sign_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds '%'"):
        load_settings(root=tmp_path / "lake%41", environ={})


def test_remote_root_is_kept_verbatim() -> None:
    settings = load_settings(root="s3a://bucket/lake/", environ={})
    assert settings.root == "s3a://bucket/lake"
    # A local session driving a remote lakehouse keeps its scratch files local.
    assert work_dir(settings).is_relative_to(tempfile.gettempdir())


def test_explain_lists_every_leaf_key() -> None:
    keys = {key for key, _, _ in describe_settings()}
    assert {"root", "storage.engine", "features.split.protocol", "spark.conf"} <= keys


def test_local_session_reads_parquet_through_the_heap(spark) -> None:
    # Vectored reads would buffer column chunks off-heap, beyond driver_memory (docs/benchmarks.md).
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    assert hadoop.get("parquet.hadoop.vectored.io.enabled") == "false"


def test_a_delta_session_rebuilds_table_state_in_as_few_tasks_as_it_shuffles(tmp_path) -> None:
    from recsys_spark.spark import session_conf

    small = session_conf(make_settings(tmp_path, "storage.engine=delta-spark", "spark.shuffle_partitions=3"))
    assert small["spark.databricks.delta.snapshotPartitions"] == "3"
    large = session_conf(make_settings(tmp_path, "storage.engine=delta-spark", "spark.shuffle_partitions=400"))
    assert large["spark.databricks.delta.snapshotPartitions"] == "50"  # never more than Delta's own default


def test_configured_worker_python_reaches_the_executors(tmp_path: Path) -> None:
    # PySpark reads the executors' Python from PYSPARK_PYTHON only; without spark-submit a session
    # started by recsys must pass the config's spark.pyspark.python on (a cluster's executors ran
    # "python3", which lacks the project).
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nRECSYS_TEST_WORKER_PYTHON=wrapped exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    script = (
        "import os, sys\n"
        "from recsys_spark.spark import get_spark\n"
        "from tests.conftest import make_settings\n"
        f"settings = make_settings(sys.argv[1], 'spark.master=local[1]', 'spark.conf.spark.pyspark.python={wrapper}')\n"
        "spark = get_spark(settings)\n"
        "seen = spark.sparkContext.parallelize([0], 1)"
        ".map(lambda _: os.environ.get('RECSYS_TEST_WORKER_PYTHON')).collect()\n"
        "print(seen[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lake")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "wrapped"
