#!/usr/bin/env bash
# The main job, end to end on this machine: install, build the models, run recipes/quickstart.yaml
# and recipes/quickstart_structured.yaml (each starts its own vLLM server serving
# SmolLM2-135M-Instruct, and stops it), show the output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m vllm_generator recipes/quickstart.yaml
.venv/bin/python -m vllm_generator recipes/quickstart_structured.yaml
.venv/bin/python - <<'PY'
import json

import pyarrow.parquet as pq

path = "out/quickstart/answers.parquet"
table = pq.read_table(path)
print(f"\n{path}: {table.num_rows} rows, columns {table.column_names}\n")
for row in table.slice(0, 3).to_pylist():
    print(f"question : {row['question']}")
    print(f"response : {row['response']}")
    print(f"finish   : {row['finish_reason']}, {row['completion_tokens']} tokens, error={row['error']}\n")

path = "out/quickstart/structured.parquet"
table = pq.read_table(path)
print(f"{path}: parsed is {table.schema.field('parsed').type}\n")
for row in table.slice(0, 2).to_pylist():
    print(f"topic  : {row['topic']}")
    print(f"parsed : {json.dumps(row['parsed'])}")
    print(f"error  : {row['error']}\n")
PY
