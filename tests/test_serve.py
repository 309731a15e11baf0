"""serve_models against a fake launcher: no vLLM needed, a few seconds in all.

The launcher stands in for `vllm serve`: it records its argv, pid and CUDA_VISIBLE_DEVICES, then
either becomes tests/fake_server.py (exec, so the pid stays the same) or misbehaves as asked.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vllm_generator import serve as serve_module
from vllm_generator.errors import RecipeError, ServerStartError
from vllm_generator.recipe import ServeConfig
from vllm_generator.serve import serve_models

FAKE_SERVER = Path(__file__).with_name("fake_server.py").resolve()

LAUNCHER = textwrap.dedent(
    """
    import argparse, json, os, signal, subprocess, sys, time

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--host", "--port"):
        parser.add_argument(flag)
    parser.add_argument("--mode", default="serve")
    parser.add_argument("--fail-on-gpu")
    args, _ = parser.parse_known_args()
    if args.fail_on_gpu is not None and args.fail_on_gpu == os.environ.get("CUDA_VISIBLE_DEVICES"):
        args.mode = "fail"
    record = {"argv": sys.argv[1:], "pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if args.mode == "hang":  # loads forever, with an "engine" child in its process group
        record["child"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]).pid
    with open(os.path.join(os.environ["RECORD_DIR"], args.port + ".json"), "w") as f:
        json.dump(record, f)
    if args.mode == "fail":
        print("loading the model", flush=True)
        print("OSError: no model weights in /nowhere/model", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.mode in ("hang", "stubborn"):
        time.sleep(3600)
    if args.mode == "slow":  # loads for a while, then serves
        time.sleep(2)
    model = args.model or sys.argv[1]  # `vllm serve MODEL` form
    key = ["--api-key", os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else []  # as vLLM reads it
    os.execv(sys.executable, [sys.executable, FAKE_SERVER, "--port", args.port, "--model", model, *key])
    """
)


@pytest.fixture
def launcher(tmp_path: Path) -> list[str]:
    path = tmp_path / "launcher.py"
    path.write_text(f"FAKE_SERVER = {str(FAKE_SERVER)!r}\n" + LAUNCHER)
    return [sys.executable, str(path)]


def _config(launcher: list[str], tmp_path: Path, **kwargs: Any) -> ServeConfig:
    kwargs.setdefault("port", 0)
    return ServeConfig(command=launcher, env={"RECORD_DIR": str(tmp_path)}, **kwargs)


def _record(tmp_path: Path, url: str) -> dict[str, Any]:
    port = url.rsplit(":", 1)[1]
    return json.loads((tmp_path / f"{port}.json").read_text())


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited already


def _model_ids(url: str) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/v1/models", timeout=5) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def test_two_servers_on_free_ports_answer_and_stop(launcher: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with serve_models(_config(launcher, tmp_path, model="org/m", num_servers=2)) as urls:
        assert len(urls) == 2 and len(set(urls)) == 2
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
        assert [_model_ids(url) for url in urls] == [["org/m"], ["org/m"]]
        records = [_record(tmp_path, url) for url in urls]
        assert all(_alive(r["pid"]) for r in records)
    for url, record in zip(urls, records):
        # No "{model}" anywhere: the model goes right after the command, like `vllm serve MODEL`.
        assert record["argv"] == ["org/m", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
        assert record["cuda"] is None
        assert not _alive(record["pid"])
    assert not serve_module._live


def test_model_placeholder_and_one_gpu_per_server(launcher: list[str], tmp_path: Path) -> None:
    config = _config([*launcher, "--model", "{model}"], tmp_path, model="org/m", args=["--served-model-name", "x-{model}"], gpus=[3, 5])
    with serve_models(config) as urls:
        records = [_record(tmp_path, url) for url in urls]
        assert [_model_ids(url) for url in urls] == [["org/m"], ["org/m"]]
    assert [r["cuda"] for r in records] == ["3", "5"]
    for url, record in zip(urls, records):
        port = url.rsplit(":", 1)[1]
        assert record["argv"] == ["--model", "org/m", "--served-model-name", "x-org/m", "--host", "127.0.0.1", "--port", port]


def test_fixed_port_is_used_and_not_doubled(launcher: list[str], tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(launcher, tmp_path, model="m", args=["--port", str(port)])
    with serve_models(config) as urls:
        assert urls == [f"http://127.0.0.1:{port}"]
    assert _records(tmp_path)[0]["argv"] == ["m", "--port", str(port), "--host", "127.0.0.1"]


def test_server_that_exits_reports_code_and_log_tail(launcher: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("VLLM_GENERATOR_SERVER_LOG_DIR", str(log_dir))
    with pytest.raises(ServerStartError) as info:
        with serve_models(_config(launcher, tmp_path, model="m", args=["--mode", "fail"])):
            pytest.fail("a server that exits is not ready")
    message = str(info.value)
    assert "exited with code 3 before it was ready" in message
    assert "loading the model" in message and "OSError: no model weights in /nowhere/model" in message
    assert f"command: {sys.executable} " in message and "--mode fail" in message
    assert f"See the full log at {log_dir}/" in message
    assert len(list(log_dir.glob("*.log"))) == 1


def test_one_failing_server_stops_the_others(launcher: list[str], tmp_path: Path) -> None:
    # The server on GPU 1 fails; the one on GPU 0 would come up and must not be left running.
    config = _config(launcher, tmp_path, model="m", gpus=["0", "1"], args=["--fail-on-gpu", "1"])
    with pytest.raises(ServerStartError, match="exited with code 3"):
        with serve_models(config):
            pytest.fail("not all servers are ready")
    records = _records(tmp_path)
    assert sorted(r["cuda"] for r in records) == ["0", "1"]
    assert not any(_alive(r["pid"]) for r in records)


def test_server_that_never_answers_times_out_and_is_killed(
    launcher: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve_module, "_PROGRESS_EVERY", 1.0)
    caplog.set_level(logging.INFO, logger="vllm_generator.serve")
    config = _config(launcher, tmp_path, model="m", args=["--mode", "hang"], startup_timeout=3)
    with pytest.raises(ServerStartError, match=r"did not become ready within 3 s") as info:
        with serve_models(config):
            pytest.fail("a hanging server is not ready")
    assert "raise serve.startup_timeout" in str(info.value)
    (record,) = _records(tmp_path)
    # The launcher and its child (vLLM's engine, say) share a process group: both are gone.
    assert not _alive(record["pid"]) and not _alive(record["child"])
    assert "waiting for vLLM at http://127.0.0.1:" in caplog.text


def test_server_ignoring_sigterm_is_killed(
    launcher: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve_module, "_STOP_GRACE", 1.0)
    config = _config(launcher, tmp_path, model="m", args=["--mode", "stubborn"], startup_timeout=1)
    with pytest.raises(ServerStartError, match="did not become ready"):
        with serve_models(config):
            pytest.fail("not ready")
    (record,) = _records(tmp_path)
    assert not _alive(record["pid"])
    assert "did not stop within 1 s of SIGTERM: killed it" in caplog.text


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_error_in_the_block_stops_the_servers(launcher: list[str], tmp_path: Path, error: type[BaseException]) -> None:
    with pytest.raises(error):
        with serve_models(_config(launcher, tmp_path, model="m", num_servers=2)) as urls:
            pids = [_record(tmp_path, url)["pid"] for url in urls]
            raise error("the run failed")
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_port_in_use_is_refused_before_starting(launcher: list[str], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerStartError, match=rf"127\.0\.0\.1:{port}: .*Is another server using that port"):
            with serve_models(_config(launcher, tmp_path, model="m", port=port)):
                pytest.fail("the port is taken")
    assert _records(tmp_path) == []  # nothing was started


def test_port_in_args_with_several_servers_is_a_recipe_error(launcher: list[str], tmp_path: Path) -> None:
    config = _config(launcher, tmp_path, model="m", num_servers=2, args=["--port=8000"])
    with pytest.raises(RecipeError, match="serve.args sets --port 8000.*set serve.port instead"):
        with serve_models(config):
            pytest.fail("not started")


def test_missing_launcher(tmp_path: Path) -> None:
    config = _config([str(tmp_path / "no-vllm")], tmp_path, model="m")
    with pytest.raises(ServerStartError, match="cannot run .*no-vllm m --host 127.0.0.1 --port .*Is vLLM installed"):
        with serve_models(config):
            pytest.fail("not started")


# --------------------------------------------------------------------------- vllm_generate(serve=...)


def test_vllm_generate_starts_its_servers_on_first_use_and_stops_them_on_close(launcher: list[str], tmp_path: Path) -> None:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    generate = vllm_generate(serve=_config(launcher, tmp_path, model="m1"))
    assert _records(tmp_path) == []  # creating the transform starts nothing
    out = Dataset.from_dict({"prompt": ["a", "b"]}).map(generate, batched=True)

    assert out["response"] == ["echo: a", "echo: b"] and out["error"] == [None, None]
    (record,) = _records(tmp_path)
    assert _alive(record["pid"])
    generate.close()
    assert not _alive(record["pid"])


def test_vllm_generate_as_a_context_manager_serves_map_workers(launcher: list[str], tmp_path: Path) -> None:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(8)]})
    with vllm_generate(serve=_config(launcher, tmp_path, model="m1")) as generate:
        # the servers run before map pickles the transform for its workers: they share them
        out = ds.map(generate, batched=True, batch_size=2, num_proc=2)
        (record,) = _records(tmp_path)
        assert _alive(record["pid"])
    assert out["response"] == [f"echo: p{i}" for i in range(8)]
    assert len(_records(tmp_path)) == 1  # no worker started servers of its own
    assert not _alive(record["pid"])


def test_vllm_generate_serve_with_workers_but_no_with_block_is_refused(launcher: list[str], tmp_path: Path) -> None:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    generate = vllm_generate(serve=_config(launcher, tmp_path, model="m1"))
    with pytest.raises(RecipeError, match=r"with vllm_generate\(serve=...\) as generate"):
        Dataset.from_dict({"prompt": ["a", "b"]}).map(generate, batched=True, batch_size=1, num_proc=2)
    assert _records(tmp_path) == []  # no worker started a server


def test_vllm_generate_serve_fingerprint_names_the_model_not_the_port(launcher: list[str], tmp_path: Path) -> None:
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    from vllm_generator import vllm_generate

    (tmp_path / "records").mkdir()
    Dataset.from_dict({"prompt": ["a", "b", "c"]}).to_parquet(str(tmp_path / "in.parquet"))
    ds = Dataset.from_parquet(str(tmp_path / "in.parquet"))
    config = _config(launcher, tmp_path / "records", model="m1")
    first = vllm_generate(serve=config)
    before = Hasher.hash(first)
    out = ds.map(first, batched=True)  # starts the servers on a random port
    assert out["response"] == ["echo: a", "echo: b", "echo: c"]
    assert Hasher.hash(first) == before  # the running servers' port is not part of it
    assert Hasher.hash(vllm_generate(serve=_config(launcher, tmp_path / "records", model="m2"))) != before
    first.close()

    # the same configuration again: datasets' cache answers, and no server is even started
    again = vllm_generate(serve=config)
    assert ds.map(again, batched=True)["response"] == out["response"]
    assert len(_records(tmp_path / "records")) == 1
    # another model: no cache hit, its own server answers
    other = ds.map(vllm_generate(serve=_config(launcher, tmp_path / "records", model="m2"), n=1), batched=True)
    assert len(_records(tmp_path / "records")) == 2 and other["error"] == [None] * 3


def test_vllm_generate_serve_starts_again_after_close(launcher: list[str], tmp_path: Path) -> None:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    generate = vllm_generate(serve=_config(launcher, tmp_path, model="m1"))
    ds = Dataset.from_dict({"prompt": ["a"]})
    assert ds.map(generate, batched=True)["response"] == ["echo: a"]
    generate.close()
    assert ds.map(generate, batched=True)["response"] == ["echo: a"]
    pids = [r["pid"] for r in _records(tmp_path)]
    assert len(pids) == 2 and sum(map(_alive, pids)) == 1  # a new server; the first one stopped
    generate.close()
    assert not any(map(_alive, pids))


def test_a_server_guarded_by_an_api_key_is_ready_and_answers_with_the_key(
    launcher: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    # vLLM reads VLLM_API_KEY itself and then answers 401 to /v1/models without it
    monkeypatch.setenv("VLLM_API_KEY", "sk-serve-test")
    config = _config(launcher, tmp_path, model="m1", startup_timeout=30)
    with vllm_generate(serve=config) as generate:
        out = Dataset.from_dict({"prompt": ["a"]}).map(generate, batched=True)
    assert out["response"] == ["echo: a"]


def test_a_recipe_checks_its_input_before_starting_servers(launcher: list[str], tmp_path: Path) -> None:
    import yaml

    from vllm_generator.recipe import load_recipe
    from vllm_generator.run import run_recipe

    (tmp_path / "in.jsonl").write_text('{"question": "q"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"input": {"path": str(tmp_path / "in.jsonl")}, "prompt_column": "prompt", "output": {"path": str(tmp_path / "out.parquet")}},
        "model": {"serve": {"model": "m1", "command": launcher, "port": 0, "env": {"RECORD_DIR": str(tmp_path)}}},
    }))  # fmt: skip
    with pytest.raises(RecipeError, match=r"^data.prompt_column: column\(s\) 'prompt' not in "):
        run_recipe(load_recipe(recipe), progress=False)
    assert _records(tmp_path) == []  # no server was started for a recipe that cannot run


def test_a_recipe_s_rates_leave_out_the_servers_start_up(launcher: list[str], tmp_path: Path) -> None:
    import yaml

    from vllm_generator.recipe import load_recipe
    from vllm_generator.run import run_recipe

    (tmp_path / "in.jsonl").write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(20)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"input": {"path": str(tmp_path / "in.jsonl")}, "output": {"path": str(tmp_path / "out.parquet")}},
        "model": {"serve": {"model": "m1", "command": launcher, "args": ["--mode", "slow"], "port": 0, "env": {"RECORD_DIR": str(tmp_path)}}},
    }))  # fmt: skip
    summary = run_recipe(load_recipe(recipe), progress=False)
    assert summary.rows == 20 and summary.wall_time_s >= 2  # the server took 2 s to start
    assert summary.rows_per_s > 2 * summary.rows / summary.wall_time_s  # measured once it answered
