"""Parquet tables checked against the schemas in `schemas/` (one JSON file per table).

A schema file is data::

    {"name": "errors", "description": "...",
     "fields": [{"name": "key", "type": "string", "nullable": false, "description": "..."}, ...]}

`type` is a pyarrow type name: string, int64, float64, bool, timestamp[us, tz=UTC], ...
Writers build their Arrow table *from* the schema, so a column can't drift from its definition.
"""

from __future__ import annotations

import io
import json
import uuid
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.files import write_atomic

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def _arrow_type(name: str) -> pa.DataType:
    if name.startswith("timestamp["):
        unit, _, tz = name[len("timestamp[") : -1].partition(",")
        return pa.timestamp(unit.strip(), tz=tz.split("=")[-1].strip() or None)
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    return pa.type_for_alias(name)


@lru_cache(maxsize=None)
def load_schema(name: str) -> pa.Schema:
    """The Arrow schema of table `name`, read from schemas/<name>.json."""
    path = SCHEMA_DIR / f"{name}.json"
    if not path.exists():
        raise KeyError(f"no schema for table {name!r} (looked for {path})")
    spec = json.loads(path.read_text())
    fields = [
        pa.field(f["name"], _arrow_type(f["type"]), nullable=f.get("nullable", True),
                 metadata={"description": f.get("description", "")})
        for f in spec["fields"]
    ]
    return pa.schema(fields, metadata={"table": name, "description": spec.get("description", "")})


def table_names() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))


def to_arrow(rows: list[dict], name: str) -> pa.Table:
    """Rows (dicts) as an Arrow table of schema `name`; unknown keys are an error."""
    schema = load_schema(name)
    extra = {k for row in rows for k in row} - set(schema.names)
    if extra:
        raise ValueError(f"columns not in schema {name!r}: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(rows: list[dict], name: str, table_dir: str, filesystem=None, basename: str | None = None) -> str:
    """Write rows as one Parquet file under `table_dir` (a folder of the table); returns its path.

    `filesystem` is a pyarrow FileSystem (local when None). Each call writes a new file, named
    `basename` or a random one, so parallel writers never collide; the file appears whole or not at all
    (`io.files.write_atomic`), so a reader never opens half a table.
    """
    path = f"{table_dir.rstrip('/')}/{basename or uuid.uuid4().hex}.parquet"
    buffer = io.BytesIO()
    pq.write_table(to_arrow(rows, name), buffer)
    write_atomic(filesystem, path, buffer.getvalue())
    return path


def check_file(path: str, name: str, filesystem=None) -> None:
    """Raise if the Parquet file at `path` does not match schema `name` exactly (names and types)."""
    actual = pq.read_schema(path, filesystem=filesystem)
    expected = load_schema(name)
    got = [(f.name, f.type) for f in actual]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        raise AssertionError(f"{path} does not match schema {name!r}:\n  got  {got}\n  want {want}")
