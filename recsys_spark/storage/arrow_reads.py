"""Reads without Spark: a table by name, at a version, as Arrow.

For the parts of the platform that run without a Spark job (the lookup, the stream's state
reads, the Delta -> torch loader) and for users' own scripts::

    from recsys_spark.storage import read_table
    rows = read_table("lakehouse", "gold/training_examples", columns=["user_id", "split"])

The same name checks as ``Lakehouse``, the same refusal of tables whose files are not their
rows (deletion vectors, column mapping), one-line errors for damaged tables, whichever engine
wrote the table. Local tables are read through Arrow's own file system:
``deltalake.DeltaTable(path).to_pyarrow_table()`` can abort the interpreter at exit (see
``delta_rs.arrow_dataset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from recsys_spark.errors import TableNotFoundError
from recsys_spark.storage.base import PartitionFilter, check_table_name
from recsys_spark.storage.delta_rs import arrow_dataset, check_readable_features, data_files, open_delta

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds
    from deltalake import DeltaTable


def table_path(root: str, table: str) -> str:
    """``<root>/<layer>/<name>``, the name checked."""
    return f"{root.rstrip('/')}/{check_table_name(table)}"


def _open(root: str, table: str, version: int | None) -> DeltaTable:
    path = table_path(root, table)
    delta = open_delta(path, version=version)
    check_readable_features(delta, path)
    return delta


def table_version(root: str, table: str) -> int | None:
    """The table's newest version, or None when nothing has written it yet."""
    try:
        return open_delta(table_path(root, table)).version()
    except TableNotFoundError:
        return None


def table_dataset(root: str, table: str, *, version: int | None = None) -> ds.Dataset:
    """The table ``<root>/<table>`` (as of ``version``; default the newest) as a pyarrow
    dataset, for filtered or batched reads."""
    return arrow_dataset(_open(root, table, version))


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


def table_files(
    root: str, table: str, *, version: int, partitions: Sequence[PartitionFilter] = ()
) -> list[str]:
    """The data files of the table as of ``version``, only those of the selected partitions
    (``[("split", "=", "train")]``): what a reader outside Spark and delta-rs opens itself."""
    pruning = [(column, op, value) for column, op, value in partitions]
    return data_files(_open(root, table, version), file_pruning_predicate=pruning or None)
