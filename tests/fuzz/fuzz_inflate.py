"""Fuzz harness: hostile object content to fastrec.app's inflate (Flower 1.42's object format).

Contract: every class's ``inflate`` either raises ``ValueError``/``TypeError`` with a message,
or returns an object whose ``deflate()`` is a fixpoint (inflating it again deflates to the same
bytes), so what was accepted is what Flower's format says it is.
"""

import sys

from fastrec import app

_CLASSES = (app.MetricRecord, app.ConfigRecord, app.Array, app.ArrayRecord, app.RecordDict,
            app.ArrayChunk)
_NAMES = [b"MetricRecord", b"ConfigRecord", b"Array", b"ArrayRecord", b"RecordDict",
          b"ArrayChunk"]


def _check(cls, content):
    try:
        obj = cls.inflate(content)
    except (ValueError, TypeError) as exc:
        assert str(exc), f"{cls.__name__}.inflate raised {type(exc).__name__} without a message"
        return
    again = obj.deflate()
    assert type(cls.inflate(again, obj.children)).__name__ == cls.__name__
    assert cls.inflate(again, obj.children).deflate() == again, "deflate is not a fixpoint"


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    # Half the inputs get a well-formed header, so that the fuzzer reaches the bodies.
    pick = data[0] % (2 * len(_NAMES))
    body = data[1:]
    if pick < len(_NAMES):
        content = b"%s  %d\x00" % (_NAMES[pick], len(body)) + body
    else:
        content = body
    for cls in _CLASSES:
        _check(cls, content)
    try:
        app.inflate(content)
    except (ValueError, TypeError) as exc:
        assert str(exc)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        with open(name, "rb") as f:
            TestOneInput(f.read())
