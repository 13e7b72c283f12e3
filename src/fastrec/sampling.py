"""Finalize-then-sample metrics aggregation: TFF's ``FinalizeThenSampleFactory`` without TensorFlow.

Each round, every client's unfinalized metrics are checked against a spec and finalized; the
process counts, per finalized leaf, the clients whose value holds a NaN/±Inf, and keeps the
finalized metrics of at most ``sample_size`` clients chosen uniformly at random, both for the
round and over all rounds so far.

Sampling is reservoir sampling by random keys: client ``i`` of round ``r`` gets the 64-bit key
``F(seed, r, i)`` of a counter-based generator (wyrand, csrc/keys.h), and a sample is the
``sample_size`` clients with the largest keys (equal keys: earlier round, then lower index).
Since keys depend only on (seed, round, index), a worker that processes clients [a, b) of a
round with ``client_offset=a`` draws the keys one machine would, and
:meth:`AggregationProcess.merge` of the workers' states is exactly the one-machine state.

State (a plain, picklable ``dict``; values best-first, all parallel):

- ``"seed"``: ``(s0, s1)``, the generator's two 64-bit key words (Python ints);
- ``"round"``: number of non-empty rounds processed (the next round's number);
- ``"keys"``: ``uint64`` array of the sampled clients' keys;
- ``"rounds"``, ``"indices"``: ``int64`` arrays, the round and client index of each;
- ``"samples"``: ``{metric name: [finalized value, ...]}``.

Example:

>>> import fastrec
>>> spec = {"loss": [fastrec.TensorSpec("float32"), fastrec.TensorSpec("float32")]}
>>> process = fastrec.FinalizeThenSampleFactory(sample_size=2, seed=0).create(
...     {"loss": lambda v: v[0] / v[1]}, spec)
>>> state = process.initialize()
>>> out = process.next(state, [{"loss": [3.0, 2.0]}, {"loss": [float("inf"), 1.0]}])
>>> sorted(out.result[0]["loss"]), out.measurements
([1.5, inf], {'loss': 1})
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _sampling
from ._sampling import CompiledSpec, count_non_finite_rows, map_leaves

__all__ = ["AggregationProcess", "FinalizeThenSampleFactory", "MeasuredProcessOutput",
           "TensorSpec", "Vectorized", "count_non_finite", "spec_of", "vectorized"]

_STATE_KEYS = ("seed", "round", "keys", "rounds", "indices", "samples")


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


class TensorSpec:
    """Dtype and shape of one unfinalized metric value (TFF's ``tff.TensorType``).

    ``shape`` entries may be ``None`` (any size). The dtype must be bool, integer, float or
    complex.

    >>> TensorSpec("float32")
    TensorSpec(dtype=float32, shape=())
    >>> TensorSpec(np.int64, shape=(None, 3)).shape
    (None, 3)
    """

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: Any, shape: Any = ()):
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"TensorSpec: {dtype!r} is not a dtype ({e})") from None
        if dt.kind not in "biufc":
            raise TypeError(f"TensorSpec: dtype {dt} is not numeric (bool, int, float, complex)")
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"TensorSpec: shape must be a tuple of ints or None, got {shape!r}")
        dims: list[int | None] = []
        for d in shape:
            if d is None:
                dims.append(None)
            elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
                dims.append(int(d))
            else:
                raise TypeError(f"TensorSpec: shape entries must be non-negative ints or None, "
                                f"got {d!r}")
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "shape", tuple(dims))

    def __setattr__(self, name, value):
        raise AttributeError("TensorSpec is immutable")

    def __eq__(self, other):
        if not isinstance(other, TensorSpec):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape

    def __hash__(self):
        return hash((self.dtype, self.shape))

    def __repr__(self):
        return f"TensorSpec(dtype={self.dtype}, shape={self.shape})"

    def __reduce__(self):
        return (TensorSpec, (self.dtype.str, self.shape))


def spec_of(example: Mapping) -> dict:
    """Infer the unfinalized-metrics spec from one client's value.

    Numbers and numpy scalars give shape-() specs, arrays and lists of numbers give array
    specs (NumPy's dtype inference: Python ``float`` is float64, ``int`` is int64). For a
    list-of-tensors structure, write the spec by hand.

    >>> spec_of({"n": 3, "loss": 0.5, "hist": [1, 2, 3]})
    {'n': TensorSpec(dtype=int64, shape=()), 'loss': TensorSpec(dtype=float64, shape=()), \
'hist': TensorSpec(dtype=int64, shape=(3,))}
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"spec_of expects a mapping of metric name to value, got "
                        f"{type(example).__name__}")
    out = {}
    for name, value in example.items():
        if isinstance(value, (str, bytes)):
            raise TypeError(f"spec_of: metric {name!r} is not numeric: {value!r}")
        try:
            a = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"spec_of: cannot infer a spec for metric {name!r} ({e})") from None
        if a.dtype.kind not in "biufc":
            raise TypeError(f"spec_of: metric {name!r} is not numeric (dtype {a.dtype})")
        out[name] = TensorSpec(a.dtype, a.shape)
    return out


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
        return map_leaves(lambda col: np.asarray(col)[0], self.fn(stacked))

    def __repr__(self):
        return f"vectorized({self.fn!r})"


def vectorized(fn: Callable) -> Vectorized:
    """Mark a finalizer as vectorized: it maps a column batch to a column batch.

    In :meth:`AggregationProcess.next_columnar`, a vectorized finalizer is called once with
    the metric's column (leading axis: clients; for a list spec, a list of columns) and must
    return an array (or list/tuple/mapping of arrays) with the same leading axis. A vectorized
    functional finalizer gets and returns a mapping of columns. Called on one client's value,
    a vectorized finalizer runs on a batch of one.

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
    ({'x': [3.0]}, {'x': 0})
    """

    state: dict
    result: tuple
    measurements: dict


_INT64_MAX = (1 << 63) - 1

# Columnar rounds at least this large draw their keys on a second thread while the
# finalizers and non-finite counts run: the key loop releases the GIL, and at this size
# it outweighs the ~0.1 ms a thread costs to start. The calling thread also draws a share
# of the keys after its own work (finalizers, non-finite counts), so both finish together.
_OVERLAP_MIN_CLIENTS = 200_000
_MAIN_THREAD_KEY_SHARE = 0.15


class _Background:
    """Run ``fn(*args)`` on a fresh thread; :meth:`result` joins it and re-raises its error.

    A fresh thread per call, not a pool: a pool's worker does not survive ``fork``.
    """

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name="fastrec-keys")
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to the caller in result()
            self._error = e

    def join(self):
        self._thread.join()

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _check_int(value, what, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be {'positive' if minimum == 1 else 'non-negative'}, "
                         f"got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {value}")
    return int(value)


class FinalizeThenSampleFactory:
    """Factory of finalize-then-sample aggregation processes (TFF's namesake, no TensorFlow).

    ``sample_size`` clients at most are kept per round and over all rounds. ``seed`` (an int
    >= 0) makes every result reproducible; without it each created process draws fresh OS
    entropy.

    >>> factory = FinalizeThenSampleFactory(sample_size=10, seed=1)
    >>> process = factory.create({"acc": lambda v: v}, {"acc": TensorSpec("float32")})
    """

    def __init__(self, sample_size: int = 100, seed: int | None = None):
        self._sample_size = _check_int(sample_size, "sample_size", 1, _INT64_MAX)
        self._seed = None if seed is None else _check_int(seed, "seed", 0)

    @property
    def sample_size(self) -> int:
        return self._sample_size

    def create(self, metric_finalizers, local_unfinalized_metrics_type) -> "AggregationProcess":
        """Build the process.

        ``metric_finalizers``: a mapping of metric name to callable (applied to that metric's
        unfinalized value), or one callable taking the whole unfinalized mapping and returning a
        mapping of finalized values. ``local_unfinalized_metrics_type``: a mapping of metric
        name to :class:`TensorSpec` or (nested) list/tuple of TensorSpec.
        """
        specs = _compile_metrics_type(local_unfinalized_metrics_type)
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
        if self._seed is None:
            seq = np.random.SeedSequence()
        else:
            seq = np.random.SeedSequence(self._seed)
        words = seq.generate_state(2, np.uint64)
        return AggregationProcess(self._sample_size, (int(words[0]), int(words[1])), specs,
                                  finalizers)


def _compile_spec(spec, path):
    if isinstance(spec, TensorSpec):
        return CompiledSpec.leaf(spec.dtype, spec.shape)
    if isinstance(spec, (list, tuple)):
        return CompiledSpec.struct(type(spec) if type(spec) in (list, tuple) else list,
                                   [_compile_spec(s, f"{path}[{i}]") for i, s in enumerate(spec)])
    raise TypeError(f"`local_unfinalized_metrics_type`{path}: expected a TensorSpec or a list/"
                    f"tuple of them, got {type(spec).__name__} {spec!r:.60}")


def _compile_metrics_type(metrics_type) -> dict:
    if not isinstance(metrics_type, Mapping):
        raise TypeError("`local_unfinalized_metrics_type` must be a mapping of metric name to "
                        f"TensorSpec (or list/tuple of TensorSpec), got "
                        f"{type(metrics_type).__name__}")
    out = {}
    for name, spec in metrics_type.items():
        if not isinstance(name, str):
            raise TypeError(f"`local_unfinalized_metrics_type` keys must be str, got {name!r}")
        out[name] = _compile_spec(spec, f"[{name!r}]")
    return out


class AggregationProcess:
    """A finalize-then-sample process: ``initialize()``, ``next(...)``, ``merge(...)``.

    Built by :meth:`FinalizeThenSampleFactory.create`; see the module docstring for the state.

    >>> p = FinalizeThenSampleFactory(3, seed=0).create({"x": lambda v: v},
    ...                                                 {"x": TensorSpec("float64")})
    >>> out = p.next(p.initialize(), [{"x": float(i)} for i in range(10)])
    >>> current, total = out.result
    >>> len(current["x"]), current == total, out.measurements
    (3, True, {'x': 0})
    """

    def __init__(self, sample_size, seed_words, specs, finalizers):
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

    @property
    def sample_size(self) -> int:
        return self._k

    def initialize(self) -> dict:
        """The empty reservoir at round 0."""
        names = self._names if self._functional is None else ()
        return {"seed": self._seed, "round": 0, "keys": np.empty(0, np.uint64),
                "rounds": np.empty(0, np.int64), "indices": np.empty(0, np.int64),
                "samples": {n: [] for n in names}}

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
        >>> round_reservoir["samples"] == one.result[0]
        True
        >>> p.merge(state, round_reservoir)["samples"] == one.state["samples"]
        True
        """
        _check_state(state)
        empty = self.initialize()
        empty["seed"], empty["round"] = state["seed"], state["round"]
        return empty

    # -- per-client rounds -------------------------------------------------------------------

    def next(self, state: dict, client_values, *, client_offset: int = 0) -> MeasuredProcessOutput:
        """Process one round of clients' unfinalized metrics.

        ``client_values``: a sequence of mappings (dict, ``MetricsRecord``, ...) of metric name
        to value. ``client_offset``: the index of the first of them in the round, for workers
        that each process a slice of the round. Returns ``MeasuredProcessOutput(state,
        (current_round_samples, total_rounds_samples), measurements)``. An empty round returns
        ``state`` itself, an empty current sample and zero measurements.
        """
        _check_state(state)
        offset = _check_int(client_offset, "client_offset", 0, _INT64_MAX)
        if isinstance(client_values, Mapping):
            raise TypeError("client_values must be a sequence of client mappings; for a mapping "
                            "of columns use next_columnar")
        clients = client_values if type(client_values) in (list, tuple) else list(client_values)
        if not clients:
            return self._unchanged(state)
        s0, s1 = state["seed"]
        keys, indices, positions = _sampling.round_sample(s0, s1, state["round"], offset,
                                                          len(clients), self._k)
        names, samples, measurements = _sampling.finalize_clients(
            clients, self._names, self._ordered_specs, self._fins, self._functional, positions,
            len(positions), offset)
        return self._finish(state, keys, indices, dict(zip(names, samples)),
                            dict(zip(names, measurements)))

    # -- columnar rounds ---------------------------------------------------------------------

    def next_columnar(self, state: dict, batch: Mapping, *,
                      client_offset: int = 0) -> MeasuredProcessOutput:
        """Process one round given as columns: metric name -> array with a leading client axis.

        For a list/tuple spec the column is a list/tuple of such arrays. If every finalizer is
        :func:`vectorized` (or the functional finalizer is), finalizers run once per column and
        the non-finite counts, keys, top-k and gather run in C over the columns; otherwise the
        rows are finalized one client at a time. Same keys, samples and measurements as
        :meth:`next` on the equivalent rows.

        >>> p = FinalizeThenSampleFactory(2, seed=0).create(
        ...     {"x": vectorized(lambda col: col * 2)}, {"x": TensorSpec("float64")})
        >>> out = p.next_columnar(p.initialize(), {"x": np.array([1.0, np.nan, 3.0, 4.0])})
        >>> len(out.result[0]["x"]), out.measurements
        (2, {'x': 1})
        """
        _check_state(state)
        offset = _check_int(client_offset, "client_offset", 0, _INT64_MAX)
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping of metric name to column, got "
                            f"{type(batch).__name__}")
        if set(batch) != set(self._spec_names):
            raise ValueError(f"batch has metrics {sorted(batch)}, expected "
                             f"{sorted(self._spec_names)}")
        sizes: dict[str, int] = {}
        cols = {name: _column(self._specs[name], batch[name], name, sizes)
                for name in self._spec_names}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns have different numbers of clients: {sizes}")
        n = next(iter(sizes.values()), 0)
        if n == 0:
            return self._unchanged(state)
        if not self._vectorized:
            rows = [{name: _row(cols[name], i) for name in self._spec_names} for i in range(n)]
            return self.next(state, rows, client_offset=offset)
        # Keys depend only on (seed, round, index), not on the values. In a large round a
        # second thread draws most of them while this one runs the finalizers and counts
        # non-finite rows, then draws the rest; the two reservoirs merge into the round's.
        s0, s1, rnd = state["seed"][0], state["seed"][1], state["round"]
        split = int(n * _MAIN_THREAD_KEY_SHARE) if n >= _OVERLAP_MIN_CLIENTS else 0
        background = (_Background(_sampling.round_sample, s0, s1, rnd, offset + split, n - split,
                                  self._k) if split else None)
        try:
            if self._functional is None:
                finalized = {}
                for name, fin in zip(self._names, self._fins):
                    finalized[name] = _call_finalizer(fin.fn, cols[name], name)
            else:
                finalized = _call_finalizer(self._functional.fn, cols, None)
                if not isinstance(finalized, Mapping):
                    raise TypeError("the vectorized metric finalizer must return a mapping of "
                                    f"metric name to column, got {type(finalized).__name__}")
            structures, leaves_of, measurements = {}, {}, {}
            for name, value in finalized.items():
                leaves: list[np.ndarray] = []
                structure = map_leaves(lambda x: _finalized_column(x, n, name, leaves), value)
                structures[name], leaves_of[name] = structure, leaves
                measurements[name] = map_leaves(lambda i: count_non_finite_rows(leaves[i]),
                                                structure)
            if background is None:
                keys, indices, positions = _sampling.round_sample(s0, s1, rnd, offset, n, self._k)
            else:
                keys, indices, positions = _sampling.round_sample(s0, s1, rnd, offset, split,
                                                                  self._k)
        finally:
            if background is not None:
                background.join()
        if background is not None:
            b_keys, b_indices, b_positions = background.result()
            keys = np.concatenate([keys, b_keys])
            indices = np.concatenate([indices, b_indices])
            positions = np.concatenate([positions, b_positions + split])
            top = _sampling.select_top(keys, np.zeros(len(keys), np.int64), indices, self._k)
            keys, indices, positions = keys[top], indices[top], positions[top]
        samples = {}
        for name, structure in structures.items():
            picked = [_sampling.gather_rows(leaf, positions) for leaf in leaves_of[name]]
            if isinstance(structure, int):  # a single column: its rows are the samples
                samples[name] = list(picked[0])
            else:
                samples[name] = [map_leaves(lambda i: picked[i][r], structure)
                                 for r in range(len(positions))]
        return self._finish(state, keys, indices, samples, measurements)

    # -- merging -----------------------------------------------------------------------------

    def merge(self, state_a: dict, state_b: dict) -> dict:
        """The state whose reservoir is that of the union of the two states' clients.

        For states built from one start state by workers that each processed a slice of a round
        (``client_offset``), the result equals the one-machine state. Both must share the seed.

        >>> p = FinalizeThenSampleFactory(2, seed=0).create({"x": float}, {"x": TensorSpec("int64")})
        >>> start, clients = p.initialize(), [{"x": i} for i in range(6)]
        >>> a = p.next(start, clients[:4]).state                   # worker 1: clients 0-3
        >>> b = p.next(start, clients[4:], client_offset=4).state  # worker 2: clients 4-5
        >>> p.merge(a, b)["samples"] == p.next(start, clients).state["samples"]
        True
        """
        _check_state(state_a)
        _check_state(state_b)
        if tuple(state_a["seed"]) != tuple(state_b["seed"]):
            raise ValueError("cannot merge states with different seeds: their keys are not "
                             "comparable")
        out = _union(state_a, state_b["keys"], state_b["rounds"], state_b["indices"],
                     state_b["samples"], self._k)
        out["round"] = max(state_a["round"], state_b["round"])
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _unchanged(self, state):
        samples = state["samples"]
        current = {name: [] for name in samples}
        zero = {name: (map_leaves(lambda _: 0, vals[0]) if vals else 0)
                for name, vals in samples.items()}
        total = {name: list(vals) for name, vals in samples.items()}
        return MeasuredProcessOutput(state, (current, total), zero)

    def _finish(self, state, keys, indices, current, measurements):
        rounds = np.full(len(keys), state["round"], np.int64)
        new_state = _union(state, keys, rounds, indices, current, self._k)
        new_state["round"] = state["round"] + 1
        total = {name: list(vals) for name, vals in new_state["samples"].items()}
        return MeasuredProcessOutput(new_state, (current, total), measurements)


def _union(state, keys, rounds, indices, samples, k):
    """New state (round copied from ``state``) holding the best k of state's and the others."""
    m = len(state["keys"])
    a_samples = state["samples"]
    if m and len(keys) and set(a_samples) != set(samples):
        raise ValueError(f"cannot merge samples of metrics {sorted(a_samples)} with samples of "
                         f"metrics {sorted(samples)}")
    names = list(a_samples) if (m or not samples) else list(samples)
    all_keys = np.concatenate([state["keys"], keys])
    all_rounds = np.concatenate([state["rounds"], rounds])
    all_indices = np.concatenate([state["indices"], indices])
    order = _sampling.select_top(all_keys, all_rounds, all_indices, k)
    new_samples = {}
    for name in names:
        a_vals, b_vals = a_samples.get(name, ()), samples.get(name, ())
        new_samples[name] = [a_vals[o] if o < m else b_vals[o - m] for o in order.tolist()]
    return {"seed": state["seed"], "round": state["round"], "keys": all_keys[order],
            "rounds": all_rounds[order], "indices": all_indices[order], "samples": new_samples}


def _check_state(state):
    if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
        raise TypeError(f"state must be a dict with keys {list(_STATE_KEYS)} (from initialize() "
                        f"or next()), got {type(state).__name__}"
                        + (f" with keys {sorted(state)}" if isinstance(state, dict) else ""))
    seed = state["seed"]
    if (not isinstance(seed, tuple) or len(seed) != 2
            or not all(isinstance(w, int) and 0 <= w < 1 << 64 for w in seed)):
        raise ValueError(f"state['seed'] must be a pair of 64-bit unsigned ints, got {seed!r}")
    _check_int(state["round"], "state['round']", 0, _INT64_MAX - 1)
    m = None
    for key, dtype in (("keys", np.uint64), ("rounds", np.int64), ("indices", np.int64)):
        arr = state[key]
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
            raise ValueError(f"state[{key!r}] must be a 1-d {np.dtype(dtype)} array")
        if m is not None and len(arr) != m:
            raise ValueError("state['keys'], ['rounds'] and ['indices'] differ in length")
        m = len(arr)
    if not isinstance(state["samples"], dict):
        raise ValueError("state['samples'] must be a dict of metric name to list")
    for name, vals in state["samples"].items():
        if not isinstance(vals, list) or len(vals) != m:
            raise ValueError(f"state['samples'][{name!r}] must be a list of {m} values")
    if m and not state["samples"]:
        raise ValueError("state has sampled clients but no samples")


def _column(spec: CompiledSpec, value, path, sizes):
    """Check one column (or list of columns) against its spec; record its client count."""
    if spec.children is not None:  # a list/tuple spec
        n = len(spec.children)
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise TypeError(f"metric {path}: expected a list or tuple of {n} columns, got "
                            f"{type(value).__name__}")
        return [_column(c, v, f"{path}[{i}]", sizes)
                for i, (c, v) in enumerate(zip(spec.children, value))]
    # A column is checked like one client's value with a leading axis of any length.
    assert spec.dtype is not None and spec.shape is not None  # a leaf spec has both
    try:
        col = _sampling.convert_value(CompiledSpec.leaf(spec.dtype, (None,) + spec.shape), value)
    except (TypeError, ValueError) as e:
        raise _sampling.with_context(e, f"metric {path!r}") from None
    sizes[path] = col.shape[0]
    return col


def _row(col, i):
    if isinstance(col, list):
        return [_row(c, i) for c in col]
    return col[i]


def _call_finalizer(fn, value, name):
    try:
        return fn(value)
    except Exception as e:
        e.add_note(f"(in the vectorized finalizer{'' if name is None else f' of {name!r}'})")
        raise


def _finalized_column(x, n, name, leaves):
    col = np.asarray(x)
    if col.ndim == 0 or col.shape[0] != n:
        raise ValueError(f"metric {name!r}: a vectorized finalizer must return columns with a "
                         f"leading axis of {n} clients, got shape {col.shape}")
    if col.dtype.kind not in "biufc":
        raise TypeError(f"metric {name!r}: finalized column is not numeric (dtype {col.dtype})")
    leaves.append(col)
    return len(leaves) - 1

