"""Finalize-then-sample metrics aggregation: TFF's ``FinalizeThenSampleFactory`` without TensorFlow.

Each round, every client's unfinalized metrics are cast to their spec's dtypes and finalized;
the process counts, per finalized leaf, the clients whose value holds a NaN/±Inf, and keeps
the finalized metrics of at most ``sample_size`` clients chosen uniformly at random, both for
the round and over all rounds so far.

Results follow TFF 0.87: a sample has the structure of the *finalized* metrics, and each leaf
is one numpy array of shape ``(n,) + leaf_shape`` in the finalized dtype (``n`` = sampled
clients; a client sits at the same row of every leaf), in arrival order (round, then client
index). Values reach finalizers in the declared dtype (a shape-() leaf as a numpy scalar, an
array leaf as an ndarray), as TFF casts them. At :meth:`FinalizeThenSampleFactory.create`
every finalizer is called **once** on an example of ones in the declared dtypes and shapes
(``None`` dimensions of size 1; a vectorized finalizer on a batch of one client) to learn the
finalized structure, dtypes and shapes, as TFF learns them by tracing: so an empty round, even
the first, returns the full structure, and a client whose finalized value differs in structure
or shape is a ``ValueError`` naming the metric and the client.

Sampling is reservoir sampling by random keys: client ``i`` of round ``r`` gets the 64-bit key
``F(seed, r, i)`` of a counter-based generator (wyrand, csrc/keys.h), and a sample is the
``sample_size`` clients with the largest keys. Since keys depend only on (seed, round, index),
workers that each process a slice of a round from :meth:`AggregationProcess.round_start`
draw the keys one machine would, and :meth:`AggregationProcess.merge` of their states is
exactly the one-machine state.

State (a plain, picklable ``dict``, validated field by field whenever it comes back; its
arrays are checked and used as private copies, so Python code that runs during the round, a
finalizer say, cannot change what was checked):

- ``"seed"``: ``(s0, s1)``, the generator's two 64-bit key words (Python ints). With a factory
  ``seed`` they derive from it; without one, every :meth:`~AggregationProcess.initialize`
  draws fresh OS entropy, so repeated trials differ while the state still determines all
  that follows;
- ``"round"``: number of non-empty rounds processed (the next round's number), at most
  2**63 - 1 (a state at that round takes no further non-empty round);
- ``"keys"``: ``uint64`` array of the sampled clients' keys, taken as given when a state comes
  back (not recomputed from seed, round and index): :meth:`~AggregationProcess.merge` keeps
  TFF's semantics for any keys, so hand-edited keys change which entries win;
- ``"rounds"``, ``"indices"``: ``int64`` arrays, the round and client index of each, in
  arrival order;
- ``"samples"``: ``{metric name: finalized structure of (m,) + shape arrays}``.

Differences from TFF 0.87, all deliberate: seeded runs are reproducible; keys are 64-bit and
depend only on (seed, round, index), so they merge exactly across workers (TFF's int32 key
chain repeats after ~65-86k draws); complex NaN/Inf are counted; values TFF refuses with a
TypeError for their type alone (a Python int or an int array under a float spec, a float64
value under float32, an int64 under int32) are cast, integers only within range; a value out of
an integer dtype's range or of the spec's shape is a ValueError (TFF: TypeError); a client kept
in both merged states (same round, index and key) is kept once; order is arrival order always
(TFF keeps it only while the reservoir is not full).

Finalizers run on numpy values, so their arithmetic is numpy's, not TensorFlow's: under NumPy 1
a numpy scalar combined with a Python float may widen (TF keeps the tensor's dtype), and
subnormal numbers are kept where TF's CPU kernels flush them to zero. tests/test_sampling.py
compares all of the above with a live TFF 0.87 (``bash .ci/tff``).

Example:

>>> import fastrec
>>> spec = {"loss": fastrec.TensorSpec("float32", (2,))}
>>> process = fastrec.FinalizeThenSampleFactory(sample_size=2, seed=0).create(
...     {"loss": lambda v: v[0] / v[1]}, spec)
>>> state = process.initialize()
>>> out = process.next(state, [{"loss": [3.0, 2.0]}, {"loss": [float("inf"), 1.0]}])
>>> out.result[0]["loss"], out.measurements
(array([1.5, inf], dtype=float32), {'loss': 1})
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _sampling
from ._sampling import Layout, count_non_finite_rows, map_leaves
from .spec import TensorSpec, compile_metrics_type, spec_of

__all__ = ["AggregationProcess", "FinalizeThenSampleFactory", "MeasuredProcessOutput",
           "TensorSpec", "Vectorized", "count_non_finite", "spec_of", "vectorized"]


def count_non_finite(a: np.ndarray) -> int:
    """Number of NaN/±Inf elements of the ndarray ``a``, by IEEE bit tests in C.

    Any memory layout (strided, negative strides, non-native byte order). Integer and bool
    arrays have none. A complex element counts once if either part is non-finite.
    float16/32/64 and complex64/128 use the C kernel; long double falls back to NumPy.
    Non-numeric dtypes raise ``TypeError``.

    >>> import numpy as np
    >>> count_non_finite(np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32))
    3
    """
    return _sampling.count_non_finite(a)


def _leading_one(col):
    shape = np.shape(col)
    if len(shape) == 0 or shape[0] != 1:
        raise ValueError(f"a vectorized finalizer must return columns with a leading axis of 1 "
                         f"clients, got shape {tuple(shape)}")
    return np.asarray(col)[0]


class Vectorized:
    """A finalizer that works on whole columns; build it with :func:`vectorized`.

    >>> vectorized(np.sqrt).fn is np.sqrt
    True
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"vectorized expects a callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, value):
        # One client: a batch of one, so the same function serves per-client processing.
        stacked = map_leaves(lambda x: np.asarray(x)[np.newaxis], value)
        return map_leaves(_leading_one, self.fn(stacked))

    def __repr__(self):
        return f"vectorized({self.fn!r})"


def vectorized(fn: Callable) -> Vectorized:
    """Mark a finalizer as vectorized: it maps a column batch to a column batch.

    In :meth:`AggregationProcess.next_columnar`, a vectorized finalizer is called once with
    the metric's column (leading axis: clients; for a list or mapping spec, a list or mapping
    of columns) and must return an array (or list/tuple/mapping of arrays) with the same
    leading axis. A vectorized functional finalizer gets and returns a mapping of columns.
    Called on one client's value, a vectorized finalizer runs on a batch of one.

    >>> fin = vectorized(lambda v: v[0] / v[1])
    >>> fin([np.array([1.0, 3.0]), np.array([2.0, 4.0])]).tolist()
    [0.5, 0.75]
    >>> float(fin([1.0, 2.0]))
    0.5
    """
    return fn if isinstance(fn, Vectorized) else Vectorized(fn)


class MeasuredProcessOutput(NamedTuple):
    """``state``, ``result`` and ``measurements`` of one ``next`` call (as in TFF).

    >>> p = FinalizeThenSampleFactory(1, seed=0).create({"x": float}, {"x": TensorSpec("int64")})
    >>> state, (current, total), measurements = p.next(p.initialize(), [{"x": 3}])
    >>> current, measurements
    ({'x': array([3.])}, {'x': 0})
    """

    state: dict
    result: tuple
    measurements: dict


_INT64_MAX = (1 << 63) - 1

# Columnar rounds at least this large draw their keys on a helper thread while the
# finalizers and non-finite counts run (_sampling.RoundDraw: a C thread that needs no GIL,
# taking chunks of the round that the calling thread finishes once its own work is done,
# never waiting for the helper). At this size the keys outweigh the ~15 µs a thread costs
# to start; with one core there is nothing to overlap.
_OVERLAP_MIN_CLIENTS = 200_000
_KEY_CHUNK = 1 << 14    # ~10 µs of keys: the two threads finish within that of each other
_CORES = os.cpu_count() or 1   # read once: it costs tens of µs per call on some systems


_check_int = _sampling.check_int


class FinalizeThenSampleFactory:
    """Factory of finalize-then-sample aggregation processes (TFF's namesake, no TensorFlow).

    ``sample_size`` clients at most are kept per round and over all rounds. ``seed`` (an int
    >= 0) makes every result reproducible; without it every ``initialize()`` draws fresh OS
    entropy (stored in the state, so the state still determines all that follows).

    >>> factory = FinalizeThenSampleFactory(sample_size=10, seed=1)
    >>> process = factory.create({"acc": lambda v: v}, {"acc": TensorSpec("float32")})
    """

    def __init__(self, sample_size: int = 100, seed: int | None = None):
        self._sample_size = _check_int(sample_size, "sample_size", 1, _INT64_MAX)
        self._seed = None if seed is None else _check_int(seed, "seed", 0)

    @property
    def sample_size(self) -> int:
        """Clients kept at most, per round and over all rounds.

        >>> FinalizeThenSampleFactory(7).sample_size
        7
        """
        return self._sample_size

    def create(self, metric_finalizers, local_unfinalized_metrics_type) -> "AggregationProcess":
        """Build the process.

        ``metric_finalizers``: a mapping of metric name to callable (applied to that metric's
        unfinalized value), or one callable taking the whole unfinalized mapping and returning a
        mapping of finalized values. ``local_unfinalized_metrics_type``: a mapping of metric
        name to :class:`TensorSpec` or (nested) list, tuple or mapping of TensorSpec.

        Each finalizer is called once here, on an example of ones in the declared dtypes and
        shapes (``None`` dimensions of size 1), to learn the finalized structure; a finalizer
        that cannot run on it is a ``TypeError`` naming the metric (its error chained).
        """
        specs = compile_metrics_type(local_unfinalized_metrics_type)
        if isinstance(metric_finalizers, Mapping):
            for key, fn in metric_finalizers.items():
                if not isinstance(key, str):
                    raise TypeError(f"`metric_finalizers` keys must be str, got {key!r}")
                if not callable(fn):
                    raise TypeError(f"`metric_finalizers`[{key!r}] must be callable, got "
                                    f"{type(fn).__name__}")
            if set(metric_finalizers) != set(specs):
                only_f = set(metric_finalizers) - set(specs)
                only_t = set(specs) - set(metric_finalizers)
                raise ValueError(
                    "The metric names in `metric_finalizers` do not match those in the "
                    "`local_unfinalized_metrics_type`. Only in `metric_finalizers`: "
                    f"{sorted(only_f)}; only in `local_unfinalized_metrics_type`: "
                    f"{sorted(only_t)}.")
            finalizers = dict(metric_finalizers)
        elif callable(metric_finalizers):
            finalizers = metric_finalizers
        else:
            raise TypeError("`metric_finalizers` must be a mapping of metric name to callable or "
                            f"a callable, got {type(metric_finalizers).__name__}")
        seed = None if self._seed is None else _seed_words(np.random.SeedSequence(self._seed))
        process = AggregationProcess(self._sample_size, seed, specs, finalizers)
        # What pickling rebuilds the process from: a snapshot, so that later edits of the
        # caller's spec do not change what a worker unpickles.
        process._metrics_type = copy.deepcopy(local_unfinalized_metrics_type)
        return process


def _rebuild_process(sample_size, seed_words, metrics_type, finalizers):
    factory = FinalizeThenSampleFactory(sample_size)
    process = factory.create(finalizers, metrics_type)
    if seed_words is not None:
        process._seed = _seed_pair(seed_words)
    return process


def _seed_pair(words) -> tuple:
    if (not isinstance(words, tuple) or len(words) != 2
            or not all(type(w) is int and 0 <= w < 2**64 for w in words)):
        raise TypeError(f"a pickled process's seed must be two 64-bit words, got {words!r}")
    return words


def _check_span(st, offset: int, n: int) -> None:
    """ValueError unless clients offset .. offset+n-1 all have int64 indices and a round
    can follow state ``st`` (its round counter is an int64)."""
    if offset > _INT64_MAX - n:
        raise ValueError(f"client_offset {offset} + {n} clients exceeds the largest client "
                         f"index, 2**63 - 1")
    if st.round == _INT64_MAX:
        raise ValueError("state['round'] is 2**63 - 1, the last round: no round can follow it")


def _seed_words(seq) -> tuple:
    words = seq.generate_state(2, np.uint64)
    return (int(words[0]), int(words[1]))




def _probe_error(e, name):
    where = "the metric finalizer" if name is None else f"the finalizer of metric {name!r}"
    return TypeError(f"{where} cannot run on an example of ones in its "
                     f"`local_unfinalized_metrics_type` ({type(e).__name__}: {e}); it is called "
                     f"once at create() to learn the finalized structure")


def _layout(value, name):
    try:
        return Layout.of(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r}: at create(), on an example of ones: {e}") from None


class _State(NamedTuple):
    """A validated state: plain types, arrays, samples as leaf lists per metric."""
    seed: tuple
    round: int
    keys: np.ndarray
    rounds: np.ndarray
    indices: np.ndarray
    leaves: dict


class AggregationProcess:
    """A finalize-then-sample process: ``initialize()``, ``next(...)``, ``merge(...)``.

    Built by :meth:`FinalizeThenSampleFactory.create`; see the module docstring for the state.
    A process keeps no round's state (that is the ``state`` argument), so several threads
    may run one process at once, as ``fastrec.dask.next(..., scheduler="threads")`` does.

    >>> p = FinalizeThenSampleFactory(3, seed=0).create({"x": lambda v: v},
    ...                                                 {"x": TensorSpec("float64")})
    >>> out = p.next(p.initialize(), [{"x": float(i)} for i in range(10)])
    >>> current, total = out.result
    >>> current["x"], out.measurements
    (array([4., 5., 7.]), {'x': 0})
    """

    def __init__(self, sample_size, seed_words, specs, finalizers):
        self._metrics_type = None
        self._k = sample_size
        self._seed = seed_words
        self._specs = specs
        self._spec_names = tuple(specs)
        if isinstance(finalizers, Mapping):
            self._names = tuple(finalizers)
            self._fins = tuple(finalizers[n] for n in self._names)
            self._functional = None
            self._vectorized = all(isinstance(f, Vectorized) for f in self._fins)
        else:
            self._names = self._spec_names
            self._fins = None
            self._functional = finalizers
            self._vectorized = isinstance(finalizers, Vectorized)
        self._ordered_specs = tuple(specs[n] for n in self._names)
        self._out_names, self._layouts = self._probe()

    def __reduce__(self):
        """Pickle as what :meth:`FinalizeThenSampleFactory.create` was given.

        Worker processes (e.g. ``fastrec.dask``) receive the process this way; the finalizers
        must pickle too (lambdas do with ``cloudpickle``, which Dask uses). Unpickling runs
        ``create``'s checks and its one probe call of each finalizer again.
        """
        if self._metrics_type is None:
            raise TypeError("only an AggregationProcess built by FinalizeThenSampleFactory.create "
                            "can be pickled")
        fins = self._functional if self._functional is not None else dict(zip(self._names,
                                                                               self._fins))
        return (_rebuild_process, (self._k, self._seed, self._metrics_type, fins))

    def _probe(self):
        """Finalize an example of ones once: the finalized names, structures and dtypes."""
        examples = {name: self._specs[name].example() for name in self._names}
        with np.errstate(all="ignore"):
            if self._functional is not None:
                try:
                    out = self._functional(examples)
                except Exception as e:
                    raise _probe_error(e, None) from e
                if not isinstance(out, Mapping):
                    raise TypeError("the metric finalizer must return a mapping of metric name "
                                    f"to finalized value, got {type(out).__name__}")
                names = tuple(out)
                return names, tuple(_layout(out[n], n) for n in names)
            layouts = []
            for name, fin in zip(self._names, self._fins):
                try:
                    value = fin(examples[name])
                except Exception as e:
                    raise _probe_error(e, name) from e
                layouts.append(_layout(value, name))
            return self._names, tuple(layouts)

    @property
    def sample_size(self) -> int:
        """Clients kept at most, per round and over all rounds.

        >>> FinalizeThenSampleFactory(7).create({"x": float}, {"x": TensorSpec("int64")}).sample_size
        7
        """
        return self._k

    def initialize(self) -> dict:
        """The empty reservoir at round 0 (fresh OS entropy as the seed, if unseeded).

        >>> p = FinalizeThenSampleFactory(3).create({"x": float}, {"x": TensorSpec("int64")})
        >>> s = p.initialize()
        >>> s["round"], s["samples"], s["seed"] != p.initialize()["seed"]
        (0, {'x': array([], dtype=float64)}, True)
        """
        seed = self._seed if self._seed is not None else _seed_words(np.random.SeedSequence())
        return {"seed": seed, "round": 0, "keys": np.empty(0, np.uint64),
                "rounds": np.empty(0, np.int64), "indices": np.empty(0, np.int64),
                "samples": {n: lay.empty(0) for n, lay in zip(self._out_names, self._layouts)}}

    def round_start(self, state: dict) -> dict:
        """The start state of a worker that processes a partition of ``state``'s next round.

        Same seed and round as ``state``, empty reservoir. Workers each run
        ``next(round_start(state), slice, client_offset=a)`` on their slice of the round's
        clients (``a`` = the slice's first client index); :meth:`merge` of their states is the
        round's own reservoir (its samples are the round's current sample), and
        ``merge(state, round_reservoir)`` is the state after the round, as one machine computes
        it with ``next(state, all_clients)``.

        >>> p = FinalizeThenSampleFactory(2, seed=0).create({"x": float}, {"x": TensorSpec("int64")})
        >>> state = p.next(p.initialize(), [{"x": i} for i in range(5)]).state  # round 0
        >>> clients = [{"x": 10 + i} for i in range(6)]                         # round 1
        >>> start = p.round_start(state)
        >>> parts = [p.next(start, clients[a:a + 3], client_offset=a).state for a in (0, 3)]
        >>> round_reservoir = p.merge(*parts)
        >>> one = p.next(state, clients)
        >>> round_reservoir["samples"]["x"], one.result[0]["x"]
        (array([11., 15.]), array([11., 15.]))
        >>> p.merge(state, round_reservoir)["samples"]["x"], one.state["samples"]["x"]
        (array([ 4., 11.]), array([ 4., 11.]))
        """
        st = self._check_state(state)
        empty = self.initialize()
        empty["seed"], empty["round"] = st.seed, st.round
        return empty

    # -- per-client rounds -------------------------------------------------------------------

    def next(self, state: dict, client_values, *, client_offset: int = 0) -> MeasuredProcessOutput:
        """Process one round of clients' unfinalized metrics.

        ``client_values``: a sequence of mappings (dict, ``MetricsRecord``, ...) of metric name
        to value; a list is read in place, so finalizers must not change it (a client added,
        removed or replaced before it is read is a RuntimeError). A client's values are all
        read before its first finalizer runs; an ndarray already in its spec's dtype and
        shape reaches the finalizer uncopied (a finalizer must not write into it unless the
        caller's array may change). ``client_offset``: the index
        of the first of them in the round, for workers that each process a slice of the round
        (see :meth:`round_start`); errors name a client by that global index, the lowest
        failing one. Returns
        ``MeasuredProcessOutput(state, (current_round_samples, total_rounds_samples),
        measurements)``. An empty round returns ``state`` itself, empty ``(0,) + shape``
        arrays as the current sample and zero measurements.

        >>> p = FinalizeThenSampleFactory(5, seed=0).create({"x": lambda v: v + v},
        ...                                                 {"x": TensorSpec("float32")})
        >>> out = p.next(p.initialize(), [{"x": 0.5}, {"x": float("nan")}])
        >>> out.result[0]["x"], out.measurements
        (array([ 1., nan], dtype=float32), {'x': 1})
        >>> p.next(out.state, []).result[0]["x"]
        array([], dtype=float32)
        """
        st = self._check_state(state)
        offset = _check_int(client_offset, "client_offset", 0, _INT64_MAX)
        if isinstance(client_values, Mapping):
            raise TypeError("client_values must be a sequence of client mappings; for a mapping "
                            "of columns use next_columnar")
        clients = client_values if type(client_values) in (list, tuple) else list(client_values)
        if not clients:
            return self._unchanged(state, st)
        _check_span(st, offset, len(clients))
        keys, indices, positions = self._round_sample(st, offset, len(clients))
        leaves, measurements = _sampling.finalize_clients(
            clients, self._names, self._ordered_specs, self._fins, self._functional,
            self._out_names, self._layouts, positions, offset)
        return self._finish(st, keys, indices, leaves, measurements)

    def _round_sample(self, st, offset, n):
        return _sampling.round_sample(st.seed[0], st.seed[1], st.round, offset, n, self._k,
                                      arrival=True)

    # -- columnar rounds ---------------------------------------------------------------------

    def next_columnar(self, state: dict, batch: Mapping, *,
                      client_offset: int = 0) -> MeasuredProcessOutput:
        """Process one round given as columns: metric name -> array with a leading client axis.

        For a list/tuple (mapping) spec the column is a list/tuple (mapping) of such arrays.
        If every finalizer is :func:`vectorized` (or the functional finalizer is), finalizers
        run once per column and the non-finite counts, keys, top-k and gather run in C over
        the columns; otherwise the rows are finalized one client at a time. Same keys, samples
        and measurements as :meth:`next` on the equivalent rows.

        >>> p = FinalizeThenSampleFactory(2, seed=0).create(
        ...     {"x": vectorized(lambda col: col * 2)}, {"x": TensorSpec("float64")})
        >>> out = p.next_columnar(p.initialize(), {"x": np.array([1.0, np.nan, 3.0, 4.0])})
        >>> out.result[0]["x"], out.measurements
        (array([2., 6.]), {'x': 1})
        """
        st = self._check_state(state)
        offset = _check_int(client_offset, "client_offset", 0, _INT64_MAX)
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping of metric name to column, got "
                            f"{type(batch).__name__}")
        if set(batch) != set(self._spec_names):
            raise ValueError(f"batch has metrics {sorted(batch)}, expected "
                             f"{sorted(self._spec_names)}")
        sizes: list[tuple[str, int]] = []
        cols = {name: _column(self._specs[name], batch[name], name, sizes, 0)
                for name in self._spec_names}
        n = _clients_of_columns(sizes)
        if n == 0:
            return self._unchanged(state, st)
        _check_span(st, offset, n)
        if not self._vectorized:
            rows = [{name: _row(cols[name], i) for name in self._spec_names} for i in range(n)]
            return self.next(state, rows, client_offset=offset)
        # Keys depend only on (seed, round, index), not on the values. In a large round a
        # helper thread draws them while this one runs the finalizers and counts non-finite
        # rows, then this one helps with the rest.
        draw = _sampling.RoundDraw(st.seed[0], st.seed[1], st.round, offset, n, self._k,
                                   _KEY_CHUNK, n >= _OVERLAP_MIN_CLIENTS and _CORES > 1)
        try:
            if self._functional is None:
                finalized = {name: _call_finalizer(fin.fn, cols[name], name)
                             for name, fin in zip(self._names, self._fins)}
            else:
                finalized = _call_finalizer(self._functional.fn, cols, None)
                if not isinstance(finalized, Mapping):
                    raise TypeError("the vectorized metric finalizer must return a mapping of "
                                    f"metric name to column, got {type(finalized).__name__}")
                if len(finalized) != len(self._out_names) or \
                        any(name not in finalized for name in self._out_names):
                    raise ValueError(f"the vectorized metric finalizer returned metrics "
                                     f"{list(finalized)}, but at create() it returned "
                                     f"{list(self._out_names)}")
            leaves_of, measurements = {}, {}
            for name, layout in zip(self._out_names, self._layouts):
                try:
                    leaves = layout.columns(finalized[name], n)
                except (TypeError, ValueError) as e:
                    raise _sampling.with_context(e, f"metric {name!r}") from None
                leaves_of[name] = leaves
                measurements[name] = layout.build([count_non_finite_rows(c) for c in leaves])
            keys, indices, positions = draw.finish(arrival=True)
        finally:
            draw.close()
        kept = {name: [_sampling.gather_rows(c, positions) for c in leaves_of[name]]
                for name in self._out_names}
        return self._finish(st, keys, indices, kept,
                            [measurements[name] for name in self._out_names])

    # -- merging -----------------------------------------------------------------------------

    def merge(self, state_a: dict, state_b: dict) -> dict:
        """The state whose reservoir is that of the union of the two states' clients.

        TFF's merge: the ``sample_size`` largest keys of both are kept, equal keys keeping
        ``state_a``'s entries first; the result is in arrival order (round, client index).
        A client present in both (same round, index and key: e.g. two workers that started
        from one non-empty state) is kept once. Both states must share the seed. For the
        states of workers that each processed a slice of a round (see :meth:`round_start`),
        the result equals the one-machine state.

        >>> p = FinalizeThenSampleFactory(2, seed=0).create({"x": float}, {"x": TensorSpec("int64")})
        >>> start, clients = p.initialize(), [{"x": i} for i in range(6)]
        >>> a = p.next(start, clients[:4]).state                   # worker 1: clients 0-3
        >>> b = p.next(start, clients[4:], client_offset=4).state  # worker 2: clients 4-5
        >>> p.merge(a, b)["samples"]["x"], p.next(start, clients).state["samples"]["x"]
        (array([4., 5.]), array([4., 5.]))
        """
        a = self._check_state(state_a, "state_a")
        b = self._check_state(state_b, "state_b")
        if a.seed != b.seed:
            raise ValueError("cannot merge states with different seeds: their keys are not "
                             "comparable")
        b = _drop_shared_clients(a, b)
        return self._union(a, b.keys, b.rounds, b.indices, b.leaves, max(a.round, b.round))

    # -- state -------------------------------------------------------------------------------

    def _check_state(self, state, what="state") -> _State:
        """Validate every field of an (untrusted) state; return it normalised."""
        return _State(*_sampling.check_state(state, self._k, self._out_names, self._layouts,
                                             what))

    def _unchanged(self, state, st):
        current = {name: lay.empty(0) for name, lay in zip(self._out_names, self._layouts)}
        zero = {name: lay.zeros() for name, lay in zip(self._out_names, self._layouts)}
        total = {name: lay.build(st.leaves[name])
                 for name, lay in zip(self._out_names, self._layouts)}
        return MeasuredProcessOutput(state, (current, total), zero)

    def _finish(self, st, keys, indices, leaves, measurements):
        names = self._out_names
        new_state = self._union(st, keys, st.round, indices, leaves, st.round + 1)
        current = {name: lay.build(leaves[name]) for name, lay in zip(names, self._layouts)}
        return MeasuredProcessOutput(new_state, (current, dict(new_state["samples"])),
                                     dict(zip(names, measurements)))

    def _union(self, st, keys, rounds, indices, leaves, rnd):
        """The state of round ``rnd`` holding the best k of st's entries and the others
        (``rounds``: an array, or one round for all; ``leaves``: their samples' leaves per
        metric), in arrival order; equal keys keep st's entries (then earlier positions)
        first."""
        keys, rounds, indices, samples = _sampling.union_state(
            st.keys, st.rounds, st.indices, st.leaves, keys, rounds, indices, leaves, self._k,
            self._out_names, self._layouts)
        return {"seed": st.seed, "round": rnd, "keys": keys, "rounds": rounds,
                "indices": indices, "samples": samples}


def _drop_shared_clients(a: _State, b: _State) -> _State:
    """``b`` without the clients ``a`` also holds (same round and index); ValueError if such a
    client's keys differ (the states do not describe the same clients)."""
    if not len(a.keys) or not len(b.keys):
        return b
    rounds = np.concatenate([a.rounds, b.rounds])
    indices = np.concatenate([a.indices, b.indices])
    order = np.lexsort((indices, rounds))
    same = (rounds[order][1:] == rounds[order][:-1]) & (indices[order][1:] == indices[order][:-1])
    if not same.any():
        return b
    first, second = order[:-1][same], order[1:][same]
    pos_a, pos_b = np.minimum(first, second), np.maximum(first, second) - len(a.keys)
    if np.any(a.keys[pos_a] != b.keys[pos_b]):
        r, i = int(a.rounds[pos_a[0]]), int(a.indices[pos_a[0]])
        raise ValueError(f"both states hold client {i} of round {r} but with different keys")
    keep = np.ones(len(b.keys), bool)
    keep[pos_b] = False
    return _State(b.seed, b.round, b.keys[keep], b.rounds[keep], b.indices[keep],
                  {name: [leaf[keep] for leaf in ls] for name, ls in b.leaves.items()})


def _column(spec, value, path, sizes, depth):
    """Check one column (or list/mapping of columns) against its spec; record its size."""
    if spec.keys is not None:   # a mapping spec
        if not isinstance(value, Mapping) or set(value) != set(spec.keys):
            raise TypeError(f"metric {path}: expected a mapping of columns with keys "
                            f"{list(spec.keys)}, got {type(value).__name__}")
        return {k: _column(c, value[k], f"{path}[{k!r}]", sizes, depth + 1)
                for k, c in zip(spec.keys, spec.children)}
    if spec.children is not None:  # a list/tuple spec
        n = len(spec.children)
        # The items as stored, as next() reads them: a subclass's __len__ or __iter__ could
        # disagree with them (and with each other).
        items = (list.copy(value) if isinstance(value, list)
                 else tuple.__getitem__(value, slice(None)) if isinstance(value, tuple) else None)
        if items is None or len(items) != n:
            raise TypeError(f"metric {path}: expected a list or tuple of {n} columns, got "
                            f"{type(value).__name__}")
        return [_column(c, v, f"{path}[{i}]", sizes, depth + 1)
                for i, (c, v) in enumerate(zip(spec.children, items))]
    # A column is checked like one client's value with a leading axis of any length.
    try:
        col = _sampling.convert_value(
            _sampling.CompiledSpec.leaf(spec.dtype, (None,) + spec.shape), value)
    except (TypeError, ValueError) as e:
        raise _sampling.with_context(e, f"metric {path!r}") from None
    sizes.append((path, col.shape[0]))
    return col


def _clients_of_columns(sizes: list[tuple[str, int]]) -> int:
    """The number of clients that columns of (path, length) all have (0 for none), else a
    ValueError naming each column's length. A list, not a dict keyed by path: two columns
    may print alike (metric "a"'s first column and a metric named "a[0]")."""
    if len({size for _, size in sizes}) > 1:
        listed = ", ".join(f"{path!r}: {size}" for path, size in sizes)
        raise ValueError(f"columns have different numbers of clients: {{{listed}}}")
    return sizes[0][1] if sizes else 0


def _row(col, i):
    if isinstance(col, dict):
        return {k: _row(c, i) for k, c in col.items()}
    if isinstance(col, list):
        return [_row(c, i) for c in col]
    return col[i]


def _call_finalizer(fn, value, name):
    try:
        return fn(value)
    except Exception as e:
        _sampling.add_note(e, "(in the vectorized finalizer"
                              f"{'' if name is None else f' of {name!r}'})")
        raise
