# Typing stub for the compiled fastrec._array module.
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

class Array:
    __match_args__: ClassVar[tuple[str, str, str, str]]
    dtype: str
    shape: list[int]
    stype: str
    data: bytes
    def __init__(self, dtype: str, shape: list[int], stype: str, data: bytes) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def numpy(self, *, copy: bool = True) -> npt.NDArray[Any]: ...

def array_from_numpy(ndarray: np.ndarray[Any, Any]) -> Array: ...
