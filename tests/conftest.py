"""Shared fixtures: a fake vLLM server as a real subprocess, and clean datasets state."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# before datasets is imported anywhere: its cache paths are read at import time
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "vllm-generator-tests", "datasets"))
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "vllm-generator-tests", "home"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from fake_server import FakeServer
from slurm_cluster import SlurmCluster, missing

from vllm_generator.client import Client
from vllm_generator.recipe import RetryConfig

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MakeClient = Callable[..., Client]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m vllm_generator ARGS``, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_generator", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node SLURM cluster (tests/slurm_cluster.py) for the session: skipped where SLURM is
    not installed, but failed under CI, where .ci/run installs it."""
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set, so the SLURM tests must run, not skip)", pytrace=False)
        pytest.skip(why)
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fake OpenAI-compatible server on 127.0.0.1 with 16 slots; see tests/fake_server.py."""
    with FakeServer("--slots", "16") as server:
        yield server


@pytest.fixture
def start_fake_server() -> Iterator[Callable[..., FakeServer]]:
    """Start fake servers with custom arguments; all are stopped after the test."""
    started: list[FakeServer] = []

    def start(*args: str) -> FakeServer:
        server = FakeServer(*args).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Clients with fast retries (``initial_wait``/``max_wait``/``attempts`` override them); closed after the test."""
    clients: list[Client] = []

    def make(
        urls: str | list[str],
        *,
        attempts: int = 3,
        initial_wait: float = 0.01,
        max_wait: float = 0.05,
        max_outage: float = 600,
        **kwargs: Any,
    ) -> Client:
        retry = RetryConfig(attempts=attempts, initial_wait=initial_wait, max_wait=max_wait, max_outage=max_outage)
        client = Client([urls] if isinstance(urls, str) else urls, retry=retry, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(autouse=True)
def _no_leaked_feeders() -> Iterator[None]:
    """No look-ahead thread outlives the run that started it."""
    yield
    assert not [t for t in threading.enumerate() if t.name == "vllm-generator-feeder"]


def user_text(body: dict[str, Any]) -> str:
    """The prompt the server echoes: the last user message, or the completion prompt."""
    if "messages" in body:
        return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    return str(body["prompt"])


def received(server: FakeServer) -> Counter[str]:
    """How many generation requests the server got for each prompt."""
    return Counter(user_text(entry["body"]) for entry in server.log())


@contextlib.contextmanager
def tmpfs(folder: Path, options: str, before_unmount: Callable[[], object] = lambda: None) -> Iterator[Path]:
    """A small tmpfs mounted on ``folder`` (a full disk, a read-only one) for the test's span.
    Mounting needs root: elsewhere the test skips, but under CI it fails."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("mounting a tmpfs needs root, and CI runs as root", pytrace=False)
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        before_unmount()
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # files may still be memory-mapped here


def resize_tmpfs(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``vllm`` is the old name of ``integration``: each selects the other's tests too."""
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test has its own datasets cache, so its own response journal (vllm_generate(cache=True)):
    no test is answered from another's. Subprocesses get it too, through the environment."""
    import datasets

    from vllm_generator.journal import close_journals

    folder = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(folder))
    yield folder
    close_journals()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key or SLURM array from the developer's shell leaks into a test."""
    for name in ("VLLM_API_KEY", "OPENAI_API_KEY", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)


def write_recipe(
    tmp_path: Path,
    url: str,
    input_path: str | Path = "in.parquet",
    output_path: str | Path = "out/answers.parquet",
    name: str = "recipe.yaml",
    **sections: dict[str, Any],
) -> Path:
    """A small recipe with fast retries; ``sections`` update its sections (``data={...}``)."""
    raw: dict[str, Any] = {
        "data": {"input": {"path": str(input_path)}, "prompt_column": "question", "output": {"path": str(output_path)}},
        "model": {"base_url": url},
        "processing": {"chunk_size": 10, "batch_size": 5},
        "retry": {"attempts": 2, "initial_wait": 0.01, "max_wait": 0.05},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path
