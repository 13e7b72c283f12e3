"""Flower's protobuf wire format: fastrec.wire vs flwr 1.15.2's serde + protobuf (upb).

Run: python bench/bench_wire.py
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import compare, table  # noqa: E402

import flwr.common as fc  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recordset_pb2 import RecordSet as ProtoRecordSet  # noqa: E402

import fastrec  # noqa: E402
from fastrec import TensorSpec, wire  # noqa: E402

N_CLIENTS = 10_000
SPEC = {"accuracy": TensorSpec("float32"), "loss": TensorSpec("float64"),
        "num_examples": TensorSpec("int64")}


def client_recordsets(n: int = N_CLIENTS, lib=fastrec) -> list:
    """n client replies: a RecordSet holding one MetricsRecord of 3 entries (~70 bytes each),
    as fastrec (``lib=fastrec``) or Flower (``lib=flwr.common``) records. Each side builds its
    own from the same numbers: converting one side's records would touch (and so move about
    in memory) the other's."""
    rng = np.random.default_rng(0)
    acc, loss = rng.random(n), rng.random(n) * 3
    return [lib.RecordSet(metrics_records={"eval": lib.MetricsRecord(
        {"accuracy": float(acc[i]), "loss": float(loss[i]), "num_examples": 100 + i})})
        for i in range(n)]


def flwr_parse(buffers: list) -> list:
    out = []
    for b in buffers:
        proto = ProtoRecordSet()
        proto.ParseFromString(b)
        out.append(serde.recordset_from_proto(proto))
    return out


def rows() -> list:
    ours = client_recordsets()
    theirs = client_recordsets(lib=fc)
    buffers = [wire.recordset_to_bytes(rs) for rs in ours]
    assert buffers == [serde.recordset_to_proto(rs).SerializeToString(deterministic=True)
                       for rs in theirs]
    out = [
        compare(f"{N_CLIENTS:,} client RecordSets to bytes (recordset_to_bytes)",
                "recordset_to_proto + SerializeToString",
                lambda: [serde.recordset_to_proto(rs).SerializeToString(deterministic=True)
                         for rs in theirs],
                lambda: [wire.recordset_to_bytes(rs) for rs in ours], "≥ 30×", repeats=5),
    ]
    # Decoding runs with only the replies' bytes alive, as on a server that has just
    # received them: the 20,000 records built to make the bytes would otherwise sit in
    # the heap that every garbage collection during the decode walks.
    one, f_one = ours[0], theirs[0]
    del ours, theirs
    gc.collect()
    out += [
        compare(f"{N_CLIENTS:,} client RecordSets from bytes (recordset_from_bytes)",
                "ParseFromString + recordset_from_proto", lambda: flwr_parse(buffers),
                lambda: [wire.recordset_from_bytes(b) for b in buffers], "≥ 50×", repeats=5),
        compare(f"{N_CLIENTS:,} client RecordSets to columns (metrics_columns)",
                "ParseFromString + recordset_from_proto", lambda: flwr_parse(buffers),
                lambda: wire.metrics_columns(buffers, "eval", SPEC), "≥ 300×", repeats=5),
    ]
    # The same work for one reply at a time, results discarded: what a server handling one
    # reply per call sees, without the cost of keeping 10,000 records alive at once.
    b_one = buffers[0]
    out += [
        compare("one client RecordSet from bytes, result discarded",
                "ParseFromString + recordset_from_proto", lambda: flwr_parse([b_one]),
                lambda: wire.recordset_from_bytes(b_one), "(info)"),
        compare("one client RecordSet to bytes",
                "recordset_to_proto + SerializeToString",
                lambda: serde.recordset_to_proto(f_one).SerializeToString(deterministic=True),
                lambda: wire.recordset_to_bytes(one), "(info)"),
    ]

    arrays = {f"layer{i}": np.random.default_rng(i).standard_normal(100_000).astype(np.float32)
              for i in range(100)}
    pr = fastrec.ParametersRecord({k: fastrec.array_from_numpy(a) for k, a in arrays.items()})
    f_pr = fastrec.to_flwr(pr)
    data = wire.parameters_record_to_bytes(pr)
    assert data == serde.parameters_record_to_proto(f_pr).SerializeToString(deterministic=True)
    view = memoryview(data)
    case = "ParametersRecord of 100 × 100k float32 (40 MB)"

    def f_from():
        proto = serde.ProtoParametersRecord()
        proto.ParseFromString(data)
        return serde.parameters_record_from_proto(proto)

    out += [
        compare(f"{case} to bytes", "bytes(memoryview) of the same size", lambda: bytes(view),
                lambda: wire.parameters_record_to_bytes(pr), "within 1.5× (≥ 0.67×)", repeats=5),
        compare(f"{case} to bytes", "parameters_record_to_proto + SerializeToString",
                lambda: serde.parameters_record_to_proto(f_pr).SerializeToString(
                    deterministic=True),
                lambda: wire.parameters_record_to_bytes(pr), "≥ 3×", repeats=5),
        compare(f"{case} from bytes", "bytes(memoryview) of the same size", lambda: bytes(view),
                lambda: wire.parameters_record_from_bytes(data), "within 1.5× (≥ 0.67×)",
                repeats=5),
        compare(f"{case} from bytes", "ParseFromString + parameters_record_from_proto", f_from,
                lambda: wire.parameters_record_from_bytes(data), "≥ 3×", repeats=5),
    ]
    return out


def run() -> list:
    return rows()


NOTES = """
The 10,000-reply rows keep every decoded record alive (a list of 10,000 RecordSets), so both
sides pay for fresh memory and for the cyclic GC walking the growing heap (the decode rows run
with only the replies' bytes alive besides the imported modules); fastrec's per-record
cost is mostly that allocation (its decode of one reply, result discarded, is the "one client"
row). Client replies are Flower's canonical bytes (`SerializeToString(deterministic=True)`), which
`recordset_to_bytes` reproduces byte for byte (checked before timing). Flower's decoder is
protobuf's upb C parser plus `serde.recordset_from_proto`; fastrec's builds fastrec records
(`recordset_from_bytes`) or, for `metrics_columns`, no per-client Python objects at all.
"""


if __name__ == "__main__":
    print(table(run()))
    print(NOTES)
