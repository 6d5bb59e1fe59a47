"""The serving and stream tables' schemas, defined once for batch scoring (Spark) and the
nearline sink (Arrow)."""

from __future__ import annotations

import pyarrow as pa

from recsys_spark.constants import (
    GENERATED_AT,
    INTRA_LIST_DIVERSITY,
    ITEM_IDS,
    LAST_EVENT_TS,
    MODEL_NAME,
    MODEL_VERSION,
    SCORES,
    SOURCE,
    STREAM_BATCH_ID,
    USER_ID,
    USER_IDX,
)

TS = pa.timestamp("us", tz="UTC")

# serving/recommendations: one row per user and source (batch, nearline)
RECOMMENDATION_SCHEMA = pa.schema([
    pa.field(USER_ID, pa.int64()),
    pa.field(USER_IDX, pa.int32()),
    pa.field(ITEM_IDS, pa.list_(pa.int64())),
    pa.field(SCORES, pa.list_(pa.float32())),
    pa.field(MODEL_NAME, pa.string()),
    pa.field(MODEL_VERSION, pa.string()),
    pa.field(GENERATED_AT, TS),
    pa.field(LAST_EVENT_TS, TS),
    pa.field(STREAM_BATCH_ID, pa.int64()),
    pa.field(INTRA_LIST_DIVERSITY, pa.float64()),
    pa.field(SOURCE, pa.string()),
])

# serving/user_state: each streamed user's recent events (raw ids) and every purchase
STATE_BEHAVIORS = "behaviors"
STATE_EVENT_TS = "event_ts"
STATE_BOUGHT = "bought"
UPDATED_AT = "updated_at"
USER_STATE_SCHEMA = pa.schema([
    pa.field(USER_ID, pa.int64()),
    pa.field(ITEM_IDS, pa.list_(pa.int64())),
    pa.field(STATE_BEHAVIORS, pa.list_(pa.string())),
    pa.field(STATE_EVENT_TS, pa.list_(TS)),
    pa.field(STATE_BOUGHT, pa.list_(pa.int64())),
    pa.field(LAST_EVENT_TS, TS),
    pa.field(STREAM_BATCH_ID, pa.int64()),
    pa.field(UPDATED_AT, TS),
])

# ops/stream_metrics: one row per micro-batch
STREAM_METRICS_SCHEMA = pa.schema([
    pa.field("batch_id", pa.int64()),
    pa.field("committed_at", TS),
    pa.field("rows_in", pa.int64()),
    pa.field("rows_clean", pa.int64()),
    pa.field("rows_quarantined", pa.int64()),
    pa.field("users_updated", pa.int64()),
    pa.field("latency_p50_s", pa.float64()),
    pa.field("latency_p95_s", pa.float64()),
    pa.field("latency_max_s", pa.float64()),
    pa.field("processing_s", pa.float64()),
    pa.field(MODEL_VERSION, pa.string()),
])
