"""Column names, behaviour types and table names shared by every stage.

Stages take column names as keyword defaults from here (``col_user=USER_ID``) so a rename happens in
one place, and tables are addressed by the names below, never by path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, get_args

# --- event columns -------------------------------------------------------------------------------
EVENT_ID: Final = "event_id"
EVENT_KEY: Final = "event_key"
USER_ID: Final = "user_id"
ITEM_ID: Final = "item_id"
CATEGORY_ID: Final = "category_id"
BEHAVIOR: Final = "behavior_type"
EVENT_TS: Final = "event_ts"
EVENT_DATE: Final = "event_date"
EXTRAS: Final = "extras"
USER_IDX: Final = "user_idx"
ITEM_IDX: Final = "item_idx"

# --- lineage columns ------------------------------------------------------------------------------
RAW: Final = "raw"
SOURCE_FILE: Final = "source_file"
RUN_ID: Final = "ingest_run_id"
INGESTED_AT: Final = "ingested_at"
INGEST_DATE: Final = "ingest_date"
REASON: Final = "reason"
DETAIL: Final = "detail"

# --- behaviour vocabulary -------------------------------------------------------------------------
Behavior = Literal["pv", "cart", "fav", "buy"]
BEHAVIORS: Final[tuple[str, ...]] = ("pv", "cart", "fav", "buy")
# Dense codes used in gold sequences and by the models (0 is left free for padding there).
BEHAVIOR_CODES: Final[dict[str, int]] = {b: i + 1 for i, b in enumerate(BEHAVIORS)}

InputFormat = Literal["taobao", "jsonl", "sequences"]
INPUT_FORMATS: Final[tuple[str, ...]] = ("taobao", "jsonl", "sequences")

# The length in bytes of the line a raw row was read from (a too-long line is read only in part).
LINE_BYTES: Final = "line_bytes"

# --- quarantine reason codes ----------------------------------------------------------------------
LINE_TOO_LONG: Final = "line_too_long"
INVALID_ENCODING: Final = "invalid_encoding"
WRONG_FIELD_COUNT: Final = "wrong_field_count"
MALFORMED_JSON: Final = "malformed_json"
MISSING_FIELD: Final = "missing_field"
INVALID_ID: Final = "invalid_id"
UNKNOWN_BEHAVIOR: Final = "unknown_behavior"
INVALID_TIMESTAMP: Final = "invalid_timestamp"
TIMESTAMP_OUT_OF_RANGE: Final = "timestamp_out_of_range"
REASON_CODES: Final[tuple[str, ...]] = (
    LINE_TOO_LONG,
    INVALID_ENCODING,
    WRONG_FIELD_COUNT,
    MALFORMED_JSON,
    MISSING_FIELD,
    INVALID_ID,
    UNKNOWN_BEHAVIOR,
    INVALID_TIMESTAMP,
    TIMESTAMP_OUT_OF_RANGE,
)

# --- lakehouse layout: "<layer>/<table>" under the root ------------------------------------------
LAYERS: Final[tuple[str, ...]] = ("bronze", "silver", "gold", "quarantine", "serving", "ops")

BRONZE_EVENTS_RAW: Final = "bronze/events_raw"
QUARANTINE_EVENTS: Final = "quarantine/events"
SILVER_EVENTS: Final = "silver/events"
SILVER_USER_INDEX: Final = "silver/user_index"
SILVER_ITEM_INDEX: Final = "silver/item_index"
GOLD_USER_FEATURES: Final = "gold/user_features"
GOLD_ITEM_FEATURES: Final = "gold/item_features"
GOLD_USER_SEQUENCES: Final = "gold/user_sequences"
GOLD_TRAINING_EXAMPLES: Final = "gold/training_examples"
SERVING_RECOMMENDATIONS: Final = "serving/recommendations"
SERVING_ITEM_EMBEDDINGS: Final = "serving/item_embeddings"
SERVING_USER_STATE: Final = "serving/user_state"
OPS_INGEST_RUNS: Final = "ops/ingest_runs"
OPS_STREAM_METRICS: Final = "ops/stream_metrics"
OPS_FEATURE_RUNS: Final = "ops/feature_runs"

# --- gold columns: features writes them, models and serving read them ---------------------------
# gold/training_examples: a history (item indices, behaviour codes, gaps) and its targets
HISTORY_ITEMS: Final = "history_items"
HISTORY_BEHAVIORS: Final = "history_behaviors"
HISTORY_GAPS: Final = "history_gaps"
HISTORY_END_TS: Final = "history_end_ts"
TARGETS: Final = "targets"
TARGET_START_TS: Final = "target_start_ts"
SEEN_ITEMS: Final = "seen_items"
# gold/user_sequences: each user's most recent steps and every purchase
SEQUENCE_ITEMS: Final = "items"
SEQUENCE_BEHAVIORS: Final = "behaviors"
SEQUENCE_GAPS: Final = "gaps"
LAST_EVENT_TS: Final = "last_event_ts"
LAST_STEP_TS: Final = "last_step_ts"
BOUGHT_ITEMS: Final = "bought_items"

# --- serving/recommendations columns --------------------------------------------------------------
ITEM_IDS: Final = "item_ids"
SCORES: Final = "scores"
MODEL_NAME: Final = "model_name"
MODEL_VERSION: Final = "model_version"
GENERATED_AT: Final = "generated_at"
STREAM_BATCH_ID: Final = "stream_batch_id"
INTRA_LIST_DIVERSITY: Final = "intra_list_diversity"
SOURCE: Final = "source"
# values of SOURCE: who wrote the list
BATCH_SOURCE: Final = "batch"
NEARLINE_SOURCE: Final = "nearline"

# --- split protocol -------------------------------------------------------------------------------
SplitProtocol = Literal["leave-one-out", "temporal"]
SPLIT: Final = "split"
TRAIN: Final = "train"
VALIDATION: Final = "validation"
TEST: Final = "test"

# Commit metadata key of silver/events commits: the input format of the ingest run.
FORMAT_KEY: Final = "format"

# --- models and baselines -------------------------------------------------------------------------
# The trainable models (``modeling.tasks.TASKS`` implements each) and the baselines
# (``baselines.FITTERS``); config and the CLI offer exactly these, a test keeps them in step.
ModelName = Literal["sasrec", "two_tower", "mf"]
MODEL_NAMES: Final[tuple[str, ...]] = get_args(ModelName)
BaselineName = Literal["popularity", "popularity_recent", "itemcf", "als"]
BASELINE_NAMES: Final[tuple[str, ...]] = get_args(BaselineName)

# --- metrics ----------------------------------------------------------------------------------------
# Full-ranking metrics at a cut-off K (``ndcg@10``), plus ``mrr``, which has none.
METRICS_AT_K: Final[tuple[str, ...]] = ("hit", "ndcg", "recall", "coverage")
MRR: Final = "mrr"


def metric_names(ks: Iterable[int]) -> list[str]:
    """Every metric evaluation reports for these cut-offs."""
    return [f"{metric}@{k}" for metric in METRICS_AT_K for k in ks] + [MRR]


def metric_key(name: str) -> str:
    """``hit@10`` -> ``hit_at_10``: MLflow metric names may not contain ``@``."""
    return name.replace("@", "_at_")
