"""Reads without Spark: a table by name, at a version, as Arrow.

For the parts of the platform that run without a Spark job (the lookup, the stream's state
reads, the Delta -> torch loader) and for users' own scripts::

    from recsys_spark.storage import read_table
    rows = read_table("lakehouse", "gold/training_examples", columns=["user_id", "split"])

The same name checks as ``Lakehouse``, the same refusal of tables whose files are not their
rows (deletion vectors, column mapping), one-line errors for damaged tables. Local tables are
read through Arrow's own file system: ``deltalake.DeltaTable(path).to_pyarrow_table()`` can
abort the interpreter at exit (see ``delta_rs.arrow_dataset``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys_spark.storage.base import check_table_name
from recsys_spark.storage.delta_rs import arrow_dataset, check_readable_features, open_delta

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds


def table_dataset(root: str, table: str, *, version: int | None = None) -> ds.Dataset:
    """The table ``<root>/<table>`` (as of ``version``; default the newest) as a pyarrow
    dataset, for filtered or batched reads."""
    path = f"{root}/{check_table_name(table)}"
    delta = open_delta(path, version=version)
    check_readable_features(delta, path)
    return arrow_dataset(delta)


def read_table(
    root: str,
    table: str,
    *,
    version: int | None = None,
    columns: list[str] | None = None,
    filter: ds.Expression | None = None,  # noqa: A002 - pyarrow's own name for it
) -> pa.Table:
    """The rows of ``<root>/<table>`` (as of ``version``) as an Arrow table."""
    return table_dataset(root, table, version=version).to_table(columns=columns, filter=filter)
