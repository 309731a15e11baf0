"""What the response journal costs, and what a rerun of a fully journaled map takes.

    python benchmarks/bench_journal.py                 # 30,000 rows each way, then a 100,000-row rerun
    python benchmarks/bench_journal.py --rows 60000 --rerun-rows 200000

A fake vLLM server (tests/fake_server.py, its own process) answers after ``--latency`` seconds with
``--slots`` generations at once. Every client is its own subprocess, with datasets' imports done
before its clock starts:

    cache=False     ds.map(vllm_generate(..., cache=False), batched=True) on an in-memory dataset
    cache=on        the same map with the journal (a fresh folder)
    fill            the same map over ``--rerun-rows`` rows, journaled (it is what the rerun reads)
    rerun           that map again, in a new process: every row is answered from the journal

rows/s is rows over the map's wall time; "CPU us/req" is the client process's user+sys CPU over the
map (all threads: the loop, the journal writer) per row. "requests" is what the server received
during that client's run. "others" is how many cores processes other than ours used meanwhile: the
machine may be shared, and figures taken while it is busy are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import MAX_TOKENS, MODEL, REPO, _busy_seconds, _cpu, _process_cpu, prompts

sys.path.insert(0, str(REPO / "tests"))
from fake_server import FakeServer


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset

    from vllm_generator import vllm_generate
    from vllm_generator.journal import close_journals

    ds = Dataset.from_dict({"prompt": prompts(spec["rows"])})  # in memory: datasets never caches it
    cache = spec["cache"] or False
    generate = vllm_generate(spec["url"], model=MODEL, max_tokens=MAX_TOKENS, max_concurrency=spec["slots"], cache=cache)
    cpu, start = _cpu(), time.monotonic()
    out = ds.map(generate, batched=True, batch_size=spec["batch_size"])
    close_journals()  # what is left to commit counts too
    wall, used = time.monotonic() - start, _cpu() - cpu
    ok = sum(r == f"echo: {p}" for p, r in zip(ds["prompt"], out["response"]))
    return {"wall": wall, "cpu": used, "rows": len(out), "ok": ok}


def run(server: FakeServer, work: Path, name: str, **spec: Any) -> dict[str, Any]:
    spec_path, result_path = work / f"{name}.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "url": server.url, "result": str(result_path)}))
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"{name}-hf"), "PYTHONPATH": str(REPO)}
    requests = server.stats()["requests"]
    busy, server_cpu, started = _busy_seconds(), _process_cpu(server.proc.pid) if server.proc else 0.0, time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], env=env, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: the client failed")
    ours = usage.ru_utime + usage.ru_stime + (_process_cpu(server.proc.pid) if server.proc else 0.0) - server_cpu
    result = json.loads(result_path.read_text())
    result |= {"name": name, "requests": server.stats()["requests"] - requests, "process_wall": wall}
    result["others"] = max(0.0, (_busy_seconds() - busy - ours) / wall)
    if result["ok"] != result["rows"]:
        print(f"WARNING {name}: only {result['ok']} of {result['rows']} rows got their own response", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--rerun-rows", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return

    print(f"{os.cpu_count()} cores; fake server: {args.latency * 1000:.0f} ms, {args.slots} slots; batch_size {args.batch_size}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp,
        FakeServer("--slots", str(args.slots), "--latency", str(args.latency), "--no-log", "--no-timeline") as server,
    ):
        work = Path(tmp)
        common = {"slots": args.slots, "batch_size": args.batch_size}
        results = [
            run(server, work, "cache=False", rows=args.rows, cache=None, **common),
            run(server, work, "cache=on", rows=args.rows, cache=str(work / "journal-a"), **common),
            run(server, work, "fill", rows=args.rerun_rows, cache=str(work / "journal-b"), **common),
            run(server, work, "rerun", rows=args.rerun_rows, cache=str(work / "journal-b"), **common),
        ]
        size = sum(f.stat().st_size for f in (work / "journal-b").iterdir())
    print(f"{'client':<12} {'rows':>8} {'map s':>7} {'rows/s':>8} {'CPU us/req':>10} {'requests':>9} {'process s':>9} {'others':>7}")
    for r in results:
        print(
            f"{r['name']:<12} {r['rows']:>8,} {r['wall']:>7.2f} {r['rows'] / r['wall']:>8,.0f} {r['cpu'] / r['rows'] * 1e6:>10,.0f} "
            f"{r['requests']:>9,} {r['process_wall']:>9.2f} {r['others']:>7.2f}"
        )
    off, on, rerun = results[0], results[1], results[3]
    rate = (on["rows"] / on["wall"]) / (off["rows"] / off["wall"]) - 1
    cpu = (on["cpu"] / on["rows"]) / (off["cpu"] / off["rows"]) - 1
    print(f"journal: {rate:+.1%} rows/s, {cpu:+.1%} client CPU per request (targets: >= -3%, <= +10%)")
    print(f"rerun of {rerun['rows']:,} journaled rows: {rerun['requests']} requests, map {rerun['wall']:.2f} s (target: 0, <= 10 s)")
    print(f"journal of {args.rerun_rows:,} rows: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
