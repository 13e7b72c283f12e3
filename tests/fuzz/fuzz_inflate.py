"""atheris target: fastrec.app's inflate on arbitrary bytes only ever raises ValueError/TypeError.

Run: python tests/fuzz/fuzz_inflate.py  (needs `pip install atheris`).
"""

import sys

from fastrec import app

_CLASSES = (app.MetricRecord, app.ConfigRecord, app.Array, app.ArrayRecord, app.RecordDict,
            app.ArrayChunk)
_NAMES = [b"MetricRecord", b"ConfigRecord", b"Array", b"ArrayRecord", b"RecordDict",
          b"ArrayChunk"]


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    # Half the inputs get a well-formed header so the fuzzer reaches the bodies.
    pick = data[0] % (2 * len(_NAMES))
    body = data[1:]
    if pick < len(_NAMES):
        content = b"%s  %d\x00" % (_NAMES[pick], len(body)) + body
    else:
        content = body
    for cls in _CLASSES:
        try:
            cls.inflate(content)
        except (ValueError, TypeError):
            pass
    try:
        app.inflate(content)
    except (ValueError, TypeError):
        pass


def main() -> None:
    import atheris
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
