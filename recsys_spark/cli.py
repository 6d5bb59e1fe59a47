"""``recsys``: the command-line interface of every stage.

Every command takes ``--config FILE``, ``--root DIR``, ``--set key=value`` (repeatable) and
``--json``; with ``--json`` the last line of standard output is one JSON object describing the
result. Errors a user can cause print one line (``error: ...``) to standard error and exit
non-zero. Logs go to standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import yaml

from recsys_spark.config import Settings, describe_settings, load_settings
from recsys_spark.constants import BASELINE_NAMES, GOLD_TRAINING_EXAMPLES, INPUT_FORMATS, LAYERS, MODEL_NAMES
from recsys_spark.errors import RecsysError, UsageError
from recsys_spark.logs import configure_logging
from recsys_spark.serving.replay import DEFAULT_PARTITIONS

Handler = Callable[[argparse.Namespace, Settings], dict[str, Any]]


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--config", help="YAML config (default: $RECSYS_CONFIG or conf/local.yaml)")
    common.add_argument("--root", help="lakehouse root folder (overrides config `root`)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set features.max_sequence_length=100",
    )
    common.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return common


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line, like every other user error (exit code 2, as argparse),
    and with --json the error object too (the command line is not parsed yet, hence the flag)."""

    json_requested = False

    def error(self, message: str) -> NoReturn:
        line = f"{message} (see: {self.prog} --help)"
        if _Parser.json_requested:
            print(json.dumps({"error": line, "exit_code": 2}))
        self.exit(2, f"error: {line}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog="recsys", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, parents=[common], help=help_text,
                                                           description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    gen = command("generate", _generate, "write a synthetic e-commerce behaviour log")
    gen.add_argument("--users", type=_positive_int, default=10_000)
    gen.add_argument("--items", type=_positive_int, default=5_000)
    gen.add_argument("--days", type=_positive_int, default=7)
    gen.add_argument("--seed", type=_non_negative_int, default=0)
    gen.add_argument("--out", required=True, help="output file (a folder with --daily)")
    gen.add_argument("--format", choices=("taobao", "jsonl"), default="taobao")
    gen.add_argument("--malformed-rate", type=float, default=0.0, help="share of bad rows mixed in")
    gen.add_argument("--daily", action="store_true",
                     help="one folder per day: OUT/date=YYYY-MM-DD/events.csv (or .jsonl)")

    ing = command("ingest", _ingest, "ingest a behaviour log into bronze/silver Delta tables")
    ing.add_argument("--format", choices=INPUT_FORMATS, required=True)
    ing.add_argument(
        "--input", required=True,
        help="a file, or a folder (files at any depth; names starting with . or _ skipped)",
    )

    feat = command("features", _features, "build gold feature, sequence and training tables")
    feat.add_argument("--as-of", type=_timestamp, help="feature time (default: newest event)")
    feat.add_argument(
        "--silver-version", type=_non_negative_int, help="read silver/events as of this version"
    )

    command("tables", _tables, "list the lakehouse's tables and their versions")

    hist = command("history", _history, "show a table's commits, newest first")
    hist.add_argument("table", help="<layer>/<name>, e.g. silver/events")
    hist.add_argument("--limit", type=_positive_int, default=20)

    maint = command("maintain", _maintain, "compact and/or vacuum tables")
    maint.add_argument("tables", nargs="*", help="tables (default: all)")
    maint.add_argument("--optimize", action="store_true", help="compact small files")
    maint.add_argument("--vacuum", action="store_true", help="delete unreferenced old files")

    train = command("train", _train, "train a model with TorchDistributor, log it to MLflow, gate it")
    train.add_argument("--model", choices=MODEL_NAMES, help="default: training.model")
    train.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its checkpoint")
    train.add_argument("--no-gate", action="store_true",
                       help="register the challenger without the registry decision (`recsys gate` makes it)")
    train.add_argument("--run-key", metavar="KEY",
                       help="idempotency key (e.g. recsys_daily/2017-11-25): a finished run of this key and "
                            "model is returned instead of training again")

    gate = command("gate", _gate, "the registry decision: promote a registered challenger if it beats the champion")
    gate.add_argument("--version", help="registered model version (default: the newest)")

    base = command("baselines", _baselines, "fit and evaluate the baselines, logged to MLflow")
    base.add_argument("names", nargs="*", help=f"subset of: {', '.join(BASELINE_NAMES)} (default: all)")

    ev = command("evaluate", _evaluate, "full-ranking evaluation of a registered model, in Spark")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--version", help="registered model version")
    which.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    ev.add_argument("--split", choices=("test", "validation"), default="test")

    prom = command("promote", _promote, "make a registered model version the champion by hand")
    prom.add_argument("--version", required=True)
    prom.add_argument("--reason", default="manual promotion")

    ui = command("ui", _ui, "open the MLflow UI on 127.0.0.1 for this lakehouse's tracking store")
    ui.add_argument("--port", type=_positive_int, default=5000)

    score = command("score-batch", _score_batch,
                    "write every user's top-K from the champion to serving/recommendations")
    score.add_argument("--generated-at", type=_timestamp, metavar="TIME",
                       help="the lists' generated_at (default: now); a scheduler passes its logical time, "
                            "so a rerun writes the same rows")

    stream = command("stream", _stream, "run the nearline streaming query until stopped")
    stream.add_argument("--landing", help="landing folder (default: serving.stream.landing)")
    stream.add_argument("--format", choices=("taobao", "jsonl"), help="default: serving.stream.format")
    stream.add_argument("--until-idle", type=_positive_number, metavar="SECONDS",
                        help="stop after this long without new data")
    stream.add_argument("--timeout", type=_positive_number, metavar="SECONDS", help="stop after this long")

    status = command("stream-status", _stream_status,
                     "whether a nearline query runs, and its recent micro-batches (no Spark needed)")
    status.add_argument("--window", type=_positive_number, default=900.0, metavar="SECONDS",
                        help="sum up the micro-batches of the last SECONDS (default 900)")

    rep = command("replay", _replay, "publish a log into a landing folder or a Kafka topic at a steady pace")
    rep.add_argument("--input", required=True)
    rep.add_argument("--format", choices=("taobao", "jsonl"), required=True)
    rep.add_argument("--sink", choices=("landing", "kafka"), default="landing",
                     help="landing: small files in --landing; kafka: messages keyed by user id (default: landing)")
    rep.add_argument("--landing", help="landing folder (--sink landing)")
    rep.add_argument("--topic", help="Kafka topic (--sink kafka; default: serving.stream.kafka.topic)")
    rep.add_argument("--bootstrap-servers", help="Kafka cluster (default: serving.stream.kafka.bootstrap_servers, "
                     "else the local broker)")
    rep.add_argument("--partitions", type=_positive_int, default=DEFAULT_PARTITIONS,
                     help=f"partitions of a topic created by the replay (default: {DEFAULT_PARTITIONS})")
    pace = rep.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=_positive_number, metavar="EVENTS_PER_S")
    pace.add_argument("--speedup", type=_positive_number, metavar="X", help="the log's own timing, X times faster")
    rep.add_argument("--keep-time", action="store_true", help="keep original event times")
    rep.add_argument("--limit", type=_positive_int, help="replay only the first N lines")

    brk = command("broker", _broker, "start, stop or show the local Kafka broker (KRaft, 127.0.0.1; trials, tests)")
    brk.add_argument("action", choices=("up", "down", "status"))

    rec = command("recommend", _recommend, "show a user's current recommendations")
    rec.add_argument("--user", type=_non_negative_int, required=True, help="raw user id")
    rec.add_argument("--k", type=_positive_int, default=10)

    conf = command("config", _config, "print the resolved configuration")
    conf.add_argument("--explain", action="store_true", help="list every key with its help")

    demo = command("demo", _demo, "run the whole pipeline on a synthetic log and summarise")
    demo.add_argument("--users", type=_positive_int, default=3_000)
    demo.add_argument("--items", type=_positive_int, default=2_000)
    demo.add_argument("--days", type=_positive_int, default=14)
    return parser


# Commands whose list of names may also follow their options ("maintain a --vacuum b"), which
# argparse alone refuses once subcommands are involved.
_TRAILING_NAMES = {"maintain": "tables", "baselines": "names"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_requested = "--json" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in _TRAILING_NAMES or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, _TRAILING_NAMES[args.command]).extend(extra)
    try:
        settings = load_settings(args.config, overrides=args.set, root=args.root)
        configure_logging(settings.logging.level, settings.logging.format)
        result = args.handler(args, settings)
    except RecsysError as exc:
        # One line, whatever a wrapped library put in its message (delta-rs: a "Help:" line).
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        if args.json:  # a scheduler reading the last stdout line learns why, too
            print(json.dumps({"error": message, "exit_code": exc.exit_code, "error_type": type(exc).__name__}))
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str, sort_keys=True))
    return 0


def run_job(command: str) -> None:
    """Entry point of ``jobs/<stage>.py`` under spark-submit: ``recsys <command> <args>``."""
    sys.exit(main([command, *sys.argv[1:]]))


# --- argument types ------------------------------------------------------------------------------


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _non_negative_int(text: str) -> int:
    return _integer(text, 0)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output, suppressed under ``--json`` so the JSON line stands alone."""
    if not args.json:
        print(text)


# --- handlers ------------------------------------------------------------------------------------


def _require_lakehouse(settings: Settings) -> None:
    """Every command but ingest (and demo) works on an existing lakehouse: a mistyped root must
    fail, not come into being empty (and "succeed", as `tables` or `maintain` would)."""
    # A layer folder, not only the root: an ingest that failed on a new root leaves its
    # scratch folder (_work) behind, and that is no lakehouse either.
    root = Path(settings.root)
    if "://" not in settings.root and not any((root / layer).is_dir() for layer in LAYERS):
        raise RecsysError(f"no lakehouse at {settings.root}: check --root, or run `recsys ingest` first")


def _require_tracking(settings: Settings) -> None:
    """Commands that log to or load from MLflow check it answers before Spark starts: an
    unreachable server fails in seconds, with nothing written."""
    _require_lakehouse(settings)  # before a default store is created in it
    from recsys_spark.tracking import connect

    connect(settings)


def _session(settings: Settings, *, new_lakehouse: bool = False) -> tuple[Any, Any]:
    from recsys_spark.spark import get_spark
    from recsys_spark.storage import open_lakehouse

    if not new_lakehouse:
        _require_lakehouse(settings)
    spark = get_spark(settings)
    return spark, open_lakehouse(spark, settings)


def _generate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.generate import GeneratorConfig, write_log

    try:
        cfg = GeneratorConfig(users=args.users, items=args.items, days=args.days, seed=args.seed)
        report = write_log(cfg, args.out, fmt=args.format, malformed_rate=args.malformed_rate, daily=args.daily)
    except ValueError as exc:
        raise RecsysError(str(exc)) from exc
    except OSError as exc:
        raise RecsysError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    _say(args, f"wrote {report.lines:,} lines ({report.events:,} events, {report.malformed:,} "
               f"malformed) to {report.path}" + (f" in {report.files} day folders" if args.daily else ""))
    return {
        "path": report.path,
        "files": report.files,
        "format": report.format,
        "events": report.events,
        "malformed": report.malformed,
        "lines": report.lines,
        "behavior_counts": report.behavior_counts,
    }


def _ingest(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.ingest import run_ingest
    from recsys_spark.ingest.sources import discover_inputs, is_uri

    if not is_uri(args.input):  # fail on a missing/empty local input before starting Spark
        discover_inputs(args.input, lakehouse=settings.root)
    spark, lake = _session(settings, new_lakehouse=True)
    report = run_ingest(spark, lake, settings, input_path=args.input, fmt=args.format)
    _say(
        args,
        f"ingest {report.run_id} ({report.status}): {report.rows_in:,} rows in -> "
        f"{report.rows_clean:,} clean, {report.rows_quarantined:,} quarantined "
        f"{report.quarantine_reasons or ''}, {report.rows_duplicate:,} duplicate",
    )
    return report.as_dict()


def _features(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.features import build_features

    if args.as_of is not None:
        settings.features.as_of = args.as_of
    spark, lake = _session(settings)
    report = build_features(spark, lake, settings, silver_version=args.silver_version)
    _say(args, f"features as of {report.as_of} ({report.protocol}) from silver/events "
               f"v{report.source_versions['silver/events']}:")
    for table, rows in report.rows.items():
        _say(args, f"  {table:<26} {rows:>12,} rows  (v{report.output_versions[table]})")
    return report.as_dict()


def _tables(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    _, lake = _session(settings)
    found = lake.tables()
    for t in found:
        _say(args, f"{t.name:<28} v{t.version:<6} {t.path}" if t.error is None
             else f"{t.name:<28} {'unreadable':<7} {t.path}")
    broken = [t for t in found if t.error is not None]
    if broken:  # listed above with the rest; the command fails so that a scheduler notices
        raise RecsysError("; ".join(t.error for t in broken if t.error))
    tables = [{"table": t.name, "version": t.version, "path": t.path} for t in found]
    return {"root": settings.root, "engine": lake.engine.name, "tables": tables}


def _history(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.storage import check_table_name

    check_table_name(args.table)  # before Spark starts
    _, lake = _session(settings)
    commits = lake.history(args.table, args.limit)
    for c in commits:
        when = datetime.fromtimestamp(int(c.get("timestamp", 0)) / 1000, UTC) if isinstance(
            c.get("timestamp"), int) else c.get("timestamp")
        _say(args, f"v{c.get('version')}  {when}  {c.get('operation')}")
    return {"table": args.table, "commits": commits}


def _maintain(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if not (args.optimize or args.vacuum):
        raise UsageError("maintain needs --optimize and/or --vacuum")
    from recsys_spark.storage import check_table_name

    for name in args.tables:
        check_table_name(name)  # before Spark starts
    _, lake = _session(settings)
    names = args.tables or [t.name for t in lake.tables()]
    missing = [name for name in names if not lake.exists(name)]
    if missing:  # before touching any table
        raise RecsysError(f"no table {', '.join(missing)} under {settings.root}")
    done: dict[str, dict[str, Any]] = {}
    for name in names:
        entry: dict[str, Any] = {}
        if args.optimize:
            entry["optimize"] = lake.optimize(name)
        if args.vacuum:
            entry["files_vacuumed"] = len(lake.vacuum(name, settings.storage.vacuum_retention_hours))
        done[name] = entry
        _say(args, f"{name}: {entry}")
    return {"tables": done}


def _metric_line(metrics: dict[str, float]) -> str:
    keys = ("hit@10", "ndcg@10", "recall@10", "mrr", "coverage@10")
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def _train(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.training.runner import run_training

    _require_tracking(settings)
    spark, lake = _session(settings)
    report = run_training(spark, lake, settings, model=args.model, resume_run_id=args.resume,
                          gate=not args.no_gate, run_key=args.run_key)
    decision = ("not gated yet: `recsys gate` decides" if not report.gated else "promoted to champion"
                if report.promoted else f"champion stays v{report.champion_version}")
    if report.reused:
        _say(args, f"run key {report.run_key!r} already finished: reusing its run")
    _say(args, f"{report.model_name}: run {report.run_id}, registered {report.registered_model} "
               f"v{report.model_version} ({decision}); best epoch {report.best_epoch} of {report.epochs_run}")
    _say(args, f"  test  {_metric_line(report.test)}")
    return report.as_dict()


def _gate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.training.runner import run_gate

    _, lake = _session(settings)
    report = run_gate(lake, settings, version=args.version)
    _say(args, f"{report['registered_model']} v{report['model_version']}: {report['decision']} ({report['reason']})")
    return report


def _baselines(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.baselines import run_baselines

    unknown = [n for n in args.names if n not in BASELINE_NAMES]
    if unknown:
        raise UsageError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINE_NAMES)}")
    _require_tracking(settings)
    _, lake = _session(settings)
    results = run_baselines(lake, settings, tuple(args.names) or BASELINE_NAMES)
    for r in results:
        _say(args, f"{r['baseline']:<18} {_metric_line(r['test'])}  (run {r['run_id']})")
    return {"baselines": results}


def _evaluate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.evaluation.versions import evaluate_version

    _, lake = _session(settings)
    result = evaluate_version(lake, settings, version=args.version, alias=args.alias, split=args.split)
    _say(args, f"{result.model_uri} on {GOLD_TRAINING_EXAMPLES} v{result.table_version} {result.split} "
               f"({result.protocol}):")
    _say(args, f"  {_metric_line(result.metrics)}")
    return result.as_dict()


def _promote(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    _require_lakehouse(settings)  # before the tracking store is created in it
    from recsys_spark.tracking import connect, promote

    promote(connect(settings), settings, args.version, reason=args.reason)
    _say(args, f"{settings.mlflow.registered_model} v{args.version} is now the champion")
    return {"registered_model": settings.mlflow.registered_model, "champion": args.version}


def _ui(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    _require_lakehouse(settings)  # before the tracking store is created in it
    from recsys_spark.processes import run_process_group
    from recsys_spark.tracking import tracking_uri

    uri = tracking_uri(settings)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(args.port)]
    return {"exit_code": run_process_group(command), "tracking_uri": uri}


def _score_batch(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.serving.scoring import score_all_users

    _require_tracking(settings)
    spark, lake = _session(settings)
    report = score_all_users(spark, lake, settings, generated_at=args.generated_at)
    _say(args, f"{report['users']:,} users scored with {report['model_name']} v{report['model_version']}: "
               f"coverage {report['catalogue_coverage']:.1%}, intra-list diversity "
               f"{report['intra_list_diversity']:.3f}")
    return report


def _stream(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.serving.streaming import run_stream

    if args.landing:
        settings.serving.stream.landing = args.landing
    if args.format:
        settings.serving.stream.format = args.format
    _require_tracking(settings)
    spark, lake = _session(settings)
    report = run_stream(spark, lake, settings, until_idle=args.until_idle, timeout=args.timeout)
    _say(args, f"stream stopped after {report['batches']} micro-batches ({report['seconds']}s)")
    return report


def _stream_status(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    _require_lakehouse(settings)
    from recsys_spark.serving.stream_guard import stream_health
    from recsys_spark.serving.streaming import checkpoint_dir

    report = stream_health(settings.root, checkpoint_dir(settings), window=timedelta(seconds=args.window))
    holder = report["holder"] or {}
    _say(args, f"running: pid {holder.get('pid')} since {holder.get('started_at')} ({holder.get('phase')})"
               if report["running"] else f"not running (checkpoint {report['checkpoint']})")
    rate = report["quarantine_rate"]
    _say(args, f"last {args.window:g}s: {report['batches']} micro-batches, {report['rows_in']:,} rows, "
               f"quarantined {'-' if rate is None else f'{rate:.1%}'}, worst p95 latency "
               f"{report['latency_p95_s'] if report['latency_p95_s'] is not None else '-'}s; last batch at "
               f"{report['last_batch_at'] or 'never'}")
    return report


def _replay(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.serving.replay import KafkaTopic, LandingFolder, Sink, replay

    sink: Sink
    if args.sink == "landing":
        if not args.landing or args.topic or args.bootstrap_servers:
            raise UsageError("--sink landing takes --landing DIR (and no --topic or --bootstrap-servers)")
        sink = LandingFolder(args.landing, args.format)
    else:
        if args.landing:
            raise UsageError("--landing is for --sink landing; --sink kafka takes --topic")
        sink = KafkaTopic(args.bootstrap_servers or settings.kafka_bootstrap_servers,
                          args.topic or settings.serving.stream.kafka.topic, partitions=args.partitions)
    report = replay(args.input, args.format, sink, rate=args.rate, speedup=args.speedup,
                    keep_time=args.keep_time, limit=args.limit)
    where = (f"in {report.sink['files']} files into {report.sink['landing']}" if args.sink == "landing" else
             f"to Kafka topic {report.sink['topic']} ({report.sink['partitions']} partitions) at "
             f"{report.sink['bootstrap_servers']}")
    _say(args, f"replayed {report.events:,} events {where} over {report.seconds:.1f}s ({report.rate:.0f}/s)")
    return {"events": report.events, "seconds": round(report.seconds, 2), "rate": round(report.rate, 1),
            **report.sink}


def _broker(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.broker import LocalBroker

    broker = LocalBroker.from_settings(settings)
    if args.action == "up":
        status = broker.up(settings.broker.start_timeout_seconds)
    elif args.action == "down":
        status = broker.down()
    else:
        status = broker.status()
    took = f" in {status.seconds} s" if status.seconds is not None else ""
    pid = f", pid {status.pid}" if status.pid else ""
    _say(args, f"Kafka broker at {status.bootstrap_servers}: {status.action}{took}{pid} (folder {status.folder})")
    return status.as_dict()


def _recommend(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.serving.lookup import RecommendationLookup
    from recsys_spark.serving.rules import BusinessRules

    _require_lakehouse(settings)
    result = RecommendationLookup(settings.root, refresh_seconds=settings.serving.lookup_refresh_seconds,
                                  cold_start_k=settings.serving.k,
                                  rules=BusinessRules.from_settings(settings.serving)).get(args.user, args.k)
    origin = "cold start (popular items)" if result.cold_start else (
        f"{result.source}, model v{result.model_version}, {result.generated_at:%Y-%m-%d %H:%M:%S}")
    _say(args, f"user {result.user_id}: {origin}")
    _say(args, "  " + " ".join(str(i) for i in result.item_ids))
    return result.as_dict()


def _config(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if args.explain:
        keys = describe_settings()
        for key, default, help_text in keys:
            _say(args, f"{key:<40} default {default:<24} {help_text}")
        return {"keys": [{"key": k, "default": d, "help": h} for k, d, h in keys]}
    _say(args, yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False).rstrip())
    return settings.model_dump(mode="json")


def _demo(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from recsys_spark.demo import run_demo

    return run_demo(settings, users=args.users, items=args.items, days=args.days, say=lambda t: _say(args, t))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
