# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled core of :mod:`fastrec.sampling`.

The C kernels (csrc/keys.c, reservoir.c, nonfinite.c) do the numeric work;
this module converts Python values around them: it checks every client's
unfinalized metrics against the compiled spec, calls the finalizers, counts
non-finite finalized leaves and keeps only the sampled clients' values.
Scalars never become numpy objects on the way.
"""

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

cimport numpy as cnp
from cpython.dict cimport PyDict_Size
from cpython.list cimport PyList_AsTuple
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.long cimport PyLong_Check
from cpython.complex cimport PyComplex_Check
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from fastrec._kernels cimport (
    FR_FT_COMPLEX64, FR_FT_COMPLEX128, FR_FT_FLOAT16, FR_FT_FLOAT32, FR_FT_FLOAT64,
    fr_client_keys, fr_count_nonfinite, fr_entry, fr_ftype, fr_gather_rows, fr_round_sample,
    fr_select_top)
from fastrec._status cimport FR_ERR_NOMEM, FR_ERR_TYPE, FR_OK, fr_status, fr_status_name

cnp.import_array()

cdef extern from "Python.h":
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL
    ctypedef struct PyTypeObject:
        pass
    PyTypeObject PyFloat_Type
    PyTypeObject PyLong_Type
    PyTypeObject *_TYPE "Py_TYPE"(PyObject *) nogil
    # Borrowed pointers, compared by address only (cpython.list's versions return objects).
    Py_ssize_t PyList_GET_SIZE(object) nogil
    PyObject *PyList_GET_ITEM(object, Py_ssize_t) nogil
    Py_ssize_t PyTuple_GET_SIZE(object) nogil
    PyObject *PyTuple_GET_ITEM(object, Py_ssize_t) nogil


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

cdef inline bint _double_bad(double x) noexcept nogil:
    cdef uint64_t b
    memcpy(&b, &x, 8)
    return (b & 0x7FF0000000000000ULL) == 0x7FF0000000000000ULL


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


cdef int _leaf_bad(object f) except -1:
    """1 if the finalized leaf ``f`` holds a non-finite number, else 0; TypeError if not numeric."""
    if PyFloat_Check(f):  # float and np.float64
        return _double_bad(PyFloat_AS_DOUBLE(f))
    if PyLong_Check(f):  # int and bool can't be non-finite
        return 0
    # Real type checks (not isinstance, which honours a __class__ property): the array
    # branch reads the ndarray struct, the scalar branch its dtype.
    if cnp.PyArray_Check(f):
        return _count_array(<cnp.ndarray>f, False) > 0
    if PyComplex_Check(f):
        return _double_bad(f.real) or _double_bad(f.imag)
    if issubclass(type(f), np.generic):
        dt = f.dtype
        if dt.kind in "biu":
            return 0
        if dt.kind == "f" and dt.itemsize <= 8:
            return _double_bad(float(f))
        return _count_array(np.asarray(f), False) > 0
    raise TypeError(f"finalized value must be a number, a numpy array, or a list, tuple or "
                    f"mapping of them; got {type(f).__name__}")


cdef inline bint _is_struct(object f):
    # Numbers and arrays first: the Mapping ABC check is slow for them.
    if PyFloat_Check(f) or PyLong_Check(f) or isinstance(f, (np.ndarray, np.generic)):
        return False
    return isinstance(f, (list, tuple, dict)) or isinstance(f, Mapping)


cdef object _skeleton(object f, list flags):
    """``f``'s list/tuple/mapping structure with ``None`` leaves (the shape ``map_leaves``
    builds), appending each leaf's non-finite flag to ``flags`` in the same walk.

    One walk, into private containers: ``f`` may be user code (a Mapping whose keys change
    between iterations, a list a finalizer keeps growing), so the structure that is compared
    and the flags that are counted must come from the same reading of it.
    """
    cdef dict d
    if isinstance(f, (list, tuple)):
        items = [_skeleton(x, flags) for x in f]
        return tuple(items) if type(f) is tuple else items
    if isinstance(f, Mapping):
        d = {}
        for key in f:
            if key in d:
                raise ValueError(f"finalized mapping yields the key {key!r} twice")
            d[key] = _skeleton(f[key], flags)
        return d
    flags.append(_leaf_bad(f))
    return None


cdef bint _same_skeleton(object a, object b) except -1:
    """Whether two skeletons have the same structure (list and tuple interchangeable,
    mapping keys in the same order)."""
    if a is None:
        return b is None
    if type(a) is dict:
        if type(b) is not dict or list(<dict>a) != list(<dict>b):
            return False
        for x, y in zip((<dict>a).values(), (<dict>b).values()):
            if not _same_skeleton(x, y):
                return False
        return True
    if (type(b) is not list and type(b) is not tuple) or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if not _same_skeleton(x, y):
            return False
    return True


def map_leaves(fn, template):
    """``template``'s list/tuple/mapping structure with every leaf ``x`` replaced by fn(x)."""
    if isinstance(template, (list, tuple)):
        items = [map_leaves(fn, x) for x in template]
        return tuple(items) if type(template) is tuple else items
    if isinstance(template, Mapping):
        return {k: map_leaves(fn, template[k]) for k in template}
    return fn(template)


cdef class _Acc:
    """Measurement and samples of one finalized metric over a round's clients."""
    cdef bint nested
    cdef bint started
    cdef object template
    cdef int64_t count
    cdef list counts
    cdef list flags
    cdef public list samples

    def __cinit__(self, Py_ssize_t nsample):
        self.samples = [None] * nsample
        self.flags = []

    cdef int add(self, object f, int64_t slot) except -1:
        cdef Py_ssize_t j
        if not self.started:
            self.started = True
            self.nested = _is_struct(f)
        if not self.nested:
            if PyFloat_Check(f):  # the common case, kept free of any type dispatch
                self.count += _double_bad(PyFloat_AS_DOUBLE(f))
                if slot >= 0:
                    self.samples[slot] = f
                return 0
            if _is_struct(f):
                raise ValueError(f"finalized value is a {type(f).__name__}, but the first "
                                 f"client's was a single value")
            self.count += _leaf_bad(f)
        else:
            del self.flags[:]
            skeleton = _skeleton(f, self.flags)
            if self.counts is None:
                self.template = skeleton
                self.counts = [0] * len(self.flags)
            elif not _same_skeleton(self.template, skeleton):
                raise ValueError("finalized value does not have the structure of the first "
                                 "client's")
            if len(self.flags) != len(self.counts):  # same skeleton, same leaves: cannot happen
                raise ValueError("finalized value does not have the structure of the first "
                                 "client's")
            for j in range(len(self.flags)):
                self.counts[j] += self.flags[j]
        if slot >= 0:
            self.samples[slot] = f
        return 0

    def measurement(self):
        if not self.nested:
            return int(self.count)
        it = iter(self.counts)
        return map_leaves(lambda _: next(it), self.template)


# ----------------------------------------------------------------------------------------------
# Unfinalized metric specs and client value conversion
# ----------------------------------------------------------------------------------------------

cdef enum:
    T_SCALAR = 1
    T_ARRAY = 2
    T_STRUCT = 3

cdef enum:
    K_BOOL = 1
    K_INT = 2
    K_FLOAT = 3
    K_COMPLEX = 4

# Value kinds (numpy dtype.kind letters) each spec kind accepts; bool is not a number here,
# as in TFF, so it only matches a bool spec.
_ACCEPTS = {K_BOOL: "b", K_INT: "iu", K_FLOAT: "iuf", K_COMPLEX: "iufc"}


cdef class CompiledSpec:
    """A checked, pre-digested TensorSpec (leaf) or list/tuple of them (struct)."""
    cdef int tag
    cdef int kind
    cdef readonly object dtype
    cdef readonly tuple shape
    cdef object lo, hi
    cdef str accepts
    cdef readonly tuple children
    cdef object container
    cdef bint scalar_children  # every child is a scalar leaf (see _convert's in-place path)

    @staticmethod
    def leaf(dtype, tuple shape):
        cdef CompiledSpec s = CompiledSpec.__new__(CompiledSpec)
        s.dtype = np.dtype(dtype)
        s.shape = shape
        s.tag = T_SCALAR if shape == () else T_ARRAY
        k = s.dtype.kind
        s.kind = {"b": K_BOOL, "i": K_INT, "u": K_INT, "f": K_FLOAT, "c": K_COMPLEX}[k]
        s.accepts = _ACCEPTS[s.kind]
        if k in "iu":
            info = np.iinfo(s.dtype)
            s.lo, s.hi = int(info.min), int(info.max)
        return s

    @staticmethod
    def struct(container, list children):
        cdef CompiledSpec s = CompiledSpec.__new__(CompiledSpec)
        s.tag = T_STRUCT
        s.container = container
        s.children = tuple(children)
        s.scalar_children = True
        for c in s.children:   # _convert casts them without a check
            if not isinstance(c, CompiledSpec):
                raise TypeError(f"struct children must be CompiledSpec, got {type(c).__name__}")
            s.scalar_children &= (<CompiledSpec>c).tag == T_SCALAR
        return s


def with_context(e, str prefix):
    """A new exception of ``e``'s type (or its TypeError/ValueError base, if that type can't
    be built from a message) reading "prefix: message"."""
    msg = f"{prefix}: {e}"
    try:
        return type(e)(msg)
    except Exception:
        return (TypeError if isinstance(e, TypeError) else ValueError)(msg)


cdef str _describe(object v):
    r = repr(v)
    if len(r) > 40:
        r = r[:37] + "..."
    return f"{type(v).__name__} {r}"


cdef object _check_int_range(CompiledSpec s, object v):
    iv = int(v)
    if iv < s.lo or iv > s.hi:
        raise ValueError(f"{iv} is out of range for {s.dtype}")
    return v


cdef object _convert_scalar(CompiledSpec s, object v):
    t = type(v)
    # Fast paths: the plain Python numbers metrics usually are, passed through unchanged.
    if t is float:
        if s.kind >= K_FLOAT:
            return v
    elif t is int:
        if s.kind == K_INT:
            return _check_int_range(s, v)
        if s.kind >= K_FLOAT:
            return v
    elif t is bool:
        if s.kind == K_BOOL:
            return v
    elif t is complex:
        if s.kind == K_COMPLEX:
            return v
    elif isinstance(v, (int, float, complex)):  # subclasses, np.float64 and np.complex128
        k = ("b" if isinstance(v, bool) else "i" if isinstance(v, int)
             else "f" if isinstance(v, float) else "c")
        if k in s.accepts:
            if s.kind == K_INT:
                return _check_int_range(s, v)
            return v
    elif issubclass(type(v), np.generic) and not issubclass(type(v), (np.str_, np.bytes_, np.void)):
        k = v.dtype.kind
        if k in s.accepts:
            if s.kind == K_INT:
                return _check_int_range(s, v)
            return v
    elif isinstance(v, (np.ndarray, list, tuple)):
        return _convert_array(s, v)
    else:
        raise TypeError(f"expected a {s.dtype} scalar, got non-numeric {_describe(v)}")
    raise TypeError(f"expected a {s.dtype} scalar, got {_describe(v)}")


cdef object _convert_array(CompiledSpec s, object v):
    if isinstance(v, (str, bytes)):
        raise TypeError(f"expected a {s.dtype} array, got non-numeric {_describe(v)}")
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as e:
        raise ValueError(f"expected a {s.dtype} array of shape {s.shape}, got a value numpy "
                         f"cannot convert ({e})") from None
    k = a.dtype.kind
    if k not in "biufc":
        raise TypeError(f"expected a {s.dtype} array, got non-numeric values (dtype {a.dtype})")
    if a.ndim != len(s.shape) or any(w is not None and w != d for w, d in zip(s.shape, a.shape)):
        raise ValueError(f"expected shape {s.shape}, got shape {a.shape}")
    if a.size == 0:
        return a.astype(s.dtype)
    if k not in s.accepts:
        raise TypeError(f"expected {s.dtype} values, got dtype {a.dtype}")
    if s.kind == K_INT and a.dtype != s.dtype:
        lo, hi = int(a.min()), int(a.max())
        if lo < s.lo or hi > s.hi:
            raise ValueError(f"values in [{lo}, {hi}] are out of range for {s.dtype}")
    return a.astype(s.dtype, copy=False)


cdef object _convert(CompiledSpec s, object v):
    """The value handed to the finalizer for ``v`` under spec ``s`` (``v`` itself if possible)."""
    if s.tag == T_SCALAR:
        return _convert_scalar(s, v)
    if s.tag == T_ARRAY:
        return _convert_array(s, v)
    cdef tuple children = s.children
    cdef Py_ssize_t j, n = len(children)
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"expected a list or tuple of {n} values, got {_describe(v)}")
    # Converting an element may run Python code (__class__, __index__, __array__...) that
    # mutates a list value: check a snapshot of it, and hand over the list itself only if
    # it still holds exactly the checked elements.
    cdef tuple items
    if type(v) is list and s.scalar_children and _exact_numbers(v, n):
        return _convert_numbers_in_place(s, v, n)
    if isinstance(v, tuple):
        items = <tuple>v   # immutable storage, also for tuple subclasses (namedtuples)
    else:
        items = PyList_AsTuple(v)
    if len(items) != n:
        raise ValueError(f"expected a list or tuple of {n} values, got {len(items)}")
    out = None
    j = 0
    try:
        for j in range(n):
            x = items[j]
            y = _convert(<CompiledSpec>children[j], x)
            if y is not x and out is None:
                out = list(items[:j])
            if out is not None:
                out.append(y)
    except (TypeError, ValueError) as e:
        raise with_context(e, f"element {j}") from None
    if out is not None:
        return s.container(out)
    if v is items or _holds_exactly(v, items):
        return v
    return s.container(list(items))


cdef bint _exact_numbers(object v, Py_ssize_t n) noexcept:
    """Whether the list ``v`` holds exactly ``n`` items, all exact floats or ints."""
    cdef Py_ssize_t j
    cdef PyObject *x
    if PyList_GET_SIZE(v) != n:
        return False
    for j in range(n):
        x = PyList_GET_ITEM(v, j)
        if _TYPE(x) != &PyFloat_Type and _TYPE(x) != &PyLong_Type:
            return False
    return True


cdef object _convert_numbers_in_place(CompiledSpec s, list v, Py_ssize_t n):
    """_convert for a list of exact floats/ints against scalar specs, the common case. Their
    conversion runs no Python code (float/int fast paths, C comparisons), so the list cannot
    change while it is read in place, and each value converts to itself or raises."""
    cdef tuple children = s.children
    cdef Py_ssize_t j = 0
    try:
        for j in range(n):
            x = <object>PyList_GET_ITEM(v, j)
            if _convert_scalar(<CompiledSpec>children[j], x) is not x:
                raise AssertionError("an exact number converted to another object")
    except (TypeError, ValueError) as e:
        raise with_context(e, f"element {j}") from None
    return v


cdef bint _holds_exactly(object v, tuple items) noexcept:
    """Whether the list ``v`` holds the objects of ``items``, in order (identity)."""
    cdef Py_ssize_t j, n = PyTuple_GET_SIZE(items)
    if PyList_GET_SIZE(v) != n:
        return False
    for j in range(n):
        # Reads the list's storage and compares addresses: no Python code runs, so the
        # size read above still holds.
        if PyList_GET_ITEM(v, j) != PyTuple_GET_ITEM(items, j):
            return False
    return True


def convert_value(CompiledSpec s, v):
    """Check ``v`` against ``s``; return what a finalizer receives."""
    return _convert(s, v)


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
    _STAGE_KEYS = 0
    _STAGE_CONVERT = 1
    _STAGE_FINALIZE = 2
    _STAGE_MEASURE = 3


cdef inline object _context(BaseException e, int64_t i, object name):
    return with_context(e, f"client {i}, metric {name!r}")


def finalize_clients(clients, tuple names, tuple specs, finalizers, functional,
                     cnp.ndarray positions not None, Py_ssize_t nsample, int64_t offset=0):
    """Finalize every client, count non-finite leaves, keep the sampled clients' values.

    ``positions[r]`` is the batch position of the client with rank r in the round's sample.
    Exactly one of ``finalizers`` (a tuple parallel to ``names``) and ``functional`` is set.
    Returns (finalized names, per-name sample lists in rank order, per-name measurements).
    Errors name the client by its index in the round, ``offset`` + batch position: with
    clients in batch order, the first failing client (the lowest index) is the one reported.
    """
    # The round was sampled over the clients as they are now; finalizers and value
    # conversions run Python code that may mutate the caller's list, so read a snapshot.
    if type(clients) is not tuple:
        clients = tuple(clients)
    cdef Py_ssize_t n = len(clients)
    cdef Py_ssize_t m = len(names)
    if len(specs) != m:
        raise ValueError(f"{len(specs)} specs for {m} metric names")
    for spec in specs:   # cast without a check in the loop below
        if not isinstance(spec, CompiledSpec):
            raise TypeError(f"specs must be CompiledSpec, got {type(spec).__name__}")
    if functional is None and (type(finalizers) is not tuple or len(finalizers) != m):
        raise ValueError(f"finalizers must be a tuple of {m} callables")
    cdef Py_ssize_t i, j, r
    cdef int64_t *slot = <int64_t *>malloc((n if n > 0 else 1) * sizeof(int64_t))
    if slot == NULL:
        raise MemoryError()
    cdef const int64_t *pos = <const int64_t *>cnp.PyArray_DATA(positions)
    cdef list accs = None
    cdef PyObject *p
    cdef int stage
    cdef dict unfin
    cdef list out_names
    cdef tuple fins = finalizers if functional is None else None
    mapping_type = None
    try:
        if positions.dtype != np.int64 or not positions.flags.c_contiguous \
                or positions.shape[0] != nsample:
            raise ValueError("positions must be a contiguous int64 array of length nsample")
        for i in range(n):
            slot[i] = -1
        for r in range(nsample):
            if pos[r] < 0 or pos[r] >= n:
                raise ValueError("sample position out of range")
            slot[pos[r]] = r
        if functional is None:
            accs = [_Acc(nsample) for _ in names]
            out_names = list(names)
        for i in range(n):
            cv = clients[i]
            gi = offset + i
            # Exact dict and OrderedDict (no __getitem__ override) are read with the C API;
            # other mappings are copied through items() once, which for records that wrap a
            # dict (Flower's MetricsRecord) is one call instead of one per metric.
            if type(cv) is not dict and type(cv) is not OrderedDict:
                if type(cv) is not mapping_type:  # the ABC check is slow: once per type
                    if not isinstance(cv, Mapping):
                        raise TypeError(f"client {gi}: expected a mapping of metric name to "
                                        f"value, got {type(cv).__name__}")
                    mapping_type = type(cv)
                cv = dict(cv.items())
            if PyDict_Size(cv) != m:
                raise _key_error(gi, cv, names)
            if functional is not None:
                unfin = {}
            # One try per client, not per value: `stage` and `ctx_name` say what failed.
            stage = _STAGE_KEYS
            try:
                for j in range(m):
                    ctx_name = names[j]
                    stage = _STAGE_KEYS
                    p = PyDict_GetItemWithError(cv, ctx_name)
                    if p == NULL:
                        raise _key_error(gi, cv, names)
                    raw = <object>p
                    stage = _STAGE_CONVERT
                    val = _convert(<CompiledSpec>specs[j], raw)
                    if functional is not None:
                        unfin[ctx_name] = val
                        continue
                    stage = _STAGE_FINALIZE
                    f = fins[j](val)
                    stage = _STAGE_MEASURE
                    (<_Acc>accs[j]).add(f, slot[i])
                if functional is not None:
                    ctx_name = None
                    stage = _STAGE_FINALIZE
                    out = functional(unfin)
                    stage = _STAGE_KEYS
                    if not isinstance(out, Mapping):
                        raise TypeError(f"client {gi}: the metric finalizer must return a mapping "
                                        f"of metric name to finalized value, got "
                                        f"{type(out).__name__}")
                    if accs is None:
                        out_names = list(out)
                        accs = [_Acc(nsample) for _ in out_names]
                    elif len(out) != len(out_names) or any(x not in out for x in out_names):
                        raise ValueError(f"client {gi}: the finalizer returned metrics "
                                         f"{list(out)}, but for client {offset} it returned "
                                         f"{out_names}")
                    stage = _STAGE_MEASURE
                    for j in range(len(out_names)):
                        ctx_name = out_names[j]
                        (<_Acc>accs[j]).add(out[ctx_name], slot[i])
            except Exception as e:
                if stage == _STAGE_FINALIZE:
                    where = "the metrics" if ctx_name is None else f"metric {ctx_name!r}"
                    e.add_note(f"(while finalizing {where} of client {gi})")
                    raise
                if stage != _STAGE_KEYS and isinstance(e, (TypeError, ValueError)):
                    raise _context(e, gi, ctx_name) from None
                raise
    finally:
        free(slot)
    if accs is None:
        return [], [], []
    return (out_names, [(<_Acc>a).samples for a in accs],
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


def round_sample(uint64_t seed0, uint64_t seed1, int64_t round, int64_t offset, int64_t n,
                 int64_t k):
    """The round's reservoir: (keys, client indices, batch positions), best first."""
    if k < 0 or n < 0:
        raise ValueError("n and k must be non-negative")
    cdef int64_t cap = k if k < n else n
    cdef fr_entry *buf = <fr_entry *>malloc((cap if cap > 0 else 1) * sizeof(fr_entry))
    if buf == NULL:
        raise MemoryError()
    cdef int64_t count = 0, r
    cdef fr_status st
    cdef uint64_t *kp
    cdef int64_t *ip
    cdef int64_t *pp
    try:
        with nogil:
            st = fr_round_sample(seed0, seed1, round, offset, n, cap, buf, &count)
        _check(st, "round_sample")
        keys = np.empty(count, dtype=np.uint64)
        idx = np.empty(count, dtype=np.int64)
        pos = np.empty(count, dtype=np.int64)
        kp = <uint64_t *>cnp.PyArray_DATA(keys)
        ip = <int64_t *>cnp.PyArray_DATA(idx)
        pp = <int64_t *>cnp.PyArray_DATA(pos)
        for r in range(count):
            kp[r] = buf[r].key
            ip[r] = buf[r].index
            pp[r] = buf[r].src
    finally:
        free(buf)
    return keys, idx, pos


def select_top(cnp.ndarray keys not None, cnp.ndarray rounds not None, cnp.ndarray indices not None,
               int64_t k):
    """Positions of the best ``k`` distinct clients among parallel (key, round, index) arrays.

    Best first; a client listed twice (same round and index) is kept once.
    """
    if keys.ndim != 1 or rounds.ndim != 1 or indices.ndim != 1 \
            or not keys.shape[0] == rounds.shape[0] == indices.shape[0]:
        raise ValueError("keys, rounds and indices must be 1-d arrays of one length")
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    rounds = np.ascontiguousarray(rounds, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    cdef int64_t n = keys.shape[0], i, count = 0
    cdef int64_t *op
    if k < 0:
        raise ValueError("k must be non-negative")
    cdef fr_entry *buf = <fr_entry *>malloc((n if n > 0 else 1) * sizeof(fr_entry))
    if buf == NULL:
        raise MemoryError()
    cdef const uint64_t *kp = <const uint64_t *>cnp.PyArray_DATA(keys)
    cdef const int64_t *rp = <const int64_t *>cnp.PyArray_DATA(rounds)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(indices)
    cdef fr_status st
    try:
        for i in range(n):
            buf[i].key = kp[i]
            buf[i].round = rp[i]
            buf[i].index = ip[i]
            buf[i].src = i
        with nogil:
            st = fr_select_top(buf, n, k, &count)
        _check(st, "select_top")
        out = np.empty(count, dtype=np.int64)
        op = <int64_t *>cnp.PyArray_DATA(out)
        for i in range(count):
            op[i] = buf[i].src
    finally:
        free(buf)
    return out


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
    cdef object dt = a.descr   # numpy.pxd: PyArray_DESCR, not the Python attribute
    cdef int d, ndim = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *astrides = cnp.PyArray_STRIDES(a)
    cdef int64_t row_bytes = cnp.PyArray_ITEMSIZE(a)
    cdef bint rows_contiguous = True
    for d in range(ndim - 1, 0, -1):
        if dims[d] != 1 and astrides[d] != row_bytes:
            rows_contiguous = False
        row_bytes *= dims[d]
    if dt.hasobject or not rows_contiguous:
        return np.asarray(a)[positions]
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
