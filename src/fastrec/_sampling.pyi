# Typing stub for the compiled fastrec._sampling module (src/fastrec/_sampling.pyx), the core
# behind fastrec.sampling. Finalized metric values are arbitrary user structures (numbers,
# arrays, and lists/tuples/mappings of them), hence the ``Any`` in those places.
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

_E = TypeVar("_E", bound=BaseException)
_ScalarT = TypeVar("_ScalarT", bound=np.generic)

def count_non_finite(a: npt.NDArray[Any]) -> int: ...
def count_non_finite_rows(a: npt.NDArray[Any]) -> int: ...
def map_leaves(fn: Callable[[Any], Any], template: Any) -> Any: ...

@disjoint_base
class CompiledSpec:
    # A leaf has dtype and shape (children is None); a struct has children (dtype and shape
    # are None).
    @property
    def dtype(self) -> np.dtype[Any] | None: ...
    @property
    def shape(self) -> tuple[int | None, ...] | None: ...
    @property
    def children(self) -> list[CompiledSpec] | None: ...
    @staticmethod
    def leaf(dtype: npt.DTypeLike, shape: tuple[int | None, ...]) -> CompiledSpec: ...
    @staticmethod
    def struct(container: Callable[[list[Any]], Any], children: list[CompiledSpec]) -> CompiledSpec: ...

def with_context(e: _E, prefix: str) -> _E | TypeError | ValueError: ...
def convert_value(s: CompiledSpec, v: object) -> Any: ...
def finalize_clients(
    clients: Sequence[Mapping[str, Any]],
    names: tuple[str, ...],
    specs: tuple[CompiledSpec, ...],
    finalizers: tuple[Callable[[Any], Any], ...] | None,
    functional: Callable[[dict[str, Any]], Mapping[str, Any]] | None,
    positions: npt.NDArray[np.int64],
    nsample: int,
    offset: int = ...,
) -> tuple[list[str], list[list[Any]], list[Any]]: ...
def client_keys(seed0: int, seed1: int, round: int, offset: int, n: int) -> npt.NDArray[np.uint64]: ...
def round_sample(
    seed0: int, seed1: int, round: int, offset: int, n: int, k: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def select_top(
    keys: npt.NDArray[Any], rounds: npt.NDArray[Any], indices: npt.NDArray[Any], k: int
) -> npt.NDArray[np.int64]: ...
def gather_rows(a: npt.NDArray[_ScalarT], positions: npt.NDArray[Any]) -> npt.NDArray[_ScalarT]: ...
