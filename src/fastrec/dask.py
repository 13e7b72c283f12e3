"""Finalize-then-sample rounds on Dask: any number of workers, exactly the one-machine result.

A client's key depends only on (seed, round, client index), and reservoirs merge exactly, so a
round can be cut into partitions anywhere. Each function here builds one Dask graph:

1. the partitions' lengths, then their offsets (the global index of each partition's first
   client), in the same graph, so every partition is computed once;
2. per partition, on a worker: ``process.next(process.round_start(state), part,
   client_offset=offset)`` — an empty reservoir at the current round, so no current-round entry
   is lost to an older one and the round's own sample can be rebuilt;
3. a tree reduction (:meth:`dask.bag.Bag.reduction`, ``split_every`` partitions per node) of
   :meth:`~fastrec.AggregationProcess.merge` into the round's reservoir — the current-round
   sample — while the measurements add up leaf by leaf;
4. on the caller, ``process.merge(state, round_reservoir)``: the new state and total sample.

The result is the ``MeasuredProcessOutput`` of ``process.next(state, all_clients)``, bit for bit,
for any partitioning. The scheduler is Dask's own choice: the active ``distributed.Client`` if
there is one, else the collection's default; fastrec never creates or closes a client. The
process (finalizers included, by cloudpickle), states and records travel to the workers, so
they must pickle.

What travels per partition: the process and the start state (a seed, a round number, empty
arrays) out; a reservoir of at most ``sample_size`` rows and the measurements back. The merge
tree's cost is O(k log k) per merge whatever the number of clients.

Errors are those of one machine: a per-client error reaches the caller with the same type and
message, naming the global client index; when several partitions fail, the lowest one wins,
whichever failed first. Partitions whose finalized structures disagree (only visible when they
meet) raise a ``ValueError`` naming the metric and both clients. Exceptions must pickle to cross
processes; one that does not is reported by Dask as it is raised.

Example (Dask's default scheduler for bags, or the active ``Client``)::

    >>> import dask.bag as db
    >>> import fastrec, fastrec.dask
    >>> p = fastrec.FinalizeThenSampleFactory(3, seed=0).create(
    ...     {"x": float}, {"x": fastrec.TensorSpec("int64")})
    >>> clients = [{"x": i} for i in range(10)]
    >>> out = fastrec.dask.next(p, p.initialize(), db.from_sequence(clients, npartitions=4),
    ...                         scheduler="sync")
    >>> one = p.next(p.initialize(), clients)
    >>> out.state["indices"].tolist() == one.state["indices"].tolist(), out.measurements
    (True, {'x': 0})
"""

from __future__ import annotations

import functools
import importlib
import pickle
from collections.abc import Mapping
from typing import Any

import cloudpickle  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no stubs
import dask
import dask.array as da
import dask.bag as db
import dask.local
import dask.threaded
import numpy as np
from dask.base import get_scheduler

from .sampling import AggregationProcess, MeasuredProcessOutput, _clients_of_columns

__all__ = ["next", "next_columnar", "next_from_wire"]

_builtin_next = next


# -- the graph ---------------------------------------------------------------------------------

def next(process: AggregationProcess, state: dict, clients: db.Bag, *,
         split_every: int | None = None, scheduler: Any = None) -> MeasuredProcessOutput:
    """One round over a :class:`dask.bag.Bag` of client mappings, as ``process.next`` on all.

    ``clients``: dicts, fastrec or Flower ``MetricsRecord`` s, in any partitioning (empty
    partitions included). ``split_every``: partitions merged per node of the reduction tree
    (Dask's default, 8). ``scheduler``: passed to ``compute``; by default Dask's own choice.

    >>> import dask.bag as db
    >>> from fastrec import FinalizeThenSampleFactory, TensorSpec
    >>> p = FinalizeThenSampleFactory(2, seed=1).create({"x": float}, {"x": TensorSpec("int64")})
    >>> bag = db.from_sequence([{"x": i} for i in range(7)], npartitions=3)
    >>> next(p, p.initialize(), bag, scheduler="sync").measurements
    {'x': 0}
    """
    _check_args(process, split_every)
    if not isinstance(clients, db.Bag):
        raise TypeError(f"clients must be a dask.bag.Bag of client mappings, got "
                        f"{type(clients).__name__} (for a list, use process.next)")
    return _bag_round(process, state, clients, _run_clients, (), split_every, scheduler)


def next_columnar(process: AggregationProcess, state: dict, batch: Mapping, *,
                  split_every: int | None = None, scheduler: Any = None) -> MeasuredProcessOutput:
    """One columnar round over :class:`dask.array.Array` columns, as ``process.next_columnar``.

    ``batch`` maps metric names to columns chunked along the client axis (nested lists, tuples
    or mappings of columns for structured specs, as ``process.next_columnar`` takes them; NumPy
    columns are wrapped). Chunk offsets come from the chunk sizes of the first column, which
    the others are rechunked to; unknown (NaN) chunk sizes are computed first. Column-level
    errors name the metric.

    Vectorized finalizers run once per chunk, on that chunk's rows: they must work row by row
    (element-wise along the client axis) for the result to be independent of the chunking — a
    finalizer that normalizes by its column's mean, say, gives a chunk-dependent answer.

    >>> import dask.array as da
    >>> from fastrec import FinalizeThenSampleFactory, TensorSpec, vectorized
    >>> p = FinalizeThenSampleFactory(2, seed=1).create(
    ...     {"x": vectorized(lambda c: c * 2.0)}, {"x": TensorSpec("float64")})
    >>> col = da.from_array(np.array([1.0, np.inf, 3.0, 4.0, np.nan]), chunks=2)
    >>> next_columnar(p, p.initialize(), {"x": col}, scheduler="sync").measurements
    {'x': 2}
    """
    _check_args(process, split_every)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of metric name to column, got "
                        f"{type(batch).__name__}")
    start = process.round_start(state)
    template, paths, leaves = _flatten(batch)
    leaves = [_dask_column(leaf, path) for leaf, path in zip(leaves, paths)]
    # The core checks names, nesting, dtypes and trailing shapes on zero rows, with its own
    # messages, before any chunk is computed.
    process.next_columnar(start, _unflatten(template, [_no_rows(c) for c in leaves]))
    if not leaves:  # no metrics: the core has accepted an empty batch
        return process.next_columnar(state, batch)
    _clients_of_columns([(path, leaf.shape[0]) for path, leaf in zip(paths, leaves)])
    chunks = leaves[0].chunks[0]
    blocks = [_blocks(leaf, chunks) for leaf in leaves]
    proc, start_d = _shared(process), _shared(start)
    runs, offset = [], 0
    for c, size in enumerate(chunks):
        if size:
            runs.append(dask.delayed(_run_columns)(proc, start_d, template,
                                                   [b[c] for b in blocks], offset))
        offset += size
    if not runs:
        return process.next_columnar(state, _unflatten(template, [_no_rows(c) for c in leaves]))
    return _finish(process, state, runs, split_every, scheduler, leaves[0])


def next_from_wire(process: AggregationProcess, state: dict, buffers: db.Bag, record: str | None,
                   spec: Mapping, *, wire: str = "recordset", split_every: int | None = None,
                   scheduler: Any = None) -> MeasuredProcessOutput:
    """One round over a :class:`dask.bag.Bag` of serialized client replies (Flower wire bytes).

    Each partition's buffers become columns with ``fastrec.wire.metrics_columns(part, record,
    spec, wire=wire)`` on its worker, then go through ``process.next_columnar`` as in
    :func:`next_columnar`: the result is ``process.next_columnar(state,
    metrics_columns(all_buffers, record, spec, wire=wire))``. Vectorized finalizers must work
    row by row (see :func:`next_columnar`). Every ``wire`` of ``metrics_columns`` works (for
    ``"metric-record-object"``, Flower 1.42 ``MetricRecord`` contents, ``record`` is ``None``);
    an error names the bad buffer by its index in the whole bag. Example::

        replies = db.from_sequence(list_of_reply_bytes, npartitions=64)
        out = fastrec.dask.next_from_wire(process, state, replies, "eval", spec)
    """
    _check_args(process, split_every)
    if not isinstance(buffers, db.Bag):
        raise TypeError(f"buffers must be a dask.bag.Bag of serialized replies, got "
                        f"{type(buffers).__name__}")
    # Fails here, on the caller, if this build has no batch ingestion.
    metrics_columns = getattr(importlib.import_module("fastrec.wire"), "metrics_columns", None)
    if metrics_columns is None:
        raise ImportError("fastrec.wire.metrics_columns is not available in this build")
    ingest = functools.partial(metrics_columns, record=record, spec=spec, wire=wire)
    return _bag_round(process, state, buffers, _run_wire, (ingest,), split_every, scheduler)


def _bag_round(process, state, bag, task, args, split_every, scheduler):
    """Partition lengths -> offsets -> ``task`` per partition -> reduction, in one graph."""
    start = process.round_start(state)
    parts = [dask.delayed(_as_list)(p) for p in bag.to_delayed()]
    offsets = dask.delayed(_offsets)([dask.delayed(len)(p) for p in parts])
    proc, start_d = _shared(process), _shared(start)
    runs = [dask.delayed(task)(proc, start_d, p, offsets, i, *args) for i, p in enumerate(parts)]
    return _finish(process, state, runs, split_every, scheduler, bag)


def _finish(process, state, runs, split_every, scheduler, collection):
    """Reduce the partition results on the cluster, then merge the round into ``state`` here."""
    tree = db.from_delayed(runs).reduction(_only, functools.partial(_combine, process),
                                           split_every=split_every)
    if scheduler is None:  # Dask's choice for the caller's collection (or the active Client)
        scheduler = get_scheduler(collections=[collection])
    _check_shippable(process, scheduler)
    (summary,) = dask.compute(tree, scheduler=scheduler)
    if summary.failure is not None:
        raise summary.failure
    if summary.state is None:  # every partition was empty: the core's empty round
        return process.next(state, [])
    new_state = process.merge(state, summary.state)
    # The core's own result format for a state's samples: the total of an empty round.
    current = process.next(summary.state, []).result[1]
    total = process.next(new_state, []).result[1]
    return MeasuredProcessOutput(new_state, (current, total), summary.measurements)


# -- tasks (run on the workers) ------------------------------------------------------------------

class _Run:
    """A run of consecutive partitions, reduced.

    ``state``: the reservoir of the run's clients (None: no clients); ``measurements``: their
    sum; ``first``: global index of the run's first client, ``skeleton``: the structure of its
    partition's measurements (the reference the next partitions must match); ``failure``: the
    exception of the run's first failing partition or disagreement. A failure ends the run: no
    later partition can beat it.
    """

    __slots__ = ("state", "measurements", "first", "skeleton", "failure")

    def __init__(self, state=None, measurements=None, first=None, failure=None, skeleton=None):
        self.state, self.measurements, self.first, self.failure = (state, measurements, first,
                                                                   failure)
        self.skeleton = skeleton if measurements is None else _skeleton(measurements)

    def __getstate__(self):
        return (self.state, self.measurements, self.first, self.skeleton, self.failure)

    def __setstate__(self, s):
        self.state, self.measurements, self.first, self.skeleton, self.failure = s


def _run_clients(process, start, part, offsets, i):
    return _attempt(lambda: process.next(start, part, client_offset=offsets[i]), len(part),
                    offsets[i])


def _run_columns(process, start, template, blocks, offset):
    batch = _unflatten(template, blocks)
    return _attempt(lambda: process.next_columnar(start, batch, client_offset=offset), 1, offset)


def _run_wire(process, start, part, offsets, i, ingest):
    offset = offsets[i]

    def run():
        # errors name a bad buffer by its global index, as one machine's metrics_columns does
        columns = ingest(part, buffer_offset=offset)
        return process.next_columnar(start, columns, client_offset=offset)
    return _attempt(run, len(part), offset)


def _attempt(run, n, offset):
    """``[_Run]`` of one partition (a one-element list: a bag partition)."""
    if not n:
        return [_Run()]
    try:
        out = run()
    except Exception as e:
        try:
            pickle.dumps(e)
        except Exception:
            raise e from None  # cannot travel as a value: let Dask report it
        return [_Run(failure=e)]
    return [_Run(out.state, out.measurements, offset)]


def _only(partition):
    return partition[0]


def _combine(process, runs):
    """Fold consecutive runs left to right: the first failure or disagreement wins."""
    runs = iter(runs)
    acc = _builtin_next(runs)
    for run in runs:
        acc = _pair(process, acc, run)
    return acc


def _pair(process, a, b):
    """``a`` and the run ``b`` that follows it, as one run."""
    if a.failure is not None or (b.first is None and b.failure is None):
        return a
    if a.first is None:
        return b
    failure = None
    if b.first is not None and b.skeleton != a.skeleton:
        failure = _disagreement(a, b, None)
    elif b.failure is not None:
        failure = b.failure
    else:
        try:
            state = process.merge(a.state, b.state)
        except (TypeError, ValueError) as e:
            failure = _disagreement(a, b, e)
        else:
            return _Run(state, _add(a.measurements, b.measurements), a.first)
    return _Run(first=a.first, failure=failure, skeleton=a.skeleton)


def _disagreement(a, b, error):
    """ValueError naming the metric whose finalized structure differs, and both clients."""
    i, j, sa, sb = a.first, b.first, a.skeleton, b.skeleton
    if not isinstance(sa, dict) or not isinstance(sb, dict) or set(sa) != set(sb):
        names_a = list(sa) if isinstance(sa, dict) else sa
        names_b = list(sb) if isinstance(sb, dict) else sb
        return ValueError(f"the metric finalizer returned metrics {names_b} for client {j}, "
                          f"but {names_a} for client {i}")
    for name in sa:
        if sa[name] != sb[name]:
            break
        if error is not None and (_leaf_kinds(a.state["samples"].get(name))
                                  != _leaf_kinds(b.state["samples"].get(name))):
            break
    else:
        return ValueError(f"the samples of clients {i} and {j} do not merge: {error}")
    return ValueError(f"metric {name!r}: the finalized value of client {j} does not have the "
                      f"structure of client {i}'s")


# -- small helpers ---------------------------------------------------------------------------

def _check_args(process, split_every):
    if not isinstance(process, AggregationProcess):
        raise TypeError(f"process must be a fastrec AggregationProcess, got "
                        f"{type(process).__name__}")
    if split_every is not None and (isinstance(split_every, bool) or not isinstance(
            split_every, int) or split_every < 2):  # 1 would never shrink the tree
        raise ValueError(f"split_every must be an int >= 2 (or None: Dask's default), got "
                         f"{split_every!r}")


def _check_shippable(process, scheduler):
    """A clear TypeError, before any work, if worker processes cannot receive ``process``."""
    if scheduler in _IN_PROCESS or scheduler in (dask.threaded.get, dask.local.get_sync):
        return
    try:
        cloudpickle.dumps(process)
    except Exception as e:
        raise TypeError(f"the process must pickle (cloudpickle) to reach worker processes: "
                        f"{type(e).__name__}: {e}") from None


_IN_PROCESS = ("sync", "synchronous", "single-threaded", "threads", "threading")


def _shared(obj):
    """One graph key holding ``obj``: sent to each worker once, not embedded in every task."""
    return dask.delayed(obj, pure=False, traverse=False)


def _as_list(part):
    return part if type(part) is list else list(part)


def _offsets(lengths):
    out, a = [], 0
    for n in lengths:
        out.append(a)
        a += n
    return out


def _skeleton(x):
    """The structure of a nested value, leaves erased."""
    if isinstance(x, Mapping):  # names in any order, as the core compares them
        return {k: _skeleton(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_skeleton(v) for v in x))
    return None


def _leaf_kinds(x):
    """Structure with each array leaf's dtype and trailing shape (diagnostics only)."""
    if isinstance(x, Mapping):
        return ("map", tuple((k, _leaf_kinds(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_leaf_kinds(v) for v in x))
    if isinstance(x, np.ndarray):
        return (x.dtype.str, x.shape[1:])
    return type(x).__name__


def _add(a, b):
    """Leaf-by-leaf sum of two measurements of the same structure."""
    if isinstance(a, Mapping):
        return {k: _add(v, b[k]) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a + b


# -- columns ---------------------------------------------------------------------------------

def _flatten(batch):
    """(template, paths, leaves): the nesting with leaf numbers, and the leaves in order."""
    paths, leaves = [], []

    def walk(x, path):
        if isinstance(x, Mapping):
            return {k: walk(v, f"{path}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{path}[{i}]") for i, v in enumerate(x))
        paths.append(path)
        leaves.append(x)
        return _Leaf(len(leaves) - 1)

    template = {name: walk(value, str(name)) for name, value in batch.items()}
    return template, paths, leaves


class _Leaf(int):
    """A leaf's number inside a template (an int subclass: not mistaken for a structure)."""


def _unflatten(template, leaves):
    if isinstance(template, _Leaf):
        return leaves[template]
    if isinstance(template, Mapping):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    return type(template)(_unflatten(v, leaves) for v in template)


def _dask_column(leaf, path):
    col = leaf if isinstance(leaf, da.Array) else da.asarray(leaf)
    if col.ndim == 0:
        raise ValueError(f"metric {path!r}: expected a column with a leading client axis, got a "
                         f"0-d array")
    if any(np.isnan(n) for c in col.chunks for n in c):
        col = col.compute_chunk_sizes()
    return col


def _no_rows(col):
    return np.empty((0,) + col.shape[1:], col.dtype)


def _blocks(col, chunks):
    """The column's blocks along the client axis, one per chunk of ``chunks``."""
    target = (chunks,) + tuple((n,) for n in col.shape[1:])
    if col.chunks != target:
        col = col.rechunk(target)
    return col.to_delayed().reshape(-1).tolist()
