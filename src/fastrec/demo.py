"""``python -m fastrec demo``: a simulated federated evaluation with finalize-then-sample metrics.

Every round, many clients report Keras-style unfinalized metrics as ``MetricsRecord`` s
(``fastrec.MetricsRecord`` when this build has it, else plain dicts): ``loss`` and
``accuracy`` as ``[sum, count]`` pairs and ``num_examples``. A few clients diverge and report a
NaN or infinite loss. The server finalizes every client's metrics, counts the non-finite ones
and keeps a uniform sample of clients for the round and over all rounds.

Each client's reply travels as a serialized Flower 1.15 ``Message``
(:func:`fastrec.wire.message_to_bytes`); the server reads the replies straight into columns
(:func:`fastrec.wire.metrics_columns`) and samples them with ``next_columnar``, and prints the
throughput of each stage.

The round's clients arrive in chunks, as they would from several workers: each chunk is
processed on its own with ``client_offset`` and the chunks' reservoirs are merged, which gives
exactly the one-machine result.

Example (prints a progress bar on stderr, then the summary)::

    $ python -m fastrec demo --rounds 5 --clients 20000 --sample-size 100 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .records import MetricsRecord
from . import wire
from .records import RecordSet
from .sampling import FinalizeThenSampleFactory, TensorSpec, vectorized

SPEC = {"loss": [TensorSpec("float64"), TensorSpec("float64")],
        "accuracy": [TensorSpec("float64"), TensorSpec("float64")],
        "num_examples": TensorSpec("int64")}


def _ratio(pair):
    total, count = pair
    return total / count


FINALIZERS = {"loss": _ratio, "accuracy": _ratio, "num_examples": int}
# The same finalizers over columns (one call per metric per chunk), for the wire path.
COLUMN_FINALIZERS = {"loss": vectorized(_ratio), "accuracy": vectorized(_ratio),
                     "num_examples": vectorized(lambda column: column)}


def simulate_clients(rng: np.random.Generator, n: int, diverge: float = 0.005) -> list:
    """``n`` clients' unfinalized metrics; a ``diverge`` fraction report a NaN or inf loss.

    >>> sorted(simulate_clients(np.random.default_rng(0), 2)[0])
    ['accuracy', 'loss', 'num_examples']
    """
    examples = rng.integers(5, 400, n)
    skill = rng.beta(8, 3, n)
    correct = rng.binomial(examples, skill)
    loss_sum = rng.gamma(2.0, 0.5 * (1.2 - skill)) * examples
    broken = rng.random(n) < diverge
    loss_sum[broken] = np.where(rng.random(int(broken.sum())) < 0.5, np.nan, np.inf)
    return [MetricsRecord({"loss": [ls, float(e)], "accuracy": [float(c), float(e)],
                     "num_examples": int(e)})
            for ls, c, e in zip(loss_sum.tolist(), correct.tolist(), examples.tolist())]


class Progress:
    """A one-line progress bar on stderr, redrawn at most every 0.1 s.

    >>> import io
    >>> bar = Progress(4, stream=io.StringIO())
    >>> bar.update(4, "round 1/1"); bar.close()
    >>> "100.0%" in bar.stream.getvalue()
    True
    """

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 30):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.enabled, self.width = total, enabled, width
        self.done = 0
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, n: int, label: str) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and self.done < self.total):
            return
        self.last = now
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        rate = self.done / max(now - self.start, 1e-9)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac:6.1%} "
                          f"{label} {rate:>12,.0f} clients/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _describe(values) -> str:
    a = np.asarray(values, dtype=float)
    finite = a[np.isfinite(a)]
    if not finite.size:
        return f"{len(a)} values, none finite"
    return (f"mean {finite.mean():.4f}  median {np.median(finite):.4f}  "
            f"min {finite.min():.4f}  max {finite.max():.4f}"
            + (f"  ({len(a) - finite.size} non-finite)" if finite.size < len(a) else ""))


def _replies(batch, first):
    """The clients' replies as Flower Message bytes (client ``first + i`` is node i + 1)."""
    return [wire.message_to_bytes(
        {"run_id": 1, "src_node_id": first + i + 1, "message_type": "evaluate"},
        RecordSet(metrics_records={"eval": rec})) for i, rec in enumerate(batch)]


def run(rounds: int, clients: int, sample_size: int, seed: int | None, chunk: int,
        progress: bool = True, out=None, err=None, dask_workers: int = 0) -> dict:
    """Run the simulation; print the summary to ``out`` (stdout), the progress bar to ``err``
    (stderr); return the final state, last round's sample, measurements and sampling time.

    ``dask_workers``: run each round with :func:`fastrec.dask.next` on a local Dask cluster
    of that many worker processes (one partition per chunk); same results."""
    if dask_workers:
        return _run_on_dask(dask_workers, rounds, clients, sample_size, seed, chunk, progress,
                            out, err)
    out = sys.stdout if out is None else out
    process = FinalizeThenSampleFactory(sample_size, seed=seed).create(COLUMN_FINALIZERS, SPEC)
    rng = np.random.default_rng(seed)
    state = process.initialize()
    bar = Progress(rounds * clients, stream=err, enabled=progress)
    sampling_s = encode_s = ingest_s = 0.0
    per_round = []
    current = {}
    for r in range(rounds):
        # Every chunk starts from the same empty reservoir at this round, as separate workers
        # would; merging their reservoirs gives the round's sample.
        start = process.round_start(state)
        round_state = start
        non_finite = dict.fromkeys(FINALIZERS, 0)
        for a in range(0, clients, chunk):
            batch = simulate_clients(rng, min(chunk, clients - a))
            # Each client replies with a Flower 1.15 Message on the wire; the server reads
            # the replies' MetricsRecord straight into columns and samples those.
            t0 = time.perf_counter()
            replies = _replies(batch, a)
            t1 = time.perf_counter()
            columns = wire.metrics_columns(replies, "eval", SPEC, wire="message")
            t2 = time.perf_counter()
            part = process.next_columnar(start, columns, client_offset=a)
            round_state = process.merge(round_state, part.state)
            t3 = time.perf_counter()
            encode_s, ingest_s, sampling_s = encode_s + t1 - t0, ingest_s + t2 - t1, \
                sampling_s + t3 - t2
            for name, count in part.measurements.items():
                non_finite[name] += count
            bar.update(len(batch), f"round {r + 1}/{rounds}")
        t0 = time.perf_counter()
        if clients:
            state = process.merge(state, round_state)
        sampling_s += time.perf_counter() - t0
        current = round_state["samples"]
        per_round.append(non_finite)
    bar.close()

    _summary(out, rounds, clients, sample_size, seed, per_round, current, state, sampling_s)
    total = rounds * clients
    print(f"wire: replies as Flower Message bytes; per stage: encode {_rate(total, encode_s)}, "
          f"ingest (metrics_columns) {_rate(total, ingest_s)}, finalize + sample "
          f"{_rate(total, sampling_s)}", file=out)
    return {"state": state, "current": current, "measurements": per_round,
            "sampling_seconds": sampling_s}


def _run_on_dask(workers, rounds, clients, sample_size, seed, chunk, progress, out, err):
    """:func:`run` with each round on a LocalCluster of ``workers`` processes (loopback):
    the replies' bytes travel to the workers, which ingest and sample them
    (:func:`fastrec.dask.next_from_wire`)."""
    import logging

    import dask
    import dask.bag as db
    from distributed import Client, LocalCluster

    from . import dask as fdask

    out = sys.stdout if out is None else out
    process = FinalizeThenSampleFactory(sample_size, seed=seed).create(COLUMN_FINALIZERS, SPEC)
    rng = np.random.default_rng(seed)
    state = process.initialize()
    bar = Progress(rounds * clients, stream=err, enabled=progress)
    encode_s = sampling_s = 0.0
    per_round, current = [], {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster):
        for r in range(rounds):
            starts = range(0, clients, chunk)  # the same chunks, in the same order, as without
            batches = [simulate_clients(rng, min(chunk, clients - a)) for a in starts]
            t0 = time.perf_counter()
            # One opaque graph value per chunk of replies (db.from_sequence would tokenize and
            # wrap every reply).
            bag = db.from_delayed([dask.delayed(_replies(b, a), pure=False, traverse=False)
                                   for b, a in zip(batches, starts)]
                                  or [dask.delayed([], pure=False, traverse=False)])
            t1 = time.perf_counter()
            result = fdask.next_from_wire(process, state, bag, "eval", SPEC, wire="message")
            encode_s, sampling_s = encode_s + t1 - t0, sampling_s + time.perf_counter() - t1
            state, current = result.state, result.result[0]
            per_round.append(result.measurements)
            bar.update(clients, f"round {r + 1}/{rounds}")
    bar.close()
    _summary(out, rounds, clients, sample_size, seed, per_round, current, state, sampling_s)
    total = rounds * clients
    print(f"dask: {workers} worker processes; per stage: encode {_rate(total, encode_s)}, "
          f"ship + ingest + finalize + sample + merge on the cluster {_rate(total, sampling_s)}",
          file=out)
    return {"state": state, "current": current, "measurements": per_round,
            "sampling_seconds": sampling_s}


def _rate(n, seconds):
    return f"{n / seconds if seconds > 0 else float('inf'):,.0f} clients/s"


def _summary(out, rounds, clients, sample_size, seed, per_round, current, state, sampling_s):
    total_clients = rounds * clients
    print(f"fastrec demo: {rounds} rounds x {clients:,} clients, sample size {sample_size}, "
          f"seed {seed}", file=out)
    print("records: fastrec.MetricsRecord", file=out)
    print("\nnon-finite finalized metrics per round (clients):", file=out)
    print("  round  " + "  ".join(f"{n:>12}" for n in FINALIZERS), file=out)
    for r, counts in enumerate(per_round):
        print(f"  {r + 1:>5}  " + "  ".join(f"{counts[n]:>12,}" for n in FINALIZERS), file=out)
    for title, samples in (("last round's sample", current), ("all rounds' sample", state["samples"])):
        size = len(next(iter(samples.values()), []))
        print(f"\n{title}: {size} clients", file=out)
        for name, values in samples.items():
            print(f"  {name:>12}: {_describe(values)}", file=out)
    if len(state["indices"]):
        # state["rounds"] is 0-based; the table above numbers rounds from 1.
        picks = ", ".join(f"r{r + 1}/c{i}" for r, i in
                          zip(state["rounds"][:5].tolist(), state["indices"][:5].tolist()))
        print(f"  first sampled clients, in arrival order (round/client): {picks}", file=out)
    rate = total_clients / sampling_s if sampling_s > 0 else float("inf")
    print(f"\nthroughput: {total_clients:,} clients finalized and sampled in {sampling_s:.3f} s "
          f"({rate:,.0f} clients/s, excluding the simulation of their records)", file=out)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastrec demo", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=_non_negative, default=10, help="rounds (default 10)")
    p.add_argument("--clients", type=_non_negative, default=10_000,
                   help="clients per round (default 10,000)")
    p.add_argument("--sample-size", type=_positive, default=100,
                   help="clients kept per sample (default 100)")
    p.add_argument("--seed", type=_non_negative, default=None,
                   help="seed for the simulation and the sampler (default: fresh entropy)")
    p.add_argument("--chunk", type=_positive, default=5_000,
                   help="clients per worker chunk within a round (default 5,000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dask-workers", type=_non_negative, default=0, metavar="N",
                   help="run the rounds on a local Dask cluster of N worker processes "
                        "(needs fastrec[dask]; default 0: in this process)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastrec demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    run(args.rounds, args.clients, args.sample_size, args.seed, args.chunk,
        progress=not args.quiet, dask_workers=args.dask_workers)
    return 0
