# The two user commands are `make demo` and `make test`; both run `setup` first and are idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# torch first, alone and pinned, so no later package pulls another build: PyPI's Linux wheel
# (CUDA libraries included, ~4 GB installed; it runs on the CPU too).
TORCH := torch==2.13.0
# Delta's and the Kafka connector's jars (.jars/spark), and Apache Kafka's broker (.jars/kafka, for
# `make kafka-up` and the kafka tests), fetched once from Maven Central by mvn, then reused offline.
JARS := .jars
JARS_STAMP := $(JARS)/.fetched
KAFKA_JARS_STAMP := $(JARS)/.kafka-fetched
MVN := mvn -B -q -ntp

# Airflow lives beside the project in a virtualenv of its own (airflow_dags/README.md).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_LOCK := airflow_dags/requirements-airflow.lock
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

.PHONY: setup airflow-setup airflow demo test lint bench mlflow-ui clean kafka-up kafka-down dist \
	cluster-up cluster-down mlflow-server mlflow-server-down

setup: $(STAMP) $(JARS_STAMP) $(KAFKA_JARS_STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v java >/dev/null || { echo "error: Java 17 is required by Spark (java not on PATH)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@touch $@

# Where Maven cannot be reached: one line, and the platform runs on its embedded engine; the
# tests that need the jars skip with that reason. Tried again on the next setup.
$(JARS_STAMP): jars/pom.xml
	@mkdir -p $(JARS)
	@if command -v mvn >/dev/null \
	    && $(MVN) -f jars/pom.xml dependency:copy-dependencies -Djars.dir=$(CURDIR)/$(JARS)/spark >$(JARS)/fetch.log 2>&1; \
	then touch $@; \
	else echo "note: could not fetch Delta/Kafka jars from Maven Central (mvn missing or unreachable; see $(JARS)/fetch.log): delta-rs engine only, the delta_spark tests will skip"; fi

# Airflow 3 + the Apache Spark provider, exactly as locked. Never into .venv: the provider pulls
# pyspark-client, which overwrites files of pyspark.
airflow-setup: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): $(AIRFLOW_LOCK)
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip --disable-pip-version-check install -q -r $(AIRFLOW_LOCK)
	$(AIRFLOW_VENV)/bin/python -m pip --disable-pip-version-check check
	@touch $@

# Airflow standalone on 127.0.0.1:$(AIRFLOW_PORT) (default 8080) with these DAGs; state in .airflow/.
airflow: setup airflow-setup
	$(AIRFLOW_VENV)/bin/python airflow_dags/standalone.py

# Where Maven cannot be reached: one line; `make kafka-up` then says what is missing and the kafka
# tests skip with that reason. Tried again on the next setup.
$(KAFKA_JARS_STAMP): jars/kafka-broker/pom.xml
	@mkdir -p $(JARS)
	@if command -v mvn >/dev/null \
	    && $(MVN) -f jars/kafka-broker/pom.xml dependency:copy-dependencies -Djars.dir=$(CURDIR)/$(JARS)/kafka >$(JARS)/fetch-kafka.log 2>&1; \
	then touch $@; \
	else echo "note: could not fetch Apache Kafka's jars from Maven Central (mvn missing or unreachable; see $(JARS)/fetch-kafka.log): no local broker, the kafka tests will skip"; fi

# A local single-node Kafka broker (KRaft) on 127.0.0.1, port broker.port of the config (default
# 9092; e.g. RECSYS__BROKER__PORT=19092 make kafka-up); data and logs in .kafka/. Both idempotent.
kafka-up: setup
	$(VENV)/bin/recsys broker up

kafka-down:
	@if test -x $(VENV)/bin/recsys; then $(VENV)/bin/recsys broker down; fi

demo: setup
	$(VENV)/bin/recsys demo

# Lint and type checks first: seconds, where the suite takes half an hour.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Where .venv-airflow cannot be built, one line: the tests marked airflow skip with that reason.
test: lint
	@$(MAKE) --no-print-directory airflow-setup || echo "note: could not build $(AIRFLOW_VENV): the airflow tests will skip"
	$(PY) -m pytest

# About 1.5 hours on 2 cores; quality needs ../shared/data/amazon_toys_sequences.txt.
bench: setup
	$(PY) bench/etl.py
	$(PY) bench/loader.py
	$(PY) bench/nearline.py
	$(PY) bench/quality.py

# The MLflow UI over this lakehouse's tracking store (ROOT=... for another lakehouse).
mlflow-ui: setup
	$(VENV)/bin/recsys ui $(if $(ROOT),--root $(ROOT))

# The package as spark-submit ships it: --py-files dist/recsys_spark-0.1.0.zip. A wheel is a zip,
# but pyspark puts only .zip/.egg/.jar files of --py-files on the executors' path, hence the copy.
DIST ?= dist
dist: setup
	@mkdir -p $(DIST)
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(DIST) .
	@cp $(DIST)/recsys_spark-0.1.0-py3-none-any.whl $(DIST)/recsys_spark-0.1.0.zip
	@echo "$(DIST)/recsys_spark-0.1.0.zip"

# A Spark standalone cluster on 127.0.0.1 (master spark://127.0.0.1:$(MASTER_PORT), two workers of
# 1 core and 2 GB) and an MLflow tracking server on http://127.0.0.1:$(MLFLOW_PORT); pids, logs
# and data in .cluster/ (scripts/services.py; the cluster tests start their own on other ports).
MASTER_PORT ?= 7077
MLFLOW_PORT ?= 5000
cluster-up: setup
	$(PY) scripts/services.py cluster-up --port $(MASTER_PORT)

cluster-down:
	$(PY) scripts/services.py cluster-down

mlflow-server: setup
	$(PY) scripts/services.py mlflow-up --port $(MLFLOW_PORT)

mlflow-server-down:
	$(PY) scripts/services.py mlflow-down

clean:
	rm -rf lakehouse demo-data .pytest_cache .airflow dist
