"""The benchmarks' own fixtures stay in step with the product (``make bench`` is not in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_lookup_benchmark_table_is_a_serving_table_the_lookup_reads(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import nearline
    finally:
        sys.path.remove(str(BENCH))
    result = nearline.lookup_latency(tmp_path, users=200, k=5)
    assert result["users"] == 200 and result["lookups"] == 20_000
    assert result["p99_ms"] > 0
