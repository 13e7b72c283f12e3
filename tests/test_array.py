import numpy as np

import fastrec


def test_roundtrip_smoke():
    a = np.arange(6.0).reshape(2, 3)
    arr = fastrec.array_from_numpy(a)
    assert arr.dtype == "float64" and arr.shape == [2, 3]
    np.testing.assert_array_equal(arr.numpy(), a)
