#!/usr/bin/env python3
"""Side-by-side benchmark: Flotilla against Dask distributed on this machine.

Runs the workloads of README's "Performance" section (W1 throughput, W2 latency, W3 CPU
efficiency, W4 lock throughput, W6 skew/stealing) on both systems, one after
the other (never at the same time, so neither disturbs the other's figures),
and prints each figure with the ratio between them. Run it through
scripts/bench.sh, which makes the pinned venv (.venv-bench) first.

Flotilla's side is `flotilla --log-level error bench --workloads ... --runs N
--json`, run as a subprocess; this script only reads its JSON. Dask's side is
measured here, with the same workloads:

* Every task is a Python code string whose result is the variable `response`,
  as the workloads say: the Dask task function `run_code` execs the string in a
  fresh namespace and returns `response`, which is what a Flotilla worker does
  with a task (the exec of a one-line string costs some microseconds).
* The cluster is `LocalCluster(n_workers=N, threads_per_worker=1,
  processes=True, host="127.0.0.1", dashboard_address=None)`, fresh for every
  run of every workload. It runs in a child process of its own (scheduler and
  nannies there, one process per worker), and the client here connects to it
  over loopback TCP: "the client must be outside the cluster". Pass
  --dask-cluster-in-client to start it inside the client's process instead
  (the common notebook set-up: the scheduler then shares the client's GIL).
* Dask has no per-worker capacity: the "capacity N" of the workloads has no
  equivalent; each Dask worker runs one task at a time (threads_per_worker=1).
* As in `flotilla bench`: W3/W6 tasks compute fib(n) and answer their index
  (`response = i`), so every workload checks each index comes back exactly
  once; single-task times are one fib(n) in a plain python subprocess, timed
  inside it (median of 3) before each run's cluster starts; p50/p99 use the
  same definition (index round((n - 1) * p) of the sorted samples).
* W6: Dask's closest equivalent of "sent to worker 0" is a loose worker
  restriction (workers=[worker 0], allow_other_workers=True), which its work
  stealing may move; the output says how many tasks each worker ran.
* --idle adds `idle`: the CPU an idle 4-worker cluster uses over 10 s (Dask:
  the cluster process and every process under it; not the client).
* The 1-minute load average is recorded before each side and each Dask run;
  the report warns when the machine was busy, since the figures then say
  little, the CPU-bound W3 and W6 least of all.
* Before timing, one tiny task runs on every worker (keys prefixed "warmup",
  so the scheduler's per-prefix duration estimates for the measured tasks
  start unknown, as for a user's first batch). This keeps worker start-up and
  the first unpickling of `run_code` out of the figures.

* W1 is also measured through Flotilla's Python client (clients/python,
  imported from the repository): a fresh `flotilla up` of 4 workers of
  capacity 64, as `flotilla bench` uses for W1, then
  `client.map("response = item", range(2000))` and `client.as_completed`
  over the futures, timed from the map call to the last result, with each
  index checked to come back once. That is the like-for-like of Dask's
  `client.map` + `gather`: a Python user's program on both sides.

No figure is ever made up: a figure that a side did not produce is printed
as "n/a" with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid

ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W6")
DEFAULT_WORKLOADS = "W1,W2,W3,W6"

W1_TASKS = 2000
W2_SAMPLES = 300
W3_TASKS, W3_N = 32, 30
W4_TASKS = 1000
W6_TASKS, W6_N = 8, 32

# Workers per workload (the workloads' "setup"; the capacities have no Dask
# equivalent).
WORKERS = {"W1": 4, "W2": 4, "W3": 2, "W4": 4, "W6": 4, "idle": 4}
IDLE_WINDOW_S = 10.0

# Targets of the benchmark issue, checked on Flotilla's figures.
TARGET_W1_RATIO = 3.0  # Flotilla tasks/s >= 3x Dask's
TARGET_W1_PYTHON_RATIO = 5.0  # through the Python client: >= 5x Dask's client.map
TARGET_W2_P50_MS = 2.0  # Flotilla p50 < 2 ms
TARGET_W3_EFFICIENCY = 1.05  # within 5% of perfect
TARGET_W6_RATIO = 1.15  # within 15% of the 2-core limit

FIB_DEF = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
FIB_VALUES = {30: 832040, 32: 2178309}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_code(code: str):
    """The Dask task: a code string run like a Flotilla task, result `response`."""
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the benchmark's own code strings
    return namespace.get("response", "No result returned.")


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (p in 0..1) of an ascending list, defined as
    `flotilla bench` does: the sample at index round((n - 1) * p), rounding
    halves away from zero (n = 300: p50 is index 150, p99 index 296)."""
    idx = math.floor((len(sorted_values) - 1) * p + 0.5)
    return sorted_values[min(idx, len(sorted_values) - 1)]


def median(values):
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        nproc = int(nproc)
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = usable
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def time_single_fib(n: int, repeats: int = 3) -> dict:
    """One fib(n) timed alone in a plain python3 subprocess, median of `repeats`.

    The interpreter is this venv's python, the same binary the Dask workers
    run (a venv links the python3 it was made from). The time is taken inside
    the subprocess, around the call only (no interpreter start-up).
    """
    code = (
        FIB_DEF
        + "import time\n"
        + "t = time.perf_counter()\n"
        + f"r = fib({n})\n"
        + "d = time.perf_counter() - t\n"
        + f"assert r == {FIB_VALUES[n]}, r\n"
        + "print(repr(d))\n"
    )
    samples = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        samples.append(float(out.stdout.strip()))
    return {"median_s": statistics.median(samples), "samples_s": samples}


# ---------------------------------------------------------------------------
# Dask


def serve_cluster(n_workers: int) -> None:
    """Child-process mode: run a LocalCluster until stdin closes."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    print(json.dumps({"address": cluster.scheduler_address}), flush=True)
    try:
        sys.stdin.read()
    finally:
        cluster.close()


class DaskCluster:
    """A fresh LocalCluster with a client connected to it, as a context manager."""

    def __init__(self, n_workers: int, in_client: bool):
        self.n_workers = n_workers
        self.in_client = in_client
        self.proc = None
        self.cluster = None
        self.client = None

    def __enter__(self):
        import logging

        from distributed import Client, LocalCluster

        if self.in_client:
            self.cluster = LocalCluster(
                n_workers=self.n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            address = self.cluster.scheduler_address
        else:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve-dask-cluster", str(self.n_workers)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise RuntimeError(f"the Dask cluster process exited ({self.proc.returncode}) before starting")
            address = json.loads(line)["address"]
        self.client = Client(address, timeout="60s")
        self.client.wait_for_workers(self.n_workers, timeout=120)
        return self

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return False

    def workers_by_name(self) -> list[str]:
        """Worker addresses, in the order of their LocalCluster names 0..N-1."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return [addr for addr, info in sorted(workers.items(), key=lambda kv: int(kv[1]["name"]))]

    def idle_cpu(self) -> dict:
        """CPU used by the idle cluster (scheduler, nannies and worker
        processes; not the client) over IDLE_WINDOW_S, as `flotilla bench`
        measures its master and workers: user + system time, 1 s after start."""
        import psutil

        if self.proc is None:
            raise RuntimeError("idle is measured only with the cluster in its own process")
        root = psutil.Process(self.proc.pid)
        procs = [root] + root.children(recursive=True)
        time.sleep(1.0)

        def used() -> float:
            total = 0.0
            for p in procs:
                t = p.cpu_times()
                total += t.user + t.system
            return total

        before = used()
        time.sleep(IDLE_WINDOW_S)
        spent = used() - before
        return {"cpu_percent_of_one_core": 100.0 * spent / IDLE_WINDOW_S, "window_s": IDLE_WINDOW_S,
                "processes": len(procs)}

    def warm_up(self) -> None:
        futures = [
            self.client.submit(run_code, "response = 0", key=f"warmup-{uuid.uuid4().hex}", workers=[addr], pure=False)
            for addr in self.workers_by_name()
        ]
        self.client.gather(futures)
        del futures


def dask_w1(c: DaskCluster) -> dict:
    codes = [f"response = {i}" for i in range(W1_TASKS)]
    t0 = time.perf_counter()
    futures = c.client.map(run_code, codes, pure=False)
    results = c.client.gather(futures)
    elapsed = time.perf_counter() - t0
    del futures
    if results != list(range(W1_TASKS)):
        raise AssertionError("W1: results are not each index exactly once")
    return {"tasks_per_s": W1_TASKS / elapsed, "elapsed_s": elapsed}


def dask_w2(c: DaskCluster) -> dict:
    latencies_ms = []
    for i in range(W2_SAMPLES):
        code = f"response = {i}"
        t0 = time.perf_counter()
        future = c.client.submit(run_code, code, pure=False)
        result = future.result()
        latencies_ms.append((time.perf_counter() - t0) * 1000)
        del future
        if result != i:
            raise AssertionError(f"W2: task {i} returned {result!r}")
    s = sorted(latencies_ms)
    return {"p50_ms": percentile(s, 0.50), "p99_ms": percentile(s, 0.99), "max_ms": s[-1]}


def dask_cpu(c: DaskCluster, n_tasks: int, n: int, single_s: float, workers=None, allow_other_workers=False) -> dict:
    # As in `flotilla bench`: compute fib(n), answer the task's index.
    code = FIB_DEF + f"fib({n})\nresponse = {{i}}\n"
    t0 = time.perf_counter()
    futures = [
        c.client.submit(
            run_code, code.replace("{i}", str(i)), key=f"fib{n}-{uuid.uuid4().hex}", pure=False,
            workers=workers, allow_other_workers=allow_other_workers,
        )
        for i in range(n_tasks)
    ]
    results = c.client.gather(futures)
    makespan = time.perf_counter() - t0
    if results != list(range(n_tasks)):
        raise AssertionError(f"fib({n}): results are not each index exactly once: {results!r}")
    # Where each task ran (its result stays on the worker that computed it).
    names = {addr: i for i, addr in enumerate(c.workers_by_name())}
    placement: dict = {}
    for holders in c.client.who_has(futures).values():
        for addr in holders:
            placement[str(names.get(addr, addr))] = placement.get(str(names.get(addr, addr)), 0) + 1
    del futures
    limit = n_tasks * single_s / 2
    return {"makespan_s": makespan, "single_task_s": single_s, "ratio": makespan / limit,
            "tasks_per_worker": dict(sorted(placement.items()))}


def dask_w4(c: DaskCluster) -> dict:
    from distributed import Variable

    name = f"w4-total-{uuid.uuid4().hex}"
    total = Variable(name, client=c.client)
    total.set(0)
    code_tpl = (
        "from distributed import Lock, Variable\n"
        f"total = Variable({name!r})\n"
        f"with Lock({name + '-lock'!r}):\n"
        "    total.set(total.get() + 1)\n"
        "response = {i}\n"
    )
    codes = [code_tpl.replace("{i}", str(i)) for i in range(W4_TASKS)]
    t0 = time.perf_counter()
    futures = c.client.map(run_code, codes, pure=False)
    results = c.client.gather(futures)
    elapsed = time.perf_counter() - t0
    del futures
    final = total.get()
    if results != list(range(W4_TASKS)):
        raise AssertionError("W4: results are not each index exactly once")
    return {"tasks_per_s": W4_TASKS / elapsed, "elapsed_s": elapsed, "final_total": final}


def run_dask(workloads: list[str], runs: int, in_client: bool) -> dict:
    import dask
    import distributed

    out = {
        "versions": {"dask": dask.__version__, "distributed": distributed.__version__},
        "cluster": (
            "LocalCluster(n_workers=N, threads_per_worker=1, processes=True, host='127.0.0.1', "
            "dashboard_address=None) " + ("in the client's process" if in_client else "in its own process")
        ),
        "loadavg_before": loadavg(),
        "workloads": {},
    }
    for w in workloads:
        per_run = []
        for r in range(runs):
            single = None
            if w == "W3":
                single = time_single_fib(W3_N)
            elif w == "W6":
                single = time_single_fib(W6_N)
            load = loadavg()
            log(f"dask {w} run {r + 1}/{runs} ({WORKERS[w]} workers, load {load})")
            with DaskCluster(WORKERS[w], in_client) as c:
                if w != "idle":
                    c.warm_up()
                if w == "idle":
                    fig = c.idle_cpu()
                elif w == "W1":
                    fig = dask_w1(c)
                elif w == "W2":
                    fig = dask_w2(c)
                elif w == "W3":
                    fig = dask_cpu(c, W3_TASKS, W3_N, single["median_s"])
                    fig["efficiency"] = fig.pop("ratio")
                elif w == "W4":
                    fig = dask_w4(c)
                elif w == "W6":
                    # W6 sends the 8 tasks to worker 0 (/send/0). Dask's
                    # closest equivalent is a worker restriction; allow_other_workers=True
                    # makes it a loose one, so Dask's work stealing may move the tasks
                    # to the idle workers (with a strict restriction it never would,
                    # and the figure would be 2.0 by construction).
                    w0 = c.workers_by_name()[0]
                    fig = dask_cpu(c, W6_TASKS, W6_N, single["median_s"], workers=[w0], allow_other_workers=True)
                else:
                    raise ValueError(w)
            fig["loadavg_before"] = load
            if single is not None:
                fig["single_samples_s"] = single["samples_s"]
            log(f"dask {w} run {r + 1}: {summarise(w, fig)}")
            per_run.append(fig)
        out["workloads"][w] = {**medians(w, per_run), "runs": per_run}
    return out


def medians(w: str, per_run: list[dict]) -> dict:
    keys = {
        "W1": ["tasks_per_s"],
        "W2": ["p50_ms", "p99_ms"],
        "W3": ["efficiency", "makespan_s", "single_task_s"],
        "W4": ["tasks_per_s"],
        "W6": ["ratio", "makespan_s", "single_task_s"],
        "idle": ["cpu_percent_of_one_core"],
    }[w]
    m = {k: median([r[k] for r in per_run]) for k in keys}
    if w == "W4":
        finals = [r["final_total"] for r in per_run]
        # Every run must end at exactly W4_TASKS; report the worst one.
        m["final_total"] = finals[0] if len(set(finals)) == 1 else min(finals, key=lambda f: abs(f - W4_TASKS))
        m["final_totals"] = finals
    return m


def summarise(w: str, fig: dict) -> str:
    if w == "idle":
        return f"{fig['cpu_percent_of_one_core']:.2f} % of one core over {fig['window_s']:.0f} s"
    if w in ("W1", "W4"):
        s = f"{fig['tasks_per_s']:.1f} tasks/s"
        return s + (f", final {fig['final_total']}" if w == "W4" else "")
    if w == "W2":
        return f"p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms"
    key = "efficiency" if w == "W3" else "ratio"
    s = f"{fig[key]:.3f} (makespan {fig['makespan_s']:.2f} s, single {fig['single_task_s']:.3f} s"
    if "tasks_per_worker" in fig and w == "W6":
        s += ", tasks per worker " + json.dumps(fig["tasks_per_worker"])
    return s + ")"


# ---------------------------------------------------------------------------
# Flotilla


def flotilla_has_bench(flotilla: str) -> bool:
    out = subprocess.run([flotilla, "--help"], capture_output=True, text=True)
    return any(re.match(r"\s+bench\b", line) for line in out.stdout.splitlines())


def parse_json_stdout(stdout: str) -> dict:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        # Tolerate lines printed before the JSON document; nothing else.
        lines = stdout.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("{"):
                try:
                    return json.loads("\n".join(lines[i:]))
                except json.JSONDecodeError:
                    continue
        raise


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_excerpt(text: str, keep: int = 12) -> str:
    """The telling lines of a failed run's output: a panic or error message
    and the lines just after it, else the last lines; repeats collapsed."""
    lines = [ANSI.sub("", line).rstrip() for line in text.strip().splitlines()]
    first = next((i for i, line in enumerate(lines) if "panicked at" in line), None)
    if first is None:
        first = next((i for i, line in enumerate(lines) if line.lower().startswith("error")), None)
    lines = lines[first:] if first is not None else lines[-keep:]
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith(line):
            continue
        out.append(line)
        if len(out) == keep:
            break
    return "\n".join(out)


def run_flotilla_once(flotilla: str, workloads: list[str], runs: int, timeout: float | None = None) -> tuple[dict | None, str]:
    cmd = [flotilla, "--log-level", "error", "bench", "--workloads", ",".join(workloads), "--runs", str(runs), "--json"]
    shown = " ".join(cmd)
    # Generous: a run of one workload takes seconds; a hung bench must not hang this.
    if timeout is None:
        timeout = 120 + 120 * runs * len(workloads)
    log(f"flotilla: {shown} (load {loadavg()}, timeout {timeout} s)")
    t0 = time.perf_counter()
    # A session of its own, so that on a timeout its clusters go too.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        stdout, stderr = p.communicate()
        return None, f"`{shown}` did not finish in {timeout} s (killed):\n{error_excerpt(stderr or stdout)}"
    log(f"flotilla: exit {p.returncode} after {time.perf_counter() - t0:.1f} s")
    if p.returncode != 0:
        return None, f"`{shown}` exited {p.returncode}:\n{error_excerpt(stderr or stdout)}"
    try:
        return parse_json_stdout(stdout), ""
    except json.JSONDecodeError as e:
        return None, f"`{shown}` printed no JSON ({e}); stdout began: {stdout[:300]!r}"


def flotilla_python_w1_once(flotilla: str) -> dict:
    """W1 through the Python client: map + as_completed on a fresh cluster."""
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
    from flotilla import Client

    manifest = ("apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: bench-python }\n"
                f"spec:\n  workers:\n    - capacity: 64\n      replicas: {WORKERS['W1']}\n")
    with tempfile.TemporaryDirectory(prefix="flotilla-bench-py-") as d:
        path = os.path.join(d, "cluster.yaml")
        with open(path, "w") as f:
            f.write(manifest)
        env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT")}
        p = subprocess.Popen([flotilla, "--log-level", "error", "up", path, "--port", "0"],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            line = p.stdout.readline()
            url = next((w for w in line.split() if w.startswith("http://")), None)
            if url is None:
                raise RuntimeError(f"flotilla up printed no address: {line!r}")
            with Client(url) as client:
                deadline = time.monotonic() + 60
                while True:
                    nodes = client.nodes()
                    if len(nodes) == WORKERS["W1"] and all(n["state"] == "active" for n in nodes):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workers did not come up: {nodes}")
                    time.sleep(0.05)
                t0 = time.perf_counter()
                futures = client.map("response = item", range(W1_TASKS))
                results = [f.result() for f in client.as_completed(futures)]
                elapsed = time.perf_counter() - t0
            if sorted(results) != list(range(W1_TASKS)):
                raise AssertionError("W1 (Python client): results are not each index exactly once")
            return {"tasks_per_s": W1_TASKS / elapsed, "elapsed_s": elapsed}
        finally:
            p.send_signal(2)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()


def run_flotilla_python(flotilla: str, runs: int) -> dict:
    per_run = []
    for r in range(runs):
        log(f"flotilla W1 through the Python client, run {r + 1}/{runs} (load {loadavg()})")
        fig = flotilla_python_w1_once(flotilla)
        log(f"flotilla W1 (Python client) run {r + 1}: {fig['tasks_per_s']:.1f} tasks/s")
        per_run.append(fig)
    return {"tasks_per_s": median([x["tasks_per_s"] for x in per_run]), "runs": per_run}


def run_flotilla(flotilla: str, workloads: list[str], runs: int) -> dict:
    """Flotilla's figures. W4 runs in an invocation of its own, so that a
    Flotilla without W4 still gives the others (W4 is then n/a, with why)."""
    out: dict = {"loadavg_before": loadavg(), "errors": {}, "reports": []}
    groups = [[w for w in workloads if w != "W4"], [w for w in workloads if w == "W4"]]
    merged: dict = {}
    for group in groups:
        if not group:
            continue
        data, err = run_flotilla_once(flotilla, group, runs)
        if data is None:
            for w in group:
                out["errors"][w] = err
            continue
        out["reports"].append(data)
        out.setdefault("machine", data.get("machine"))
        for w in group:
            entry = (data.get("workloads") or {}).get(w)
            if entry is None:
                out["errors"][w] = f"no {w} in flotilla bench's JSON"
            elif not isinstance(entry, dict) or entry.get("error"):
                out["errors"][w] = str(entry.get("error") if isinstance(entry, dict) else entry)
            else:
                merged[w] = entry
    out["workloads"] = merged
    return out


# ---------------------------------------------------------------------------
# report


def fnum(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def fig(side: dict | None, w: str, key: str):
    """A figure from one side, or None when it has none (never a stand-in)."""
    if side is None:
        return None
    entry = side.get(w)
    if not isinstance(entry, dict) or entry.get("error"):
        return None
    v = entry.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def compare(workloads, flot: dict | None, dask_w: dict) -> tuple[list[list[str]], dict, dict]:
    rows = [["workload", "Flotilla", "Dask", "ratio"]]
    comp: dict = {}
    targets: dict = {}
    for w in workloads:
        if w == "W1":
            f, d = fig(flot, w, "tasks_per_s"), fig(dask_w, w, "tasks_per_s")
            r = ratio(f, d)
            rows.append(["W1 throughput (tasks/s)", fnum(f, "{:.1f}"), fnum(d, "{:.1f}"),
                         fnum(r, "{:.2f}x (Flotilla/Dask)")])
            comp[w] = {"flotilla_tasks_per_s": f, "dask_tasks_per_s": d, "flotilla_over_dask": r}
            targets["W1 >= 3x Dask tasks/s"] = None if r is None else r >= TARGET_W1_RATIO
            fp = fig(flot, "W1-python", "tasks_per_s")
            rp = ratio(fp, d)
            rows.append(["  W1 via Python client map+as_completed", fnum(fp, "{:.1f}"), fnum(d, "{:.1f}"),
                         fnum(rp, "{:.2f}x (Flotilla/Dask client.map)")])
            comp["W1-python"] = {"flotilla_tasks_per_s": fp, "dask_tasks_per_s": d, "flotilla_over_dask": rp}
            targets["W1 via the Python client >= 5x Dask's client.map"] = (
                None if rp is None else rp >= TARGET_W1_PYTHON_RATIO)
        elif w == "W2":
            f50, d50 = fig(flot, w, "p50_ms"), fig(dask_w, w, "p50_ms")
            f99, d99 = fig(flot, w, "p99_ms"), fig(dask_w, w, "p99_ms")
            r50, r99 = ratio(d50, f50), ratio(d99, f99)
            rows.append(["W2 latency p50 (ms)", fnum(f50, "{:.2f}"), fnum(d50, "{:.2f}"),
                         fnum(r50, "{:.1f}x faster (Dask/Flotilla)")])
            rows.append(["W2 latency p99 (ms)", fnum(f99, "{:.2f}"), fnum(d99, "{:.2f}"),
                         fnum(r99, "{:.1f}x faster (Dask/Flotilla)")])
            comp[w] = {"flotilla_p50_ms": f50, "dask_p50_ms": d50, "flotilla_p99_ms": f99, "dask_p99_ms": d99,
                       "dask_over_flotilla_p50": r50, "dask_over_flotilla_p99": r99}
            targets["W2 p50 < 2 ms"] = None if f50 is None else f50 < TARGET_W2_P50_MS
        elif w in ("W3", "W6"):
            key = "efficiency" if w == "W3" else "ratio"
            f, d = fig(flot, w, key), fig(dask_w, w, key)
            label = "W3 makespan / perfect" if w == "W3" else "W6 makespan / 2-core limit"
            rows.append([label, fnum(f, "{:.3f}"), fnum(d, "{:.3f}"), "side by side (1.00 is perfect)"])
            for k in ("makespan_s", "single_task_s"):
                rows.append([f"  {w} {k}", fnum(fig(flot, w, k), "{:.3f}"), fnum(fig(dask_w, w, k), "{:.3f}"), ""])
            comp[w] = {f"flotilla_{key}": f, f"dask_{key}": d}
            if w == "W3":
                targets["W3 within 5% of perfect (<= 1.05)"] = None if f is None else f <= TARGET_W3_EFFICIENCY
            else:
                targets["W6 within 15% of the 2-core limit (<= 1.15)"] = None if f is None else f <= TARGET_W6_RATIO
        elif w == "W4":
            f, d = fig(flot, w, "tasks_per_s"), fig(dask_w, w, "tasks_per_s")
            ff, df = fig(flot, w, "final_total"), fig(dask_w, w, "final_total")
            r = ratio(f, d)
            rows.append(["W4 lock throughput (tasks/s)", fnum(f, "{:.1f}"), fnum(d, "{:.1f}"),
                         fnum(r, "{:.2f}x (Flotilla/Dask)")])
            rows.append(["  W4 final total (must be 1000)", fnum(ff, "{:d}"), fnum(df, "{:d}"), ""])
            comp[w] = {"flotilla_tasks_per_s": f, "dask_tasks_per_s": d, "flotilla_over_dask": r,
                       "flotilla_final_total": ff, "dask_final_total": df}
        elif w == "idle":
            f, d = fig(flot, w, "cpu_percent_of_one_core"), fig(dask_w, w, "cpu_percent_of_one_core")
            rows.append(["idle 4 workers (% of one core)", fnum(f, "{:.2f}"), fnum(d, "{:.2f}"), "side by side"])
            comp[w] = {"flotilla_cpu_percent_of_one_core": f, "dask_cpu_percent_of_one_core": d}
    return rows, comp, targets


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            print("  ".join("-" * wd for wd in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per workload; medians are reported (default 3)")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"comma-separated, of {','.join(ALL_WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    ap.add_argument("--flotilla", default="target/release/flotilla", help="the flotilla binary")
    ap.add_argument("--json", metavar="FILE", help="also write every figure (all runs) to FILE")
    ap.add_argument("--idle", action="store_true",
                    help="also measure the CPU an idle 4-worker cluster uses over 10 s (flotilla bench's `idle`)")
    ap.add_argument("--dask-only", action="store_true", help="measure Dask alone (no flotilla binary needed)")
    ap.add_argument("--dask-cluster-in-client", action="store_true",
                    help="start Dask's LocalCluster in the client's process instead of a process of its own")
    ap.add_argument("--serve-dask-cluster", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve_dask_cluster:
        serve_cluster(args.serve_dask_cluster)
        return 0

    asked = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in asked if w not in ALL_WORKLOADS]
    workloads = [w for w in ALL_WORKLOADS if w in asked]
    if bad or not workloads:
        ap.error(f"unknown workloads {bad}; choose from {','.join(ALL_WORKLOADS)} (W5 is not compared here; --idle adds idle)")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.idle:
        if args.dask_cluster_in_client:
            ap.error("--idle needs Dask's cluster in a process of its own (not --dask-cluster-in-client)")
        workloads.append("idle")

    if not args.dask_only:
        if not (os.path.isfile(args.flotilla) and os.access(args.flotilla, os.X_OK)):
            print(f"{args.flotilla} is missing: run `cargo build --release` first (or use --dask-only)", file=sys.stderr)
            return 1
        if not flotilla_has_bench(args.flotilla):
            print(f"{args.flotilla} has no `bench` subcommand yet; use --dask-only to measure Dask alone",
                  file=sys.stderr)
            return 1

    date = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    # One system at a time: Flotilla's whole bench first, then Dask's.
    flot = None
    if not args.dask_only:
        flot = run_flotilla(os.path.abspath(args.flotilla), workloads, args.runs)
        if "W1" in workloads:
            try:
                flot["workloads"]["W1-python"] = run_flotilla_python(os.path.abspath(args.flotilla), args.runs)
            except Exception as e:  # noqa: BLE001 - reported as n/a with the reason
                flot["errors"]["W1-python"] = f"W1 through the Python client failed: {e!r}"
    dask = run_dask(workloads, args.runs, args.dask_cluster_in_client)

    flot_w = flot["workloads"] if flot is not None else None
    rows, comp, targets = compare(workloads, flot_w, dask["workloads"])

    print()
    print(f"Flotilla vs Dask distributed {dask['versions']['distributed']} — {date.strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"machine: {machine['nproc']} cores (nproc), {machine['cpu_model']}, {machine['platform']}, "
          f"Python {machine['python']}")
    if flot is not None and isinstance(flot.get("machine"), dict):
        print(f"flotilla bench says: {json.dumps(flot['machine'])}")
    print(f"medians of {args.runs} run(s); one system at a time "
          f"(load average before Flotilla: {flot['loadavg_before'] if flot else 'n/a'}, "
          f"before Dask: {dask['loadavg_before']})")
    print(f"Dask: {dask['cluster']}, threads_per_worker=1 (Dask has no per-worker capacity)")
    if load_at_start is not None and load_at_start > 1.0:
        print(f"WARNING: the 1-minute load average was {load_at_start:.2f} before the first side started: "
              "something else was running, and the figures of both sides are disturbed.")
    print()
    print_table(rows)
    if flot is not None:
        by_error: dict = {}
        for w, e in flot["errors"].items():
            by_error.setdefault(e, []).append(w)
        for e, ws in by_error.items():
            print(f"\nFlotilla {','.join(ws)}: n/a — {e}")

    print("\nall runs:")
    for w in workloads:
        print(f"  dask {w}: " + "; ".join(summarise(w, r) for r in dask["workloads"][w]["runs"]))
        if flot_w and isinstance(flot_w.get(w), dict) and "runs" in flot_w[w]:
            print(f"  flotilla {w}: {json.dumps(flot_w[w]['runs'])}")
        if w == "W1" and flot_w and isinstance(flot_w.get("W1-python"), dict):
            print(f"  flotilla W1 via the Python client: {json.dumps(flot_w['W1-python']['runs'])}")

    if not args.dask_only:
        print("\ntargets (Flotilla's figures):")
        for name, ok in targets.items():
            print(f"  {'n/a ' if ok is None else ('PASS' if ok else 'FAIL')}  {name}")

    if args.json:
        doc = {
            "date": date.isoformat(),
            "machine": machine,
            "loadavg_1m_at_start": load_at_start,
            "runs": args.runs,
            "workloads": workloads,
            "command": sys.argv,
            "dask": dask,
            "flotilla": flot,
            "comparison": comp,
            "targets": targets,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
