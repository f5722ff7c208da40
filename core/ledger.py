"""The run ledger: one Parquet row per stage execution, cached or not (docs/architecture.md).

Each row is its own small file, so concurrent writers never contend; readers see the directory as one table.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("flow", pa.string()),
    ("stage", pa.string()),
    ("identity", pa.string()),
    ("status", pa.string()),  # completed | failed
    ("cache_hit", pa.bool_()),
    ("input_hashes", pa.string()),  # JSON object stage -> hash
    ("output_hash", pa.string()),
    ("params_hash", pa.string()),
    ("cache_key", pa.string()),
    ("code_version", pa.string()),
    ("started_at", pa.string()),
    ("duration_s", pa.float64()),
    ("peak_rss_mb", pa.float64()),
    ("host", pa.string()),
    ("error", pa.string()),
])


def append(ledger_dir: Path, row: dict[str, Any]) -> Path:
    ledger_dir.mkdir(parents=True, exist_ok=True)
    full = {name: row.get(name) for name in SCHEMA.names}
    if isinstance(full["input_hashes"], dict):
        full["input_hashes"] = json.dumps(full["input_hashes"], sort_keys=True)
    if isinstance(full["code_version"], dict):
        cv = full["code_version"]
        full["code_version"] = f"{cv.get('commit')}{'+dirty' if cv.get('dirty') else ''}"
    table = pa.Table.from_pylist([full], schema=SCHEMA)
    stamp = (full["started_at"] or "").replace(":", "").replace("-", "")
    final = ledger_dir / f"{stamp}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(final)
    return final


def read(ledger_dir: Path) -> pd.DataFrame:
    files = sorted(ledger_dir.glob("*.parquet")) if ledger_dir.is_dir() else []
    if not files:
        return SCHEMA.empty_table().to_pandas()
    table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    return table.to_pandas().sort_values("started_at", kind="stable").reset_index(drop=True)
