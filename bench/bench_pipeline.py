"""End to end: 10,000 serialized client Messages -> one round's sample and measurements.

Flower's route: protobuf ``ParseFromString`` + ``serde.message_from_proto`` per reply, then the
plain NumPy finalize-then-sample of bench/bench_sampling.py. fastrec's: ``metrics_columns``
(bytes straight into columns) + ``next_columnar``; and, for reference, the per-record route
(``message_from_bytes`` + ``next``).

Run: python bench/bench_pipeline.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import compare, table  # noqa: E402
from bench_sampling import (FINALIZERS, SAMPLE, SPEC, NumpyFinalizeThenSample,  # noqa: E402
                            make_clients)

from flwr.common import serde  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402

import fastrec  # noqa: E402
from fastrec import wire  # noqa: E402

N = 10_000


def client_messages(n: int = N) -> list:
    """Each client's reply: a Message whose content holds MetricsRecord "eval" (serialized)."""
    out = []
    for i, c in enumerate(make_clients(n)):
        rs = fastrec.RecordSet(metrics_records={"eval": fastrec.MetricsRecord(c)})
        md = {"run_id": 1, "message_id": f"m{i}", "src_node_id": 1000 + i, "dst_node_id": 0,
              "group_id": "1", "ttl": 3600.0, "message_type": "evaluate", "created_at": 1.0}
        out.append(wire.message_to_bytes(md, rs))
    return out


def rows() -> list:
    bufs = client_messages()

    def flwr_records():
        out = []
        for b in bufs:
            proto = ProtoMessage()
            proto.ParseFromString(b)
            out.append(serde.message_from_proto(proto).content.metrics_records["eval"])
        return out

    base = NumpyFinalizeThenSample(FINALIZERS, SAMPLE)
    b_state = base.next(base.initialize(), flwr_records())[0]

    # FINALIZERS over columns: "loss" is an (n, 2) column of [sum, count] rows.
    vec = {"accuracy": fastrec.vectorized(lambda col: col),
           "loss": fastrec.vectorized(lambda col: col[:, 0] / col[:, 1]),
           "num_examples": fastrec.vectorized(lambda col: col)}
    proc = fastrec.FinalizeThenSampleFactory(SAMPLE, seed=0).create(vec, SPEC)
    f_state = proc.next_columnar(proc.initialize(),
                                 wire.metrics_columns(bufs, "eval", SPEC, wire="message")).state
    rec_proc = fastrec.FinalizeThenSampleFactory(SAMPLE, seed=0).create(FINALIZERS, SPEC)
    r_state = rec_proc.next(rec_proc.initialize(),
                            [wire.message_from_bytes(b)[1].metrics_records["eval"]
                             for b in bufs]).state

    def flwr_round():
        return base.next(b_state, flwr_records())

    def columnar_round():
        return proc.next_columnar(f_state, wire.metrics_columns(bufs, "eval", SPEC,
                                                                wire="message"))

    def per_record_round():
        return rec_proc.next(r_state, [wire.message_from_bytes(b)[1].metrics_records["eval"]
                                       for b in bufs])

    # Same measurements (non-finite counts) on every route before timing.
    assert flwr_round()[2] == columnar_round().measurements == per_record_round().measurements
    case = f"{N:,} serialized client Messages → one round's sample (k={SAMPLE})"
    return [
        compare(f"{case}: metrics_columns + next_columnar",
                "flwr parse + message_from_proto + NumPy sampler", flwr_round, columnar_round,
                "≥ 100×", repeats=5),
        compare(f"{case}: message_from_bytes + next (per record)",
                "flwr parse + message_from_proto + NumPy sampler", flwr_round, per_record_round,
                "(info)", repeats=5),
    ]


def run() -> list:
    return rows()


NOTES = """
Each reply is a Flower 1.15 `Message` (metadata plus a RecordSet holding MetricsRecord "eval":
accuracy, a `[sum, count]` loss pair as a shape-(2,) spec, an example count; 1% NaN losses),
serialized as Flower's serde writes it. The NumPy sampler is bench/bench_sampling.py's baseline (Python finalizers per
client); the columnar route uses the same finalizers vectorized.
"""


if __name__ == "__main__":
    print(table(run()))
    print(NOTES)
