"""Benchmark: a columnar round on a Dask LocalCluster of 2 worker processes vs one process.

    python bench/bench_dask.py

The columns (20,000,000 clients: Keras-style loss and accuracy [sum, count] pairs in float32
and an int64 example count, 1% NaN losses) are generated and persisted on the workers, as
they would be after loading there; the one-process baseline runs ``process.next_columnar`` on
the same columns as NumPy arrays in the driver. Both are checked equal before timing. Also
measured: the scheduling overhead per partition (a round of 1-client partitions) and the cost
of the reduction's merges as the number of partitions, the sample size and the clients per
partition grow.
"""

from __future__ import annotations

import logging
import os
import pickle
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import compare, fmt_time, per_call  # noqa: E402

import fastrec  # noqa: E402

N = int(os.environ.get("BENCH_DASK_CLIENTS", 20_000_000))
N_PER_CLIENT = N // 40  # finalizers called once per client: far more work per client
SAMPLE = 100
SPEC = {"loss": [fastrec.TensorSpec("float32"), fastrec.TensorSpec("float32")],
        "accuracy": [fastrec.TensorSpec("float32"), fastrec.TensorSpec("float32")],
        "num_examples": fastrec.TensorSpec("int64")}


def _ratio(v):
    return v[0] / v[1]


def _same(c):
    return c


def make_process(k=SAMPLE, vectorized=True):
    wrap = fastrec.vectorized if vectorized else (lambda f: f)
    fin = {"loss": wrap(_ratio), "accuracy": wrap(_ratio), "num_examples": wrap(_same)}
    return fastrec.FinalizeThenSampleFactory(k, seed=0).create(fin, SPEC)


def dask_columns(n, chunks, seed=0):
    import dask.array as da

    rng = da.random.default_rng(seed)
    size = -(-n // chunks)
    counts = rng.integers(1, 500, n, chunks=size).astype(np.float32)
    loss = rng.random(n, dtype=np.float32, chunks=size) * 3 * counts
    loss = da.where(rng.random(n, chunks=size) < 0.01, np.float32(np.nan), loss)
    correct = rng.random(n, dtype=np.float32, chunks=size) * counts
    return {"loss": [loss, counts], "accuracy": [correct, counts],
            "num_examples": counts.astype(np.int64)}


def _bits(x):
    """A nested value as comparable bytes and structure (arrays by dtype, shape and bytes)."""
    if isinstance(x, dict):
        return ("dict", [(k, _bits(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_bits(v) for v in x])
    if isinstance(x, (np.ndarray, np.generic)):
        return (x.dtype.str, np.shape(x), np.ascontiguousarray(x).tobytes())
    return (type(x).__name__, pickle.dumps(x))


def case_round(client, n, chunks, vectorized=True):
    import dask
    import distributed
    import fastrec.dask as fd

    p = make_process(vectorized=vectorized)
    state = p.initialize()
    (cols,) = dask.persist(dask_columns(n, chunks))
    distributed.wait(cols)
    local = dask.compute(cols)[0]
    got, one = fd.next_columnar(p, state, cols), p.next_columnar(state, local)
    assert _bits(got) == _bits(one)  # bit for bit
    kind = "vectorized" if vectorized else "per-client (not vectorized)"
    return compare(f"columnar round, {kind} finalizers, {n:,} clients in {chunks} chunks, "
                   f"sample {SAMPLE}",
                  "next_columnar, one process", lambda: p.next_columnar(state, local),
                  lambda: fd.next_columnar(p, state, cols),
                  "speed-up on 2 worker processes (2 shared cores)", repeats=3, min_time=0)


def scheduling_overhead(client, partitions=64, repeats=5):
    """Seconds per partition: (round of P one-client partitions - round of 1) / (P - 1)."""
    import dask
    import dask.array as da
    import distributed
    import fastrec.dask as fd

    p = make_process()
    state = p.initialize()

    def cols(chunks):  # persisted: only fastrec's own tasks are timed
        x = da.from_array(np.ones(partitions, np.float32), chunks=chunks)
        (out,) = dask.persist({"loss": [x, x], "accuracy": [x, x],
                               "num_examples": x.astype(np.int64)})
        distributed.wait(out)
        return out

    one, many = cols(partitions), cols(1)
    t1 = statistics.median(per_call(lambda: fd.next_columnar(p, state, one), repeats=repeats,
                                    min_time=0))
    tp = statistics.median(per_call(lambda: fd.next_columnar(p, state, many), repeats=repeats,
                                    min_time=0))
    return t1, tp, (tp - t1) / (partitions - 1)


def merge_costs():
    """Per-merge time of the reduction, in one process: vs k, vs clients per partition, vs P."""
    import fastrec.dask as fd

    rows = []

    def reservoirs(k, per_part, parts):
        p = make_process(k)
        start = p.round_start(p.initialize())
        cols = {"loss": [np.ones(per_part, np.float32)] * 2,
                "accuracy": [np.ones(per_part, np.float32)] * 2,
                "num_examples": np.ones(per_part, np.int64)}
        outs = [p.next_columnar(start, cols, client_offset=i * per_part) for i in range(parts)]
        return p, [fd._Run(o.state, o.measurements, i * per_part) for i, o in enumerate(outs)]

    for k, per_part in ((100, 10_000), (100, 1_000_000), (1_000, 1_000_000), (10_000, 1_000_000)):
        p, runs = reservoirs(k, per_part, 2)
        t = statistics.median(per_call(lambda: fd._combine(p, runs), repeats=5))
        rows.append((f"k={k:,}, {per_part:,} clients per partition, 2 partitions", t))
    p, base = reservoirs(100, 10_000, 8)
    for parts in (2, 8, 32, 128):
        runs = [base[i % 8] for i in range(parts)]
        for i, r in enumerate(runs):  # distinct offsets: distinct clients, as in a real round
            runs[i] = fd._Run(r.state, r.measurements, i * 10_000)
        t = statistics.median(per_call(lambda: fd._combine(p, runs), repeats=5))
        rows.append((f"k=100, {parts} partitions: all {parts - 1} merges, per merge",
                     t / (parts - 1)))
    return rows


NOTES = ""
EXPLAIN = ("Two worker processes can only beat one process when two cores are free for them; "
           "this machine's 2 cores are shared with other jobs (load averages above). A "
           "vectorized round of 20,000,000 clients costs tens of milliseconds in one process, "
           "less than Dask's fixed cost per graph (the 1-partition round above) plus the "
           "per-partition overhead and the chunk transfers between workers, so the cluster does "
           "not pay off for it here; it pays off when the per-partition work dominates (the "
           "per-client row) and the cores are free, or when the data lives on many machines.")


def run() -> list[dict]:
    global NOTES
    import distributed

    load_before = os.getloadavg()[0]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        rows = [case_round(client, N, 2), case_round(client, N, 16),
                case_round(client, N_PER_CLIENT, 2, vectorized=False)]
        t1, tp, per = scheduling_overhead(client)
    merges = merge_costs()
    lines = [f"Load average (1 min) of the machine: {load_before:.1f} before the run, "
             f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores.", "","Scheduling overhead: a round of 1 partition takes "
             f"{fmt_time(t1)}, of 64 one-client partitions {fmt_time(tp)}: "
             f"**{fmt_time(per)} per partition** (graph, tasks, a k-row reservoir back, its merge).",
             "", "Merge cost of the reduction (one process; each merge is two k-row reservoirs):",
             "", "| case | time per merge |", "|---|---:|"]
    lines += [f"| {case} | {fmt_time(t)} |" for case, t in merges]
    lines += ["", "A merge costs the same whatever the clients per partition (only k rows "
              "travel and merge) and grows with k like k log k; a round of P partitions does "
              "P - 1 merges, so the reduction costs O(P k log k), independent of N.", "",
              EXPLAIN]
    NOTES = "\n".join(lines)
    return rows


if __name__ == "__main__":
    from _harness import table

    t0 = time.perf_counter()
    print(table(run()))
    print()
    print(NOTES)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
