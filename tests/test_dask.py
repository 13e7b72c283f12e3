"""Tests of fastrec.dask: rounds on a real Dask cluster equal one machine, bit for bit."""

import doctest
import logging
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (a dependency of distributed)
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402

import fastrec  # noqa: E402
import fastrec.dask as fd  # noqa: E402
from fastrec import FinalizeThenSampleFactory, TensorSpec, vectorized  # noqa: E402

# The workers cannot import this file: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = {"loss": [TensorSpec("float64"), TensorSpec("float64")], "n": TensorSpec("int64")}


def create(k, seed, finalizers, spec):
    return FinalizeThenSampleFactory(k, seed=seed).create(finalizers, spec)


def _loss(v):
    return [v[0] / v[1], v[0]]


def make_process(k=7, seed=3):
    return create(k, seed, {"loss": _loss, "n": int}, SPEC)


def make_clients(n, seed=0):
    rng = np.random.default_rng(seed)
    out = [{"loss": [float(x), float(c)], "n": int(c)}
           for x, c in zip(rng.normal(size=n), rng.integers(1, 50, n))]
    for i in range(0, n, 17):
        out[i]["loss"][0] = (math.nan, math.inf)[i % 2]
    return out


def _logged(part, log, i):
    with open(log, "a") as f:  # one line per computation of partition i, on any process
        f.write(f"{i} {os.getpid()}\n")
    return part


def bag_of(clients, sizes, log=None):
    """A bag whose partitions hold exactly ``sizes`` consecutive clients (0 allowed); with
    ``log``, each computation of a partition appends its number to that file."""
    assert sum(sizes) == len(clients)
    parts, a = [], 0
    for i, n in enumerate(sizes):
        part = dask.delayed(clients[a:a + n], traverse=False)
        parts.append(part if log is None else dask.delayed(_logged, pure=False)(part, log, i))
        a += n
    return db.from_delayed(parts)


def same(a, b, path="out"):
    """Recursive exact equality: types, dict key order, dtypes, shapes and bits (NaN == NaN)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def error_of(fn):
    try:
        fn()
    except Exception as e:  # the error itself is the result under test
        return e
    raise AssertionError("no error raised")


def same_error(a, b):
    assert type(a) is type(b), (a, b)
    assert str(a) == str(b)
    assert getattr(a, "__notes__", None) == getattr(b, "__notes__", None)


# -- without a cluster ---------------------------------------------------------------------------

def test_docstrings():
    assert doctest.testmod(fd).failed == 0


def test_import_fastrec_does_not_import_dask():
    code = ("import sys, fastrec, fastrec.demo, fastrec.__main__; "
            "assert not any(m == 'dask' or m.startswith(('dask.', 'distributed')) "
            "for m in sys.modules), sorted(m for m in sys.modules if 'dask' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_default_scheduler_and_no_client_created():
    # No active Client: Dask's choice (the config's scheduler, else the collection's default).
    with pytest.raises(ValueError):
        distributed.default_client()
    p = make_process()
    clients = make_clients(60)
    with dask.config.set(scheduler="sync"):
        same(fd.next(p, p.initialize(), bag_of(clients, [20, 0, 40])),
             p.next(p.initialize(), clients))
    col = np.arange(50, dtype=np.float64)
    q = create(4, 1, {"x": vectorized(np.sqrt)},
                                                      {"x": TensorSpec("float64")})
    same(fd.next_columnar(q, q.initialize(), {"x": da.from_array(col, chunks=9)}),
         q.next_columnar(q.initialize(), {"x": col}))   # arrays' default: threads
    with pytest.raises(ValueError):
        distributed.default_client()


def test_argument_errors():
    p = make_process()
    with pytest.raises(TypeError, match="dask.bag.Bag"):
        fd.next(p, p.initialize(), make_clients(3))
    with pytest.raises(TypeError, match="AggregationProcess"):
        fd.next(object(), {}, db.from_sequence([]))
    with pytest.raises(TypeError, match="state"):
        fd.next(p, {"round": 0}, db.from_sequence(make_clients(3)))
    with pytest.raises(TypeError, match="mapping"):
        fd.next_columnar(p, p.initialize(), [1, 2])
    for bad in (1, 0, 2.5, True):  # 1 would never shrink the reduction tree
        with pytest.raises(ValueError, match="split_every"):
            fd.next(p, p.initialize(), db.from_sequence(make_clients(3)), split_every=bad)


def test_demo_on_a_dask_cluster():
    # Its own LocalCluster (created and closed by the demo), before the module's cluster exists.
    import io

    from fastrec import demo
    assert demo.build_parser().parse_args(["--dask-workers", "2"]).dask_workers == 2
    args = dict(rounds=2, clients=700, sample_size=5, seed=3, chunk=200, progress=False)
    with_out, without_out = io.StringIO(), io.StringIO()
    with_dask = demo.run(out=with_out, dask_workers=1, **args)
    without = demo.run(out=without_out, **args)
    with pytest.raises(ValueError):
        distributed.default_client()  # closed again
    same(with_dask["state"], without["state"])
    same(with_dask["measurements"], without["measurements"])
    text = with_out.getvalue()
    assert "dask: 1 worker processes; per stage: encode" in text

    def summary(t):
        return [line for line in t.splitlines()
                if not line.startswith(("throughput:", "dask:", "wire:"))]
    assert summary(text) == summary(without_out.getvalue())


# -- on a LocalCluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       silence_logs=logging.ERROR)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(params=["in-process", "cluster"])
def where(request):
    """Run the test on Dask's synchronous scheduler, then on the module's LocalCluster."""
    if request.param == "in-process":
        with dask.config.set(scheduler="sync"):
            yield None
        return
    yield request.getfixturevalue("client")


LAYOUTS = {
    "uneven": [3, 50, 1, 46],
    "size 0 and 1": [0, 1, 0, 1, 97, 1, 0],
    "single": [100],
    "more partitions than clients": None,  # 5 clients over 12 partitions, below
    "many, deep tree": [5] * 20,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_partitionings_equal_one_machine(where, layout, tmp_path):
    p = make_process()
    earlier = p.next(p.initialize(), make_clients(30, seed=9)).state  # from round 1 on
    if LAYOUTS[layout] is None:
        clients, sizes = make_clients(5), [1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0]
    else:
        clients, sizes = make_clients(100), LAYOUTS[layout]
    log = str(tmp_path / "computed")
    got = fd.next(p, earlier, bag_of(clients, sizes, log),
                  split_every=2 if len(sizes) > 8 else None)
    same(got, p.next(earlier, clients))
    with open(log) as f:  # each partition computed once, lengths and offsets included
        computed = [tuple(map(int, line.split())) for line in f]
    assert sorted(i for i, _ in computed) == list(range(len(sizes)))
    workers = {os.getpid()} if where is None else set(where.run(os.getpid).values())
    assert {pid for _, pid in computed} <= workers  # on the cluster's worker processes


def test_empty_round(where):
    p = make_process()
    state = p.next(p.initialize(), make_clients(20)).state
    same(fd.next(p, state, bag_of([], [0, 0, 0])), p.next(state, []))


def test_rounds_in_a_row_with_pickled_states(where):
    p = make_process(k=5, seed=11)
    one = two = p.initialize()
    for r, sizes in enumerate([[40, 0, 25], [1, 64], [30, 30, 5], [65]]):
        clients = make_clients(65, seed=r)
        a = p.next(one, clients)
        b = fd.next(p, two, bag_of(clients, sizes))
        same(b, a)
        if r:
            with pytest.raises(AssertionError):
                same(a.result[0], a.result[1])  # current-round sample differs from the total
        one, two = a.state, pickle.loads(pickle.dumps(b.state))


def test_functional_finalizer_and_records(where):
    def fin(m):
        return {"ratio": m["loss"][0] / m["loss"][1], "both": [m["n"], m["loss"][1]]}
    p = create(6, 2, fin, SPEC)
    clients = make_clients(80)
    same(fd.next(p, p.initialize(), bag_of(clients, [10, 30, 0, 40])),
         p.next(p.initialize(), clients))
    records = [fastrec.MetricsRecord(c) for c in clients]
    same(fd.next(p, p.initialize(), db.from_sequence(records, npartitions=3)),
         p.next(p.initialize(), records))


def test_flower_records(where):
    flwr = pytest.importorskip("flwr")
    p = make_process()
    records = [flwr.common.MetricsRecord(c) for c in make_clients(40)]
    same(fd.next(p, p.initialize(), db.from_sequence(records, npartitions=4)),
         p.next(p.initialize(), records))


def _slow_before(marker):
    def fin(v):
        if v == marker:
            time.sleep(1.0)  # this partition's own error comes after the later one's
        return float(v)
    return fin


def test_lowest_index_error_wins(where):
    p = create(3, 0, {"x": _slow_before(-5)},
                                                      {"x": TensorSpec("int64")})
    clients = [{"x": i} for i in range(100)]
    clients[20] = {"x": -5}          # partition 0: slow, then
    clients[30] = {"x": "bad"}       # the lowest error
    clients[70] = {"x": [1, 2]}      # partition 1: fails at once
    one = error_of(lambda: p.next(p.initialize(), clients))
    assert "client 30" in str(one)
    same_error(error_of(lambda: fd.next(p, p.initialize(), bag_of(clients, [50, 50]))), one)


def test_finalizer_error_names_global_client(where):
    p = create(3, 0,
        {"loss": _loss, "n": lambda n: 1 // (int(n) - 1000)}, SPEC)
    clients = make_clients(60)
    clients[44]["n"] = clients[52]["n"] = 1000
    one = error_of(lambda: p.next(p.initialize(), clients))
    assert isinstance(one, ZeroDivisionError)
    assert "client 44" in " ".join([str(one)] + getattr(one, "__notes__", []))
    same_error(error_of(lambda: fd.next(p, p.initialize(), bag_of(clients, [25, 25, 10]))), one)


def _shape_changes_at(i0):
    def fin(v):
        return float(v) if v < i0 else [float(v), 1.0]
    return fin


def test_structure_disagreement_between_partitions(where):
    p = create(3, 0, {"x": _shape_changes_at(50)},
                                                      {"x": TensorSpec("int64")})
    clients = [{"x": i} for i in range(100)]
    one = error_of(lambda: p.next(p.initialize(), clients))
    got = error_of(lambda: fd.next(p, p.initialize(), bag_of(clients, [50, 50])))
    assert isinstance(got, ValueError) and isinstance(one, ValueError)
    if str(got) != str(one):  # found only when the partitions meet
        assert "'x'" in str(got) and "client 0" in str(got) and "client 50" in str(got), got

    def names(m):
        return {"a" if m["x"] < 50 else "b": float(m["x"])}
    q = create(3, 0, names, {"x": TensorSpec("int64")})
    one = error_of(lambda: q.next(q.initialize(), clients))
    got = error_of(lambda: fd.next(q, q.initialize(), bag_of(clients, [0, 50, 50])))
    assert isinstance(got, ValueError) and isinstance(one, ValueError)
    if str(got) != str(one):
        assert "'a'" in str(got) and "'b'" in str(got) and "client 0" in str(got) \
            and "client 50" in str(got), got


def test_partition_runs_that_disagree_name_the_metric_and_both_clients():
    # The core probes the finalized structure at create(), so through the public API every
    # partition agrees; the reduction still checks, for states that reach it otherwise (here:
    # partitions finalized by different processes). Its ValueErrors name the metric and both
    # first clients, never an internal TypeError.
    spec = {"x": TensorSpec("int64")}

    def run(finalizers, a, n):
        p = FinalizeThenSampleFactory(3, seed=0).create(finalizers, spec)
        o = p.next(p.round_start(p.initialize()), [{"x": i} for i in range(a, a + n)],
                   client_offset=a)
        return fd._Run(o.state, o.measurements, a)

    base = FinalizeThenSampleFactory(3, seed=0).create({"x": float}, spec)
    cases = [({"x": lambda v: [float(v), 1.0]}, "metric 'x'"),      # structure
             ({"x": lambda v: np.int32(v)}, "metric 'x'"),          # leaf dtype
             (lambda m: {"y": float(m["x"])}, "['y'] for client 10")]  # metric names
    for finalizers, named in cases:
        out = fd._combine(base, [run({"x": float}, 0, 10), fd._Run(), run(finalizers, 10, 5)])
        assert isinstance(out.failure, ValueError) and out.state is None
        message = str(out.failure)
        assert named in message and "client 0" in message and "client 10" in message, message


def test_unpicklable_process_is_a_clear_error(client):
    lock = threading.Lock()
    p = create(3, 0, {"x": lambda v: (lock, float(v))[1]}, {"x": TensorSpec("int64")})
    with pytest.raises(TypeError, match="the process must pickle"):
        fd.next(p, p.initialize(), db.from_sequence([{"x": 1}, {"x": 2}]))
    with dask.config.set(scheduler="threads"):  # one process: nothing to ship
        assert fd.next(p, p.initialize(), db.from_sequence([{"x": 1}])).measurements == {"x": 0}


# -- columns -----------------------------------------------------------------------------------

CSPEC = {"loss": [TensorSpec("float32"), TensorSpec("float32")], "hist": TensorSpec("int64", (3,))}


def columnar_process(vec=True):
    wrap = vectorized if vec else (lambda f: f)
    return create(9, 5,
        {"loss": wrap(lambda v: v[0] / v[1]), "hist": wrap(lambda h: h * 2)}, CSPEC)


def make_columns(n, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n).astype(np.float32)
    s[::13] = np.nan
    return {"loss": [s, rng.integers(0, 3, n).astype(np.float32)],
            "hist": rng.integers(0, 9, (n, 3))}


@pytest.mark.parametrize("vec", [True, False])
def test_columnar_equals_one_machine(where, vec):
    p = columnar_process(vec)
    state = p.next_columnar(p.initialize(), make_columns(50, seed=4)).state
    cols = make_columns(300)
    dcols = {"loss": [da.from_array(cols["loss"][0], chunks=((0, 1, 120, 179),)),
                      da.from_array(cols["loss"][1], chunks=77)],       # rechunked to the first
             "hist": da.from_array(cols["hist"], chunks=(50, 1))}
    got = fd.next_columnar(p, state, dcols)
    same(got, p.next_columnar(state, cols))
    # Unknown chunk sizes (a boolean mask) are computed first.
    keep = cols["hist"][:, 0] != 4
    dkeep = da.from_array(keep, chunks=100)
    masked = {"loss": [dcols["loss"][0][dkeep], dcols["loss"][1][dkeep]],
              "hist": dcols["hist"][dkeep]}
    assert math.isnan(masked["hist"].chunks[0][0])
    same(fd.next_columnar(p, state, masked),
         p.next_columnar(state, {"loss": [c[keep] for c in cols["loss"]], "hist": cols["hist"][keep]}))


def test_columns_whose_paths_print_alike_are_still_checked_for_length(where):
    spec = {"a": [TensorSpec("float64")], "a[0]": TensorSpec("float64")}
    p = FinalizeThenSampleFactory(10, seed=0).create(
        {"a": vectorized(lambda v: v[0]), "a[0]": vectorized(lambda v: v)}, spec)
    for na, nb in ((40, 30), (30, 40)):
        batch = {"a": [da.from_array(np.arange(na, dtype=float), chunks=10)],
                 "a[0]": da.from_array(np.arange(nb, dtype=float), chunks=10)}
        with pytest.raises(ValueError, match=rf"different numbers of clients.*: {na}.*: {nb}"):
            fd.next_columnar(p, p.initialize(), batch)


def test_columnar_errors_name_the_metric(where):
    p = columnar_process()
    cols = make_columns(40)
    dcols = {"loss": [da.from_array(c, chunks=10) for c in cols["loss"]],
             "hist": da.from_array(cols["hist"], chunks=10)}
    short = dict(dcols, hist=dcols["hist"][:30])
    with pytest.raises(ValueError, match=r"different numbers of clients.*'hist': 30"):
        fd.next_columnar(p, p.initialize(), short)
    text = dict(dcols, hist=da.from_array(cols["hist"].astype(str), chunks=10))
    same_error(error_of(lambda: fd.next_columnar(p, p.initialize(), text)),
               error_of(lambda: p.next_columnar(p.initialize(), dict(cols, hist=cols["hist"].astype(str)))))
    missing = {"loss": dcols["loss"]}
    same_error(error_of(lambda: fd.next_columnar(p, p.initialize(), missing)),
               error_of(lambda: p.next_columnar(p.initialize(), {"loss": cols["loss"]})))
    q = create(3, 0,
        {"loss": vectorized(lambda v: v[0][:1]), "hist": vectorized(lambda h: h)}, CSPEC)
    with pytest.raises(ValueError, match="'loss'"):
        fd.next_columnar(q, q.initialize(), dcols)


def test_next_from_wire(where):
    wire = pytest.importorskip("fastrec.wire")
    spec = {"acc": TensorSpec("float64"), "n": TensorSpec("int64")}
    p = create(4, 0,
        {"acc": vectorized(lambda c: c), "n": vectorized(lambda c: c)}, spec)
    buffers = [wire.recordset_to_bytes(fastrec.RecordSet(
        metrics_records={"m": fastrec.MetricsRecord({"acc": i / 7, "n": i})}))
        for i in range(60)]
    state = p.next_columnar(p.initialize(), wire.metrics_columns(buffers[:9], "m", spec)).state
    one = p.next_columnar(state, wire.metrics_columns(buffers, "m", spec))
    same(fd.next_from_wire(p, state, db.from_sequence(buffers, npartitions=5), "m", spec), one)
    bag = bag_of(buffers, [0, 1, 30, 0, 29])
    same(fd.next_from_wire(p, state, bag, "m", spec), one)
    bad = list(buffers)
    for i in (44, 52):  # a list where a number belongs, in the last partition
        bad[i] = wire.recordset_to_bytes(fastrec.RecordSet(
            metrics_records={"m": fastrec.MetricsRecord({"acc": [1.0, 2.0], "n": i})}))
    one = error_of(lambda: p.next_columnar(state, wire.metrics_columns(bad, "m", spec)))
    assert "buffer 44" in str(one)
    same_error(error_of(lambda: fd.next_from_wire(p, state, bag_of(bad, [0, 1, 30, 0, 29]), "m",
                                                  spec)), one)
    # a malformed reply: the decoder's error, also under its global index
    bad[44] = buffers[44][:-1]
    one = error_of(lambda: p.next_columnar(state, wire.metrics_columns(bad, "m", spec)))
    assert str(one).startswith("buffer 44: malformed RecordSet")
    same_error(error_of(lambda: fd.next_from_wire(p, state, bag_of(bad, [0, 1, 30, 0, 29]), "m",
                                                  spec)), one)


def test_next_from_wire_metric_record_objects(where):
    wire = pytest.importorskip("fastrec.wire")
    from fastrec import app
    spec = {"acc": TensorSpec("float64"), "n": TensorSpec("int64")}
    p = create(4, 0,
        {"acc": vectorized(lambda c: c), "n": vectorized(lambda c: c)}, spec)
    buffers = [app.MetricRecord({"acc": i / 7, "n": i}).deflate() for i in range(60)]
    obj = "metric-record-object"
    one = p.next_columnar(p.initialize(), wire.metrics_columns(buffers, None, spec, wire=obj))
    same(fd.next_from_wire(p, p.initialize(), bag_of(buffers, [0, 1, 30, 0, 29]), None, spec,
                           wire=obj), one)
    bad = list(buffers)
    bad[50] = app.MetricRecord({"acc": 0.5}).deflate()
    one = error_of(lambda: wire.metrics_columns(bad, None, spec, wire=obj))
    assert str(one) == "buffer 50: no metric 'n'"
    same_error(error_of(lambda: fd.next_from_wire(p, p.initialize(),
                                                  bag_of(bad, [0, 1, 30, 0, 29]), None, spec,
                                                  wire=obj)), one)


# -- reliability -------------------------------------------------------------------------------

def _gated(tmp, marker):
    def fin(v):
        if v == marker:  # announce the task in flight, then wait for the test to kill us
            open(os.path.join(tmp, f"started-{os.getpid()}"), "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(tmp, "go")) and time.monotonic() < deadline:
                time.sleep(0.01)
        return float(v)
    return fin


def test_killed_worker_mid_round_gives_the_same_result(client, tmp_path):
    tmp = str(tmp_path)
    p = create(8, 4, {"x": _gated(tmp, -1)},
                                                      {"x": TensorSpec("int64")})
    state = p.next(p.initialize(), [{"x": i} for i in range(10)]).state
    clients = [{"x": i} for i in range(400)]
    clients[137] = {"x": -1}
    box = {}
    run = threading.Thread(target=lambda: box.update(out=fd.next(p, state,
                                                                  bag_of(clients, [50] * 8))))
    run.start()
    deadline = time.monotonic() + 60
    while not any(f.startswith("started-") for f in os.listdir(tmp)):
        assert time.monotonic() < deadline, "the gated partition never started"
        time.sleep(0.01)
    pid = int(next(f for f in os.listdir(tmp) if f.startswith("started-")).split("-")[1])
    workers = {pid_: addr for addr, pid_ in client.run(os.getpid).items()}
    assert pid in workers, "the gated task runs on a cluster worker"
    in_flight = client.processing(workers=[workers[pid]])[workers[pid]]
    assert any("run_clients" in str(k) for k in in_flight), in_flight
    os.kill(pid, signal.SIGKILL)
    open(os.path.join(tmp, "go"), "w").close()
    run.join(120)
    assert not run.is_alive()
    same(box["out"], p.next(state, clients))
    client.wait_for_workers(2, timeout=60)
    assert pid not in client.run(os.getpid).values()
