"""Throughput, client CPU and memory of vllm-generator against its limit, on one machine.

    python benchmarks/bench_throughput.py                       # both latency models, < 2 min
    python benchmarks/bench_throughput.py --latency-model fixed --repeat 3   # medians of 3 runs
    python benchmarks/bench_throughput.py --latency-model lognormal --rows 32768 --pipeline-lookaheads 4096
    python benchmarks/bench_throughput.py --only bare,map --rows 32768 --map-batch-sizes 1024,2048,4096,8192,16384
    python benchmarks/bench_throughput.py --memory              # pipeline at 20k and 200k rows
    python benchmarks/bench_throughput.py --servers 2           # a fast and a slow server
    python benchmarks/bench_throughput.py --kill                # one of two servers dies mid-run

A fake vLLM server (tests/fake_server.py, its own process) runs ``--slots`` generations at once
and queues the rest, as vLLM does. Every client runs in its own subprocess, on the same rows:

    bare       the limit: a bare aiohttp loop keeping exactly ``slots`` requests in flight
    barrier    the same loop, but waiting for each batch of B rows before the next, as
               ``Dataset.map`` does: the limit of any client inside a plain map
    pipeline   ``python -m vllm_generator recipe.yaml`` (load, chunks, map, write)
    map        ``ds.map(vllm_generate(...), batched=True, batch_size=B)`` for each B of the sweep
    openai     what users do today: ``AsyncOpenAI`` in an ``async def`` batched map (gather +
               semaphore), on ``--openai-rows`` rows
    sync       a row-by-row map with the sync ``OpenAI`` client, built per row as in
               ``ds.map(lambda r: {...: OpenAI().chat...})``, on ``--sync-rows`` rows
    pipeline2x (only with --only) the pipeline with max_concurrency = 2 x slots

rows/s is rows over the wall time of the work (the map, or the whole CLI run for the pipeline),
imports excluded. "CPU us/req" is the user+sys CPU of the client process over that same work
(``getrusage(RUSAGE_SELF)`` deltas, all threads) per request; "proc CPU" is the whole process,
imports and interpreter start included (``os.wait4`` on the child). Peak RSS is the child's
``ru_maxrss`` (it counts memory-mapped Arrow files too); "anon MB" is the peak of its anonymous
memory. Each is also given as a ratio to ``bare``. "others" is how many cores processes other than
ours used meanwhile: this machine may be shared, and figures taken while it is busy are noise.

For the heavy-tailed model, each row's latency is computed exactly as the fake server does (a hash
of the prompt), which gives the ideal wall time ``max(sum of latencies / slots, longest)`` and the
best wall time of any client that sends rows in order with ``slots`` in flight ("FIFO bound", a
simulation with zero network cost). No client that does not know latencies in advance can beat
the FIFO bound, which is 1.1x to 1.7x the ideal depending on where the slowest rows fall.
Heavy-tailed clients are bound by latency, not CPU, so by default they run at the same time, each
against its own server (``--sequential`` to run them one after another).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_server import FakeServer  # noqa: E402 (tests/ is put on the path first)

MODEL = "fake-model"
MAX_TOKENS = 32


def prompts(n: int) -> list[str]:
    # distinct texts: the fake server's lognormal latency is a hash of the prompt
    return [f"Question {i}: in a few words, why is the number {i} interesting?" for i in range(n)]


def body(prompt: str) -> dict[str, Any]:
    """The request every client sends for a row (the pipeline builds the same one)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}


# =========================================================================== child processes
#
# ``bench_throughput.py --child SPEC.json`` runs one client and writes RESULT (spec["result"]):
# {"wall": s, "rows": n, "ok": n, "errors": n, "cpu": s, "requests": n, ...}. Heavy imports happen
# before the clock starts.


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import aiohttp

    rows = json.loads(Path(spec["rows_path"]).with_suffix(".json").read_text())
    url = spec["url"] + "/v1/chat/completions"
    slots = spec["slots"]

    # with "barrier": rows in batches of that size, each sent only once the one before is done,
    # as Dataset.map hands them over: the best any client can do inside a plain map
    barrier = spec.get("barrier") or len(rows)

    async def run() -> tuple[int, int]:
        ok = errors = 0
        connector = aiohttp.TCPConnector(limit=slots)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(next_row: Any) -> None:
                nonlocal ok, errors
                for i in next_row:  # shared iterator: exactly `slots` requests in flight
                    payload = json.dumps(body(rows[i])).encode()
                    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
                        data = await resp.read()
                    if resp.status == 200 and json.loads(data)["choices"][0]["message"]["content"] is not None:
                        ok += 1
                    else:
                        errors += 1

            for first in range(0, len(rows), barrier):
                batch = iter(range(first, min(first + barrier, len(rows))))
                await asyncio.gather(*(worker(batch) for _ in range(slots)))
        return ok, errors

    cpu, start = _cpu(), time.monotonic()
    ok, errors = asyncio.run(run())
    return {"wall": time.monotonic() - start, "cpu": _cpu() - cpu, "rows": len(rows), "ok": ok, "errors": errors, "requests": len(rows)}


def _child_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    import runpy

    import datasets  # noqa: F401  (imports before the clock, like the other clients)

    import vllm_generator.__main__
    import vllm_generator.run  # noqa: F401

    sys.argv = ["vllm_generator", spec["recipe"]]
    cpu, start = _cpu(), time.monotonic()
    code: Any = 0
    try:
        runpy.run_module("vllm_generator", run_name="__main__", alter_sys=True)  # = python -m vllm_generator
    except SystemExit as exit_:
        code = exit_.code
    wall, used = time.monotonic() - start, _cpu() - cpu
    if code:
        raise SystemExit(f"pipeline exited with {code}")
    metrics = json.loads(Path(spec["output"]).with_suffix(".metrics.json").read_text())
    # ok and errors: the parent reads the output (here it would count in this process's memory)
    return {
        "wall": wall,
        "cpu": used,
        "rows": metrics["rows"],
        "ok": 0,
        "errors": 0,
        "requests": metrics["requests"],
        "run_wall": metrics["wall_time_s"],
    }


def _check_output(output: str, rows_path: str) -> tuple[int, int]:
    """(rows whose response is the fake server's echo of their prompt, rows with an error)."""
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["prompt", "response", "error"]).to_pydict()
    expected = _read_prompts(rows_path)
    if table["prompt"] != expected:
        raise SystemExit(f"{output}: rows are missing or out of order ({len(table['prompt'])} of {len(expected)})")
    ok = sum(r == f"echo: {p}" and e is None for p, r, e in zip(table["prompt"], table["response"], table["error"]))
    errors = sum(e is not None for e in table["error"])
    if ok + errors != len(expected):
        raise SystemExit(f"{output}: {len(expected) - ok - errors} rows have neither their response nor an error")
    return ok, errors


def _child_map(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset

    from vllm_generator import vllm_generate

    ds = Dataset.from_parquet(spec["rows_path"])
    generate = vllm_generate(spec["url"], model=MODEL, max_tokens=MAX_TOKENS, max_concurrency=spec["slots"])
    cpu, start = _cpu(), time.monotonic()
    out = ds.map(generate, batched=True, batch_size=spec["batch_size"])
    wall, used = time.monotonic() - start, _cpu() - cpu
    responses, errors = out["response"], out["error"]
    ok = sum(r == f"echo: {p}" for p, r in zip(ds["prompt"], responses))
    return {"wall": wall, "cpu": used, "rows": len(out), "ok": ok, "errors": sum(e is not None for e in errors), "requests": len(out)}


def _child_openai(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from datasets import Dataset
    from openai import AsyncOpenAI

    ds = Dataset.from_parquet(spec["rows_path"]).select(range(spec["rows"]))
    # As in the SDK's README: one module-level client and a semaphore for the server's capacity.
    client = AsyncOpenAI(base_url=spec["url"] + "/v1", api_key="EMPTY", max_retries=0)
    semaphore = asyncio.Semaphore(spec["slots"])

    async def one(prompt: str) -> str | None:
        async with semaphore:
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS
            )
        return completion.choices[0].message.content

    async def generate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"response": await asyncio.gather(*(one(p) for p in batch["prompt"]))}

    cpu, start = _cpu(), time.monotonic()
    out = ds.map(generate, batched=True, batch_size=spec["batch_size"])
    wall, used = time.monotonic() - start, _cpu() - cpu
    ok = sum(r == f"echo: {p}" for p, r in zip(ds["prompt"], out["response"]))
    return {"wall": wall, "cpu": used, "rows": len(out), "ok": ok, "errors": len(out) - ok, "requests": len(out)}


def _child_sync(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from openai import OpenAI

    ds = Dataset.from_parquet(spec["rows_path"]).select(range(spec["rows"]))
    url = spec["url"] + "/v1"
    cpu, start = _cpu(), time.monotonic()
    out = ds.map(
        lambda row: {
            "response": OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
            .chat.completions.create(model=MODEL, messages=[{"role": "user", "content": row["prompt"]}], max_tokens=MAX_TOKENS)
            .choices[0]
            .message.content
        }
    )
    wall, used = time.monotonic() - start, _cpu() - cpu
    ok = sum(r == f"echo: {p}" for p, r in zip(ds["prompt"], out["response"]))
    return {"wall": wall, "cpu": used, "rows": len(out), "ok": ok, "errors": len(out) - ok, "requests": len(out)}


_CHILDREN = {"bare": _child_bare, "pipeline": _child_pipeline, "map": _child_map, "openai": _child_openai, "sync": _child_sync}


def _read_prompts(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist())


def _anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # ru_maxrss also counts the pages of memory-mapped files (datasets' Arrow files), which the
    # kernel can drop; the peak of anonymous memory (the heap) is sampled here besides
    peak = [_anon_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = _CHILDREN[spec["kind"]](spec)
    stop.set()
    sampler.join()
    result["anon_mb"] = max(peak[0], _anon_mb())
    Path(spec["result"]).write_text(json.dumps(result))


# =========================================================================== the parent


@dataclass
class Measurement:
    name: str
    rows: int
    wall: float
    cpu: float  # work only
    proc_cpu: float  # whole child process
    maxrss_mb: float
    ok: int
    errors: int
    requests: int
    others: float = 0.0  # cores used by processes not ours meanwhile (other users of the machine)
    anon_mb: float = 0.0  # peak anonymous memory (RssAnon), sampled every 50 ms
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(self.requests, 1) * 1e6

    @property
    def proc_cpu_us(self) -> float:
        return self.proc_cpu / max(self.requests, 1) * 1e6


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Job:
    name: str
    proc: subprocess.Popen[bytes]
    run_dir: Path
    spec: dict[str, Any]


class Bench:
    """Runs clients as subprocesses and measures them; also tells how busy the machine was."""

    def __init__(self, work: Path, verbose: bool) -> None:
        self.work = work
        self.verbose = verbose
        self.rows_paths: dict[int, str] = {}
        self.count = 0
        self.processing: dict[str, Any] = {}  # extra processing.* of every recipe (--lookahead)

    def rows_file(self, n: int) -> str:
        if n not in self.rows_paths:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = self.work / f"rows-{n}.parquet"
            # row groups of 10,000 rows, as datasets and our own output write them: a single
            # row group of 200k rows would make datasets' loader hold it all in memory at once
            pq.write_table(pa.table({"prompt": prompts(n)}), path, row_group_size=10_000)
            path.with_suffix(".json").write_text(json.dumps(prompts(n)))
            self.rows_paths[n] = str(path)
        return self.rows_paths[n]

    def start(self, name: str, kind: str, **spec: Any) -> Job:
        self.count += 1
        run_dir = self.work / f"{self.count:02d}-{kind}"
        run_dir.mkdir()
        spec = {"kind": kind, "result": str(run_dir / "result.json"), **spec}
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "HF_DATASETS_CACHE": str(run_dir / "hf-cache"),  # no cache hit from an earlier run
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        with open(run_dir / "stdout", "wb") as out, open(run_dir / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=out, stderr=err, env=env, cwd=run_dir)
        return Job(name, proc, run_dir, spec)

    def finish(self, job: Job, check: Callable[[str, str], tuple[int, int]] | None = None) -> Measurement:
        """Wait for ``job`` and measure it; a pipeline's output is counted by ``check(output,
        rows_path)`` -> (ok rows, error rows), by default ``_check_output``."""
        # wait4: this child's own rusage (the fake server, also our child, is not in it)
        _, status, usage = os.wait4(job.proc.pid, 0)
        job.proc.returncode = os.waitstatus_to_exitcode(status)
        if job.proc.returncode != 0:
            tail = (job.run_dir / "stderr").read_text(errors="replace")[-3000:]
            raise SystemExit(f"{job.name}: child failed (exit {job.proc.returncode}); its stderr ends:\n{tail}")
        result = json.loads((job.run_dir / "result.json").read_text())
        if job.spec["kind"] == "pipeline":
            result["ok"], result["errors"] = (check or _check_output)(job.spec["output"], job.spec["rows_path"])
        m = Measurement(
            name=job.name,
            rows=result["rows"],
            wall=result["wall"],
            cpu=result["cpu"],
            proc_cpu=usage.ru_utime + usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024,
            ok=result["ok"],
            errors=result["errors"],
            requests=result["requests"],
            anon_mb=result.pop("anon_mb", 0.0),
            extra={k: v for k, v in result.items() if k not in ("wall", "cpu", "rows", "ok", "errors", "requests")},
        )
        if m.ok != m.rows:
            print(f"  WARNING {m.name}: only {m.ok} of {m.rows} rows got their own response ({m.errors} errors)", file=sys.stderr)
        return m

    def measure(self, servers: Sequence[FakeServer], jobs: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Measurement]:
        """Run ``jobs`` (name, kind, spec) at the same time; ``servers`` are theirs, to account CPU."""
        busy, server_cpu, started = _busy_seconds(), sum(_process_cpu(s.proc.pid) for s in servers if s.proc), time.monotonic()
        running = [self.start(name, kind, **spec) for name, kind, spec in jobs]
        results = [self.finish(job) for job in running]
        wall = time.monotonic() - started
        ours = sum(m.proc_cpu for m in results) + sum(_process_cpu(s.proc.pid) for s in servers if s.proc) - server_cpu
        others = max(0.0, (_busy_seconds() - busy - ours) / wall)
        for m in results:
            m.others = others
            if self.verbose:
                print(
                    f"  {m.name}: {m.rows} rows in {m.wall:.2f}s = {m.rate:,.0f} rows/s, {m.cpu_us:,.0f} us/req "
                    f"(other processes: {others:.2f} cores)",
                    file=sys.stderr,
                    flush=True,
                )
        return results

    def run(self, server: FakeServer, name: str, kind: str, **spec: Any) -> Measurement:
        return self.measure([server], [(name, kind, spec)])[0]

    def recipe(
        self,
        url: str | list[str],
        rows: int,
        slots: int,
        batch_size: int,
        name: str,
        chunk_size: int | None = None,
        lookahead: int | None = None,
    ) -> tuple[str, str]:
        import yaml

        d = self.work / f"recipe-{name}"
        d.mkdir(exist_ok=True)
        output = str(d / "out.parquet")
        processing: dict[str, Any] = {"batch_size": batch_size, "max_concurrency": slots}
        if chunk_size:
            processing["chunk_size"] = chunk_size
        processing.update(self.processing)
        if lookahead is not None:
            processing["lookahead"] = lookahead
        recipe = {
            "data": {"input": {"path": self.rows_file(rows)}, "prompt_column": "prompt", "output": {"path": output}},
            "model": {"base_url": url, "model": MODEL},
            "generation": {"max_tokens": MAX_TOKENS},
            "processing": processing,
        }
        path = d / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return str(path), output


def median_of(ms: list[Measurement]) -> Measurement:
    """Each figure's median over repeated runs of one client."""
    if len(ms) == 1:
        return ms[0]
    first = ms[0]
    return Measurement(
        name=first.name,
        rows=first.rows,
        wall=statistics.median(m.wall for m in ms),
        cpu=statistics.median(m.cpu for m in ms),
        proc_cpu=statistics.median(m.proc_cpu for m in ms),
        maxrss_mb=statistics.median(m.maxrss_mb for m in ms),
        ok=min(m.ok for m in ms),
        errors=max(m.errors for m in ms),
        requests=first.requests,
        others=statistics.median(m.others for m in ms),
        anon_mb=statistics.median(m.anon_mb for m in ms),
        extra={k: statistics.median(m.extra[k] for m in ms) for k in first.extra if isinstance(first.extra[k], (int, float))},
    )


# --------------------------------------------------------------------------- ideal wall time


def latencies(n: int, median: float) -> list[float]:
    """Each row's latency, computed by the fake server's own code."""
    from fake_server import FakeVLLM, _parse_args

    app = FakeVLLM(_parse_args(["--latency", str(median), "--latency-model", "lognormal"]))
    return [app._lognormal_latency(p) for p in prompts(n)]


def fifo_bound(lat: Sequence[float], slots: int) -> float:
    """Wall time of rows sent in order, each as soon as one of ``slots`` frees, with no network cost."""
    free = [0.0] * slots
    end = 0.0
    for x in lat:
        start = heapq.heappop(free)
        heapq.heappush(free, start + x)
        end = max(end, start + x)
    return end


# --------------------------------------------------------------------------- printing


def table(measurements: list[Measurement], bare: Measurement | None) -> str:
    head = (
        f"{'client':<40} {'rows':>6} {'wall s':>7} {'rows/s':>7} {'x bare':>6} {'CPU us/req':>10} {'x bare':>6} "
        f"{'proc CPU':>8} {'peak RSS MB':>11} {'x bare':>6} {'anon MB':>7} {'ok rows':>7} {'others':>6}"
    )
    lines = [head, "-" * len(head)]

    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else "-"

    for m in measurements:
        lines.append(
            f"{m.name:<40} {m.rows:>6} {m.wall:>7.2f} {m.rate:>7,.0f} {ratio(m.rate, bare.rate if bare else None):>6} "
            f"{m.cpu_us:>10,.0f} {ratio(m.cpu_us, bare.cpu_us if bare else None):>6} {m.proc_cpu_us:>8,.0f} "
            f"{m.maxrss_mb:>11,.0f} {ratio(m.maxrss_mb, bare.maxrss_mb if bare else None):>6} {m.anon_mb:>7,.0f} {m.ok:>7} {m.others:>6.2f}"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# --------------------------------------------------------------------------- scenarios


def bench_latency_model(bench: Bench, args: argparse.Namespace, model: str) -> None:
    slots = args.slots
    heavy = model == "lognormal"
    median = 0.2 if heavy else 0.05
    rows = args.rows or (args.heavy_rows if heavy else args.fixed_rows)
    only = set((args.only or ("bare,pipeline,map" if heavy else "bare,barrier,pipeline,map,openai,sync")).split(","))
    default_sizes = args.heavy_map_batch_sizes if heavy else args.map_batch_sizes
    sizes = [int(b) for b in default_sizes.split(",")]
    rows_path = bench.rows_file(rows)
    # Heavy-tailed runs are bound by latency, not CPU (~500 req/s at 256 slots): by default they
    # run at the same time, each against its own server, so the default run stays short.
    concurrent = heavy and not args.sequential
    title = f"heavy-tailed (lognormal, median {median * 1000:.0f} ms)" if heavy else f"fixed {median * 1000:.0f} ms"
    print(f"\n## {title}: {rows} rows, {slots} slots{', clients run at the same time, one server each' if concurrent else ''}", flush=True)

    jobs: list[tuple[str, str, dict[str, Any]]] = []  # spec without "url"
    if "bare" in only:
        jobs.append(("(1) bare aiohttp, slots in flight", "bare", {"rows_path": rows_path, "slots": slots}))
    if "pipeline" in only:
        jobs.append((f"(2) pipeline, batch {args.batch_size}", "pipeline", {"batch_size": args.batch_size}))
    for b in [int(x) for x in (args.pipeline_batch_sizes or "").split(",") if x]:
        jobs.append((f"(2) pipeline, batch {b}", "pipeline", {"batch_size": b}))
    for la in [int(x) for x in (args.pipeline_lookaheads or "").split(",") if x]:
        jobs.append((f"(2c) pipeline, lookahead {la}", "pipeline", {"batch_size": args.batch_size, "lookahead": la}))
    if "pipeline2x" in only:
        jobs.append((f"(2b) pipeline, max_concurrency {2 * slots}", "pipeline", {"batch_size": args.batch_size, "concurrency": 2 * slots}))
    if "barrier" in only:
        for b in sizes:
            jobs.append((f"(1b) bare aiohttp, map's barrier, batch {b}", "bare", {"rows_path": rows_path, "slots": slots, "barrier": b}))
    if "map" in only:
        for b in sizes:
            jobs.append((f"(3) ds.map(vllm_generate), batch {b}", "map", {"rows_path": rows_path, "slots": slots, "batch_size": b}))
    if "openai" in only:
        n = min(rows, args.openai_rows)
        jobs.append(
            (f"(4a) AsyncOpenAI async map, {n} rows", "openai", {"rows_path": rows_path, "rows": n, "slots": slots, "batch_size": 1000})
        )
    if "sync" in only:
        n = min(rows, args.sync_rows_heavy if heavy else args.sync_rows)
        jobs.append((f"(4b) sync OpenAI per row, {n} rows", "sync", {"rows_path": rows_path, "rows": n}))

    server_args = ["--slots", str(slots), "--latency", str(median), "--latency-model", model, "--no-timeline", "--no-log"]

    def with_url(index: str, name: str, kind: str, spec: dict[str, Any], url: str) -> tuple[str, str, dict[str, Any]]:
        if kind == "pipeline":  # a new output folder each time: no chunk of an earlier run is reused
            recipe, output = bench.recipe(
                url, rows, spec.get("concurrency", slots), spec["batch_size"], f"{model}-{index}", lookahead=spec.get("lookahead")
            )
            return name, kind, {"recipe": recipe, "output": output, "rows_path": rows_path}
        return name, kind, {**spec, "url": url}

    results: list[Measurement] = []
    if concurrent:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(FakeServer(*server_args)) for _ in jobs]
            results = bench.measure(servers, [with_url(str(i), *job, s.url) for i, (job, s) in enumerate(zip(jobs, servers))])
    else:
        runs: list[list[Measurement]] = [[] for _ in jobs]
        with FakeServer(*server_args) as server:
            for r in range(args.repeat):  # interleaved, so a noisy minute hits every client alike
                for i, job in enumerate(jobs):
                    runs[i] += bench.measure([server], [with_url(f"{i}-{r}", *job, server.url)])
        results = [median_of(ms) for ms in runs]
    bare = next((m for (_, kind, spec), m in zip(jobs, results) if kind == "bare" and "barrier" not in spec), None)
    pipeline = next((m for (name, kind, _), m in zip(jobs, results) if kind == "pipeline" and name.startswith("(2)")), None)
    maps = [m for (_, kind, _), m in zip(jobs, results) if kind == "map"]

    print(table(results, bare))
    for m in results:
        if m.rows < rows:
            print(f"  {m.name}: at {m.rate:,.1f} rows/s, all {rows} rows would take {rows / m.rate:,.0f} s")
    if pipeline is not None:
        print(f"  pipeline: run_recipe's own wall {pipeline.extra.get('run_wall', 0):.2f} s of the CLI run's {pipeline.wall:.2f} s")
    ideal = fifo = 0.0
    if heavy:
        lat = latencies(rows, median)
        ideal = max(sum(lat) / slots, max(lat))
        fifo = fifo_bound(lat, slots)
        print(
            f"  latencies: sum/slots {sum(lat) / slots:.2f} s, longest {max(lat):.2f} s, {sum(x > 5 for x in lat) / len(lat):.2%} over 5 s"
            f" -> ideal {ideal:.2f} s; FIFO bound {fifo:.2f} s ({fifo / ideal:.2f}x ideal: the best any in-order client can do)"
        )
        for (_, kind, spec), m in zip(jobs, results):
            if m.rows == rows:
                print(f"  {m.name:<40} wall {m.wall:7.2f} s = {m.wall / ideal:.2f}x ideal, {m.wall / fifo:.2f}x FIFO bound")
            if kind == "map":
                b = spec["batch_size"]
                barrier = sum(fifo_bound(lat[i : i + b], slots) for i in range(0, rows, b))
                print(f"  {'':<40} (the batch barrier alone: each batch waits for its slowest row -> {barrier:.2f} s)")
    print("targets (ratios from this run):")
    if pipeline is not None:
        if heavy:
            print(
                f"  pipeline wall <= 1.10x ideal: {pipeline.wall / ideal:.3f}x -> {verdict(pipeline.wall <= 1.10 * ideal)}"
                f" (vs the FIFO bound: {pipeline.wall / fifo:.3f}x)"
            )
        elif bare is not None:
            print(f"  pipeline >= 0.95x bare rows/s: {pipeline.rate / bare.rate:.2f}x -> {verdict(pipeline.rate >= 0.95 * bare.rate)}")
        if bare is not None:
            print(
                f"  pipeline CPU/request <= 1.3x bare: {pipeline.cpu_us / bare.cpu_us:.2f}x -> {verdict(pipeline.cpu_us <= 1.3 * bare.cpu_us)}"
            )
    if bare is not None:
        for m in maps:
            print(
                f"  {m.name}: >= 0.9x bare rows/s: {m.rate / bare.rate:.2f}x -> {verdict(m.rate >= 0.9 * bare.rate)}; "
                f"CPU/request {m.cpu_us / bare.cpu_us:.2f}x bare -> {verdict(m.cpu_us <= 1.3 * bare.cpu_us)}"
            )
    sys.stdout.flush()


def bench_memory(bench: Bench, args: argparse.Namespace) -> None:
    slots = args.slots
    print(f"\n## memory: pipeline at 20,000 and 200,000 rows (fixed 50 ms, {slots} slots)", flush=True)
    results = []
    with FakeServer("--slots", str(slots), "--latency", "0.05", "--no-timeline", "--no-log") as server:
        for n in (20_000, 200_000):
            recipe, output = bench.recipe(server.url, n, slots, args.batch_size, f"memory-{n}")
            results.append(bench.run(server, f"pipeline, {n} rows", "pipeline", recipe=recipe, output=output, rows_path=bench.rows_file(n)))
    print(table(results, None))
    ratio = results[1].maxrss_mb / results[0].maxrss_mb
    anon = results[1].anon_mb / results[0].anon_mb
    print(f"peak RSS 200k / 20k: {ratio:.2f}x (target <= 1.3x) -> {verdict(ratio <= 1.3)}")
    print(f"peak anonymous memory 200k / 20k: {anon:.2f}x; the rest of the RSS growth is memory-mapped Arrow files")


def server_rows(server: FakeServer) -> int:
    return int(server.stats()["requests"])


def bench_two_servers(bench: Bench, args: argparse.Namespace) -> None:
    slots, rows = args.slots, args.rows or args.fixed_rows
    print(f"\n## two servers: 50 ms and 150 ms, {slots} slots each, {rows} rows (pipeline)", flush=True)
    common = ["--slots", str(slots), "--no-timeline", "--no-log"]
    with FakeServer(*common, "--latency", "0.05") as fast, FakeServer(*common, "--latency", "0.15") as slow:
        recipe, output = bench.recipe([fast.url, slow.url], rows, slots, args.batch_size, "two-servers")
        m = bench.measure(
            [fast, slow], [("pipeline, 2 servers", "pipeline", {"recipe": recipe, "output": output, "rows_path": bench.rows_file(rows)})]
        )[0]
        f, s = server_rows(fast), server_rows(slow)
    print(table([m], None))
    # both servers full until the end: rows go 3:1, and the wall is rows / (slots/0.05 + slots/0.15)
    ideal = rows / (slots / 0.05 + slots / 0.15)
    print(f"rows finished: fast (50 ms) {f}, slow (150 ms) {s}: fast/slow {f / max(s, 1):.2f} (capacity ratio 3.00)")
    print(f"wall {m.wall:.2f} s; both servers full all the time: {ideal:.2f} s -> {m.wall / ideal:.2f}x")
    print(f"faster server finished more rows -> {verdict(f > s)}")


def bench_kill(bench: Bench, args: argparse.Namespace) -> None:
    slots, rows = args.slots, args.rows or args.fixed_rows
    print(f"\n## one of two servers killed mid-run: {rows} rows, {slots} slots each (pipeline)", flush=True)
    common = ["--slots", str(slots), "--latency", "0.05", "--no-timeline", "--no-log"]
    with FakeServer(*common) as keep, FakeServer(*common) as victim:
        recipe, output = bench.recipe([keep.url, victim.url], rows, slots, args.batch_size, "kill")
        stop = threading.Event()
        killed_at: list[int] = []

        def killer() -> None:
            while not stop.wait(0.05):
                with contextlib.suppress(OSError):
                    n = server_rows(victim)
                    if n >= rows // 6:  # a third of its share: mid-run, with requests in flight
                        victim.kill()
                        killed_at.append(n)
                        return

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        m = bench.measure(
            [keep],
            [("pipeline, 2 servers, one killed", "pipeline", {"recipe": recipe, "output": output, "rows_path": bench.rows_file(rows)})],
        )[0]
        stop.set()
        thread.join()
        kept = server_rows(keep)
    print(table([m], None))
    print(f"killed the second server after it had received {killed_at[0] if killed_at else '(never)'} requests; the other received {kept}")
    print(
        f"output rows {m.rows} of {rows}: {m.ok} with their own response, {m.errors} with an error; {m.requests} requests (retries included)"
    )
    lost = rows - m.ok - m.errors
    print(
        f"no row lost (each has its own response or an error, {lost} have neither) -> {verdict(m.rows == rows and lost == 0 and bool(killed_at))}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--latency-model", choices=("fixed", "lognormal", "both"), default="both")
    parser.add_argument("--rows", type=int, default=None, help="rows per run (default: --fixed-rows / --heavy-rows)")
    parser.add_argument("--fixed-rows", type=int, default=16_384)
    parser.add_argument("--heavy-rows", type=int, default=4_096)
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="the server's concurrent generations; clients keep this many in flight (default 256; 64 with --servers 2, "
        "so that two servers and the client fit on two cores)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated: bare,barrier,pipeline,pipeline2x,map,openai,sync "
        "(default: all but pipeline2x for fixed latency; bare,pipeline,map for heavy-tailed)",
    )
    parser.add_argument("--sequential", action="store_true", help="heavy-tailed: run the clients one after another")
    parser.add_argument("--repeat", type=int, default=1, help="run each client N times (interleaved) and report medians (not heavy-tailed)")
    parser.add_argument("--batch-size", type=int, default=1024, help="the pipeline's processing.batch_size")
    parser.add_argument("--pipeline-batch-sizes", default=None, help="also run the pipeline at these batch sizes, e.g. 4096,8192")
    parser.add_argument("--pipeline-lookaheads", default=None, help="also run the pipeline with these processing.lookahead values")
    parser.add_argument("--lookahead", type=int, default=None, help="the pipeline's processing.lookahead (default: the package's)")
    parser.add_argument("--map-batch-sizes", default="1024,4096,8192", help="the ds.map sweep (fixed latency)")
    parser.add_argument("--heavy-map-batch-sizes", default="2048", help="the ds.map sweep (heavy-tailed)")
    parser.add_argument("--openai-rows", type=int, default=2048)
    parser.add_argument("--sync-rows", type=int, default=50)
    parser.add_argument("--sync-rows-heavy", type=int, default=20)
    parser.add_argument("--memory", action="store_true", help="only: the pipeline's peak RSS at 20k and 200k rows")
    parser.add_argument("--servers", type=int, choices=(1, 2), default=1, help="2: only the two-server run (50 ms and 150 ms)")
    parser.add_argument("--kill", action="store_true", help="only: kill one of two servers mid-run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, recipes, outputs)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.slots is None:
        args.slots = 64 if args.servers == 2 else 256
    if args.child:
        child_main(args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    bench = Bench(work, verbose=not args.quiet)
    if args.lookahead is not None:
        bench.processing["lookahead"] = args.lookahead
    started = time.monotonic()
    try:
        print(f"machine: {os.cpu_count()} cores, {_cpu_model()}; python {sys.version.split()[0]}")
        print(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
        if args.memory:
            bench_memory(bench, args)
        elif args.servers == 2:
            bench_two_servers(bench, args)
        elif args.kill:
            bench_kill(bench, args)
        else:
            models = ("fixed", "lognormal") if args.latency_model == "both" else (args.latency_model,)
            for model in models:
                bench_latency_model(bench, args, model)
        print(f"\nbenchmark wall time: {time.monotonic() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
