# Typing stub for the compiled fastrec._app module (src/fastrec/_app.pyx): Flower 1.42's
# flwr.app record classes and their object wire format.
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar, Optional, TypeVar, Union

import numpy as np
from typing_extensions import Self, TypeAlias

from ._array import Array as _Array15
from ._records import TypedDict

_T = TypeVar("_T")
MetricScalar: TypeAlias = Union[int, float]
MetricRecordValues: TypeAlias = Union[int, float, list[int], list[float]]
ConfigRecordValues: TypeAlias = Union[int, float, str, bytes, bool, list[int], list[float],
                                      list[str], list[bytes], list[bool]]

MAX_ARRAY_CHUNK_SIZE: int

class _Inflatable:
    def deflate(self) -> bytes: ...
    @classmethod
    def inflate(cls, object_content: bytes,
                children: Optional[Mapping[str, Any]] = None) -> Self: ...
    @property
    def object_id(self) -> str: ...
    @property
    def children(self) -> Optional[dict[str, Any]]: ...
    @property
    def is_dirty(self) -> bool: ...

class ArrayChunk(_Inflatable):
    data: memoryview
    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __init__(self, data: memoryview) -> None: ...

class Array(_Array15, _Inflatable):  # type: ignore[misc]
    shape: tuple[int, ...]  # type: ignore[assignment]
    def __init__(self, *args: Any, dtype: Optional[str] = None,
                 shape: Optional[tuple[int, ...]] = None, stype: Optional[str] = None,
                 data: Optional[bytes] = None, ndarray: Optional[np.ndarray] = None,
                 torch_tensor: Any = None) -> None: ...
    @classmethod
    def from_numpy_ndarray(cls, ndarray: np.ndarray) -> Array: ...
    @classmethod
    def from_torch_tensor(cls, tensor: Any) -> Array: ...
    def slice_array(self) -> list[tuple[str, ArrayChunk]]: ...
    @property
    def is_dirty(self) -> bool: ...
    @is_dirty.setter
    def is_dirty(self, value: bool) -> None: ...

class _AppDict(TypedDict[str, _T]):
    def copy(self) -> Self: ...

class _ValueRecord(_AppDict[_T], _Inflatable):
    def count_bytes(self) -> int: ...

class MetricRecord(_ValueRecord[MetricRecordValues]):
    def __init__(self, metric_dict: Optional[MutableMapping[str, MetricRecordValues]] = None,
                 keep_input: bool = True) -> None: ...

class ConfigRecord(_ValueRecord[ConfigRecordValues]):
    def __init__(self, config_dict: Optional[MutableMapping[str, ConfigRecordValues]] = None,
                 keep_input: bool = True) -> None: ...

class ArrayRecord(_AppDict[Array], _Inflatable):
    def __init__(self, *args: Any, numpy_ndarrays: Optional[list[np.ndarray]] = None,
                 torch_state_dict: Optional[Mapping[str, Any]] = None,
                 array_dict: Optional[Mapping[str, Array]] = None,
                 keep_input: bool = True) -> None: ...
    @classmethod
    def from_array_dict(cls, array_dict: MutableMapping[str, Array], *,
                        keep_input: bool = True) -> ArrayRecord: ...
    @classmethod
    def from_numpy_ndarrays(cls, ndarrays: list[np.ndarray], *,
                            keep_input: bool = True) -> ArrayRecord: ...
    @classmethod
    def from_torch_state_dict(cls, state_dict: MutableMapping[str, Any], *,
                              keep_input: bool = True) -> ArrayRecord: ...
    def to_numpy_ndarrays(self, *, keep_input: bool = True) -> list[np.ndarray]: ...
    def to_torch_state_dict(self, *, keep_input: bool = True) -> OrderedDict[str, Any]: ...
    def count_bytes(self) -> int: ...
    @property
    def is_dirty(self) -> bool: ...
    @is_dirty.setter
    def is_dirty(self, value: bool) -> None: ...

_RecordType: TypeAlias = Union[ArrayRecord, MetricRecord, ConfigRecord]

class RecordDict(_AppDict[_RecordType], _Inflatable):
    def __init__(self, records: Optional[Mapping[str, _RecordType]] = None, *,
                 parameters_records: Optional[Mapping[str, ArrayRecord]] = None,
                 metrics_records: Optional[Mapping[str, MetricRecord]] = None,
                 configs_records: Optional[Mapping[str, ConfigRecord]] = None) -> None: ...
    @property
    def array_records(self) -> _AppDict[ArrayRecord]: ...
    @property
    def metric_records(self) -> _AppDict[MetricRecord]: ...
    @property
    def config_records(self) -> _AppDict[ConfigRecord]: ...
    @property
    def parameters_records(self) -> _AppDict[ArrayRecord]: ...
    @property
    def metrics_records(self) -> _AppDict[MetricRecord]: ...
    @property
    def configs_records(self) -> _AppDict[ConfigRecord]: ...

def inflate(object_content: bytes, children: Optional[Mapping[str, Any]] = None) -> Any: ...
