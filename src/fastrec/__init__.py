"""fastrec: compiled implementations of Flower's record API and TFF's metric sampling."""

from .array import Array, array_from_numpy
from .sampling import (AggregationProcess, FinalizeThenSampleFactory, MeasuredProcessOutput,
                       TensorSpec, Vectorized, count_non_finite, spec_of, vectorized)

__all__ = ["Array", "array_from_numpy"]
__all__ += ["AggregationProcess", "FinalizeThenSampleFactory", "MeasuredProcessOutput", "TensorSpec",
            "Vectorized", "count_non_finite", "spec_of", "vectorized"]
__version__ = "0.1.0"
