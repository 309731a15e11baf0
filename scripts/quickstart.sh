#!/usr/bin/env bash
# The main job, end to end on this machine: install, build a tiny model, run
# recipes/quickstart.yaml (which starts its own vLLM server and stops it), show the output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m vllm_generator recipes/quickstart.yaml
.venv/bin/python - <<'PY'
import pyarrow.parquet as pq

path = "out/quickstart/answers.parquet"
table = pq.read_table(path)
print(f"\n{path}: {table.num_rows} rows, columns {table.column_names}\n")
for row in table.slice(0, 3).to_pylist():
    print(f"question : {row['question']}")
    print(f"reasoning: {(row['reasoning'] or '')[:80]!r}")
    print(f"response : {(row['response'] or '')[:80]!r}")
    print(f"finish   : {row['finish_reason']}, {row['completion_tokens']} tokens, error={row['error']}\n")
PY
