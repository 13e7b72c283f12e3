# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Array: Flower-compatible serialized array backed by the C .npy kernels (csrc/npy.c)."""

import ast
import dataclasses
import io
import warnings

import numpy as np
from numpy.lib.format import descr_to_dtype as _np_descr_to_dtype
from numpy.lib.format import dtype_to_descr as _np_dtype_to_descr

cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from fastrec._npy cimport *
from fastrec._status cimport *

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyTypeObject:
        pass
    PyTypeObject PyArray_Type
    # Steals a reference to descr (also on failure).
    object _np_new_from_descr "PyArray_NewFromDescr" (
        PyTypeObject *subtype, cnp.PyArray_Descr *descr, int nd, cnp.npy_intp *dims,
        cnp.npy_intp *strides, void *data, int flags, PyObject *obj)
    int NPY_ARRAY_C_CONTIGUOUS
    int NPY_ARRAY_F_CONTIGUOUS
    int NPY_ARRAY_WRITEABLE

cdef extern from "Python.h":
    Py_ssize_t PY_SSIZE_T_MAX

cdef enum:
    NOGIL_BYTES = 1 << 18   # copies at least this big run without the GIL
    CACHE_SLOTS = 64
    DESCR_CACHE_MAX = 256

cdef str _NUMPY_STYPE = "numpy.ndarray"


# Flower's Array dataclass fields (types as objects, as Flower's module has no
# postponed annotations). Array below publishes them, so the dataclasses module
# (fields/asdict/astuple/replace/is_dataclass) treats a fastrec Array as the
# dataclass Flower's Array is.
_ArrayFields = dataclasses.make_dataclass(
    "Array", [("dtype", str), ("shape", list[int]), ("stype", str), ("data", bytes)])


# numpy.save's warnings for headers that need format 2.0 or 3.0, in the installed numpy's own
# words: their text changed between releases (2.5 put the missing space into "can only be read"),
# so they are read from numpy once, on first use, rather than copied from one version.
cdef dict _FORMAT_WARNINGS = {}


cdef str _format_warning(int major):
    cdef str text = _FORMAT_WARNINGS.get(major)
    if text is not None:
        return text
    text = (f"Stored array in format {major}.0. It can only be read by NumPy >= "
            + ("1.9" if major == 2 else "1.17"))
    try:
        try:  # numpy >= 2
            from numpy.lib._format_impl import _wrap_header_guess_version
        except ImportError:  # numpy 1.x
            from numpy.lib.format import _wrap_header_guess_version
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # a header too long for format 1.0 needs 2.0; one that is not latin-1 needs 3.0
            _wrap_header_guess_version(("x" * 70000) if major == 2 else "\u4e2d")
        if len(caught) == 1 and f"format {major}.0" in str(caught[0].message):
            text = str(caught[0].message)
    except Exception:  # a numpy without that private helper: keep the documented text
        pass
    _FORMAT_WARNINGS[major] = text
    return text


# ---------------------------------------------------------------------------
# Per-dtype facts for the encoder, cached on the dtype object's address. The
# entry keeps a strong reference to the dtype, so the address cannot be
# reused by another object while the slot holds it.
# ---------------------------------------------------------------------------

cdef class _EncEntry:
    cdef object dtype       # strong ref: keeps the cache key alive
    cdef bytes descr_lit    # repr(descr), encoded, as numpy.save writes it
    cdef str dtype_str      # str(dtype), for Array.dtype
    cdef object load_dtype  # what numpy.load gives back for that descr
    cdef int utf8           # descr needs format 3.0 (non-latin-1 field names)


cdef PyObject *_enc_keys[CACHE_SLOTS]
cdef list _enc_vals = [None] * CACHE_SLOTS


cdef _EncEntry _make_entry(object dt):
    # Attribute access goes through Python on purpose: numpy's Cython
    # accessors for names/metadata read C fields that may be NULL.
    if dt.hasobject:
        raise ValueError("Object arrays cannot be saved when allow_pickle=False")
    if not type(dt)._legacy:
        raise ValueError("User-defined dtypes cannot be saved when allow_pickle=False")
    cdef _EncEntry e = _EncEntry.__new__(_EncEntry)
    e.dtype = dt
    e.dtype_str = str(dt)
    cdef str lit
    if dt.names is not None:
        # Structured: numpy's own descr (the allowed fallback); the header
        # around it is still written by the C encoder.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = _np_dtype_to_descr(dt)
        lit = repr(descr)
        e.load_dtype = None
    else:
        lit = repr(dt.str)
        e.load_dtype = np.dtype(dt.str)
    try:
        e.descr_lit = lit.encode("latin1")
        e.utf8 = 0
    except UnicodeEncodeError:
        e.descr_lit = lit.encode("utf8")
        e.utf8 = 1
    return e


cdef inline _EncEntry _entry_for(cnp.dtype dt):
    cdef PyObject *key = <PyObject *>dt
    cdef size_t slot = ((<size_t>key) >> 4) % CACHE_SLOTS
    if _enc_keys[slot] == key:
        return <_EncEntry>_enc_vals[slot]
    cdef object pdt = <object>dt
    if pdt.metadata is not None:
        warnings.warn("metadata on a dtype is not saved to an npy/npz. "
                      "Use another format (such as pickle) to store it.",
                      UserWarning, stacklevel=3)
        return _make_entry(pdt)   # not cached: warn every time, like numpy
    cdef _EncEntry e = _make_entry(pdt)
    if pdt.names is None:
        # Structured dtypes are mutable (dtype.names can be reassigned): never cached.
        _enc_vals[slot] = e
        _enc_keys[slot] = key
    return e


# ---------------------------------------------------------------------------
# descr (header text) -> dtype, cached for plain descr strings.
# ---------------------------------------------------------------------------

cdef dict _DESCR_CACHE = {}


cdef object _checked_dtype(object dt, object descr_text):
    if dt.hasobject:
        raise ValueError(f"descr {descr_text!r} holds Python objects; object arrays cannot be "
                         "loaded when allow_pickle=False")
    if not type(dt)._legacy:
        raise ValueError(f"descr {descr_text!r} is a user-defined dtype, which .npy stores "
                         "pickled; refusing to load it")
    if dt.subdtype is not None:
        raise ValueError(f"descr {descr_text!r} is a subarray dtype, which is not a valid "
                         "array descr")
    return dt


# The most recent descr strings, compared in place before any Python object
# is created (most Arrays of a model share a handful of dtypes).
cdef enum:
    RECENT = 8
cdef list _recent_keys = [b""] * RECENT
cdef list _recent_dtypes = [None] * RECENT
cdef int _recent_next = 0


cdef inline object _recent_lookup(const char *p, size_t n):
    cdef int k
    cdef bytes key
    for k in range(RECENT):
        key = <bytes>_recent_keys[k]
        if <size_t>PyBytes_GET_SIZE(key) == n and memcmp(PyBytes_AS_STRING(key), p, n) == 0 \
                and _recent_dtypes[k] is not None:
            return _recent_dtypes[k]
    return None


cdef object _descr_dtype(const uint8_t *buf, fr_npy_header *h):
    global _recent_next
    cdef bint plain = h.descr_kind == FR_NPY_DESCR_STR
    cdef const char *p = <const char *>buf + h.descr_off
    if plain:
        dt = _recent_lookup(p, h.descr_len)
        if dt is not None:
            return dt
    cdef bytes raw = PyBytes_FromStringAndSize(p, h.descr_len)
    if plain:
        dt = _DESCR_CACHE.get(raw)
        if dt is not None:
            _recent_keys[_recent_next] = raw
            _recent_dtypes[_recent_next] = dt
            _recent_next = (_recent_next + 1) % RECENT
            return dt
    try:
        text = raw.decode("utf8" if h.major == 3 else "latin1")
    except UnicodeDecodeError as exc:
        raise ValueError(f"descr is not valid UTF-8: {raw!r}") from exc
    if plain:
        try:
            dt = np.dtype(text)
        except Exception as exc:
            raise ValueError(f"descr is not a valid dtype descriptor: {text!r}") from exc
    else:
        # A list (structured dtype), tuple, or unusual string literal: read it
        # as numpy.load does (ast.literal_eval, then numpy's descr_to_dtype).
        # The text is bounded by the 10000-character header limit. The
        # parentheses keep newlines and comments inside brackets.
        try:
            value = ast.literal_eval("(" + text + "\n)")
        except Exception as exc:
            raise ValueError(f"cannot parse header: bad descr {text!r}") from exc
        try:
            dt = _np_descr_to_dtype(value)
        except Exception as exc:
            raise ValueError(f"descr is not a valid dtype descriptor: {value!r}") from exc
    _checked_dtype(dt, text)
    if plain and dt.names is None and len(_DESCR_CACHE) < DESCR_CACHE_MAX:
        _DESCR_CACHE[raw] = dt
    return dt


cdef str _status_msg(fr_status st, fr_npy_header *h):
    msg = (<bytes>h.msg).decode("utf8", "replace")
    return msg if msg else f"invalid .npy data (status {<int>st})"


# ---------------------------------------------------------------------------
# Array
# ---------------------------------------------------------------------------

cdef class Array:
    """A serialized array: ``dtype``, ``shape``, ``stype`` and ``data`` bytes.

    Mirrors ``flwr.common.Array`` (a dataclass): positional or keyword
    construction, mutable fields, ``==`` compares the four fields, a
    dataclass-style ``repr``, picklable and deep-copyable.

    >>> import numpy as np
    >>> from fastrec import Array, array_from_numpy
    >>> a = array_from_numpy(np.arange(3.0))
    >>> (a.dtype, a.shape, a.stype)
    ('float64', [3], 'numpy.ndarray')
    >>> Array(a.dtype, a.shape, a.stype, a.data) == a
    True
    """

    __match_args__ = ("dtype", "shape", "stype", "data")
    __dataclass_fields__ = _ArrayFields.__dataclass_fields__
    __dataclass_params__ = _ArrayFields.__dataclass_params__

    @property
    def __dict__(self):
        """The four fields as a new dict, like ``vars()`` of Flower's dataclass.

        Flower's serde builds its protobuf message with ``ProtoArray(**vars(array))``.
        Unlike a dataclass instance's ``__dict__`` the dict is a snapshot: writing
        to it does not change the Array.

        >>> from fastrec import Array
        >>> vars(Array("float32", [1], "raw", b"abcd"))
        {'dtype': 'float32', 'shape': [1], 'stype': 'raw', 'data': b'abcd'}
        """
        return {"dtype": self.dtype, "shape": self.shape, "stype": self.stype,
                "data": self.data}

    def __init__(self, dtype, shape, stype, data):
        self.dtype = dtype
        self.shape = shape
        self.stype = stype
        self.data = data

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        cdef Array o = <Array>other
        return (self.dtype, self.shape, self.stype, self.data) == (o.dtype, o.shape, o.stype, o.data)

    __hash__ = None

    def __repr__(self):
        return (f"{type(self).__qualname__}(dtype={self.dtype!r}, shape={self.shape!r}, "
                f"stype={self.stype!r}, data={self.data!r})")

    def __reduce__(self):
        return (type(self), (self.dtype, self.shape, self.stype, self.data))

    def numpy(self, *, bint copy=True):
        """Return the array held in ``data`` (``.npy`` bytes) as a NumPy array.

        ``copy=True`` (the default, Flower's behaviour) returns a new,
        writable array that owns its memory. ``copy=False`` returns a
        read-only view of ``data`` without copying.

        The bytes are parsed defensively: anything malformed raises
        ``ValueError`` and nothing is ever unpickled. Unlike ``numpy.load``,
        data longer than the header's shape needs is rejected too (numpy
        silently ignores the trailing bytes).

        >>> import numpy as np
        >>> from fastrec import array_from_numpy
        >>> array_from_numpy(np.eye(2)).numpy()
        array([[1., 0.],
               [0., 1.]])
        """
        stype = self.stype
        if stype is not _NUMPY_STYPE and stype != _NUMPY_STYPE:
            raise TypeError(f"Unsupported serialization type for numpy conversion: '{stype}'")
        cdef object data = self.data
        cdef Py_buffer view
        cdef const uint8_t *buf
        cdef Py_ssize_t n
        cdef bint have_view = False
        cdef fr_npy_header h
        cdef cnp.npy_intp dims[FR_NPY_MAXDIMS]
        cdef int ndim, fortran, i
        cdef Py_ssize_t offset, nbytes
        cdef size_t need
        cdef fr_status st
        cdef object dt
        cdef object base
        if PyBytes_CheckExact(data):
            buf = <const uint8_t *>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
            base = data
        else:
            if copy:
                base = data
            else:
                base = memoryview(data)   # holds the export while the view lives
            try:
                PyObject_GetBuffer(base, &view, PyBUF_SIMPLE)
            except BufferError as e:
                # e.g. a strided memoryview: bad input, so a ValueError like every other
                raise ValueError(f"Array.data must be a contiguous bytes-like object: {e}") from e
            have_view = True
            buf = <const uint8_t *>view.buf
            n = view.len
        try:
            if have_view or data is not self._hdr_data:
                # Headers are capped at 10000 characters: too short to be
                # worth releasing the GIL.
                st = fr_npy_parse_header(buf, <size_t>n, &h)
                if st != FR_OK:
                    raise ValueError(_status_msg(st, &h))
                dt = _descr_dtype(buf, &h)
                st = fr_npy_data_nbytes(&h, <size_t>(<cnp.dtype>dt).itemsize, &need)
                if st != FR_OK:
                    raise ValueError(_status_msg(st, &h))
                avail = <size_t>n - h.data_offset
                if need > avail:
                    raise ValueError(
                        f"truncated .npy data: shape {tuple([h.shape[i] for i in range(h.ndim)])} "
                        f"of {dt} needs {need} bytes of data, only {avail} present")
                if need < avail:
                    raise ValueError(
                        f".npy data too long: shape {tuple([h.shape[i] for i in range(h.ndim)])} "
                        f"of {dt} needs {need} bytes of data, {avail} present "
                        "(numpy.load would ignore the trailing bytes)")
                if h.py2_retry:
                    warnings.warn(
                        "Reading `.npy` or `.npz` file required additional header parsing as "
                        "it was created on Python 2. Save the file again to speed up loading "
                        "and avoid this warning.", UserWarning, stacklevel=2)
                ndim = h.ndim
                fortran = h.fortran_order
                offset = <Py_ssize_t>h.data_offset
                nbytes = <Py_ssize_t>need
                for i in range(ndim):
                    dims[i] = <cnp.npy_intp>h.shape[i]
                # Structured dtypes are mutable (dtype.names can be assigned
                # through the returned array), so they are never cached.
                if not have_view and ndim <= 8 and dt.names is None:
                    self._hdr_data = data
                    self._hdr_dtype = dt
                    self._hdr_offset = offset
                    self._hdr_nbytes = nbytes
                    self._hdr_ndim = ndim
                    self._hdr_fortran = fortran
                    for i in range(ndim):
                        self._hdr_shape[i] = dims[i]
            else:
                dt = self._hdr_dtype
                ndim = self._hdr_ndim
                fortran = self._hdr_fortran
                offset = self._hdr_offset
                nbytes = self._hdr_nbytes
                for i in range(ndim):
                    dims[i] = self._hdr_shape[i]
            return _new_array(dt, ndim, dims, fortran, buf + offset, nbytes, copy, base)
        finally:
            if have_view:
                PyBuffer_Release(&view)


cdef int _shape_in_place = -1   # see _load_sets_shape; -1 until first asked


cdef bint _load_sets_shape():
    """Whether this numpy's numpy.load gives an array its shape by assignment (older numpy)
    or by reshape() (newer). For zero-itemsize arrays the two leave different contiguity
    flags, so the one numpy.load uses is found once, by asking numpy.load itself."""
    global _shape_in_place
    if _shape_in_place < 0:
        from numpy.lib import format as npy_format
        buf = io.BytesIO()
        npy_format.write_array_header_1_0(buf, {"descr": "|V0", "fortran_order": False,
                                                "shape": (2, 3)})
        buf.seek(0)
        _shape_in_place = 1 if npy_format.read_array(buf).flags.f_contiguous else 0
    return _shape_in_place == 1


cdef object _new_array(object dt, int ndim, cnp.npy_intp *dims, int fortran,
                       const uint8_t *src, Py_ssize_t nbytes, bint copy, object base):
    cdef cnp.ndarray arr
    cdef int i
    cdef object count, flat
    if (<cnp.dtype>dt).itemsize == 0:
        # No bytes to copy or view. PyArray_NewFromDescr would turn an unsized
        # 'U0'/'S0'/'V0' into size 1 when it allocates; the ndarray constructor
        # keeps it. Built as numpy.load builds it (1-d, then reshaped, transposed
        # for Fortran order), so the contiguity flags match too: a transposed
        # view of size-0 items is C- and F-contiguous, ndarray(order="F") only F.
        shape = tuple([dims[i] for i in range(ndim)])
        count = 1
        for i in range(ndim):
            count *= dims[i]
        flat = np.ndarray(count, dtype=dt)
        rev = shape[::-1] if fortran else shape
        if _load_sets_shape():
            flat.shape = rev
        else:
            flat = flat.reshape(rev)
        arr = flat.transpose() if fortran else flat
        if not copy:
            arr.flags.writeable = False   # as every copy=False result
        return arr
    Py_INCREF(dt)   # stolen by PyArray_NewFromDescr
    if copy:
        arr = _np_new_from_descr(&PyArray_Type, <cnp.PyArray_Descr *>dt, ndim, dims, NULL, NULL,
                                 fortran, NULL)
        if nbytes >= NOGIL_BYTES:
            with nogil:
                memcpy(cnp.PyArray_DATA(arr), src, <size_t>nbytes)
        elif nbytes > 0:
            memcpy(cnp.PyArray_DATA(arr), src, <size_t>nbytes)
        return arr
    arr = _np_new_from_descr(&PyArray_Type, <cnp.PyArray_Descr *>dt, ndim, dims, NULL, <void *>src,
                             NPY_ARRAY_F_CONTIGUOUS if fortran else NPY_ARRAY_C_CONTIGUOUS,
                             NULL)
    cnp.set_array_base(arr, base)
    return arr


def array_from_numpy(ndarray):
    """Serialize ``ndarray`` into an :class:`Array` holding ``.npy`` bytes.

    ``data`` is byte-identical to ``numpy.save(buf, ndarray, allow_pickle=False)``;
    ``dtype`` is ``str(ndarray.dtype)`` and ``shape`` is ``list(ndarray.shape)``.
    A numpy scalar is taken as a 0-d array (as Flower's ``numpy.save`` takes it); other
    non-arrays raise ``TypeError``. Object arrays raise ``ValueError``, as ``numpy.save`` does.

    >>> import numpy as np
    >>> from fastrec import array_from_numpy
    >>> a = array_from_numpy(np.zeros((2, 3), dtype=np.int32))
    >>> a.dtype, a.shape, a.data[:6]
    ('int32', [2, 3], b'\\x93NUMPY')
    """
    if not cnp.PyArray_Check(ndarray):
        if not isinstance(ndarray, np.generic):
            raise TypeError(f"array_from_numpy expects a numpy.ndarray, got "
                            f"{type(ndarray).__name__}")
        # Flower's numpy.save takes a numpy scalar as the 0-d array it converts it to
        # (same dtype; the scalar's shape is ()).
        ndarray = np.asarray(ndarray)
    cdef cnp.ndarray arr = <cnp.ndarray>ndarray
    cdef _EncEntry e = _entry_for(<cnp.dtype>cnp.PyArray_DESCR(arr))
    cdef int ndim = cnp.PyArray_NDIM(arr)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(arr)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(arr)
    cdef int64_t shape64[FR_NPY_MAXDIMS]
    cdef int64_t strides64[FR_NPY_MAXDIMS]
    cdef int i
    for i in range(ndim):
        shape64[i] = dims[i]
        strides64[i] = strides[i]
    cdef bint c_contig = cnp.PyArray_IS_C_CONTIGUOUS(arr)
    cdef bint fortran = (not c_contig) and cnp.PyArray_IS_F_CONTIGUOUS(arr)
    cdef size_t itemsize = <size_t>cnp.PyArray_ITEMSIZE(arr)
    cdef size_t nbytes = <size_t>cnp.PyArray_NBYTES(arr)
    cdef const char *lit = PyBytes_AS_STRING(e.descr_lit)
    cdef size_t lit_len = <size_t>PyBytes_GET_SIZE(e.descr_lit)
    cdef size_t cap = fr_npy_header_bound(lit_len, ndim)
    cdef uint8_t stack_hdr[512]
    cdef uint8_t *hdr = stack_hdr
    cdef size_t hlen = 0
    cdef int major = 1
    cdef fr_status st
    cdef bytes out
    cdef uint8_t *dst
    if cap > sizeof(stack_hdr):
        hdr = <uint8_t *>malloc(cap)
        if hdr == NULL:
            raise MemoryError()
    try:
        st = fr_npy_write_header(hdr, cap, lit, lit_len, fortran, ndim, shape64, e.utf8,
                                 &hlen, &major)
        if st != FR_OK:
            raise ValueError(f"cannot encode the .npy header (status {<int>st})")
        if nbytes > <size_t>(PY_SSIZE_T_MAX) - hlen:
            raise ValueError("array too large to serialize")
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(hlen + nbytes))
        dst = <uint8_t *>PyBytes_AS_STRING(out)
        memcpy(dst, hdr, hlen)
    finally:
        if hdr != stack_hdr:
            free(hdr)
    if major != 1:
        warnings.warn(_format_warning(major), UserWarning, stacklevel=2)
    cdef const uint8_t *src = <const uint8_t *>cnp.PyArray_DATA(arr)
    dst += hlen
    if nbytes >= NOGIL_BYTES:
        fr_npy_advise_huge(dst, nbytes)
    if nbytes > 0:
        if c_contig or fortran:
            if nbytes >= NOGIL_BYTES:
                with nogil:
                    memcpy(dst, src, nbytes)
            else:
                memcpy(dst, src, nbytes)
        elif nbytes >= NOGIL_BYTES:
            with nogil:
                fr_npy_gather(dst, src, ndim, shape64, strides64, itemsize)
        else:
            fr_npy_gather(dst, src, ndim, shape64, strides64, itemsize)
    cdef Array a = Array.__new__(Array)
    a.dtype = e.dtype_str
    a.shape = [dims[i] for i in range(ndim)]
    a.stype = _NUMPY_STYPE
    a.data = out
    if e.load_dtype is not None and ndim <= 8:
        a._hdr_data = out
        a._hdr_dtype = e.load_dtype
        a._hdr_offset = <Py_ssize_t>hlen
        a._hdr_nbytes = <Py_ssize_t>nbytes
        a._hdr_ndim = ndim
        a._hdr_fortran = fortran
        for i in range(ndim):
            a._hdr_shape[i] = dims[i]
    return a
