# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled core of :mod:`fastrec.sampling`.

The C kernels (csrc/keys.c, reservoir.c, nonfinite.c) do the numeric work;
this module converts Python values around them: it checks every client's
unfinalized metrics against the compiled spec, calls the finalizers, counts
non-finite finalized leaves and keeps only the sampled clients' values.
A client's numbers and lists are written straight into numpy scalars and
arrays of the spec's dtypes (the previous client's, when nothing kept
them), and finalized scalars are read off their structs.
"""

from collections import OrderedDict
from collections.abc import Mapping

import os

import numpy as np

cimport cython
cimport numpy as cnp
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.object cimport PyObject_Hash
from cpython.unicode cimport PyUnicode_Compare
from cpython.list cimport PyList_AsTuple, PyList_Check
from cpython.tuple cimport PyTuple_Check
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.complex cimport PyComplex_Check
from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport INT64_MAX, int8_t, int16_t, int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from fastrec._kernels cimport (
    FR_FT_COMPLEX64, FR_FT_COMPLEX128, FR_FT_FLOAT16, FR_FT_FLOAT32, FR_FT_FLOAT64,
    fr_client_keys, fr_count_nonfinite, fr_entry, fr_ftype, fr_gather_rows, fr_reservoir,
    fr_reservoir_draw, fr_round_sample, fr_round_stream, fr_select_top, fr_sort_arrival)
from cpython.pythread cimport (
    WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock, PyThread_release_lock,
    PyThread_start_new_thread, PyThread_type_lock)

cdef extern from "pythread.h":
    # Cython's declaration omits nogil; CPython's locks need no thread state to be freed.
    void PyThread_free_lock(PyThread_type_lock) nogil
from fastrec._records cimport TypedDict as _TypedDict, unseal_record
from fastrec._status cimport FR_ERR_NOMEM, FR_ERR_TYPE, FR_OK, fr_status, fr_status_name

cnp.import_array()

cdef extern from "Python.h":
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL
    object PyObject_Vectorcall(object callable, PyObject **args, size_t nargsf, PyObject *kw)
    ctypedef PyObject *(*vectorcallfunc)(PyObject *, PyObject **, size_t, PyObject *)
    vectorcallfunc PyVectorcall_Function(object callable)
    bint PyFunction_Check(object o)

cdef extern from *:
    """
    /* One positional argument through a vectorcall entry point read once per round: for a
       Python function this skips PyObject_Vectorcall's lookup of the entry point and its
       result check, which CPython's own bytecode calls skip too. */
    static PyObject *fastrec_vcall1(vectorcallfunc f, PyObject *callable, PyObject *arg) {
        PyObject *args[1];
        args[0] = arg;
        return f(callable, args, 1, NULL);
    }
    """
    object _vcall1 "fastrec_vcall1"(vectorcallfunc f, PyObject *callable, PyObject *arg)
    ctypedef struct PyTypeObject:
        pass
    PyTypeObject PyFloat_Type
    PyTypeObject PyLong_Type
    PyTypeObject PyUnicode_Type
    PyTypeObject PyList_Type
    PyTypeObject *_TYPE "Py_TYPE"(PyObject *) nogil
    # An instance check on the real type (isinstance asks a __class__ property too).
    bint _type_check "PyObject_TypeCheck"(object o, PyTypeObject *type)
    # Borrowed pointers, compared by address only (cpython.list's versions return objects).
    Py_ssize_t PyList_GET_SIZE(object) nogil
    PyObject *PyList_GET_ITEM(object, Py_ssize_t) nogil
    Py_ssize_t PyTuple_GET_SIZE(object) nogil
    PyObject *PyTuple_GET_ITEM(object, Py_ssize_t) nogil


cdef extern from "_client_step.h":
    float _narrow "fc_narrow"(double x) noexcept nogil
    bint _float_bad "fc_float_bad"(float x) noexcept nogil
    bint _double_bad "fc_double_bad"(double x) noexcept nogil
    enum:
        FC_OFF
        FC_SCALAR
        FC_ARRAY
        FC_STORE_NONE
        FC_STORE_F32
        FC_STORE_F64
        FC_STORE_INT
        FC_RES_OTHER
        FC_RES_F32
        FC_RES_F64
        FC_RES_UNCOUNTED
        FC_STAGE_CONVERT
        FC_STAGE_FINALIZE
        FC_STAGE_MEASURE
    ctypedef struct fc_conv:
        int kind
        int store
        int typenum
        int itemsize
        int64_t lo, hi
        PyTypeObject *scalar_type
        int ndim
        cnp.npy_intp dims[8]
        PyObject *spare
    ctypedef int (*fc_add_fn)(PyObject *acc, PyObject *result, int64_t slot) except -1
    ctypedef struct fc_step:
        PyObject *name
        fc_conv *conv
        PyObject *fin
        vectorcallfunc call
        int res
        PyTypeObject *res_type
        int64_t *count
        PyObject *acc
    object fc_convert_obj(fc_conv *conv, PyObject *v)
    int fc_client(PyObject *cv, Py_ssize_t m, const fc_step *steps, PyObject **vals,
                  int64_t slot, fc_add_fn add, PyObject **failed, int *stage) except -1


# Arrays at least this large are counted with the GIL released; below it
# the release/re-acquire would cost more than the count.
cdef int64_t _NOGIL_MIN_ELEMS = 1 << 14


cdef int _check(fr_status s, str what) except -1:
    if s == FR_OK:
        return 0
    msg = f"{what}: {fr_status_name(s).decode()}"
    if s == FR_ERR_TYPE:
        raise TypeError(msg)
    if s == FR_ERR_NOMEM:
        raise MemoryError(msg)
    raise ValueError(msg)


# ----------------------------------------------------------------------------------------------
# Non-finite counting
# ----------------------------------------------------------------------------------------------

cdef int _ftype_of(object dt) except -1:
    """The kernel's element type for a float/complex dtype, 0 if it has none (long double)."""
    cdef Py_ssize_t size = dt.itemsize
    if dt.kind == "f":
        if size == 2:
            return FR_FT_FLOAT16
        if size == 4:
            return FR_FT_FLOAT32
        if size == 8:
            return FR_FT_FLOAT64
    elif dt.kind == "c":
        if size == 8:
            return FR_FT_COMPLEX64
        if size == 16:
            return FR_FT_COMPLEX128
    return 0


cdef int64_t _count_array(cnp.ndarray a, bint per_row) except -1:
    """Non-finite elements of ``a`` (or, per_row, rows of axis 0 holding any)."""
    # The dtype comes from the array struct, like the shape, strides and data the kernel
    # reads: an ndarray subclass can override the ``dtype`` attribute (and ``astype``).
    cdef object dt = a.descr   # numpy.pxd: PyArray_DESCR, not the Python attribute
    kind = dt.kind
    if kind in "biu":
        return 0
    if kind not in "fc":
        raise TypeError(f"dtype {dt} is not numeric")
    if not dt.isnative:
        # The bit tests read native-order words; a byte-swapped copy is rare enough to afford.
        a = np.asarray(a).astype(dt.newbyteorder("="))
        dt = a.descr
    cdef int ft = _ftype_of(dt)
    if ft == 0:
        # long double has no portable bit layout: let numpy decide.
        bad = ~np.isfinite(a)
        if per_row:
            return int(np.count_nonzero(bad.reshape(a.shape[0], -1).any(axis=1)))
        return int(np.count_nonzero(bad))
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int64_t shape[64]
    cdef int64_t strides[64]
    cdef int d
    cdef int64_t out = 0
    cdef int64_t size = cnp.PyArray_SIZE(a)
    cdef const char *data = <const char *>cnp.PyArray_DATA(a)
    cdef fr_status st
    if not per_row and cnp.PyArray_IS_C_CONTIGUOUS(a):
        ndim = 1
        shape[0] = size
        strides[0] = dt.itemsize
    elif not per_row:
        # Innermost axis = smallest stride, so the kernel's 1-d runs are as dense as possible.
        order = sorted(range(ndim), key=lambda ax: -abs(a.strides[ax]))
        for d in range(ndim):
            shape[d] = a.shape[order[d]]
            strides[d] = a.strides[order[d]]
    else:
        for d in range(ndim):
            shape[d] = a.shape[d]
            strides[d] = a.strides[d]
    if size >= _NOGIL_MIN_ELEMS:
        with nogil:
            st = fr_count_nonfinite(data, <fr_ftype>ft, ndim, shape, strides, per_row, &out)
    else:
        st = fr_count_nonfinite(data, <fr_ftype>ft, ndim, shape, strides, per_row, &out)
    _check(st, "count_non_finite")
    return out


def count_non_finite(a):
    """Number of NaN/±Inf elements of the ndarray ``a`` (see fastrec.count_non_finite)."""
    # PyArray_Check, not isinstance: isinstance honours a __class__ property, and the
    # kernel reads the array struct's fields.
    if not cnp.PyArray_Check(a):
        raise TypeError(f"count_non_finite expects a numpy.ndarray, got {type(a).__name__}")
    return _count_array(<cnp.ndarray>a, False)


def count_non_finite_rows(a):
    """Number of indices along axis 0 whose sub-array holds any NaN/±Inf."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"expected a numpy.ndarray, got {type(a).__name__}")
    if (<cnp.ndarray>a).ndim == 0:
        raise ValueError("expected an array with a leading client axis, got a 0-d array")
    return _count_array(<cnp.ndarray>a, True)



# ----------------------------------------------------------------------------------------------
# Bounded walks and exception notes
# ----------------------------------------------------------------------------------------------

# Every recursive walk over a user structure stops here: Cython functions do not check
# Python's recursion limit, so an unbounded walk of a cyclic or 100k-deep value would
# overflow the C stack. Metric structures are a few levels deep.
MAX_DEPTH = 64
cdef int _MAX_DEPTH = MAX_DEPTH


cdef int _check_depth(int depth, str what) except -1:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_DEPTH} levels (a cyclic value?)")
    return 0


def add_note(BaseException e, str note):
    """``e.add_note(note)``; before Python 3.11 (no add_note) the note is appended to
    ``e.__notes__`` by hand, which the exceptiongroup backport and pytest display."""
    adder = getattr(e, "add_note", None)
    if adder is not None:
        adder(note)
        return
    try:
        notes = getattr(e, "__notes__", None)
        e.__notes__ = (list(notes) if isinstance(notes, list) else []) + [note]
    except Exception:   # an exception type without an instance dict: keep it as it is
        pass


def map_leaves(fn, template, int _depth=0):
    """``template``'s list/tuple/mapping structure with every leaf ``x`` replaced by fn(x)."""
    _check_depth(_depth, "value")
    if isinstance(template, (list, tuple)):
        items = [map_leaves(fn, x, _depth + 1) for x in template]
        return tuple(items) if type(template) is tuple else items
    if isinstance(template, Mapping) and not cnp.PyArray_Check(template):
        return {k: map_leaves(fn, template[k], _depth + 1) for k in template}
    return fn(template)


cdef str _describe(object v):
    try:
        r = repr(v)
    except Exception:
        r = "<unprintable>"
    if len(r) > 40:
        r = r[:37] + "..."
    return f"{type(v).__name__} {r}"


def with_context(e, str prefix):
    """A new exception of ``e``'s type (or its TypeError/ValueError base, if that type can't
    be built from a message) reading "prefix: message"."""
    msg = f"{prefix}: {e}"
    try:
        return type(e)(msg)
    except Exception:
        return (TypeError if isinstance(e, TypeError) else ValueError)(msg)


cdef dict _read_mapping(object v):
    """A private dict of the mapping ``v``, read once (keys, then one lookup each); a key
    yielded twice is a ValueError."""
    cdef dict d
    if type(v) is dict:
        return <dict>v
    d = {}
    for key in v:
        if key in d:
            raise ValueError(f"mapping yields the key {key!r} twice")
        d[key] = v[key]
    return d


# ----------------------------------------------------------------------------------------------
# Dtypes: what each kind of value may be cast to
# ----------------------------------------------------------------------------------------------

cdef enum:
    K_BOOL = 1
    K_INT = 2
    K_FLOAT = 3
    K_COMPLEX = 4

# Value kinds (numpy dtype.kind letters) each unfinalized spec kind accepts; bool is not a
# number here, as in TFF, so it only matches a bool spec.
_ACCEPTS = {K_BOOL: "b", K_INT: "iu", K_FLOAT: "iuf", K_COMPLEX: "iufc"}
# Finalized leaves are cast to the dtype the probe returned: any number widens or narrows
# within its family, bool counts as an integer.
_FINAL_ACCEPTS = {K_BOOL: "b", K_INT: "biu", K_FLOAT: "biuf", K_COMPLEX: "biufc"}
_KIND = {"b": K_BOOL, "i": K_INT, "u": K_INT, "f": K_FLOAT, "c": K_COMPLEX}


cdef extern from "numpy/arrayscalars.h":
    ctypedef struct PyFloatScalarObject:
        float obval
    ctypedef struct PyDoubleScalarObject:
        double obval

cdef class _DType:
    """A numeric dtype, pre-digested for the per-value checks."""
    cdef readonly object dtype
    cdef cnp.dtype descr
    cdef object scalar_type
    cdef int kind
    cdef int ftype
    cdef Py_ssize_t itemsize
    cdef object lo, hi
    cdef str accepts
    cdef int typenum
    cdef bint c_int_range   # lo/hi fit int64: range checks in C (all but uint64)
    cdef int64_t clo, chi
    # How fc_convert stores a Python number into a scalar of this dtype (FC_STORE_NONE:
    # through NumPy; bool is one, its scalars being two singletons, never new objects).
    cdef int store

    def __cinit__(self, dtype, str accepts_table="spec"):
        dt = np.dtype(dtype)
        if not dt.isnative:
            dt = dt.newbyteorder("=")
        if dt.kind not in "biufc":
            raise TypeError(f"dtype {dt} is not numeric (bool, int, float, complex)")
        self.dtype = dt
        self.descr = <cnp.dtype>dt
        self.scalar_type = dt.type
        self.kind = _KIND[dt.kind]
        self.ftype = _ftype_of(dt)
        self.itemsize = dt.itemsize
        self.accepts = (_ACCEPTS if accepts_table == "spec" else _FINAL_ACCEPTS)[self.kind]
        self.typenum = self.descr.type_num
        if dt.kind in "iu":
            info = np.iinfo(dt)
            self.lo, self.hi = int(info.min), int(info.max)
            self.c_int_range = self.hi <= INT64_MAX
            if self.c_int_range:
                self.clo, self.chi = self.lo, self.hi
                self.store = FC_STORE_INT
        elif self.ftype == FR_FT_FLOAT32:
            self.store = FC_STORE_F32
        elif self.ftype == FR_FT_FLOAT64:
            self.store = FC_STORE_F64


cdef object _check_int_range(_DType d, object v):
    """The integer ``v`` (an int or numpy integer, maybe of a subclass) as the exact int it
    stores, if it fits ``d``."""
    iv = _exact_int(v)
    if iv is None:
        raise TypeError(f"expected {d.dtype} values, got {_describe(v)}")
    if iv < d.lo or iv > d.hi:
        raise ValueError(f"{iv} is out of range for {d.dtype}")
    return iv


cdef object _array_in_range(_DType d, object a):
    """``a`` (an integer or bool array) cast to ``d``, if every value fits."""
    if a.dtype != d.dtype and a.size and a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < d.lo or hi > d.hi:
            raise ValueError(f"values in [{lo}, {hi}] are out of range for {d.dtype}")
    return a.astype(d.dtype, copy=False)


cdef object _number_kind(type t):
    """The dtype kind letter of a number type, None if ``t`` is not one. Real types, not
    isinstance, which honours a ``__class__`` property."""
    if t is float:
        return "f"
    if t is int:
        return "i"
    if t is bool or issubclass(t, (bool, np.bool_)):
        return "b"
    if issubclass(t, np.timedelta64):   # a numpy signedinteger, but a duration, not a number
        return None
    if issubclass(t, (int, np.integer)):
        return "i"
    if issubclass(t, (float, np.floating)):
        return "f"
    if issubclass(t, (complex, np.complexfloating)):
        return "c"
    return None


# Numpy's abstract scalar types, for _type_check.
cdef PyTypeObject *_NP_GENERIC = <PyTypeObject *>np.generic
cdef PyTypeObject *_NP_INTEGER = <PyTypeObject *>np.integer
cdef PyTypeObject *_NP_BOOL = <PyTypeObject *>np.bool_


cdef object _stored_scalar(object x):
    """An exact numpy scalar holding the bytes of the numeric numpy scalar ``x`` (of a
    subclass), so that none of the subclass's methods is asked for its value."""
    cdef cnp.dtype descr = cnp.PyArray_DescrFromScalar(x)
    cdef long double buf[2]   # room for the widest number, a clongdouble, and aligned for it
    if descr.kind not in b"biufc" or descr.itemsize > <int>sizeof(buf):
        return x
    cnp.PyArray_ScalarAsCtype(x, buf)
    return PyArray_Scalar(buf, descr, None)


cdef object _stored_number(object x):
    """``x`` as the number it stores: itself if an exact Python number or numpy scalar; for
    a subclass an exact copy of its value, read off the object, not through the methods a
    subclass may override (``__int__``, ``__index__``, ``__float__``, ``__complex__``)."""
    t = type(x)
    if t is float or t is int or t is bool or t is complex:
        return x
    if _type_check(x, _NP_GENERIC):
        return x if t is cnp.PyArray_DescrFromScalar(x).type else _stored_scalar(x)
    if isinstance(x, int):
        return int.__index__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, complex):
        return complex(complex.real.__get__(x), complex.imag.__get__(x))
    return x


cdef object _EMPTY = object()   # _leaf_type of lists holding no numbers


cdef object _leaf_type(object v, int depth):
    """The one type of all the numbers in nested lists/tuples ``v`` (an exact ndarray counts
    as its dtype's scalar type; ``_EMPTY`` if none), or None where they differ, are not all
    exact Python numbers or numpy scalars, or nest past NumPy's 32 dimensions. Only then is
    NumPy's own inference safe to type them: it types bools among ints as ints, ints among
    floats through a double (rounded twice under float32) and a subclass through its
    methods. Read off snapshots by type checks alone: no Python code runs."""
    cdef tuple items
    cdef object found = _EMPTY, t
    if depth > 32:
        return None
    items = PyList_AsTuple(v) if PyList_Check(v) else <tuple?>v
    for x in items:
        t = type(x)
        if t is float or t is int or t is bool or t is complex:
            pass
        elif PyList_Check(x) or PyTuple_Check(x):
            t = _leaf_type(x, depth + 1)
            if t is None:
                return None
            if t is _EMPTY:
                continue
        elif cnp.PyArray_CheckExact(x):
            t = (<cnp.ndarray>x).dtype.type
        elif _type_check(x, _NP_GENERIC) and t is cnp.PyArray_DescrFromScalar(x).type:
            pass
        else:
            return None
        if found is _EMPTY:
            found = t
        elif t is not found:
            return None
    return found


cdef object _from_elements(_DType d, object v):
    """``v`` (nested lists of numbers) as a ``d`` array, cast element by element as a
    number of the spec is (``_to_scalar``): NumPy's own inference types ``[2**63, 1]`` as
    float64 and ``[2**64]`` as object, although under a uint64 or float64 spec each element
    fits, and ``[True, 1]`` as int64, although a bool is not a number here."""
    try:
        obj = np.array(v, dtype=object)
    except (ValueError, TypeError, RuntimeError) as e:   # RuntimeError: > 32 dimensions
        raise ValueError(f"expected a {d.dtype} array, got a value numpy cannot convert "
                         f"({e})") from None
    if obj.ndim > 32:   # NumPy's iterators stop at 32 dimensions
        raise ValueError(f"expected a {d.dtype} array, got lists nested {obj.ndim} deep")
    for x in obj.reshape(-1):
        k = _number_kind(type(x))
        if k is None:
            if isinstance(x, (list, tuple)) or cnp.PyArray_Check(x):
                raise ValueError(f"expected a {d.dtype} array, got a ragged nested list")
            raise TypeError(f"expected {d.dtype} values, got non-numeric {_describe(x)}")
        if k not in d.accepts:
            raise TypeError(f"expected {d.dtype} values, got {_describe(x)}")
    out = np.empty(obj.shape, d.dtype)
    cast = out.reshape(-1)   # a view
    for i, x in enumerate(obj.reshape(-1)):
        cast[i] = _to_scalar(d, x)
    return out


cdef object _as_array(_DType d, object v, tuple shape, bint lists):
    """``v`` as an ndarray of ``d``'s dtype, checked against ``shape`` (None: any size)."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"expected a {d.dtype} array, got non-numeric {_describe(v)}")
    leaf = _leaf_type(v, 0) if lists and (PyList_Check(v) or PyTuple_Check(v)) else _EMPTY
    if cnp.PyArray_CheckExact(v):
        a = v
    elif leaf is None:
        a = _from_elements(d, v)
    else:
        try:
            # ndarray subclasses become plain views: their Python attributes (dtype, shape,
            # astype) may lie about the struct.
            a = np.asarray(v)
        except (OverflowError, ValueError, TypeError, RuntimeError) as e:
            if not lists:
                raise ValueError(f"expected a {d.dtype} array of shape {shape}, got a value "
                                 f"numpy cannot convert ({e})") from None
            a = _from_elements(d, v)
    k = a.dtype.kind
    # Ints NumPy typed as float64 ([2**63, 1]) would be rounded twice under float32.
    if lists and not cnp.PyArray_Check(v) and (k == "O" or (k == "f" and (d.kind == K_INT
                                                                         or leaf is int))):
        a = _from_elements(d, v)
        k = a.dtype.kind
    if k not in "biufc":
        raise TypeError(f"expected a {d.dtype} array, got non-numeric values (dtype {a.dtype})")
    if a.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, a.shape)):
        raise ValueError(f"expected shape {shape}, got shape {a.shape}")
    if a.dtype == d.dtype:
        return a
    if a.size == 0:
        return a.astype(d.dtype)
    if k not in d.accepts:
        raise TypeError(f"expected {d.dtype} values, got dtype {a.dtype}")
    if d.kind == K_INT:
        return _array_in_range(d, a)
    return a.astype(d.dtype)


cdef extern from "numpy/arrayobject.h":
    object PyArray_Scalar(void *data, cnp.dtype descr, object base)


cdef object _to_scalar(_DType d, object v):
    """The ``d`` numpy scalar for the number ``v`` (TFF casts to the spec's dtype): the
    cases fc_convert leaves, and their errors."""
    cdef double x
    t = type(v)
    if t is d.scalar_type:
        return v
    # Every float dtype accepts Python floats and ints, every integer dtype ints: the
    # common case of records and JSON needs no kind lookup.
    if not ((t is float and d.kind == K_FLOAT)
            or (t is int and (d.kind == K_INT or d.kind == K_FLOAT))):
        k = _number_kind(t)
        if k is None:
            if cnp.PyArray_Check(v) or isinstance(v, (list, tuple)):
                return _as_array(d, v, (), True)[()]
            raise TypeError(f"expected a {d.dtype} scalar, got non-numeric {_describe(v)}")
        if k not in d.accepts:
            raise TypeError(f"expected a {d.dtype} scalar, got {_describe(v)}")
        v = _stored_number(v)   # a subclass's value, not what its methods say
    # (fc_convert stored the exact floats and ints it could; here: other numeric types,
    # dtypes it does not store into, and the errors.)
    if d.kind == K_INT:
        return d.scalar_type(_check_int_range(d, v))
    if d.kind == K_FLOAT and type(v) is int:
        # Cast as NumPy casts an int64 or uint64 array, rounded once; past 64 bits as NumPy
        # casts a Python int (through a double, but exactly to a long double).
        if -_TWO_63 <= v < _TWO_63:
            return d.scalar_type(np.int64(v))
        if 0 <= v < _TWO_64:
            return d.scalar_type(np.uint64(v))
        if d.itemsize <= 8:
            try:
                x = v   # int -> double: OverflowError past 1.8e308
            except OverflowError:
                raise ValueError(f"{v} does not fit {d.dtype}") from None
    try:
        return d.scalar_type(v)
    except (OverflowError, ValueError, TypeError) as e:
        raise ValueError(f"{_describe(v)} does not fit {d.dtype} ({e})") from None


# ----------------------------------------------------------------------------------------------
# Unfinalized metric specs and client value conversion
# ----------------------------------------------------------------------------------------------

cdef enum:
    T_SCALAR = 1
    T_ARRAY = 2
    T_SEQ = 3
    T_MAP = 4


cdef class CompiledSpec:
    """A checked TensorSpec (leaf), list/tuple of specs (struct) or mapping of them."""
    cdef int tag
    cdef _DType dt
    cdef readonly object dtype
    cdef readonly tuple shape
    cdef readonly tuple children
    cdef readonly tuple keys
    cdef object container
    # A leaf digested for fc_convert (kind FC_OFF: a struct), with the last scalar or array
    # it made (owned; a numpy value holds no reference back, so there is no cycle to collect)
    cdef fc_conv conv

    def __dealloc__(self):
        Py_XDECREF(self.conv.spare)
        self.conv.spare = NULL

    @staticmethod
    def leaf(dtype, tuple shape):
        cdef CompiledSpec s = CompiledSpec.__new__(CompiledSpec)
        cdef int j
        s.dt = _DType(dtype)
        s.dtype = s.dt.dtype
        s.shape = shape
        s.tag = T_SCALAR if shape == () else T_ARRAY
        s.conv.kind = FC_SCALAR if s.tag == T_SCALAR else FC_ARRAY
        s.conv.store = s.dt.store
        s.conv.typenum = s.dt.typenum
        s.conv.itemsize = <int>s.dt.itemsize
        s.conv.lo, s.conv.hi = s.dt.clo, s.dt.chi
        s.conv.scalar_type = <PyTypeObject *>s.dt.scalar_type
        s.conv.ndim = len(shape)
        for j in range(min(s.conv.ndim, 8)):
            s.conv.dims[j] = -1 if shape[j] is None else shape[j]
        return s

    @staticmethod
    def struct(container, list children):
        cdef CompiledSpec s = CompiledSpec.__new__(CompiledSpec)
        s.tag = T_SEQ
        s.container = container
        s.children = tuple(children)
        for c in s.children:   # _convert casts them without a check
            if not isinstance(c, CompiledSpec):
                raise TypeError(f"struct children must be CompiledSpec, got {type(c).__name__}")
        return s

    @staticmethod
    def mapping(container, list keys, list children):
        cdef CompiledSpec s = CompiledSpec.struct(container, children)
        s.tag = T_MAP
        s.keys = tuple(keys)
        if len(s.keys) != len(s.children):
            raise ValueError("a mapping spec needs one child per key")
        return s

    def example(self):
        """A value of ones in this spec's dtypes and shapes (``None`` dimensions of size 1)."""
        if self.tag == T_SCALAR:
            return self.dt.scalar_type(1)
        if self.tag == T_ARRAY:
            return np.ones(tuple(1 if d is None else d for d in self.shape), self.dtype)
        items = [(<CompiledSpec>c).example() for c in self.children]
        if self.tag == T_MAP:
            return self.container(zip(self.keys, items))
        return self.container(items)


cdef inline object _convert(CompiledSpec s, object v):
    """The value handed to the finalizer for ``v`` under spec ``s``: numbers become numpy
    scalars of the spec's dtype, arrays and lists ndarrays of it, structures new containers.
    The common leaf cases are stored in C (fc_convert); the rest and every error here."""
    if s.tag == T_SCALAR or s.tag == T_ARRAY:
        x = fc_convert_obj(&s.conv, <PyObject *>v)
        if x is not None:
            return x
        if s.tag == T_SCALAR:
            return _to_scalar(s.dt, v)
        return _as_array(s.dt, v, s.shape, True)
    return _convert_struct(s, v)


cdef object _convert_struct(CompiledSpec s, object v):
    """_convert for a list/tuple or mapping spec (apart, so that the leaf paths above do
    not set up this function's generator-expression scope on every call)."""
    cdef tuple children = s.children
    cdef Py_ssize_t j, n = len(children)
    cdef tuple items
    cdef dict d
    cdef list out
    if s.tag == T_MAP:
        if not isinstance(v, Mapping):
            raise TypeError(f"expected a mapping with keys {list(s.keys)}, got {_describe(v)}")
        d = _read_mapping(v)
        if len(d) != n or any(k not in d for k in s.keys):
            raise ValueError(f"expected a mapping with keys {list(s.keys)}, got keys {list(d)}")
        items = tuple([d[k] for k in s.keys])
    else:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"expected a list or tuple of {n} values, got {_describe(v)}")
        # A snapshot: converting an element may run Python code that mutates a list.
        items = <tuple>v if isinstance(v, tuple) else PyList_AsTuple(v)
        if len(items) != n:
            raise ValueError(f"expected a list or tuple of {n} values, got {len(items)}")
    out = []
    j = 0
    try:
        for j in range(n):
            out.append(_convert(<CompiledSpec>children[j], items[j]))
    except (TypeError, ValueError) as e:
        where = f"key {s.keys[j]!r}" if s.tag == T_MAP else f"element {j}"
        raise with_context(e, where) from None
    if s.tag == T_MAP:
        return s.container(zip(s.keys, out))
    return s.container(out)


def convert_value(CompiledSpec s, v):
    """Check ``v`` against ``s``; return what a finalizer receives."""
    return _convert(s, v)


# ----------------------------------------------------------------------------------------------
# Finalized structure: learned from the probe at create(), then every client must match it
# ----------------------------------------------------------------------------------------------

cdef enum:
    L_LEAF = 1
    L_LIST = 2
    L_TUPLE = 3
    L_MAP = 4


cdef class _Node:
    cdef int tag
    cdef Py_ssize_t leaf
    cdef tuple children
    cdef tuple keys


cdef str _describe_node(_Node node):
    if node.tag == L_LEAF:
        return "a number or array"
    if node.tag == L_MAP:
        return f"a mapping with keys {list(node.keys)}"
    return f"a list or tuple of {len(node.children)} values"


cdef _Node _build_node(object v, list leaves, int depth):
    _check_depth(depth, "finalized value")
    cdef _Node node = _Node.__new__(_Node)
    cdef dict d
    if isinstance(v, (list, tuple)):
        node.tag = L_TUPLE if isinstance(v, tuple) else L_LIST
        node.children = tuple([_build_node(x, leaves, depth + 1) for x in tuple(v)])
    elif isinstance(v, Mapping) and not cnp.PyArray_Check(v):
        node.tag = L_MAP
        d = _read_mapping(v)
        node.keys = tuple(d)
        node.children = tuple([_build_node(d[k], leaves, depth + 1) for k in node.keys])
    else:
        a = _leaf_value(v)
        node.tag = L_LEAF
        node.leaf = len(leaves)
        leaves.append((_DType(a.dtype, "final"), a.shape))
    return node


cdef object _leaf_value(object v):
    """A finalized leaf as an ndarray (numbers, numpy scalars and arrays only)."""
    if not (PyFloat_Check(v) or PyLong_Check(v) or PyComplex_Check(v) or cnp.PyArray_Check(v)
            or issubclass(type(v), np.generic)):
        raise TypeError(f"finalized value must be a number, a numpy array, or a list, tuple or "
                        f"mapping of them; got {type(v).__name__}")
    try:
        a = np.asarray(v)
    except (OverflowError, ValueError, TypeError) as e:
        raise TypeError(f"finalized value {_describe(v)} is not numeric ({e})") from None
    if a.dtype.kind not in "biufc":
        raise TypeError(f"finalized value is not numeric (dtype {a.dtype})")
    return a


cdef int _flatten(_Node node, object v, list out) except -1:
    """Append ``v``'s leaves to ``out`` in the layout's order; ValueError if ``v``'s structure
    is not the layout's. The walk follows the layout, so its depth is the layout's."""
    cdef tuple items
    cdef dict d
    cdef Py_ssize_t j
    if node.tag == L_LEAF:
        if isinstance(v, (list, tuple)) or (isinstance(v, Mapping) and not cnp.PyArray_Check(v)):
            raise ValueError(f"finalized value is a {type(v).__name__}, but at create() the "
                             f"finalizer returned a number or array there")
        out.append(v)
        return 0
    if node.tag == L_MAP:
        if not isinstance(v, Mapping) or cnp.PyArray_Check(v):
            raise ValueError(f"finalized value is a {type(v).__name__}, but at create() the "
                             f"finalizer returned {_describe_node(node)}")
        d = _read_mapping(v)
        if len(d) != len(node.keys) or any(k not in d for k in node.keys):
            raise ValueError(f"finalized value has keys {list(d)}, but at create() the "
                             f"finalizer returned keys {list(node.keys)}")
        for j in range(len(node.keys)):
            _flatten(<_Node>node.children[j], d[node.keys[j]], out)
        return 0
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"finalized value is a {type(v).__name__}, but at create() the "
                         f"finalizer returned {_describe_node(node)}")
    items = <tuple>v if isinstance(v, tuple) else PyList_AsTuple(v)
    if len(items) != len(node.children):
        raise ValueError(f"finalized value has {len(items)} elements, but at create() the "
                         f"finalizer returned {len(node.children)}")
    for j in range(len(items)):
        _flatten(<_Node>node.children[j], items[j], out)
    return 0


cdef object _rebuild(_Node node, list leaves):
    if node.tag == L_LEAF:
        return leaves[node.leaf]
    items = [_rebuild(<_Node>c, leaves) for c in node.children]
    if node.tag == L_MAP:
        return dict(zip(node.keys, items))
    return tuple(items) if node.tag == L_TUPLE else items


cdef object _final_leaf(_DType d, tuple shape, object v):
    """A finalized leaf cast to the probe's dtype, checked against the probe's shape."""
    a = _leaf_value(v)
    if a.shape != shape:
        raise ValueError(f"finalized value has shape {a.shape}, but at create() the finalizer "
                         f"returned shape {shape}")
    if a.dtype == d.dtype:
        return a
    if a.dtype.kind not in d.accepts:
        raise TypeError(f"finalized value has dtype {a.dtype}, but at create() the finalizer "
                        f"returned {d.dtype}")
    if d.kind == K_INT:
        return _array_in_range(d, a)
    return a.astype(d.dtype)


cdef class Layout:
    """The structure, dtypes and shapes of one metric's finalized value (from the probe)."""
    cdef _Node root
    cdef readonly tuple dtypes
    cdef readonly tuple shapes
    cdef tuple _dts
    cdef bint single

    @staticmethod
    def of(value):
        """The layout of ``value``: TypeError for a non-numeric leaf, ValueError if too deep."""
        cdef Layout lay = Layout.__new__(Layout)
        cdef list leaves = []
        lay.root = _build_node(value, leaves, 0)
        lay._dts = tuple([x[0] for x in leaves])
        lay.dtypes = tuple([(<_DType>x[0]).dtype for x in leaves])
        lay.shapes = tuple([x[1] for x in leaves])
        lay.single = lay.root.tag == L_LEAF
        return lay

    def __len__(self):
        return len(self.shapes)

    def flatten(self, value):
        """``value``'s leaves in layout order (ValueError if its structure differs)."""
        cdef list out = []
        _flatten(self.root, value, out)
        return out

    def build(self, leaves):
        """The layout's structure holding ``leaves`` (a sequence in layout order)."""
        return _rebuild(self.root, list(leaves))

    def empty(self, Py_ssize_t n=0):
        """The structure holding an empty ``(n,) + shape`` array per leaf."""
        return self.build([np.empty((n,) + s, d) for d, s in zip(self.dtypes, self.shapes)])

    def zeros(self):
        """The structure holding 0 per leaf (an empty round's measurement)."""
        return self.build([0] * len(self.shapes))

    def columns(self, value, Py_ssize_t n):
        """A vectorized finalizer's result as leaf columns, each ``(n,) + shape`` in the
        layout's dtype."""
        cdef list flat = self.flatten(value)
        cdef list out = []
        for j in range(len(flat)):
            col = flat[j]
            shape = np.shape(col) if cnp.PyArray_Check(col) or issubclass(type(col), np.generic) \
                else None
            if shape is None:
                col = _leaf_value(col)
                shape = col.shape
            if len(shape) == 0 or shape[0] != n:
                raise ValueError(f"a vectorized finalizer must return columns with a leading "
                                 f"axis of {n} clients, got shape {tuple(shape)}")
            out.append(_final_leaf(<_DType>self._dts[j], (n,) + self.shapes[j], col))
        return out

    def check_samples(self, value, Py_ssize_t m):
        """``value`` (a state's samples of this metric) checked: the layout's structure with an
        ndarray of exactly the leaf's dtype and shape ``(m,) + shape`` per leaf. Returns the
        leaves as private copies (``_private_copy``)."""
        cdef list flat = self.flatten(value)
        for j in range(len(flat)):
            a = flat[j]
            for attempt in range(2):   # checked before the copy and again on it
                if not _is_sample_leaf(a, self.dtypes[j], self.shapes[j], m):
                    want = (m,) + self.shapes[j]
                    got = (f"dtype {a.dtype}, shape {a.shape}" if cnp.PyArray_Check(a)
                           else type(a).__name__)
                    raise ValueError(f"expected a {self.dtypes[j]} array of shape {want}, "
                                     f"got {got}")
                if attempt == 0:
                    a = flat[j] = _private_copy(a)
        return flat


cdef bint _is_sample_leaf(object a, cnp.dtype dtype, tuple shape, Py_ssize_t m) except -1:
    """``a`` is an ndarray of ``dtype`` (as ``==`` compares dtypes) and shape ``(m,) + shape``,
    checked on its struct: the round's first step, on cold caches."""
    if not cnp.PyArray_Check(a) or not cnp.PyArray_EquivTypes((<cnp.ndarray>a).descr, dtype):
        return False
    cdef Py_ssize_t nd = len(shape), j
    if cnp.PyArray_NDIM(a) != nd + 1 or cnp.PyArray_DIMS(a)[0] != m:
        return False
    for j in range(nd):
        if cnp.PyArray_DIMS(a)[j + 1] != <cnp.npy_intp>shape[j]:
            return False
    return True


cdef int _scalar_bad(_DType d, object x) except -1:
    """Non-finite flag of the numpy scalar ``x`` of exactly ``d``'s type (so its value is
    read off the scalar's struct: PyArray_ScalarAsCtype would look the type up again)."""
    cdef float f[2]
    cdef double g[2]
    if d.ftype == FR_FT_FLOAT32:
        return _float_bad((<PyFloatScalarObject *><PyObject *>x).obval)
    if d.ftype == FR_FT_FLOAT64:
        return _double_bad((<PyDoubleScalarObject *><PyObject *>x).obval)
    if d.ftype == FR_FT_COMPLEX64:
        cnp.PyArray_ScalarAsCtype(x, f)
        return _float_bad(f[0]) or _float_bad(f[1])
    if d.ftype == FR_FT_COMPLEX128:
        cnp.PyArray_ScalarAsCtype(x, g)
        return _double_bad(g[0]) or _double_bad(g[1])
    if d.kind <= K_INT:
        return 0
    return _count_array(np.asarray(x), False) > 0


@cython.final   # add() is called per client and metric: a direct call, no vtable
cdef class _Acc:
    """Non-finite counts and sampled rows of one finalized metric over a round's clients."""
    cdef Layout layout
    cdef tuple dts
    cdef tuple shapes
    cdef list outs
    cdef list flat
    cdef int64_t *counts
    cdef Py_ssize_t nleaves
    cdef _DType d0          # the first leaf's dtype and scalar type: the one-leaf fast path
    cdef object scalar0     # exact numpy scalar type of a lone shape-() leaf, else None

    def __cinit__(self, Layout layout, Py_ssize_t nsample):
        self.layout = layout
        self.dts = layout._dts
        self.d0 = layout._dts[0] if layout._dts else None
        self.scalar0 = (self.d0.scalar_type if layout.single and layout.shapes[0] == ()
                        else None)
        self.shapes = layout.shapes
        self.nleaves = len(layout.shapes)
        self.outs = [np.empty((nsample,) + s, d) for d, s in zip(layout.dtypes, layout.shapes)]
        self.flat = []
        self.counts = <int64_t *>calloc(self.nleaves if self.nleaves else 1, sizeof(int64_t))
        if self.counts == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.counts)

    cdef int take_leaf(self, Py_ssize_t j, object x, int64_t slot) except -1:
        cdef _DType d = <_DType>self.dts[j]
        cdef tuple shape = <tuple>self.shapes[j]
        cdef int bad
        cdef double g
        cdef float f
        t = type(x)
        if t is d.scalar_type and not shape:
            bad = _scalar_bad(d, x) if d.kind >= K_FLOAT else 0
        elif t is float and not shape and d.kind == K_FLOAT \
                and (d.itemsize == 4 or d.itemsize == 8):   # not half, not long double
            g = PyFloat_AS_DOUBLE(x)
            if d.itemsize == 8:
                bad = _double_bad(g)
            else:
                f = _narrow(g)   # stored as the probe's float32: the cast decides
                bad = _float_bad(f)
        else:
            x = _final_leaf(d, shape, x)
            bad = _count_array(<cnp.ndarray>x, False) > 0 if d.kind >= K_FLOAT else 0
        self.counts[j] += bad
        if slot >= 0:
            self.outs[j][slot] = x
        return 0

    cdef inline int add(self, object v, int64_t slot) except -1:
        # The common case, inline: a numpy scalar of the probe's type, float or integer.
        if type(v) is self.scalar0:
            if self.d0.store == FC_STORE_F32:
                self.counts[0] += _float_bad((<PyFloatScalarObject *><PyObject *>v).obval)
            elif self.d0.store == FC_STORE_F64:
                self.counts[0] += _double_bad((<PyDoubleScalarObject *><PyObject *>v).obval)
            elif self.d0.kind >= K_FLOAT:
                self.counts[0] += _scalar_bad(self.d0, v)
            if slot >= 0:
                self.outs[0][slot] = v
            return 0
        return self.add_any(v, slot)

    cdef int add_any(self, object v, int64_t slot) except -1:
        """add() for all but a lone scalar of the probe's type."""
        cdef Py_ssize_t j
        if self.layout.single:
            if not PyFloat_Check(v):
                if isinstance(v, (list, tuple)) or (isinstance(v, Mapping)
                                                    and not cnp.PyArray_Check(v)):
                    raise ValueError(f"finalized value is a {type(v).__name__}, but at "
                                     f"create() the finalizer returned a number or array")
            return self.take_leaf(0, v, slot)
        del self.flat[:]
        _flatten(self.layout.root, v, self.flat)
        for j in range(self.nleaves):
            self.take_leaf(j, self.flat[j], slot)
        return 0

    def measurement(self):
        return self.layout.build([int(self.counts[j]) for j in range(self.nleaves)])


# ----------------------------------------------------------------------------------------------
# Per-client round: convert, finalize, measure, keep the sampled
# ----------------------------------------------------------------------------------------------

cdef object _key_error(int64_t i, object cv, tuple names):
    have = list(cv.keys())
    missing = [x for x in names if x not in cv]
    extra = [x for x in have if x not in names]
    parts = []
    if missing:
        parts.append(f"missing metric(s) {missing}")
    if extra:
        parts.append(f"unexpected metric(s) {extra}")
    return ValueError(f"client {i}: " + "; ".join(parts) + f" (expected exactly {list(names)})")


cdef enum:
    _READ_ITEMS = 0     # dict(cv.items())
    _READ_FASTREC = 1   # an exact fastrec record: its C-level dict
    _READ_FLWR = 2      # Flower's TypedDict, not overridden: cv.__dict__["_data"]

_FLWR_TYPEDDICT = "flwr.common.record.typeddict"
cdef object _ORDERED_DICT = OrderedDict   # a C global: no module lookup per client


cdef int _reader_of(type t) except -1:
    """How to read the clients of mapping type ``t`` (decided once per type)."""
    if issubclass(t, _TypedDict):
        return _READ_FASTREC
    # Flower's records keep their items in ``self.__dict__["_data"]`` and read them only
    # there; a subclass that overrides any reading method is read through items() instead.
    for method in ("__getitem__", "__iter__", "__len__", "__contains__", "keys", "items"):
        fn = getattr(t, method, None)
        if getattr(fn, "__module__", None) != _FLWR_TYPEDDICT \
                or getattr(fn, "__qualname__", None) != f"TypedDict.{method}":
            return _READ_ITEMS
    return _READ_FLWR


cdef dict _read_client(object cv, int reader):
    if reader == _READ_FASTREC and (<_TypedDict>cv)._exact:
        unseal_record(<_TypedDict>cv)   # its values go on to Python code
        return (<_TypedDict>cv)._data
    if reader == _READ_FLWR:
        d = getattr(cv, "__dict__", None)
        data = d.get("_data") if type(d) is dict else None
        if type(data) is dict:
            return <dict>data
    return dict(cv.items())


cdef inline bint _next_is(object d, Py_ssize_t *it, PyObject *name, PyObject **value):
    """Whether ``d``'s next item (PyDict_Next from ``*it``) has the key ``name``, and if so
    its value in ``*value`` (borrowed). Clients built alike hold their metrics in the same
    order, so reading them in order replaces a hash lookup per metric; the first key out of
    order sends the rest to lookups. A key matches as a lookup would: the same object, or
    an exact str with the same hash and characters (a name of a str subclass is looked up)."""
    cdef PyObject *key
    if not PyDict_Next(d, it, &key, value):
        value[0] = NULL
        return False
    if key == name:
        return True
    # Both exact str, so hashing runs no Python code that could free *value (borrowed).
    if _TYPE(key) == &PyUnicode_Type and _TYPE(name) == &PyUnicode_Type \
            and PyObject_Hash(<object>key) == PyObject_Hash(<object>name) \
            and PyUnicode_Compare(<object>key, <object>name) == 0:
        return True
    value[0] = NULL
    return False


cdef enum:
    _STAGE_KEYS = 0
    _STAGE_CONVERT = FC_STAGE_CONVERT
    _STAGE_FINALIZE = FC_STAGE_FINALIZE
    _STAGE_MEASURE = FC_STAGE_MEASURE


# Off only in tests, which check that both ways give the same result.
cdef bint _client_fast_path = True


def set_client_fast_path(bint on):
    """Whether next() takes the common clients through fc_client (tests compare both ways);
    returns the previous setting."""
    global _client_fast_path
    was = _client_fast_path
    _client_fast_path = on
    return was


cdef int _acc_add(PyObject *acc, PyObject *result, int64_t slot) except -1:
    """fc_client's way back for results it does not count itself (sampled clients, results
    not of the probe's scalar type)."""
    return (<_Acc>acc).add(<object>result, slot)


cdef bint _fill_step(fc_step *st, CompiledSpec spec, PyObject *name, PyObject *fin,
                     vectorcallfunc call, _Acc acc) noexcept:
    """One metric of a round for fc_client; False if its spec is a list/tuple/mapping (the
    round's clients then all go the general way)."""
    st.name = name
    st.conv = &spec.conv
    st.fin = fin
    st.call = call
    st.acc = <PyObject *>acc
    st.count = acc.counts
    st.res = FC_RES_OTHER
    st.res_type = NULL
    if acc.scalar0 is not None:
        st.res_type = <PyTypeObject *>acc.scalar0
        if acc.d0.store == FC_STORE_F32:
            st.res = FC_RES_F32
        elif acc.d0.store == FC_STORE_F64:
            st.res = FC_RES_F64
        elif acc.d0.kind < K_FLOAT:
            st.res = FC_RES_UNCOUNTED
    return spec.conv.kind != FC_OFF


cdef inline object _context(BaseException e, int64_t i, object name):
    return with_context(e, f"client {i}, metric {name!r}")


def finalize_clients(clients, tuple names, tuple specs, finalizers, functional,
                     tuple out_names, tuple layouts, cnp.ndarray positions not None,
                     int64_t offset=0):
    """Finalize every client, count non-finite leaves, keep the sampled clients' values.

    ``positions`` (ascending) are the batch positions of the round's sampled clients.
    Exactly one of ``finalizers`` (a tuple parallel to ``names``) and ``functional`` is set;
    ``layouts`` (parallel to ``out_names``) are the finalized layouts from the probe.
    Returns the sampled clients' leaves (name: list in layout order) and the per-metric
    measurements, parallel to ``out_names``, each in its layout's structure. Errors name the
    client by its index in the round, ``offset`` + batch position: clients run in batch
    order, so the first failing client (the lowest index) is the one reported.
    """
    # The round was sampled over the clients as they are now, and finalizers and value
    # conversions run Python code that may change the caller's list. A tuple copy would touch
    # every client twice more (~5% of a round), so a list is read in place against a copy of
    # its item pointers (compared, never followed): a change of its length, or of the object
    # at a position, before that client is read is a RuntimeError, as changing a dict while
    # iterating over it is. The pointers are not owned (owning them costs what the copy
    # does): a replacement allocated where the replaced client was freed passes the check
    # and is read, which is memory-safe (the list's own item is read), not detected.
    cdef bint in_place = type(clients) is list
    cdef object cl = clients if in_place or type(clients) is tuple else tuple(clients)
    cdef Py_ssize_t n = len(cl)
    cdef PyObject **items = NULL
    cdef Py_ssize_t m = len(names)
    cdef Py_ssize_t q = len(out_names)
    cdef Py_ssize_t nsample = positions.shape[0] if positions.ndim == 1 else -1
    if len(specs) != m or len(layouts) != q:
        raise ValueError("specs must match names, and layouts out_names")
    for spec in specs:   # cast without a check in the loop below
        if not isinstance(spec, CompiledSpec):
            raise TypeError(f"specs must be CompiledSpec, got {type(spec).__name__}")
    for lay in layouts:
        if not isinstance(lay, Layout):
            raise TypeError(f"layouts must be Layout, got {type(lay).__name__}")
    if functional is None and (type(finalizers) is not tuple or len(finalizers) != m
                               or out_names != names):
        raise ValueError(f"finalizers must be a tuple of {m} callables, one per name")
    if cnp.PyArray_TYPE(positions) != cnp.NPY_INT64 or not cnp.PyArray_ISNOTSWAPPED(positions) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(positions) or nsample < 0:
        raise ValueError("positions must be a contiguous 1-d int64 array")
    cdef Py_ssize_t i, j, r
    cdef int64_t gi
    cdef const int64_t *pos = <const int64_t *>cnp.PyArray_DATA(positions)
    # _Acc allocates nsample rows per leaf (MemoryError): before the malloc that only the
    # finally below frees.
    cdef list accs = [_Acc(<Layout>lay, nsample) for lay in layouts]
    # The sample slot of the client at hand: -1, or its row among the sampled clients
    # (positions ascend, so the next sampled position is the only one to look for).
    cdef int64_t sl
    cdef Py_ssize_t next_r = 0
    # Python functions' vectorcall entry points (NULL: call through PyObject_Vectorcall).
    # fins holds the functions for the whole round.
    cdef vectorcallfunc *vcalls = <vectorcallfunc *>calloc(m if m > 0 else 1,
                                                           sizeof(vectorcallfunc))
    if vcalls == NULL:
        raise MemoryError()
    cdef PyObject *p
    cdef PyObject *namep  # the metric at hand (borrowed from names or out_names)
    cdef Py_ssize_t it    # PyDict_Next's position in the client's dict
    cdef bint in_order    # the client's keys so far came in the names' order
    cdef PyObject *valp   # borrowed from val: the finalizer's one argument
    cdef int stage
    cdef dict unfin
    cdef list held
    cdef dict outd
    cdef tuple fins = finalizers if functional is None else None
    if fins is not None:
        for j in range(m):
            if PyFunction_Check(fins[j]):
                vcalls[j] = PyVectorcall_Function(fins[j])
    cdef int reader = _READ_ITEMS
    # The common clients go through fc_client (_client_step.h), one C call each; the rest,
    # and every client of a round with a functional finalizer or a structured spec, the
    # general way below. Both give the same result.
    cdef fc_step *steps = NULL
    cdef PyObject **vals = NULL
    cdef bint fast = _client_fast_path and fins is not None and m > 0
    mapping_type = None
    try:
        if fast:
            steps = <fc_step *>calloc(m, sizeof(fc_step))
            vals = <PyObject **>calloc(m, sizeof(PyObject *))
            if steps == NULL or vals == NULL:
                raise MemoryError()
            for j in range(m):
                fast &= _fill_step(&steps[j], <CompiledSpec>PyTuple_GET_ITEM(specs, j),
                                   PyTuple_GET_ITEM(names, j), PyTuple_GET_ITEM(fins, j),
                                   vcalls[j], <_Acc>PyList_GET_ITEM(accs, j))
        for r in range(nsample):
            if pos[r] < 0 or pos[r] >= n or (r and pos[r] <= pos[r - 1]):
                raise ValueError("sample positions must be ascending and inside the batch")
        if in_place:
            items = <PyObject **>malloc(<size_t>n * sizeof(PyObject *) if n > 0 else 1)
            if items == NULL:
                raise MemoryError()
            for i in range(n):
                items[i] = PyList_GET_ITEM(cl, i)
        held = [None] * m   # a client's converted values, until its finalizers have run
        # One try for the whole loop, not per client or value: `stage` and `namep` say
        # what failed.
        try:
            for i in range(n):
                stage = _STAGE_KEYS
                namep = NULL
                gi = offset + i
                if not in_place:
                    cv = <object>PyTuple_GET_ITEM(cl, i)
                elif PyList_GET_SIZE(cl) == n and PyList_GET_ITEM(cl, i) == items[i]:
                    cv = <object>items[i]
                else:
                    raise RuntimeError(f"client_values changed during next(), before client "
                                       f"{gi} was read: finalizers and value conversions must "
                                       f"not modify it")
                sl = -1
                if next_r < nsample and pos[next_r] == i:
                    sl = next_r
                    next_r += 1
                # Exact dict and OrderedDict (no __getitem__ override) are read with the C API,
                # so are the dicts inside fastrec's and Flower's records; other mappings are
                # copied through items() once, one call instead of one per metric.
                if type(cv) is not dict and type(cv) is not _ORDERED_DICT:
                    if type(cv) is not mapping_type:  # the type checks are slow: once per type
                        if not isinstance(cv, Mapping):
                            raise TypeError(f"client {gi}: expected a mapping of metric name to "
                                            f"value, got {type(cv).__name__}")
                        mapping_type = type(cv)
                        reader = _reader_of(mapping_type)
                    cv = _read_client(cv, reader)
                if PyDict_Size(cv) != m:
                    raise _key_error(gi, cv, names)
                if fast and fc_client(<PyObject *>cv, m, steps, vals, sl, _acc_add,
                                      &namep, &stage) == 1:
                    continue
                if functional is not None:
                    unfin = {}
                it = 0
                in_order = True
                for j in range(m):
                    namep = PyTuple_GET_ITEM(names, j)
                    stage = _STAGE_KEYS
                    p = NULL
                    if in_order:
                        in_order = _next_is(cv, &it, namep, &p)
                    if p == NULL:
                        p = PyDict_GetItemWithError(cv, <object>namep)
                        if p == NULL:
                            raise _key_error(gi, cv, names)
                    raw = <object>p   # owned: converting may run code that mutates cv
                    stage = _STAGE_CONVERT
                    val = _convert(<CompiledSpec>PyTuple_GET_ITEM(specs, j), raw)
                    if functional is not None:
                        unfin[<object>namep] = val
                    else:
                        held[j] = val
                    val = None
                # Every value is read before the first finalizer runs, as in fc_client: a
                # finalizer that edits the client changes nothing this round.
                if functional is None:
                    for j in range(m):
                        namep = PyTuple_GET_ITEM(names, j)
                        stage = _STAGE_FINALIZE
                        valp = PyList_GET_ITEM(held, j)   # held owns it during the call
                        if vcalls[j] != NULL:
                            f = _vcall1(vcalls[j], PyTuple_GET_ITEM(fins, j), valp)
                        else:
                            f = PyObject_Vectorcall(<object>PyTuple_GET_ITEM(fins, j), &valp,
                                                    1, NULL)
                        held[j] = None    # let go at once: the spare may refill next client
                        stage = _STAGE_MEASURE
                        (<_Acc>PyList_GET_ITEM(accs, j)).add(f, sl)
                        f = None
                else:
                    namep = NULL
                    stage = _STAGE_FINALIZE
                    out = functional(unfin)
                    stage = _STAGE_KEYS
                    if not isinstance(out, Mapping):
                        raise TypeError(f"client {gi}: the metric finalizer must return a "
                                        f"mapping of metric name to finalized value, got "
                                        f"{type(out).__name__}")
                    outd = _read_mapping(out)
                    if len(outd) != q or any(x not in outd for x in out_names):
                        raise ValueError(f"client {gi}: the finalizer returned metrics "
                                         f"{list(outd)}, but at create() it returned "
                                         f"{list(out_names)}")
                    stage = _STAGE_MEASURE
                    for j in range(q):
                        namep = PyTuple_GET_ITEM(out_names, j)
                        (<_Acc>PyList_GET_ITEM(accs, j)).add(outd[<object>namep], sl)
        except Exception as e:
            ctx_name = <object>namep if namep != NULL else None
            if stage == _STAGE_FINALIZE:
                where = "the metrics" if ctx_name is None else f"metric {ctx_name!r}"
                add_note(e, f"(while finalizing {where} of client {gi})")
                raise
            if stage != _STAGE_KEYS and isinstance(e, (TypeError, ValueError)):
                raise _context(e, gi, ctx_name) from None
            raise
    finally:
        free(vcalls)
        free(steps)
        free(vals)   # fc_client leaves it empty
        free(items)
    return ({name: (<_Acc>a).outs for name, a in zip(out_names, accs)},
            [(<_Acc>a).measurement() for a in accs])


# ----------------------------------------------------------------------------------------------
# Keys, reservoirs, gathers
# ----------------------------------------------------------------------------------------------

def client_keys(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset, int64_t n):
    """uint64 keys of clients offset .. offset+n-1 in ``round`` (the generator itself)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    out = np.empty(n, dtype=np.uint64)
    cdef uint64_t *o = <uint64_t *>cnp.PyArray_DATA(out)
    cdef fr_status st
    with nogil:
        st = fr_client_keys(seed0, seed1, round, offset, n, o)
    _check(st, "client_keys")
    return out


cdef inline cnp.ndarray _empty1(int64_t n, int typenum):
    """np.empty(n, typenum) through the C API (no Python call: these run every round)."""
    cdef cnp.npy_intp dim = <cnp.npy_intp>n
    return cnp.PyArray_EMPTY(1, &dim, typenum, 0)


cdef cnp.ndarray _c1d(object a, int typenum):
    """``a`` as a C-contiguous 1-d ndarray of ``typenum`` (itself when it already is one)."""
    if cnp.PyArray_CheckExact(a) and cnp.PyArray_NDIM(a) == 1 \
            and cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISNOTSWAPPED(a) \
            and cnp.PyArray_IS_C_CONTIGUOUS(a):
        return a
    a = np.asarray(a, dtype=cnp.PyArray_DescrFromType(typenum))
    if cnp.PyArray_NDIM(a) != 1:   # before ascontiguousarray, which makes a 0-d array 1-d
        raise ValueError("expected a 1-d array")
    return np.ascontiguousarray(a)


cdef tuple _entry_arrays(const fr_entry *buf, int64_t count):
    """(keys, client indices, batch positions) of buf[0..count)."""
    keys = _empty1(count, cnp.NPY_UINT64)
    idx = _empty1(count, cnp.NPY_INT64)
    pos = _empty1(count, cnp.NPY_INT64)
    cdef uint64_t *kp = <uint64_t *>cnp.PyArray_DATA(keys)
    cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(idx)
    cdef int64_t *pp = <int64_t *>cnp.PyArray_DATA(pos)
    cdef int64_t r
    for r in range(count):
        kp[r] = buf[r].key
        ip[r] = buf[r].index
        pp[r] = buf[r].src
    return keys, idx, pos


def round_sample(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset, int64_t n,
                 int64_t k, bint arrival=False):
    """The round's reservoir: (keys, client indices, batch positions), best first, or in
    arrival order (by position) if ``arrival``."""
    if k < 0 or n < 0:
        raise ValueError("n and k must be non-negative")
    cdef int64_t cap = k if k < n else n
    cdef fr_entry *buf = <fr_entry *>malloc((cap if cap > 0 else 1) * sizeof(fr_entry))
    if buf == NULL:
        raise MemoryError()
    cdef int64_t count = 0
    cdef fr_status st
    try:
        with nogil:
            st = fr_round_sample(seed0, seed1, round, offset, n, cap, buf, &count)
        _check(st, "round_sample")
        if arrival:
            fr_sort_arrival(buf, count)
        return _entry_arrays(buf, count)
    finally:
        free(buf)


# A round's reservoir drawn by two threads: the caller's, and a helper C thread started with
# the draw that takes chunks of the round's clients while the caller runs the finalizers; the
# caller takes what is left once its own work is done. Keys depend only on (seed, round,
# index), so the split changes nothing in the result. The helper never touches a Python
# object (no GIL) and the caller never waits for it: the helper publishes its reservoir after
# each chunk, and a chunk it is still drawing when the caller is done is drawn again by the
# caller (the helper's copy is dropped). So a helper that gets no core, or is preempted, costs
# the caller at most one chunk. The two share only this struct, under `lock`; the last to let
# go frees it.
ctypedef struct _DrawJob:
    PyThread_type_lock lock   # guards next, busy_*, closed, refs and the helper_* fields
    uint64_t stream
    int64_t round, offset, n, chunk
    int64_t next              # first batch position not yet handed out
    int64_t busy_start, busy_size   # the chunk the helper is drawing (size 0: none)
    bint closed               # the caller is done: the helper publishes nothing more
    int refs
    # [0] the caller's own chunks; [1] the helper's chunks as last published; [2] the chunk
    # the helper was drawing when the caller closed. Each is offered increasing positions.
    fr_reservoir res[3]
    fr_reservoir mine         # the helper's working copy of res[1]
    fr_status helper_st       # the helper's first error in a published chunk
    int64_t helper_chunks     # chunks the helper published
    int64_t generation        # _fork_generation when made


# Helper threads still running (tests check that none outlives its draw by long).
cdef PyThread_type_lock _helpers_lock = PyThread_allocate_lock()
cdef int64_t _helpers_running = 0
# Bumped in a forked child, which has none of its parent's helper threads: a draw made
# before the fork cannot trust its lock or the helper's reservoir there (the helper may have
# held the one and been writing the other at the fork), so it redraws the round alone.
cdef int64_t _fork_generation = 0


def _after_fork_in_child():
    global _helpers_lock, _helpers_running, _fork_generation
    _helpers_lock = PyThread_allocate_lock()   # the parent's may be held: left as it was
    _helpers_running = 0
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef void _count_helper(int64_t d) noexcept nogil:
    PyThread_acquire_lock(_helpers_lock, WAIT_LOCK)
    global _helpers_running
    _helpers_running += d
    PyThread_release_lock(_helpers_lock)


def helpers_running():
    """How many RoundDraw helper threads are running now."""
    with nogil:
        PyThread_acquire_lock(_helpers_lock, WAIT_LOCK)
    n = _helpers_running
    PyThread_release_lock(_helpers_lock)
    return n


cdef void _free_job(_DrawJob *j) noexcept nogil:
    if j.lock != NULL:
        PyThread_free_lock(j.lock)
    free(j.res[0].heap)
    free(j.res[1].heap)
    free(j.res[2].heap)
    free(j.mine.heap)
    free(j)


cdef void _let_go(_DrawJob *j) noexcept nogil:
    PyThread_acquire_lock(j.lock, WAIT_LOCK)
    j.refs -= 1
    cdef bint last = j.refs == 0
    PyThread_release_lock(j.lock)
    if last:
        _free_job(j)


cdef int64_t _take_chunk(_DrawJob *j, int64_t *start) noexcept nogil:
    """The next chunk's size (0: none left) and start; call with the lock held."""
    cdef int64_t size = j.n - j.next
    if size > j.chunk:
        size = j.chunk
    start[0] = j.next
    j.next += size
    return size


cdef void _helper_main(void *arg) noexcept nogil:
    cdef _DrawJob *j = <_DrawJob *>arg
    cdef int64_t start = 0, size = 0
    cdef fr_status st
    PyThread_acquire_lock(j.lock, WAIT_LOCK)
    while not j.closed:
        size = _take_chunk(j, &start)
        if size == 0:
            break
        j.busy_start, j.busy_size = start, size
        PyThread_release_lock(j.lock)
        st = fr_reservoir_draw(&j.mine, j.stream, j.round, j.offset, start, size)
        PyThread_acquire_lock(j.lock, WAIT_LOCK)
        j.busy_size = 0
        if j.closed:      # too late: the caller drew this chunk itself
            break
        memcpy(j.res[1].heap, j.mine.heap, <size_t>j.mine.count * sizeof(fr_entry))
        j.res[1].count = j.mine.count
        j.helper_chunks += 1
        if st != FR_OK and j.helper_st == FR_OK:
            j.helper_st = st
    PyThread_release_lock(j.lock)
    _let_go(j)
    _count_helper(-1)


cdef int _adopt_after_fork(_DrawJob *j) except -1:
    """Make a draw from before a fork this process's alone: a fresh lock, no helper, and
    every chunk to draw again (what the helper published may be torn)."""
    cdef PyThread_type_lock lock = PyThread_allocate_lock()
    if lock == NULL:
        raise MemoryError()
    j.lock = lock   # the old one may be held by the parent's helper: leaked
    j.generation = _fork_generation
    j.refs = 1
    j.res[0].count = j.res[1].count = j.res[2].count = 0
    j.helper_chunks = 0
    j.busy_size = 0
    j.closed = False
    j.helper_st = FR_OK
    j.next = j.n if j.res[0].cap == 0 else 0
    return 0


@cython.final
cdef class RoundDraw:
    """The round's reservoir over clients offset .. offset+n-1, the same as
    :func:`round_sample`, drawn in chunks of ``chunk`` clients by a helper thread (when
    ``helper``) while the caller works; :meth:`finish` draws what is left and returns
    (keys, client indices, batch positions), best first (by position if ``arrival``).
    :meth:`close` (also on
    deallocation) lets the helper go; neither ever waits for it."""
    cdef _DrawJob *job      # NULL once closed (finish() closes it too)
    cdef bint finishing     # finish() is drawing without the GIL: close() leaves it to finish
    cdef readonly int64_t helper_chunks   # after finish(): how many chunks the helper drew
    cdef readonly int64_t redrawn         # ... and how many clients the caller drew again

    def __cinit__(self, uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset,
                  int64_t n, int64_t k, int64_t chunk=1 << 14, bint helper=True):
        if n < 0 or k < 0 or offset < 0 or round < 0 or chunk < 1:
            raise ValueError("n, k, offset and round must be non-negative and chunk positive")
        if offset > INT64_MAX - n:
            raise OverflowError("offset + n overflows int64")
        cdef int64_t cap = k if k < n else n
        cdef size_t nbytes = <size_t>(cap if cap > 0 else 1) * sizeof(fr_entry)
        cdef int r
        cdef _DrawJob *j = <_DrawJob *>calloc(1, sizeof(_DrawJob))
        if j == NULL:
            raise MemoryError()
        j.lock = PyThread_allocate_lock()
        for r in range(3):
            j.res[r].heap = <fr_entry *>malloc(nbytes)
            j.res[r].cap = cap
        j.mine.heap = <fr_entry *>malloc(nbytes)
        j.mine.cap = cap
        if j.lock == NULL or j.res[0].heap == NULL or j.res[1].heap == NULL or \
                j.res[2].heap == NULL or j.mine.heap == NULL:
            _free_job(j)
            raise MemoryError()
        self.job = j
        j.refs = 1
        j.generation = _fork_generation
        j.stream = fr_round_stream(seed0, seed1, <uint64_t>round)
        j.round, j.offset, j.n, j.chunk = round, offset, n, chunk
        # An empty reservoir keeps nothing: no keys to draw.
        j.next = n if cap == 0 else 0
        if helper and j.next < n:
            if _helpers_lock == NULL:
                raise MemoryError()
            j.refs = 2
            _count_helper(1)
            if PyThread_start_new_thread(_helper_main, <void *>j) == -1:
                j.refs = 1
                _count_helper(-1)

    def finish(self, bint arrival=False):
        cdef _DrawJob *j = self.job
        if j == NULL or self.finishing:
            raise RuntimeError("this round's draw is closed")
        cdef int64_t start = 0, size, busy_start = 0, busy_size = 0, m, count = 0
        cdef int r
        cdef fr_status st0 = FR_OK, st
        cdef fr_entry *buf = NULL
        self.finishing = True
        try:
            if j.generation != _fork_generation:
                _adopt_after_fork(j)
            with nogil:
                PyThread_acquire_lock(j.lock, WAIT_LOCK)
                while True:
                    size = _take_chunk(j, &start)
                    if size == 0:
                        break
                    PyThread_release_lock(j.lock)
                    st = fr_reservoir_draw(&j.res[0], j.stream, j.round, j.offset, start, size)
                    if st != FR_OK and st0 == FR_OK:
                        st0 = st
                    PyThread_acquire_lock(j.lock, WAIT_LOCK)
                # From here on res[1] is the helper's for good; its unfinished chunk is ours.
                j.closed = True
                busy_start, busy_size = j.busy_start, j.busy_size
                PyThread_release_lock(j.lock)
                if busy_size > 0:
                    st = fr_reservoir_draw(&j.res[2], j.stream, j.round, j.offset,
                                           busy_start, busy_size)
                    if st != FR_OK and st0 == FR_OK:
                        st0 = st
            self.helper_chunks = j.helper_chunks
            self.redrawn = busy_size
            _check(st0, "round_sample")
            _check(j.helper_st, "round_sample")
            # The reservoirs' union, best first: equal keys by position, as in one pass.
            m = j.res[0].count + j.res[1].count + j.res[2].count
            buf = <fr_entry *>malloc((m if m > 0 else 1) * sizeof(fr_entry))
            if buf == NULL:
                raise MemoryError()
            count = 0
            for r in range(3):
                memcpy(buf + count, j.res[r].heap, <size_t>j.res[r].count * sizeof(fr_entry))
                count += j.res[r].count
            _check(fr_select_top(buf, m, j.res[0].cap, &count), "select_top")
            if arrival:
                fr_sort_arrival(buf, count)
            return _entry_arrays(buf, count)
        finally:
            free(buf)
            self.finishing = False
            self._close()

    def close(self):
        if not self.finishing:   # else finish() closes when it is done
            self._close()

    cdef void _close(self) noexcept:
        cdef _DrawJob *j = self.job
        if j == NULL:
            return
        self.job = NULL
        if j.generation != _fork_generation:   # made before a fork: this child's alone
            j.lock = NULL   # perhaps held by a helper that is not in this process: leaked
            _free_job(j)
            return
        with nogil:
            PyThread_acquire_lock(j.lock, WAIT_LOCK)
            j.closed = True
            PyThread_release_lock(j.lock)
            _let_go(j)

    def __dealloc__(self):
        self._close()


cdef cnp.ndarray _private_copy(object a, object dtype=None):
    """A fresh C-contiguous ndarray (not a subclass) with ``a``'s dtype (or ``dtype``, an
    equivalent one), shape and values, held by no one else. A state's arrays are checked and
    used as such copies: the caller keeps its own, and Python code that runs during the
    round (a finalizer, a dict subclass's ``__getitem__``, a ``__del__``) may change those in
    place after the check."""
    return np.array(a, dtype=dtype, copy=True, order="C", subok=False)


cdef _check_entry_array(object a, int typenum, str what, str key):
    """ValueError unless a state's array ``a`` is a 1-d ndarray of ``typenum`` (native) or
    an equivalent type (``ulonglong`` is ``uint64`` where both are 64 bits)."""
    if not cnp.PyArray_Check(a) or cnp.PyArray_NDIM(a) != 1 \
            or not cnp.PyArray_EquivTypenums(cnp.PyArray_TYPE(a), typenum) \
            or not cnp.PyArray_ISNOTSWAPPED(a):
        raise ValueError(f"{what}[{key!r}] must be a 1-d "
                         f"{cnp.PyArray_DescrFromType(typenum)} array")


cdef object _exact_int(object value):
    """``value``'s integer as an exact int, or None unless an int or numpy integer (not a
    bool). Read from the object itself, not through its methods: a subclass's ``__int__``,
    ``__index__`` or comparisons could otherwise pass a check with one value and give
    another."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or _type_check(value, _NP_BOOL):
        return None
    if isinstance(value, int):
        return int.__index__(value)        # int's own slot: a copy of the stored value
    if _type_check(value, _NP_INTEGER):
        return _stored_integer(value)
    return None


cdef object _stored_integer(object value):
    """A numpy integer scalar's stored value as an int (None for a timedelta64): its bytes
    copied into an exact scalar of its dtype, so no method of a subclass is asked."""
    cdef cnp.dtype descr = cnp.PyArray_DescrFromScalar(value)
    cdef uint64_t buf[2]
    if (descr.kind != b"i" and descr.kind != b"u") or descr.itemsize > 8:
        return None
    cnp.PyArray_ScalarAsCtype(value, buf)
    return int(PyArray_Scalar(buf, descr, None))


def check_int(value, what, minimum, maximum=None):
    """``value`` as an exact int, checked: TypeError unless an int or numpy integer (not a
    bool), ValueError outside [minimum, maximum]."""
    v = _exact_int(value)
    if v is None:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if v < minimum:
        raise ValueError(f"{what} must be {'positive' if minimum == 1 else 'non-negative'}, "
                         f"got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {v}")
    return v


cdef object _seed_word(object w):
    """A seed word as an exact int, or None unless an integer in [0, 2**64)."""
    v = _exact_int(w)
    return v if v is not None and 0 <= v < _TWO_64 else None


_TWO_64 = 1 << 64
_TWO_63 = 1 << 63
STATE_KEYS = ("seed", "round", "keys", "rounds", "indices", "samples")


def check_state(state, int64_t k, tuple out_names, tuple layouts, str what):
    """Every field of an (untrusted) state checked, in one call (a round starts with it, on
    caches its client loop left cold): ``((seed0, seed1), round, keys, rounds, indices,
    {name: leaves})``, the leaves per finalized metric parallel to ``layouts``."""
    if not isinstance(state, dict) or len(state) != len(STATE_KEYS) \
            or not all([key in state for key in STATE_KEYS]):
        raise TypeError(f"{what} must be a dict with keys {list(STATE_KEYS)} (from "
                        f"initialize() or next()), got {type(state).__name__}"
                        + (f" with keys {sorted(map(str, state))}"
                           if isinstance(state, dict) else ""))
    seed = state["seed"]
    s0 = s1 = None
    if type(seed) is tuple or type(seed) is list:
        if len(seed) == 2:
            s0, s1 = _seed_word(seed[0]), _seed_word(seed[1])
    if s0 is None or s1 is None:
        raise ValueError(f"{what}['seed'] must be a pair of 64-bit unsigned ints, got "
                         f"{seed!r:.80}")
    rnd = check_int(state["round"], f"{what}['round']", 0, INT64_MAX)
    keys, rounds, indices = check_entries(state["keys"], state["rounds"], state["indices"],
                                          rnd, k, what)
    cdef Py_ssize_t m = len(keys)
    samples = state["samples"]
    if not isinstance(samples, dict) or len(samples) != len(out_names) \
            or not all([name in samples for name in out_names]):
        raise ValueError(f"{what}['samples'] must be a dict with the finalized metrics "
                         f"{list(out_names)}, got "
                         + (f"keys {list(samples)!r:.200}" if isinstance(samples, dict)
                            else type(samples).__name__))
    cdef dict leaves = {}
    for name, layout in zip(out_names, layouts):
        try:
            leaves[name] = (<Layout?>layout).check_samples(samples[name], m)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}['samples'][{name!r}]: {e}") from None
    return (s0, s1), rnd, keys, rounds, indices, leaves


cpdef tuple check_entries(keys, rounds, indices, int64_t rnd, int64_t k, str what):
    """A state's ``keys``, ``rounds`` and ``indices`` checked (1-d uint64/int64/int64 arrays
    of one length, at most ``k``; rounds in [0, ``rnd``), indices non-negative, clients
    distinct and in arrival order) in one pass; returns them as private copies
    (``_private_copy``), checked before they are copied (nothing refused is copied) and
    again as copied."""
    cdef tuple arrays = (keys, rounds, indices)
    cdef int attempt
    cdef int64_t m = 0, i
    for attempt in range(2):
        _check_entry_array(arrays[0], cnp.NPY_UINT64, what, "keys")
        _check_entry_array(arrays[1], cnp.NPY_INT64, what, "rounds")
        _check_entry_array(arrays[2], cnp.NPY_INT64, what, "indices")
        m = cnp.PyArray_DIMS(arrays[0])[0]
        if cnp.PyArray_DIMS(arrays[1])[0] != m or cnp.PyArray_DIMS(arrays[2])[0] != m:
            raise ValueError(f"{what}['keys'], ['rounds'] and ['indices'] differ in length")
        if m > k:
            raise ValueError(f"{what} holds {m} clients, more than sample_size={k}")
        if attempt == 0:   # copied as exactly uint64, int64, int64
            arrays = (_private_copy(arrays[0], np.uint64), _private_copy(arrays[1], np.int64),
                      _private_copy(arrays[2], np.int64))
    cdef cnp.ndarray ka = arrays[0], ra = arrays[1], ia = arrays[2]
    cdef const int64_t *r = <const int64_t *>cnp.PyArray_DATA(ra)
    cdef const int64_t *ix = <const int64_t *>cnp.PyArray_DATA(ia)
    # One rule at a time over the whole state: the first rule broken is the one reported.
    for i in range(m):
        if r[i] < 0 or r[i] >= rnd:
            raise ValueError(f"{what}['rounds'] must lie in [0, {what}['round'] = {rnd})")
    for i in range(m):
        if ix[i] < 0:
            raise ValueError(f"{what}['indices'] must be non-negative")
    for i in range(1, m):
        if not (r[i] > r[i - 1] or (r[i] == r[i - 1] and ix[i] > ix[i - 1])):
            raise ValueError(f"{what}'s clients must be distinct and in arrival order "
                             f"(round, then index)")
    return ka, ra, ia


cpdef tuple union_entries(a_keys, a_rounds, a_indices, b_keys, b_rounds, b_indices,
                          int64_t k):
    """The best ``k`` entries of a's then b's (keys, rounds, indices), in arrival order:
    ``(sel, keys, rounds, indices)``, ``sel`` their positions in the concatenation of a and
    b. Larger keys win; equal keys keep the earlier position (a's entries first).
    ``b_rounds`` may be an int: the round of all of b's entries."""
    if k < 0:
        raise ValueError("k must be non-negative")
    cdef cnp.ndarray ak = _c1d(a_keys, cnp.NPY_UINT64)
    cdef cnp.ndarray ar = _c1d(a_rounds, cnp.NPY_INT64)
    cdef cnp.ndarray ai = _c1d(a_indices, cnp.NPY_INT64)
    cdef cnp.ndarray bk = _c1d(b_keys, cnp.NPY_UINT64)
    cdef cnp.ndarray bi = _c1d(b_indices, cnp.NPY_INT64)
    cdef int64_t na = ak.shape[0], nb = bk.shape[0], n, i, count = 0, b_round = 0
    cdef cnp.ndarray br = None
    if isinstance(b_rounds, (int, np.integer)):
        b_round = b_rounds
    else:
        br = _c1d(b_rounds, cnp.NPY_INT64)
    if ar.shape[0] != na or ai.shape[0] != na or bi.shape[0] != nb \
            or (br is not None and br.shape[0] != nb):
        raise ValueError("each side's keys, rounds and indices must be of one length")
    n = na + nb
    cdef fr_entry *buf = <fr_entry *>malloc((n if n > 0 else 1) * sizeof(fr_entry))
    if buf == NULL:
        raise MemoryError()
    cdef const uint64_t *kp = <const uint64_t *>cnp.PyArray_DATA(ak)
    cdef const int64_t *rp = <const int64_t *>cnp.PyArray_DATA(ar)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ai)
    cdef uint64_t *ko
    cdef int64_t *so
    cdef int64_t *ro
    cdef int64_t *io
    try:
        for i in range(na):
            buf[i].key, buf[i].round, buf[i].index, buf[i].src = kp[i], rp[i], ip[i], i
        kp = <const uint64_t *>cnp.PyArray_DATA(bk)
        rp = <const int64_t *>cnp.PyArray_DATA(br) if br is not None else NULL
        ip = <const int64_t *>cnp.PyArray_DATA(bi)
        for i in range(nb):
            buf[na + i].key = kp[i]
            buf[na + i].round = rp[i] if rp != NULL else b_round
            buf[na + i].index = ip[i]
            buf[na + i].src = na + i
        _check(fr_select_top(buf, n, k, &count), "select_top")
        fr_sort_arrival(buf, count)
        sel = _empty1(count, cnp.NPY_INT64)
        keys = _empty1(count, cnp.NPY_UINT64)
        rounds = _empty1(count, cnp.NPY_INT64)
        indices = _empty1(count, cnp.NPY_INT64)
        so, ko = <int64_t *>cnp.PyArray_DATA(sel), <uint64_t *>cnp.PyArray_DATA(keys)
        ro, io = <int64_t *>cnp.PyArray_DATA(rounds), <int64_t *>cnp.PyArray_DATA(indices)
        for i in range(count):
            so[i], ko[i], ro[i], io[i] = buf[i].src, buf[i].key, buf[i].round, buf[i].index
    finally:
        free(buf)
    return sel, keys, rounds, indices


def union_state(a_keys, a_rounds, a_indices, dict a_leaves, b_keys, b_rounds, b_indices,
                dict b_leaves, int64_t k, tuple out_names, tuple layouts):
    """The best ``k`` of a's and b's entries, ordered as union_entries orders them, with their
    samples: ``(keys, rounds, indices, {name: samples})``. ``a_leaves`` and ``b_leaves`` map
    each finalized metric of ``out_names`` (parallel to ``layouts``) to its leaves."""
    sel, keys, rounds, indices = union_entries(a_keys, a_rounds, a_indices, b_keys, b_rounds,
                                               b_indices, k)
    cdef dict samples = {}
    for name, layout in zip(out_names, layouts):
        samples[name] = _rebuild((<Layout?>layout).root,
                                 _gather_union(<list?>a_leaves[name], <list?>b_leaves[name], sel))
    return keys, rounds, indices, samples


cdef bint _plain_rows(cnp.ndarray a, int64_t *row_bytes):
    """Whether a's rows (along the first axis) are contiguous bytes, with no object
    references; their size in *row_bytes."""
    cdef int d, ndim = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    cdef int64_t size = cnp.PyArray_ITEMSIZE(a)
    # Numbers and bools: built-in types of plain bytes (no object references, no parameters
    # such as a datetime's unit), so a typenum remakes the dtype of a native-order one.
    cdef bint ok = ndim >= 1 and (cnp.PyArray_ISNUMBER(a) or cnp.PyArray_ISBOOL(a))
    for d in range(ndim - 1, 0, -1):
        if dims[d] != 1 and strides[d] != size:
            ok = False
        size *= dims[d]
    row_bytes[0] = size
    return ok


def gather_union(list xs not None, list ys not None, cnp.ndarray sel not None):
    """``[np.concatenate([x, y])[sel] for x, y in zip(xs, ys)]``, rows copied directly
    where both sides hold plain rows of one dtype and shape (numpy otherwise)."""
    return _gather_union(xs, ys, sel)


cdef list _gather_union(list xs, list ys, cnp.ndarray sel):
    if len(xs) != len(ys):
        raise ValueError("xs and ys must have the same length")
    if sel.ndim != 1 or cnp.PyArray_TYPE(sel) != cnp.NPY_INT64:
        raise ValueError("sel must be a 1-d int64 array")
    sel = _c1d(sel, cnp.NPY_INT64)
    cdef const int64_t *sp = <const int64_t *>cnp.PyArray_DATA(sel)
    cdef int64_t nsel = sel.shape[0], j, na, nb, xrow, yrow, lo = 0, hi = -1
    if nsel:   # sel's range, checked against each leaf's length below
        lo = hi = sp[0]
        for j in range(1, nsel):
            if sp[j] < lo:
                lo = sp[j]
            elif sp[j] > hi:
                hi = sp[j]
    cdef cnp.ndarray x, y, out
    cdef const char *xp
    cdef const char *yp
    cdef char *dst
    cdef Py_ssize_t t
    cdef int d, nd
    cdef cnp.npy_intp dims[32]   # NPY_MAXDIMS in NumPy 1.x (2.x allows 64: those go to numpy)
    cdef list result = []
    for t in range(len(xs)):
        x = <cnp.ndarray?>xs[t]
        y = <cnp.ndarray?>ys[t]
        na, nb = x.shape[0] if x.ndim else 0, y.shape[0] if y.ndim else 0
        if nsel and (lo < 0 or hi >= na + nb):
            raise ValueError("sel holds a position outside the concatenation")
        # EquivTypes: the same type, size and byte order; native, as concatenate returns.
        nd = cnp.PyArray_NDIM(x)
        if not (_plain_rows(x, &xrow) and _plain_rows(y, &yrow) and xrow == yrow
                and cnp.PyArray_NDIM(y) == nd and nd <= 32 and cnp.PyArray_ISNOTSWAPPED(x)
                and cnp.PyArray_EquivTypes(x.descr, y.descr)
                and _same_inner_dims(x, y)):
            result.append(np.concatenate([x, y])[sel])
            continue
        dims[0] = <cnp.npy_intp>nsel
        for d in range(1, nd):
            dims[d] = cnp.PyArray_DIMS(x)[d]
        out = cnp.PyArray_EMPTY(nd, dims, cnp.PyArray_TYPE(x), 0)
        if xrow == 0:   # empty rows: nothing to copy (and no row addresses to form)
            result.append(out)
            continue
        xp = <const char *>cnp.PyArray_DATA(x)
        yp = <const char *>cnp.PyArray_DATA(y)
        dst = <char *>cnp.PyArray_DATA(out)
        for j in range(nsel):
            if sp[j] < na:
                memcpy(dst + j * xrow, xp + sp[j] * cnp.PyArray_STRIDES(x)[0], <size_t>xrow)
            else:
                memcpy(dst + j * xrow, yp + (sp[j] - na) * cnp.PyArray_STRIDES(y)[0],
                       <size_t>xrow)
        result.append(out)
    return result


cdef bint _same_inner_dims(cnp.ndarray x, cnp.ndarray y):
    """x and y (of one ndim) agree past the first axis."""
    cdef int d
    for d in range(1, cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(x)[d] != cnp.PyArray_DIMS(y)[d]:
            return False
    return True


def gather_rows(cnp.ndarray a not None, cnp.ndarray positions not None):
    """``a[positions]`` for a 1-d int64 ``positions``, rows copied by the C gather."""
    if a.ndim == 0:
        raise ValueError("expected an array with a leading client axis, got a 0-d array")
    if positions.ndim != 1:
        raise ValueError("positions must be a 1-d array")
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    cdef int64_t npos = positions.shape[0]
    cdef int64_t nrows = a.shape[0]
    # Dtype, shape and strides all come from the array struct the kernel reads (an ndarray
    # subclass can override the Python attributes). The kernel copies whole rows as bytes;
    # rows that are not C-contiguous (or object rows, which hold references) go through
    # numpy instead.
    cdef int64_t row_bytes
    if not _plain_rows(a, &row_bytes):
        return np.asarray(a)[positions]
    cdef object dt = a.descr   # numpy.pxd: PyArray_DESCR, not the Python attribute
    cdef int d, ndim = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
    inner = tuple([dims[d] for d in range(1, ndim)])
    out = np.empty((npos,) + inner, dtype=dt)
    cdef fr_status st
    cdef const char *src = <const char *>cnp.PyArray_DATA(a)
    cdef int64_t stride = a.strides[0]
    cdef const int64_t *pp = <const int64_t *>cnp.PyArray_DATA(positions)
    cdef char *dst = <char *>cnp.PyArray_DATA(out)
    with nogil:
        st = fr_gather_rows(src, nrows, stride, row_bytes, pp, npos, dst)
    _check(st, "gather_rows")
    return out

