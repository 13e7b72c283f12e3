"""Fuzz harness: hostile states handed back to ``AggregationProcess`` (next, next_columnar, merge).

A state is a plain dict a caller keeps between rounds (and may have stored, shipped or edited), so
every entry point re-checks it. The bytes drive a small program, never pickle: they pick a sample
size and the clients of a few honest rounds, then edits to the resulting state (a field replaced by
a hostile value, an array truncated, retyped, made non-contiguous or filled with extreme values, a
sample list shortened or renamed). Contract: the process either raises ``TypeError``/
``ValueError`` with a message or returns a state that is itself valid (feeding it back succeeds)
and holds at most ``sample_size`` distinct clients in arrival order (round, then client
index; an empty round returns the caller's state object itself).
"""

from __future__ import annotations

import numpy as np

import fastrec

_HOSTILE = [None, 0, -1, 1 << 64, 2**63, -(2**63) - 1, 1.5, "x", b"x", (), [], {}, (1,), (1, 2, 3),
            (-1, 0), (0, 1 << 64), [0, 0], np.uint64(1), True, float("nan"),
            np.empty(0, np.uint64), np.zeros(3, np.int64), np.zeros((2, 2), np.uint64)]
_DTYPES = [np.uint64, np.int64, np.int32, np.uint32, np.float64, np.bool_, object]
_EXTREMES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]


class _Bytes:
    """Reads small integers from the input, then zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def more(self) -> bool:
        return self.pos < len(self.data)


def _process(sample_size: int):
    spec = {"loss": [fastrec.TensorSpec("float32"), fastrec.TensorSpec("float32")],
            "acc": fastrec.TensorSpec("float64")}
    return fastrec.FinalizeThenSampleFactory(sample_size=sample_size, seed=7).create(
        {"loss": lambda v: v[0] / v[1], "acc": lambda v: v}, spec)


def _clients(b: _Bytes, n: int) -> list:
    return [{"loss": [float(b.byte()), 1.0 + b.byte() % 4], "acc": b.byte() / 255.0}
            for _ in range(n)]


def _edit(state: dict, b: _Bytes) -> dict:
    state = dict(state)
    field = b.pick(["seed", "round", "keys", "rounds", "indices", "samples", "drop", "add"])
    how = b.byte() % 6
    if field == "drop":
        state.pop(b.pick(list(state)), None)
    elif field == "add":
        state[b.pick(["extra", "seed", 1])] = b.pick(_HOSTILE)
    elif field in ("keys", "rounds", "indices"):
        arr = np.atleast_1d(np.asarray(state.get(field, ())))
        if how == 0:
            state[field] = arr[: b.byte() % (len(arr) + 1)]
        elif how == 1:
            state[field] = arr.astype(b.pick(_DTYPES))
        elif how == 2:
            state[field] = np.repeat(arr, 2)[::2]  # same values, non-contiguous
        elif how == 3 and len(arr):
            arr = arr.copy()
            arr[b.byte() % len(arr)] = np.array(b.pick(_EXTREMES)).astype(arr.dtype)
            state[field] = arr
        elif how == 4:
            state[field] = arr[::-1].copy()
        else:
            state[field] = b.pick(_HOSTILE)
    elif field == "samples":
        old = state.get("samples")
        samples = {k: list(v) for k, v in old.items()} if isinstance(old, dict) else {}
        if how == 0 and samples:
            name = b.pick(list(samples))
            samples[name] = samples[name][: b.byte() % (len(samples[name]) + 1)]
        elif how == 1 and samples:
            samples[b.pick(["other", 3, ""])] = samples.pop(b.pick(list(samples)))
        elif how == 2 and samples:
            name = b.pick(list(samples))
            samples[name] = [b.pick(_HOSTILE) for _ in samples[name]]
        elif how == 3:
            samples = b.pick(_HOSTILE)
        else:
            samples.clear()
        state["samples"] = samples
    else:
        state[field] = b.pick(_HOSTILE) if how < 4 else b.pick(_EXTREMES)
    return state


def _check_output(process, state: dict, k: int) -> None:
    keys = state["keys"]
    assert len(keys) <= k, f"{len(keys)} clients kept, sample size {k}"
    arrival = list(zip(state["rounds"].tolist(), state["indices"].tolist()))
    assert arrival == sorted(set(arrival)), "sampled clients not in arrival order, or repeated"
    process.next(state, [])  # a returned state is valid input
    process.merge(state, state)


def TestOneInput(data: bytes) -> None:
    b = _Bytes(data)
    k = 1 + b.byte() % 4
    process = _process(k)
    state = process.initialize()
    for _ in range(b.byte() % 3):
        state = process.next(state, _clients(b, b.byte() % 6), client_offset=b.byte() % 3).state
    honest = state
    for _ in range(1 + b.byte() % 3):
        try:
            state = _edit(state, b)
        except (TypeError, ValueError, OverflowError):  # an edit numpy cannot build: skip it
            pass
    entry = b.byte() % 4
    try:
        if entry == 0:
            out = process.next(state, _clients(b, b.byte() % 4)).state
        elif entry == 1:
            out = process.merge(state, honest)
        elif entry == 2:
            out = process.merge(honest, state)
        else:
            n = b.byte() % 4
            rows = _clients(b, n)
            batch = {"loss": [np.array([r["loss"][0] for r in rows], np.float32),
                              np.array([r["loss"][1] for r in rows], np.float32)],
                     "acc": np.array([r["acc"] for r in rows])}
            out = process.next_columnar(state, batch).state
    except (TypeError, ValueError) as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return
    if out is not state:  # an empty round hands the caller's state back unchanged
        _check_output(process, out, k)


if __name__ == "__main__":  # python tests/fuzz/run.py runs this under atheris
    import sys

    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            TestOneInput(f.read())
