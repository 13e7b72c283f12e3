"""atheris target: every fastrec.wire decoder on arbitrary bytes only ever raises ValueError.

Run: python tests/fuzz/fuzz_wire.py  (needs `pip install atheris`).
"""

import sys

from fastrec import TensorSpec, wire

_DECODERS = (wire.array_from_bytes, wire.parameters_record_from_bytes,
             wire.metrics_record_from_bytes, wire.configs_record_from_bytes,
             wire.recordset_from_bytes, wire.message_from_bytes)
_SPEC = {"a": TensorSpec("float32"), "h": TensorSpec("int64", (2,)),
         "p": [TensorSpec("float64"), TensorSpec("uint8")]}


def TestOneInput(data: bytes) -> None:
    for decode in _DECODERS:
        try:
            decode(data)
        except ValueError:
            pass
    for kind in ("recordset", "message"):
        try:
            wire.metrics_columns([data, data], "m", _SPEC, wire=kind)
        except ValueError:
            pass


def main() -> None:
    import atheris
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
