# Typing stub for the compiled fastrec._records module (src/fastrec/_records.pyx).
#
# Mirrors Flower 1.15's annotations (flwr/common/record/*.py, flwr/common/typing.py) for the same
# classes, widened only where the runtime is wider than Flower's hints: constructors take any
# ``Mapping`` (Flower: ``dict``; ParametersRecord: ``OrderedDict``), and a ``MutableMapping``
# when ``keep_input`` is false, since the input's entries are then deleted. The ``_``-prefixed
# aliases exist only for type checkers; Flower's public names for them are
# ``flwr.common.MetricsRecordValues`` etc.
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, MutableMapping, ValuesView
from types import GenericAlias
from typing import Any, ClassVar, Generic, Literal, TypeVar, Union, overload

from typing_extensions import TypeAlias, disjoint_base

from ._array import Array

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")

_MetricsScalar: TypeAlias = Union[int, float]
_MetricsScalarList: TypeAlias = Union[list[int], list[float]]
_MetricsRecordValues: TypeAlias = Union[_MetricsScalar, _MetricsScalarList]
_ConfigsScalar: TypeAlias = Union[_MetricsScalar, str, bytes, bool]
_ConfigsScalarList: TypeAlias = Union[_MetricsScalarList, list[str], list[bytes], list[bool]]
_ConfigsRecordValues: TypeAlias = Union[_ConfigsScalar, _ConfigsScalarList]

@disjoint_base
class TypedDict(MutableMapping[_K, _V], Generic[_K, _V]):
    # The extension type defines every MutableMapping method itself, with the mixin semantics;
    # popitem, clear and update keep the MutableMapping typing (same signatures), get, pop and
    # setdefault are restated because they also take their arguments by keyword.
    __hash__: ClassVar[None]  # type: ignore[assignment]
    __reversed__: ClassVar[None]
    def __class_getitem__(cls, params: Any) -> GenericAlias: ...
    def __init__(
        self, check_key_fn: Callable[[_K], object], check_value_fn: Callable[[_V], object]
    ) -> None: ...
    def __setitem__(self, key: _K, value: _V, /) -> None: ...
    def __getitem__(self, key: _K, /) -> _V: ...
    def __delitem__(self, key: _K, /) -> None: ...
    def __iter__(self) -> Iterator[_K]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def keys(self) -> KeysView[_K]: ...
    def values(self) -> ValuesView[_V]: ...
    def items(self) -> ItemsView[_K, _V]: ...
    @overload
    def get(self, key: _K, default: None = None) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _V) -> _V: ...
    @overload
    def get(self, key: _K, default: _T) -> _V | _T: ...
    @overload
    def pop(self, key: _K) -> _V: ...
    @overload
    def pop(self, key: _K, default: _V) -> _V: ...
    @overload
    def pop(self, key: _K, default: _T) -> _V | _T: ...
    @overload
    def setdefault(self: TypedDict[_K, _T | None], key: _K, default: None = None) -> _T | None: ...
    @overload
    def setdefault(self, key: _K, default: _V) -> _V: ...

class MetricsRecord(TypedDict[str, _MetricsRecordValues]):
    @overload
    def __init__(
        self,
        metrics_dict: Mapping[str, _MetricsRecordValues] | None = None,
        keep_input: Literal[True] = True,
    ) -> None: ...
    @overload
    def __init__(
        self,
        metrics_dict: MutableMapping[str, _MetricsRecordValues] | None = None,
        keep_input: bool = True,
    ) -> None: ...
    def count_bytes(self) -> int: ...

class ConfigsRecord(TypedDict[str, _ConfigsRecordValues]):
    @overload
    def __init__(
        self,
        configs_dict: Mapping[str, _ConfigsRecordValues] | None = None,
        keep_input: Literal[True] = True,
    ) -> None: ...
    @overload
    def __init__(
        self,
        configs_dict: MutableMapping[str, _ConfigsRecordValues] | None = None,
        keep_input: bool = True,
    ) -> None: ...
    def count_bytes(self) -> int: ...

class ParametersRecord(TypedDict[str, Array]):
    # keep_input defaults to False here (as in Flower): the input is emptied unless told not to.
    @overload
    def __init__(
        self, array_dict: Mapping[str, Array] | None, keep_input: Literal[True]
    ) -> None: ...
    @overload
    def __init__(
        self, array_dict: Mapping[str, Array] | None = None, *, keep_input: Literal[True]
    ) -> None: ...
    @overload
    def __init__(
        self, array_dict: MutableMapping[str, Array] | None = None, keep_input: bool = False
    ) -> None: ...
    def count_bytes(self) -> int: ...

@disjoint_base
class RecordSet:
    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __init__(
        self,
        parameters_records: Mapping[str, ParametersRecord] | None = None,
        metrics_records: Mapping[str, MetricsRecord] | None = None,
        configs_records: Mapping[str, ConfigsRecord] | None = None,
    ) -> None: ...
    @property
    def parameters_records(self) -> TypedDict[str, ParametersRecord]: ...
    @property
    def metrics_records(self) -> TypedDict[str, MetricsRecord]: ...
    @property
    def configs_records(self) -> TypedDict[str, ConfigsRecord]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
