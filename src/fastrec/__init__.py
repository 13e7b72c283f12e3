"""fastrec: compiled implementations of Flower's record API and TFF's metric sampling."""

from .array import Array, array_from_numpy
from .interop import from_flwr, to_flwr
from .records import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet

__all__ = ["Array", "array_from_numpy"]
__all__ += ["RecordSet", "ParametersRecord", "MetricsRecord", "ConfigsRecord", "from_flwr", "to_flwr"]
__version__ = "0.1.0"
