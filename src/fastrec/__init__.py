"""fastrec: compiled implementations of Flower's record API and TFF's metric sampling.

>>> import numpy as np, fastrec
>>> fastrec.array_from_numpy(np.zeros(3)).numpy().tolist()
[0.0, 0.0, 0.0]
"""

from .array import Array, array_from_numpy
from .interop import from_flwr, to_flwr
from .records import ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet
from .sampling import (AggregationProcess, FinalizeThenSampleFactory, MeasuredProcessOutput,
                       TensorSpec, Vectorized, count_non_finite, spec_of, vectorized)

__all__ = [
    # arrays
    "Array", "array_from_numpy",
    # records
    "RecordSet", "ParametersRecord", "MetricsRecord", "ConfigsRecord", "from_flwr", "to_flwr",
    # metric sampling
    "AggregationProcess", "FinalizeThenSampleFactory", "MeasuredProcessOutput", "TensorSpec",
    "Vectorized", "count_non_finite", "spec_of", "vectorized",
]
__version__ = "0.1.0"
