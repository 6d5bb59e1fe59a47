"""Typed records that one stage writes into a table's Delta commit metadata and another reads
back (commit metadata holds strings; each record converts both ways in one place)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from recsys_spark.constants import SplitProtocol
from recsys_spark.errors import InputDataError


@dataclass(frozen=True)
class GoldCommit:
    """What every gold table's commit records of the features run that wrote it; training reads
    it back from the version it trains on."""

    feature_run_id: str
    as_of: datetime
    protocol: SplitProtocol
    source_versions: dict[str, int]
    num_items: int

    def commit_info(self) -> dict[str, str]:
        return {
            "feature_run_id": self.feature_run_id,
            "as_of": self.as_of.isoformat(),
            "protocol": self.protocol,
            "source_versions": json.dumps(self.source_versions),
            "num_items": str(self.num_items),
        }

    @classmethod
    def from_commit_info(cls, table: str, version: int, meta: dict[str, str]) -> GoldCommit:
        missing = [key for key in ("feature_run_id", "as_of", "protocol", "source_versions", "num_items")
                   if key not in meta]
        if missing:
            raise InputDataError(f"{table} v{version} was not written by `recsys features` (its commit "
                                 f"lacks {', '.join(missing)}): run `recsys features` again")
        return cls(
            feature_run_id=meta["feature_run_id"],
            as_of=datetime.fromisoformat(meta["as_of"]),
            protocol=cast(SplitProtocol, meta["protocol"]),
            source_versions=json.loads(meta["source_versions"]),
            num_items=int(meta["num_items"]),
        )
