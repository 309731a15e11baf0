"""notebooks/quickstart.ipynb, executed top to bottom as a user would run it (from notebooks/).

The notebook starts its own vLLM server (the CPU build and SmolLM2-135M-Instruct) and must stop it in its
last cell; the test checks that no vLLM server it started is left running.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_vllm_e2e import group_members, require_real_vllm

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "vllm-generator-tests"


def vllm_server_groups() -> set[int]:
    """Process groups of running vLLM API servers (each holds its engine and worker)."""
    groups = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if b"vllm.entrypoints" in cmdline:
            groups.add(int(stat.rsplit(")", 1)[1].split()[2]))
    return groups


def test_notebook_is_saved_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert [c.id for c in code if c.outputs or c.execution_count is not None] == []


@pytest.mark.integration
@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_real_vllm()
    # A kernel spec for exactly this interpreter: a "python3" spec elsewhere on the machine could
    # start another Python without vllm_generator. JUPYTER_PATH is searched first.
    spec = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "vllm-generator tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # the kernel, and the server it starts, inherit these
    monkeypatch.setenv("VLLM_GENERATOR_SERVER_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))

    servers_before = vllm_server_groups()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    failure: Exception | None = None
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    except Exception as err:  # reported below, after the check that no server was left behind
        failure = err
    # the last cell stops the server; if a cell failed first, kernel exit must have stopped it
    deadline = time.monotonic() + 30
    while (left := vllm_server_groups() - servers_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    if failure is not None:
        raise failure
    assert not left, f"the notebook left vLLM servers running: groups {left}, pids {[group_members(g) for g in left]}"

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "rows: 16\n" in text
    assert "ok: 16, failed: 0\n" in text
    assert "server stopped" in text
    assert "parsed: 6 of 6\n" in text, "every structured answer should parse into the Topic model"
    assert "Topic(name=" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell drew no figure"
