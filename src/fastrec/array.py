"""Flower-compatible arrays: :class:`Array` and :func:`array_from_numpy`.

Drop-in replacements for ``flwr.common.Array`` and ``flwr.common.array_from_numpy``
(Flower 1.15). ``data`` holds ``.npy`` bytes, byte-identical to what
``numpy.save(..., allow_pickle=False)`` writes, so Flower reads fastrec's arrays and
fastrec reads Flower's. The ``.npy`` header encoder/parser and the data copies are C
(``csrc/npy.c``).

>>> import numpy as np
>>> from fastrec.array import array_from_numpy
>>> arr = array_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
>>> arr.dtype, arr.shape, arr.stype
('float32', [2, 3], 'numpy.ndarray')
>>> arr.numpy()
array([[0., 1., 2.],
       [3., 4., 5.]], dtype=float32)

Differences from ``numpy.load`` on untrusted bytes (everything else agrees):

* data longer than the header's shape needs raises ``ValueError`` (numpy ignores
  the trailing bytes);
* a few exotic Python-literal spellings inside the header that no writer produces
  raise ``ValueError``: escape sequences or triple quotes in the keys, and a
  subarray descr such as ``('<f4', (2,))`` (numpy only loads that one when the
  array is empty, with extra axes);
* a repeated key's overridden value is only checked to be one literal-looking
  value (balanced brackets, closed strings, no bare names but ``True``/``False``/
  ``None``), not parsed as Python: e.g. ``'shape': 1 2, 'shape': (3,)`` loads here
  while ``literal_eval`` refuses it.
"""

from ._array import Array, array_from_numpy

__all__ = ["Array", "array_from_numpy"]
