# cython: language_level=3, cdivision=True
"""Compiled Flower 1.42 records and their object wire format (see :mod:`fastrec.app`).

The classes reuse the 1.15 kernels: ``MetricRecord``/``ConfigRecord`` are
``fastrec._records.TypedDict``s of kind ``K_METRICS``/``K_CONFIGS`` (same value
rules, 1.42's wording), ``Array`` extends the 1.15 ``fastrec.Array`` (same
``.npy`` codec, plus 1.42's strict constructor and dirty tracking).

Objects travel as ``b"<Class> <child ids> <body length>\\x00" + body`` and are
named by the SHA-256 of those bytes (``object_id``). Bodies: JSON for
``RecordDict``/``ArrayRecord``/``Array`` (``json.dumps``' default spelling),
protobuf ``MetricRecord``/``ConfigRecord`` messages of Flower's
``recorddict.proto`` (see ``_recproto.pxi``), raw bytes for ``ArrayChunk``.
"""

cimport cython
from cpython.object cimport PyObject, PyTypeObject, PyObject_IsInstance, PyObject_GenericSetAttr
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.dict cimport PyDict_Next
from libc.string cimport memcpy, memchr
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, INT64_MAX, INT64_MIN, UINT64_MAX
from libc.stdlib cimport malloc, realloc, free

from fastrec._array cimport Array as _Array15
from fastrec._records cimport (TypedDict, _count_bytes, K_CUSTOM, K_METRICS, K_CONFIGS,
                               seal_record)

import copyreg
import hashlib
import json
import logging
import os
import sys
from collections import OrderedDict
from textwrap import indent

import numpy as np

from fastrec._array import array_from_numpy as _array_from_numpy15

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object)
    PyTypeObject PyFloat_Type
    PyTypeObject PyLong_Type
    PyTypeObject PyBool_Type
    PyTypeObject PyUnicode_Type
    PyTypeObject PyBytes_Type
    PyTypeObject PyList_Type
    PyTypeObject PyTuple_Type
    PyTypeObject PyDict_Type
    PyTypeObject* _TYPE "Py_TYPE"(PyObject*) nogil
    Py_ssize_t _LIST_SIZE "PyList_GET_SIZE"(object) nogil
    PyObject** _LIST_ITEMS "PySequence_Fast_ITEMS"(object) nogil
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)
    int PyUnicode_IS_ASCII(object)
    PyObject* PyDict_GetItemWithError(object, object) except? NULL

_log = logging.getLogger("fastrec.app")

_NUMPY_STYPE = "numpy.ndarray"

# Flower reads this once, when it is imported; so do we.
MAX_ARRAY_CHUNK_SIZE = int(os.getenv("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", "5242880"))

include "_objhead.pxi"
include "_recproto.pxi"


# ----------------------------------------------------------------------------
# TypedDict of fastrec.app: Flower 1.42 adds copy()
# ----------------------------------------------------------------------------

cdef class _AppDict(TypedDict):
    """Base of the fastrec.app records: a 1.15 TypedDict plus 1.42's ``copy()``."""

    def __cinit__(self, *args, **kwargs):
        self._app = True

    def copy(self):
        """Return a shallow copy (same class, same items, a fresh dirty state).

        >>> from fastrec.app import MetricRecord
        >>> r = MetricRecord({"a": 1.0})
        >>> c = r.copy(); c["b"] = 2
        >>> list(r), list(c)
        (['a'], ['a', 'b'])
        """
        cdef TypedDict new = type(self).__new__(type(self))
        new._check_key_fn = self._check_key_fn
        new._check_value_fn = self._check_value_fn
        new._data = dict(self._data)
        return new


# ----------------------------------------------------------------------------
# Array and ArrayChunk
# ----------------------------------------------------------------------------

cdef object _array_init_error():
    return TypeError("Invalid arguments for Array. Expected either a PyTorch tensor, a NumPy "
                     "ndarray, or explicit dtype/shape/stype/data values.")


cdef bint _int_tuple(object t) except -1:
    cdef PyObject* item
    if _TYPE(<PyObject*>t) != &PyTuple_Type and not PyObject_IsInstance(t, tuple):
        return False
    for x in t:
        if _TYPE(<PyObject*>x) != &PyLong_Type and _TYPE(<PyObject*>x) != &PyBool_Type \
                and not PyObject_IsInstance(x, int):
            return False
    return True


cdef object _torch_module(str what):
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"PyTorch is required to use {what} (pip install torch)") from exc
    return torch


@cython.final
cdef class ArrayChunk:
    """A slice of an :class:`Array`'s ``data``; Flower's ``ArrayChunk`` (raw-bytes body).

    >>> from fastrec.app import ArrayChunk
    >>> ArrayChunk(memoryview(b"ab")).deflate()
    b'ArrayChunk  2\\x00ab'
    """

    cdef public object data
    cdef dict __dict__

    def __init__(self, data):
        self.data = data

    def __eq__(self, other):
        if type(other) is not ArrayChunk:
            return NotImplemented
        return self.data == (<ArrayChunk>other).data

    __hash__ = None

    def __repr__(self):
        return f"ArrayChunk(data={self.data!r})"

    def deflate(self):
        """The object content: header plus the chunk's bytes."""
        return _with_header(b"ArrayChunk", b"", self.data)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild a chunk from its content (``ValueError`` if it does not check out)."""
        if children:
            raise ValueError("`ArrayChunk` objects do not have children.")
        cdef _Head h = _parse_head(object_content, "ArrayChunk")
        return cls(memoryview(object_content[h.body_off:]))

    @property
    def object_id(self):
        """SHA-256 (hex) of ``deflate()``."""
        return _chunk_id(self.data)

    @property
    def children(self):
        return None

    @property
    def is_dirty(self):
        return True


cdef str _chunk_id(object view):
    # sha256(header + data) without building the concatenation; hashlib
    # releases the GIL while it hashes a large buffer.
    cdef Py_ssize_t n = len(view)
    h = hashlib.sha256(b"ArrayChunk  %d\x00" % n)
    h.update(view)
    return h.hexdigest()


cdef class Array(_Array15):
    """Flower 1.42's ``Array``: a serialized array (``dtype``, ``shape`` tuple, ``stype``, ``data``).

    ``Array(ndarray)``, ``Array(torch_tensor)``, ``Array(dtype, shape, stype, data)``
    and the keyword forms; 1.42's strict checks (``shape`` a tuple of ints, ``data``
    bytes). Assigning a field marks the array dirty, so its ``object_id`` and
    chunks are recomputed.

    >>> import numpy as np
    >>> from fastrec.app import Array
    >>> a = Array(np.zeros((2, 2), dtype=np.float32))
    >>> a.dtype, a.shape, a.stype
    ('float32', (2, 2), 'numpy.ndarray')
    """

    cdef bint _dirty
    cdef object _oid
    cdef list _chunks
    cdef dict __dict__

    def __init__(self, *args, dtype=None, shape=None, stype=None, data=None, ndarray=None,
                 torch_tensor=None):
        cdef Py_ssize_t nargs = len(args)
        if nargs == 1 and dtype is None and shape is None and stype is None and data is None \
                and torch_tensor is None and ndarray is None:
            x = args[0]
            if isinstance(x, np.ndarray):
                _fill_from_numpy(self, x)
                return
        elif nargs == 4 and dtype is None and shape is None and stype is None and data is None \
                and ndarray is None and torch_tensor is None:
            if _direct_ok(args[0], args[1], args[2], args[3]):
                self._set_fields(args[0], args[1], args[2], args[3])
                return
            raise _array_init_error()
        if nargs > 4:
            raise _array_init_error()
        all_args = list(args) + [None] * (4 - nargs)
        method = [None]

        def try_set(index, arg, m):
            if arg is None:
                return
            if all_args[index] is not None:
                raise _array_init_error()
            if method[0] is not None and method[0] != m:
                raise _array_init_error()
            method[0] = m
            all_args[index] = arg

        try_set(0, dtype, "direct")
        try_set(1, shape, "direct")
        try_set(2, stype, "direct")
        try_set(3, data, "direct")
        try_set(0, ndarray, "ndarray")
        try_set(0, torch_tensor, "torch_tensor")
        given = [a for a in all_args if a is not None]
        init = method[0]
        if not init or init == "direct":
            if len(given) == 4 and _direct_ok(given[0], given[1], given[2], given[3]):
                self._set_fields(given[0], given[1], given[2], given[3])
                return
        if not init or init == "ndarray":
            if len(given) == 1 and isinstance(given[0], np.ndarray):
                _fill_from_numpy(self, given[0])
                return
        if not init or init == "torch_tensor":
            torch = sys.modules.get("torch")
            if len(given) == 1 and torch is not None and isinstance(given[0], torch.Tensor):
                _fill_from_numpy(self, given[0].detach().cpu().numpy())
                return
        raise _array_init_error()

    cdef _set_fields(self, dtype, shape, stype, data):
        self.dtype = dtype
        self.shape = shape
        self.stype = stype
        self.data = data
        self._dirty = True
        self._oid = None
        self._chunks = None

    def __setattr__(self, name, value):
        # Like Flower's __setattr__: a field assignment marks the array dirty.
        if name in ("dtype", "shape", "stype", "data"):
            self._dirty = True
            self._oid = None
            if name == "data":
                self._chunks = None
        PyObject_GenericSetAttr(self, name, value)

    def __reduce__(self):
        return (_new_array, (type(self), self.dtype, self.shape, self.stype, self.data,
                             getattr(self, "__dict__") or None))

    @classmethod
    def from_numpy_ndarray(cls, ndarray):
        """Create an Array from a NumPy ndarray (``data`` is ``numpy.save``'s bytes).

        >>> import numpy as np
        >>> Array.from_numpy_ndarray(np.arange(3)).shape
        (3,)
        """
        if not isinstance(ndarray, np.ndarray):
            raise TypeError(f"Expected NumPy ndarray, got {type(ndarray)}")
        cdef Array a = Array.__new__(Array)
        _fill_from_numpy(a, ndarray)
        return a

    @classmethod
    def from_torch_tensor(cls, tensor):
        """Create an Array from a PyTorch tensor (detached, moved to CPU). Needs torch."""
        torch = _torch_module("from_torch_tensor")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Expected PyTorch Tensor, got {type(tensor)}")
        return cls.from_numpy_ndarray(tensor.detach().cpu().numpy())

    # --- object layer -------------------------------------------------------
    cdef list _slices(self):
        if self._chunks is not None:
            return self._chunks
        cdef list chunks = []
        view = memoryview(self.data)
        cdef Py_ssize_t n = len(view), start = 0, size = MAX_ARRAY_CHUNK_SIZE
        if size <= 0:
            raise ValueError("range() arg 3 must not be zero" if size == 0 else
                             "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE must be positive")
        while start < n:
            part = view[start:start + size]
            chunks.append((_chunk_id(part), part))
            start += size
        self._chunks = chunks
        return chunks

    def slice_array(self):
        """The ``(object_id, ArrayChunk)`` pairs of ``data``, in order (repeats kept)."""
        return [(cid, ArrayChunk(part)) for cid, part in self._slices()]

    @property
    def children(self):
        """The distinct ArrayChunks of ``data`` keyed by object id (first-seen order)."""
        cdef dict out = {}
        for cid, part in self._slices():
            if cid not in out:
                out[cid] = ArrayChunk(part)
        return out

    def deflate(self):
        """The object content: header (the distinct chunk ids) plus a JSON body."""
        cdef list chunks = self._slices()
        cdef dict index = {}
        cdef list order = []
        cdef list ids = []
        for cid, _ in chunks:
            i = index.get(cid)
            if i is None:
                i = len(order)
                index[cid] = i
                order.append(cid)
            ids.append(i)
        body = _array_body(self.dtype, self.shape, self.stype, ids)
        return _with_header(_class_name(self, b"Array", type(self) is Array),
                            ",".join(order).encode(), body)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild an Array from its content and its ArrayChunk children (dict by id)."""
        if children is None:
            children = {}
        cdef _Head h = _parse_head(object_content, cls.__qualname__)
        child_ids = h.child_ids()
        meta = _json_body(object_content, h)
        try:
            chunk_ids = [child_ids[i] for i in meta["arraychunk_ids"]]
            if set(chunk_ids) != set(children.keys()):
                raise ValueError("Unexpected set of `children`. "
                                 f"Expected {set(chunk_ids)} but got {set(children.keys())}.")
            arr = cls(dtype=meta["dtype"], shape=tuple(meta["shape"]), stype=meta["stype"],
                      data=b"")
            parts = []
            for cid in chunk_ids:
                ch = children[cid]
                if not isinstance(ch, ArrayChunk):
                    raise ValueError("`Array` children must be `ArrayChunk` objects.")
                parts.append((<ArrayChunk>ch).data)
            arr.data = b"".join(parts)
        except (KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"Unexpected Array object body: {exc!r}") from None
        return arr

    @property
    def object_id(self):
        """SHA-256 (hex) of ``deflate()``; cached until a field is assigned."""
        if self._dirty or self._oid is None:
            self._oid = hashlib.sha256(self.deflate()).hexdigest()
        self._dirty = False
        return self._oid

    @property
    def is_dirty(self):
        """True if a field changed since ``object_id`` was last read."""
        return self._dirty

    @is_dirty.setter
    def is_dirty(self, value):
        self._dirty = bool(value)


def _new_array(cls, dtype, shape, stype, data, extra):
    cdef Array a = cls.__new__(cls)
    a._set_fields(dtype, shape, stype, data)
    if extra:
        getattr(a, "__dict__").update(extra)
    return a


cdef bint _direct_ok(dtype, shape, stype, data) except -1:
    return (isinstance(dtype, str) and _int_tuple(shape) and isinstance(stype, str)
            and isinstance(data, bytes))


cdef int _fill_from_numpy(Array a, object ndarray) except -1:
    # fastrec's .npy writer is byte-identical to numpy.save(allow_pickle=False).
    cdef _Array15 src = _array_from_numpy15(ndarray)
    a._set_fields(src.dtype, tuple(src.shape), _NUMPY_STYPE, src.data)
    return 0


# ----------------------------------------------------------------------------
# MetricRecord and ConfigRecord: the 1.15 kernels, 1.42 names, protobuf bodies
# ----------------------------------------------------------------------------

cdef class _ValueRecord(_AppDict):
    """What MetricRecord and ConfigRecord share: count_bytes and the protobuf object body."""

    def count_bytes(self):
        """Bytes stored (Flower's rule for this record type) plus the key lengths."""
        return _count_bytes(self)

    def deflate(self):
        """The object content: header plus the protobuf record body."""
        return _deflate_values(self, self._kind == K_CONFIGS)

    @property
    def object_id(self):
        """SHA-256 (hex) of ``deflate()`` (recomputed each time, as in Flower)."""
        return hashlib.sha256(self.deflate()).hexdigest()

    @property
    def children(self):
        return None

    @property
    def is_dirty(self):
        return True


cdef class MetricRecord(_ValueRecord):
    """Flower 1.42's ``MetricRecord``: ``str`` keys; ``int``/``float`` values or lists of them.

    >>> from fastrec.app import MetricRecord
    >>> r = MetricRecord({"accuracy": 0.94})
    >>> r["loss-historic"] = [0.9, 0.5]
    >>> MetricRecord.inflate(r.deflate()) == r
    True
    >>> r.count_bytes()  # (8 + 8) + (2 * 8 + 13)
    45
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_METRICS
        self._exact = type(self) is MetricRecord

    def __init__(self, metric_dict=None, keep_input=True):
        self._fill(metric_dict, keep_input)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild a MetricRecord from its content (``ValueError`` if malformed)."""
        if children:
            raise ValueError("`MetricRecord` objects do not have children.")
        return _inflate_values(cls, object_content, False)


cdef class ConfigRecord(_ValueRecord):
    """Flower 1.42's ``ConfigRecord``: ``str`` keys; ``int``/``float``/``str``/``bytes``/``bool``
    values or homogeneous lists of them.

    >>> from fastrec.app import ConfigRecord
    >>> r = ConfigRecord({"lr": 0.1, "name": "x"})
    >>> ConfigRecord.inflate(r.deflate())
    {'lr': 0.1, 'name': 'x'}
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_CONFIGS
        self._exact = type(self) is ConfigRecord

    def __init__(self, config_dict=None, keep_input=True):
        self._fill(config_dict, keep_input)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild a ConfigRecord from its content (``ValueError`` if malformed)."""
        if children:
            raise ValueError("`ConfigRecord` objects do not have children.")
        return _inflate_values(cls, object_content, True)


# ----------------------------------------------------------------------------
# ArrayRecord
# ----------------------------------------------------------------------------

cdef object _array_record_init_error():
    return TypeError("Invalid arguments for ArrayRecord. Expected either a list of NumPy "
                     "ndarrays, a PyTorch state_dict, or a dictionary of Arrays. The "
                     "`keep_input` argument is keyword-only.")


cdef inline int _check_str_key(object key) except -1:
    if _TYPE(<PyObject*>key) == &PyUnicode_Type or PyObject_IsInstance(key, str):
        return 0
    raise TypeError(f"Key must be of type `str` but `{type(key)}` was passed.")


cdef class ArrayRecord(_AppDict):
    """Flower 1.42's ``ArrayRecord``: ``str`` keys, :class:`Array` values (a serialized state_dict).

    >>> import numpy as np
    >>> from fastrec.app import ArrayRecord
    >>> rec = ArrayRecord([np.zeros(2), np.ones(3)])
    >>> list(rec), [a.shape for a in rec.values()]
    (['0', '1'], [(2,), (3,)])
    """

    cdef bint _dirty

    def __cinit__(self, *args, **kwargs):
        self._kind = K_CUSTOM
        # Not "exact": the mixin methods must go through __setitem__/__delitem__
        # so that every change marks the record dirty, as in Flower.
        self._exact = False
        self._dirty = True

    def __init__(self, *args, numpy_ndarrays=None, torch_state_dict=None, array_dict=None,
                 keep_input=True):
        if len(args) > 1:
            raise _array_record_init_error()
        arg = args[0] if args else None
        cdef object init = None
        for given, m in ((array_dict, "array_dict"), (numpy_ndarrays, "numpy_ndarrays"),
                         (torch_state_dict, "state_dict")):
            if given is None:
                continue
            if arg is not None or init is not None:
                raise _array_record_init_error()
            init = m
            arg = given
        if arg is None:
            return
        cdef ArrayRecord conv
        if not init or init == "array_dict":
            if isinstance(arg, dict) and all(isinstance(k, str) for k in arg.keys()) \
                    and all(isinstance(v, Array) for v in arg.values()):
                conv = ArrayRecord.from_array_dict(arg, keep_input=keep_input)
                self._data = conv._data
                return
        if not init or init == "numpy_ndarrays":
            if isinstance(arg, list) and all(isinstance(v, np.ndarray) for v in arg):
                conv = ArrayRecord.from_numpy_ndarrays(arg, keep_input=keep_input)
                self._data = conv._data
                return
        if not init or init == "state_dict":
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(arg, dict) \
                    and all(isinstance(k, str) for k in arg.keys()) \
                    and all(isinstance(v, torch.Tensor) for v in arg.values()):
                conv = ArrayRecord.from_torch_state_dict(arg, keep_input=keep_input)
                self._data = conv._data
                return
        raise _array_record_init_error()

    cdef int _set(self, object key, object value) except -1:
        _check_str_key(key)
        if not isinstance(value, Array):
            raise TypeError(f"Value must be of type `{Array}` but `{type(value)}` was passed.")
        self._dirty = True
        self._data[key] = value
        return 0

    def __setitem__(self, key, value):
        """Set ``key`` to an :class:`Array` (TypeError otherwise); marks the record dirty."""
        self._set(key, value)

    def __delitem__(self, key):
        self._dirty = True
        del self._data[key]

    @classmethod
    def from_array_dict(cls, array_dict, *, keep_input=True):
        """Create an ArrayRecord holding copies of the given :class:`Array`s."""
        cdef ArrayRecord record = ArrayRecord.__new__(ArrayRecord)
        cdef Array a
        for k, v in array_dict.items():
            a = Array.__new__(Array)
            shape = tuple(v.shape)
            dtype, stype, data = v.dtype, v.stype, v.data
            if not _direct_ok(dtype, shape, stype, data):
                raise _array_init_error()
            a._set_fields(dtype, shape, stype, data)
            record._set(k, a)
        if not keep_input:
            array_dict.clear()
        return record

    @classmethod
    def from_numpy_ndarrays(cls, ndarrays, *, keep_input=True):
        """Create an ArrayRecord with keys ``"0"``, ``"1"``, ... from a list of ndarrays.

        >>> import numpy as np
        >>> list(ArrayRecord.from_numpy_ndarrays([np.zeros(1)]))
        ['0']
        """
        cdef ArrayRecord record = ArrayRecord.__new__(ArrayRecord)
        cdef dict data = record._data
        cdef Array a
        cdef Py_ssize_t i
        for i in range(len(ndarrays)):
            x = ndarrays[i]
            if not isinstance(x, np.ndarray):
                raise TypeError(f"Expected NumPy ndarray, got {type(x)}")
            a = Array.__new__(Array)
            _fill_from_numpy(a, x)
            data[str(i)] = a
            if not keep_input:
                ndarrays[i] = None
        if not keep_input:
            ndarrays.clear()
        return record

    @classmethod
    def from_torch_state_dict(cls, state_dict, *, keep_input=True):
        """Create an ArrayRecord from a PyTorch ``state_dict``. Needs torch."""
        _torch_module("from_torch_state_dict")
        cdef ArrayRecord record = ArrayRecord.__new__(ArrayRecord)
        for k in list(state_dict.keys()):
            v = state_dict[k] if keep_input else state_dict.pop(k)
            record[k] = Array.from_numpy_ndarray(v.detach().cpu().numpy())
        return record

    def to_numpy_ndarrays(self, *, keep_input=True):
        """The arrays as a list of NumPy ndarrays (``keep_input=False`` empties the record)."""
        if keep_input:
            return [v.numpy() for v in self.values()]
        ret = []
        for k in list(self.keys()):
            ret.append(self.pop(k).numpy())
        return ret

    def to_torch_state_dict(self, *, keep_input=True):
        """The arrays as a PyTorch ``state_dict`` (an OrderedDict of tensors). Needs torch."""
        torch = _torch_module("to_torch_state_dict")
        state_dict = OrderedDict()
        for k in list(self.keys()):
            arr = self[k] if keep_input else self.pop(k)
            state_dict[k] = torch.from_numpy(arr.numpy())
        return state_dict

    def count_bytes(self):
        """Total length of the arrays' ``data`` plus the key lengths."""
        n = 0
        for k, v in self.items():
            n += len(v.data)
            n += len(k)
        return n

    # --- object layer -------------------------------------------------------
    @property
    def children(self):
        """The distinct Arrays keyed by object id."""
        return {arr.object_id: arr for arr in self.values()}

    def deflate(self):
        """The object content: header (the distinct array ids) plus a JSON name->id body."""
        return _deflate_refs(_class_name(self, b"ArrayRecord", type(self) is ArrayRecord),
                             self._data)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild an ArrayRecord from its content and its Array children (dict by id)."""
        if children is None:
            children = {}
        cdef _Head h = _parse_head(object_content, cls.__qualname__)
        refs = _json_refs(object_content, h, children)
        if not all(isinstance(arr, Array) for arr in children.values()):
            raise ValueError("`Children` are expected to be of type `Array`.")
        return ArrayRecord({name: children[oid] for name, oid in refs.items()})

    @property
    def object_id(self):
        """SHA-256 (hex) of ``deflate()``; cached while neither the record nor its arrays change."""
        if self.is_dirty or "_object_id" not in getattr(self, "__dict__"):
            getattr(self, "__dict__")["_object_id"] = hashlib.sha256(self.deflate()).hexdigest()
        self._dirty = False
        return getattr(self, "__dict__")["_object_id"]

    @property
    def is_dirty(self):
        """True if the record or one of its arrays changed since ``object_id`` was read."""
        if not self._dirty:
            for v in self._data.values():
                if v.is_dirty:
                    self._dirty = True
                    break
        return self._dirty

    @is_dirty.setter
    def is_dirty(self, value):
        self._dirty = bool(value)


# ----------------------------------------------------------------------------
# RecordDict
# ----------------------------------------------------------------------------

cdef class _WarningTracker:
    cdef public bint parameters_records_logged
    cdef public bint metrics_records_logged
    cdef public bint configs_records_logged

_warning_tracker = _WarningTracker()

cdef inline bint _is_record(object v):
    return isinstance(v, (ArrayRecord, MetricRecord, ConfigRecord))


cdef inline int _check_rd_key(object key) except -1:
    if _TYPE(<PyObject*>key) == &PyUnicode_Type or PyObject_IsInstance(key, str):
        return 0
    raise TypeError(f"Expected `str`, but received `{type(key).__name__}` for the key.")


cdef class _SyncedDict(_AppDict):
    """A typed view of one record type of a RecordDict; changes are mirrored into it."""

    cdef public object recorddict
    cdef public object allowed_type

    def __cinit__(self, *args, **kwargs):
        self._kind = K_CUSTOM
        self._exact = False

    def __init__(self, ref_recorddict, allowed_type):
        if not issubclass(allowed_type, (ArrayRecord, MetricRecord, ConfigRecord)):
            raise TypeError(f"{allowed_type} is not a valid type.")
        self.recorddict = ref_recorddict
        self.allowed_type = allowed_type

    cdef int _set(self, object key, object value) except -1:
        _check_rd_key(key)
        self.check_value(value)
        self._data[key] = value
        self.recorddict[key] = value
        return 0

    def __setitem__(self, key, value):
        self._set(key, value)

    def __delitem__(self, key):
        del self._data[key]
        del self.recorddict[key]

    def check_value(self, value):
        """TypeError unless ``value`` is of this view's record type."""
        if not isinstance(value, self.allowed_type):
            raise TypeError(f"Expected `{self.allowed_type.__name__}`, but "
                            f"received `{type(value).__name__}` for the value.")


cdef class RecordDict(_AppDict):
    """Flower 1.42's ``RecordDict``: one ``str``-keyed dict of Array/Metric/Config records.

    >>> from fastrec.app import RecordDict, MetricRecord, ConfigRecord
    >>> rd = RecordDict({"m": MetricRecord({"acc": 0.9}), "c": ConfigRecord({"lr": 0.1})})
    >>> list(rd.metric_records), list(rd.config_records)
    (['m'], ['c'])
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_CUSTOM
        self._exact = type(self) is RecordDict

    def __init__(self, records=None, *, parameters_records=None, metrics_records=None,
                 configs_records=None):
        if (parameters_records is not None or metrics_records is not None
                or configs_records is not None):
            _log.warning(
                "The arguments `parameters_records`, `metrics_records`, and "
                "`configs_records` of `RecordDict` are deprecated and will "
                "be removed in a future release. "
                "Please pass all records using the `records` argument instead.")
            records = records or {}
            records.update(parameters_records or {})
            records.update(metrics_records or {})
            records.update(configs_records or {})
        if records is not None:
            for key, record in records.items():
                self._store(key, record)

    cdef int _set(self, object key, object value) except -1:
        _check_rd_key(key)
        if not _is_record(value):
            raise TypeError("Expected `ArrayRecord`, `MetricRecord`, or `ConfigRecord` but "
                            f"received `{type(value).__name__}` for the value.")
        cdef PyObject* p = PyDict_GetItemWithError(self._data, key)
        # Owned: replacing the value below may free the old record (the dict's reference
        # is often its only one), and its type is read after that.
        cdef object old = <object>p if p != NULL else None
        self._data[key] = value
        if old is not None and not isinstance(value, type(old)):
            _log.warning("Key '%s' was overwritten: record of type `%s` replaced with type `%s`",
                         key, type(old).__name__, type(value).__name__)
        return 0

    cdef _SyncedDict _view(self, cls):
        cdef _SyncedDict view = _SyncedDict(self, cls)
        for key, record in self._data.items():
            if isinstance(record, cls):
                view._data[key] = record
        return view

    @property
    def array_records(self):
        """The ArrayRecords, as a dict view whose changes are mirrored into this RecordDict."""
        return self._view(ArrayRecord)

    @property
    def metric_records(self):
        """The MetricRecords, as a synchronized dict view."""
        return self._view(MetricRecord)

    @property
    def config_records(self):
        """The ConfigRecords, as a synchronized dict view."""
        return self._view(ConfigRecord)

    @property
    def parameters_records(self):
        """Deprecated: use ``array_records``."""
        # Flower 1.42 tests the flag the wrong way round, so this one never logs.
        if _warning_tracker.parameters_records_logged:
            _log.warning("The `parameters_records` property of `RecordDict` "
                         "(formerly `RecordSet`) is deprecated and will be removed in a "
                         "future release. Please use the `array_records` property instead.")
        return self.array_records

    @property
    def metrics_records(self):
        """Deprecated: use ``metric_records``."""
        if not _warning_tracker.metrics_records_logged:
            _warning_tracker.metrics_records_logged = True
            _log.warning("The `metrics_records` property of `RecordDict` "
                         "(formerly `RecordSet`) is deprecated and will be removed in a "
                         "future release. Please use the `metric_records` property instead.")
        return self.metric_records

    @property
    def configs_records(self):
        """Deprecated: use ``config_records``."""
        if not _warning_tracker.configs_records_logged:
            _warning_tracker.configs_records_logged = True
            _log.warning("The `configs_records` property of `RecordDict` "
                         "(formerly `RecordSet`) is deprecated and will be removed in a "
                         "future release. Please use the `config_records` property instead.")
        return self.config_records

    def __repr__(self):
        flds = ("array_records", "metric_records", "config_records")
        view = indent(",\n".join([f"{fld}={dict(getattr(self, fld))!r}" for fld in flds]), "  ")
        return f"{type(self).__qualname__}(\n{view}\n)"

    # --- object layer -------------------------------------------------------
    @property
    def children(self):
        """The distinct records keyed by object id."""
        return {record.object_id: record for record in self.values()}

    def deflate(self):
        """The object content: header (the distinct record ids) plus a JSON name->id body."""
        return _deflate_refs(_class_name(self, b"RecordDict", self._exact), self._data)

    @classmethod
    def inflate(cls, object_content, children=None):
        """Rebuild a RecordDict from its content and its record children (dict by id)."""
        if children is None:
            children = {}
        cdef _Head h = _parse_head(object_content, cls.__qualname__)
        refs = _json_refs(object_content, h, children)
        if not all(_is_record(ch) for ch in children.values()):
            raise ValueError("`Children` are expected to be of type `ArrayRecord`, "
                             "`ConfigRecord` or `MetricRecord`.")
        return RecordDict({name: children[oid] for name, oid in refs.items()})

    @property
    def object_id(self):
        """SHA-256 (hex) of ``deflate()`` (recomputed each time, as in Flower)."""
        return hashlib.sha256(self.deflate()).hexdigest()

    @property
    def is_dirty(self):
        return True


# ----------------------------------------------------------------------------
# JSON bodies: json.dumps' default spelling, written directly when it is plain
# ----------------------------------------------------------------------------

cdef bint _plain_ascii(object s):
    """True if json.dumps(s) is just s in double quotes."""
    if _TYPE(<PyObject*>s) != &PyUnicode_Type or not PyUnicode_IS_ASCII(s):
        return False
    cdef Py_ssize_t n
    cdef const char* p = PyUnicode_AsUTF8AndSize(s, &n)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = <unsigned char>p[i]
        if c < 0x20 or c == 0x22 or c == 0x5C or c == 0x7F:
            return False
    return True


cdef bytes _deflate_refs(bytes name, dict data):
    """The content of an object that maps names to children: the header lists each distinct
    child id once, in first-seen order; the body maps every name to its child's id."""
    cdef dict refs = {}
    cdef dict kids = {}
    for key, child in data.items():
        oid = child.object_id
        refs[key] = oid
        kids[oid] = None
    return _with_header(name, ",".join(kids).encode(), _refs_body(refs))


cdef bytes _refs_body(dict refs):
    cdef list parts = []
    for k, v in refs.items():
        if not (_plain_ascii(k) and _plain_ascii(v)):
            return json.dumps(refs).encode("utf-8")
        parts.append(f'"{k}": "{v}"')
    return ("{" + ", ".join(parts) + "}").encode("ascii")


cdef bytes _array_body(dtype, shape, stype, list ids):
    cdef bint plain = _plain_ascii(dtype) and _plain_ascii(stype) \
        and _TYPE(<PyObject*>shape) == &PyTuple_Type
    if plain:
        for x in shape:
            if _TYPE(<PyObject*>x) != &PyLong_Type:
                plain = False
                break
    if not plain:
        return json.dumps({"dtype": dtype, "shape": shape, "stype": stype,
                           "arraychunk_ids": ids}).encode("utf-8")
    return (f'{{"dtype": "{dtype}", "shape": [{", ".join(map(str, shape))}], '
            f'"stype": "{stype}", "arraychunk_ids": [{", ".join(map(str, ids))}]}}'
            ).encode("ascii")


cdef object _json_body(object content, _Head h):
    try:
        return json.loads(content[h.body_off:].decode("utf-8"))
    except RecursionError:
        raise ValueError("object body nests too deeply") from None


cdef dict _json_refs(object content, _Head h, children):
    """Flower's shared checks for a name->object-id JSON body against the children."""
    refs = _json_body(content, h)
    if type(refs) is not dict:
        raise ValueError(f"Expected a JSON object of names to object ids, got {type(refs).__name__}")
    try:
        unique = set(refs.values())
    except TypeError as exc:
        raise ValueError(f"Unexpected object ids in body: {exc}") from None
    if unique != set(children.keys()):
        raise ValueError(f"Unexpected set of `children`. Expected {unique} but got "
                         f"{set(children.keys())}.")
    return refs


_REGISTRY = {"ArrayChunk": ArrayChunk, "Array": Array, "ArrayRecord": ArrayRecord,
             "ConfigRecord": ConfigRecord, "MetricRecord": MetricRecord,
             "RecordDict": RecordDict}


def inflate(object_content, children=None):
    """Inflate any fastrec.app object from its content, dispatching on the header's class.

    >>> from fastrec.app import MetricRecord, inflate
    >>> inflate(MetricRecord({"a": 1}).deflate())
    {'a': 1}
    """
    cdef _Head h = _parse_head(object_content, None)
    cls = _REGISTRY.get(h.type_name)
    if cls is None:
        raise ValueError(f"Object of type {h.type_name} is not supported.")
    return cls.inflate(object_content, children)

