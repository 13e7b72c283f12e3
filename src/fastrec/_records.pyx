# cython: language_level=3, cdivision=True
"""Compiled Flower-compatible records (see :mod:`fastrec.records` for the public API).

Every record is a ``TypedDict``: an extension type holding a plain ``dict`` and a
``kind`` that selects the key/value rules. The rules are exactly Flower 1.15's
(``flwr/common/record/*.py``), including its quirks:

* the list rule is ``isinstance(v, type(first))`` (so ``[1, True]`` is a valid
  metrics list and ``[np.float64(1), 2.0]`` is not);
* ``isinstance`` honours ``__class__``, so anything that is not an exact builtin
  type goes through ``PyObject_IsInstance`` exactly like Flower's ``isinstance``;
* the ``MutableMapping`` mixin methods (``get``, ``pop``, ``popitem``, ``clear``,
  ``update``, ``setdefault``) keep the mixin's semantics, e.g. ``popitem`` removes
  the *first* key.

Speed comes from fast paths that only ever decide "valid" for exact builtin types
(pure C, no Python code runs); anything else falls back to the general rule.
When a Python subclass may override ``__setitem__`` & co. (``_exact`` is false),
the methods dispatch through ``self[...]`` like Flower's mixins do.
"""

cimport cython
from cpython.object cimport PyObject, PyTypeObject, PyObject_IsInstance
from cpython.dict cimport PyDict_Next, PyDict_SetItem, PyDict_Copy, PyDict_Update
from libc.stdint cimport int64_t, INT64_MAX

from fastrec._array cimport Array

import copyreg
import sys
from types import GenericAlias
from collections.abc import Mapping, MutableMapping

cdef extern from "Python.h":
    PyTypeObject PyFloat_Type
    PyTypeObject PyLong_Type
    PyTypeObject PyBool_Type
    PyTypeObject PyUnicode_Type
    PyTypeObject PyBytes_Type
    PyTypeObject PyList_Type
    PyTypeObject PyType_Type
    PyTypeObject* _TYPE "Py_TYPE"(PyObject*) nogil
    int PyType_IsSubtype(PyTypeObject*, PyTypeObject*) nogil
    Py_ssize_t _LIST_SIZE "PyList_GET_SIZE"(object) nogil
    PyObject** _LIST_ITEMS "PySequence_Fast_ITEMS"(object) nogil
    Py_ssize_t _STR_LEN "PyUnicode_GET_LENGTH"(PyObject*) nogil
    Py_ssize_t _BYTES_LEN "PyBytes_GET_SIZE"(PyObject*) nogil
    PyObject* PyDict_GetItemWithError(object, object) except? NULL
    void PyObject_GC_Track(object)
    void PyObject_GC_UnTrack(object)
    object PyObject_GenericGetAttr(object, object)
    int PyObject_GenericSetAttr(object, object, PyObject *) except -1
    Py_ssize_t _DICT_SIZE "PyDict_GET_SIZE"(object) nogil


# The record kinds (K_METRICS, ...) are declared in _records.pxd.

# Flower's wording (str() of its typing aliases) so messages read the same.
_METRICS_VALUES = "typing.Union[int, float, list[int], list[float]]"
_METRICS_SCALAR = "typing.Union[int, float]"
_CONFIGS_VALUES = ("typing.Union[int, float, str, bytes, bool, list[int], list[float], "
                   "list[str], list[bytes], list[bool]]")
_CONFIGS_SCALAR = "typing.Union[int, float, str, bytes, bool]"
# Flower 1.42 (fastrec.app) spells the same unions with PEP 604 `|`.
_APP_METRICS_VALUES = "int | float | list[int] | list[float]"
_APP_METRICS_SCALAR = "int | float"
_APP_CONFIGS_VALUES = ("int | float | str | bytes | bool | list[int] | list[float] | "
                       "list[str] | list[bytes] | list[bool]")
_APP_CONFIGS_SCALAR = "int | float | str | bytes | bool"
# isinstance targets, in Flower's order (typing.get_args of its unions).
_METRICS_TYPES = (int, float)
_CONFIGS_TYPES = (int, float, str, bytes, bool)
_STR_BYTES = (bytes, str)
_MARKER = object()


# ----------------------------------------------------------------------------
# Pure-C fast checks. They never run Python code and never raise: 1 means
# "certainly valid under Flower's rule", 0 means "take the general path".
# ----------------------------------------------------------------------------

cdef inline bint _scalar_fast(int kind, PyTypeObject* tp) noexcept nogil:
    if tp == &PyFloat_Type or tp == &PyLong_Type:
        return True
    if kind == K_CONFIGS:
        return tp == &PyUnicode_Type or tp == &PyBytes_Type or tp == &PyBool_Type
    return False


cdef inline Py_ssize_t _list_run(PyObject** items, Py_ssize_t i, Py_ssize_t n,
                                 PyTypeObject* t) noexcept nogil:
    """First index >= i whose item is not certainly an instance of builtin type t."""
    cdef PyTypeObject* tp
    while i < n:
        tp = _TYPE(items[i])
        if tp != t and not PyType_IsSubtype(tp, t):
            break
        i += 1
    return i


cdef bint _list_fast(int kind, list lst) noexcept:
    # Flower: first element valid, then isinstance(v, type(first)) for every v.
    # With t an exact builtin type (metaclass ``type``), isinstance(v, t) is
    # true whenever type(v) is a subtype of t, so no Python call is needed.
    cdef Py_ssize_t n = _LIST_SIZE(lst)
    if n == 0:
        return True
    cdef PyObject** items = _LIST_ITEMS(lst)
    cdef PyTypeObject* t = _TYPE(items[0])
    if not _scalar_fast(kind, t):
        return False
    return _list_run(items, 1, n, t) == n


cdef bint _value_fast(int kind, PyObject* v) noexcept:
    cdef PyTypeObject* tp = _TYPE(v)
    if kind == K_METRICS or kind == K_CONFIGS:
        if _scalar_fast(kind, tp):
            return True
        if tp == &PyList_Type:
            return _list_fast(kind, <list>v)
        return False
    if kind == K_PARAMS:
        return PyType_IsSubtype(tp, <PyTypeObject*>Array)
    if kind == K_RS_PARAMS:
        return PyType_IsSubtype(tp, <PyTypeObject*>ParametersRecord)
    if kind == K_RS_METRICS:
        return PyType_IsSubtype(tp, <PyTypeObject*>MetricsRecord)
    if kind == K_RS_CONFIGS:
        return PyType_IsSubtype(tp, <PyTypeObject*>ConfigsRecord)
    return False


cdef bint _dict_fast(int kind, dict d) noexcept:
    """True if every entry of d is certainly valid (exact str keys, fast values)."""
    if kind == K_CUSTOM:
        return False
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    while PyDict_Next(d, &pos, &k, &v):
        if _TYPE(k) != &PyUnicode_Type or not _value_fast(kind, v):
            return False
    return True


# ----------------------------------------------------------------------------
# General checks: Flower's rules verbatim, with the fast cases short-cut.
# ----------------------------------------------------------------------------

cdef int _is_valid_scalar(int kind, object v, bint app=False) except -1:
    cdef PyTypeObject* tp = _TYPE(<PyObject*>v)
    if _scalar_fast(kind, tp):
        return 0
    if kind == K_METRICS:
        if tp != &PyBool_Type and PyObject_IsInstance(v, _METRICS_TYPES) \
                and not PyObject_IsInstance(v, bool):
            return 0
        raise TypeError("Not all values are of valid type. Expected "
                        f"`{_APP_METRICS_VALUES if app else _METRICS_VALUES}` but `{type(v)}` "
                        "was passed.")
    if PyObject_IsInstance(v, _CONFIGS_TYPES):
        return 0
    raise TypeError("Not all values are of valid type. "
                    f"Expected `{_APP_CONFIGS_VALUES if app else _CONFIGS_VALUES}` but "
                    f"`{type(v)}` was passed.")


cdef object _list_type_error(int kind, bint app=False):
    if kind == K_METRICS:
        scalar = _APP_METRICS_SCALAR if app else _METRICS_SCALAR
    else:
        scalar = _APP_CONFIGS_SCALAR if app else _CONFIGS_SCALAR
    return TypeError(f"All values in a list must be of the same valid type. One of {scalar}.")


cdef int _check_exact_list(int kind, list lst, bint app=False) except -1:
    if _LIST_SIZE(lst) == 0:
        return 0
    _is_valid_scalar(kind, lst[0], app)
    # Flower re-reads value[0] for type(); identical unless the check above ran
    # Python code that mutated the list.
    cdef object t = type(lst[0])
    cdef PyTypeObject* tp = <PyTypeObject*>t
    cdef bint plain = _TYPE(<PyObject*>t) == &PyType_Type
    cdef Py_ssize_t i = 0, n
    cdef PyObject** items
    cdef object item
    while True:
        n = _LIST_SIZE(lst)  # re-read: a fallback isinstance may run Python code
        items = _LIST_ITEMS(lst)
        if plain:
            i = _list_run(items, i, n, tp)
        if i >= n:
            return 0
        item = <object>items[i]  # own a reference across the Python call
        if not PyObject_IsInstance(item, t):
            raise _list_type_error(kind, app)
        i += 1


cdef int _check_generic_list(int kind, object value, bint app=False) except -1:
    # PyObject_IsInstance spelled out: Cython compiles isinstance() against a
    # builtin type into a type check that ignores ``__class__``.
    if len(value) > 0:
        _is_valid_scalar(kind, value[0], app)
        t = type(value[0])
        for v in value:
            if not PyObject_IsInstance(v, t):
                raise _list_type_error(kind, app)
    return 0


cdef int _check_value(TypedDict d, object value) except -1:
    cdef int kind = d._kind
    cdef PyTypeObject* tp = _TYPE(<PyObject*>value)
    if kind == K_METRICS or kind == K_CONFIGS:
        if _scalar_fast(kind, tp):
            return 0
        if tp == &PyList_Type:
            if _list_fast(kind, <list>value):
                return 0
            return _check_exact_list(kind, <list>value, d._app)
        if tp != &PyBool_Type and PyObject_IsInstance(value, list):
            return _check_generic_list(kind, value, d._app)
        return _is_valid_scalar(kind, value, d._app)
    if kind == K_PARAMS:
        if PyType_IsSubtype(tp, <PyTypeObject*>Array) or PyObject_IsInstance(value, Array):
            return 0
        hint = ""
        if type(value).__module__.startswith("flwr."):
            hint = " (convert Flower objects with fastrec.from_flwr)"
        raise TypeError(f"Value must be of type `{Array}` but `{type(value)}` was passed.{hint}")
    if kind == K_CUSTOM:
        d._check_value_fn(value)
        return 0
    cls = (ParametersRecord if kind == K_RS_PARAMS else
           MetricsRecord if kind == K_RS_METRICS else ConfigsRecord)
    if PyType_IsSubtype(tp, <PyTypeObject*>cls) or PyObject_IsInstance(value, cls):
        return 0
    raise TypeError(f"Expected `{cls.__name__}`, but "
                    f"received `{type(value).__name__}` for the value.")


cdef inline int _check_key(TypedDict d, object key) except -1:
    if d._kind == K_CUSTOM:
        d._check_key_fn(key)
        return 0
    if _TYPE(<PyObject*>key) == &PyUnicode_Type or PyObject_IsInstance(key, str):
        return 0
    if d._kind >= K_RS_PARAMS:
        raise TypeError(f"Expected `str`, but received `{type(key).__name__}` for the key.")
    raise TypeError(f"Key must be of type `str` but `{type(key)}` was passed.")


# ----------------------------------------------------------------------------
# count_bytes
# ----------------------------------------------------------------------------

cdef inline bint _add(int64_t* acc, int64_t x) noexcept nogil:
    """acc += x for x >= 0; False (acc untouched) if it would overflow."""
    if x < 0 or acc[0] > INT64_MAX - x:
        return False
    acc[0] += x
    return True


cdef inline bint _mul_add(int64_t* acc, int64_t per, Py_ssize_t n) noexcept nogil:
    if n < 0 or (per != 0 and n > INT64_MAX // per):
        return False
    return _add(acc, per * n)


cdef int64_t _count_bytes_fast(int kind, dict data) noexcept:
    """Flower's count_bytes when every entry is an exact builtin shape; -1 otherwise.

    -1 sends the caller to the general code, which reproduces Flower including
    its errors (IndexError on an empty configs list, ValueError on a "" value).
    """
    cdef int64_t total = 0
    cdef Py_ssize_t pos = 0, n, j
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject** items
    cdef PyTypeObject* tp
    cdef PyTypeObject* t0
    cdef object arr_data
    while PyDict_Next(data, &pos, &k, &v):
        if _TYPE(k) != &PyUnicode_Type or not _add(&total, _STR_LEN(k)):
            return -1
        tp = _TYPE(v)
        if kind == K_PARAMS:
            if tp != <PyTypeObject*>Array:
                return -1
            arr_data = (<Array>v).data
            if _TYPE(<PyObject*>arr_data) != &PyBytes_Type:
                return -1
            if not _add(&total, _BYTES_LEN(<PyObject*>arr_data)):
                return -1
        elif tp == &PyList_Type:
            n = _LIST_SIZE(<list>v)
            if kind == K_METRICS:
                if not _mul_add(&total, 8, n):
                    return -1
                continue
            if n == 0:
                return -1
            items = _LIST_ITEMS(<list>v)
            t0 = _TYPE(items[0])
            if t0 == &PyUnicode_Type or t0 == &PyBytes_Type:
                for j in range(n):
                    tp = _TYPE(items[j])
                    if tp == &PyUnicode_Type:
                        if not _add(&total, _STR_LEN(items[j])):
                            return -1
                    elif tp == &PyBytes_Type:
                        if not _add(&total, _BYTES_LEN(items[j])):
                            return -1
                    else:
                        return -1
            elif t0 == &PyBool_Type:
                if not _mul_add(&total, 1, n):
                    return -1
            elif t0 == &PyLong_Type or t0 == &PyFloat_Type:
                if not _mul_add(&total, 8, n):
                    return -1
            else:
                return -1
        elif tp == &PyFloat_Type or tp == &PyLong_Type:
            if not _add(&total, 8):
                return -1
        elif tp == &PyBool_Type:
            if not _add(&total, 1 if kind == K_CONFIGS else 8):
                return -1
        elif tp == &PyUnicode_Type or tp == &PyBytes_Type:
            if kind == K_METRICS:
                n = 8
            else:
                n = _STR_LEN(v) if tp == &PyUnicode_Type else _BYTES_LEN(v)
                if n == 0:
                    return -1
            if not _add(&total, n):
                return -1
        else:
            return -1
    return total


def _var_bytes(value):
    # Flower's ConfigsRecord.count_bytes.get_var_bytes, verbatim rules (with
    # Python's isinstance, which honours __class__, unlike Cython's isinstance).
    var_bytes = 0
    if PyObject_IsInstance(value, bool):
        var_bytes = 1
    elif PyObject_IsInstance(value, _METRICS_TYPES):
        var_bytes = 8
    if PyObject_IsInstance(value, _STR_BYTES):
        var_bytes = len(value)
    if var_bytes == 0:
        raise ValueError("Config values must be either `bool`, `int`, `float`, "
                         "`str`, or `bytes`")
    return var_bytes


cdef object _count_bytes(TypedDict rec):
    cdef int64_t fast
    if rec._exact:
        fast = _count_bytes_fast(rec._kind, rec._data)
        if fast >= 0:
            return fast
    num_bytes = 0
    if rec._kind == K_METRICS:
        for k, v in rec.items():
            num_bytes += 8 * len(v) if PyObject_IsInstance(v, list) else 8
            num_bytes += len(k)
    elif rec._kind == K_CONFIGS:
        for k, v in rec.items():
            if PyObject_IsInstance(v, list):
                if PyObject_IsInstance(v[0], _STR_BYTES):
                    num_bytes += int(sum([len(s) for s in v]))
                else:
                    num_bytes += _var_bytes(v[0]) * len(v)
            else:
                num_bytes += _var_bytes(v)
            num_bytes += len(k)
    else:
        for k, v in rec.items():
            num_bytes += len(v.data)
            num_bytes += len(k)
    return num_bytes


# ----------------------------------------------------------------------------
# TypedDict and the records
# ----------------------------------------------------------------------------

cdef str _CLASS = sys.intern("__class__")

@cython.collection_type("mapping")
cdef class TypedDict:
    """A ``MutableMapping`` that type-checks every key and value it stores.

    Mirrors ``flwr.common.record.typeddict.TypedDict``: constructed with a key
    check and a value check (callables that raise on bad input); compares equal
    to any ``TypedDict`` or ``dict`` with the same items; ``repr`` is the dict's.
    The records and the three dicts of :class:`RecordSet` are TypedDicts whose
    checks are compiled.

    >>> def key_ok(k):
    ...     if not isinstance(k, str): raise TypeError("str keys only")
    >>> d = TypedDict(key_ok, lambda v: None)
    >>> d["a"] = 1
    >>> d == {"a": 1}
    True
    """

    def __cinit__(self, *args, **kwargs):
        self._data = {}
        self._kind = K_CUSTOM
        self._exact = type(self) is TypedDict

    def __init__(self, check_key_fn, check_value_fn):
        self._check_key_fn = check_key_fn
        self._check_value_fn = check_value_fn
        if self._kind >= K_RS_PARAMS:
            self._data.clear()   # a RecordSet's view keeps the dict the RecordSet holds
        else:
            self._data = {}

    __reversed__ = None  # like collections.abc.Mapping

    @classmethod
    def __class_getitem__(cls, params):
        # Flower's TypedDict is Generic[K, V]: ``TypedDict[str, X](check_k, check_v)``
        # works, and so does subscripting its records (typing is lenient there).
        return GenericAlias(cls, params)
    __hash__ = None

    # --- core protocol --------------------------------------------------
    cdef int _set(self, object key, object value) except -1:
        _check_key(self, key)
        _check_value(self, value)
        PyDict_SetItem(self._data, key, value)
        return 0

    cdef int _store(self, object key, object value) except -1:
        """``self[key] = value``, through a subclass override if there may be one."""
        if self._exact:
            return self._set(key, value)
        self[key] = value
        return 0

    def __setitem__(self, key, value):
        """Set ``key`` to ``value`` after checking both (TypeError if invalid)."""
        unseal_record(self)
        self._set(key, value)

    def __getitem__(self, key):
        unseal_record(self)
        return self._data[key]

    def __delitem__(self, key):
        unseal_record(self)
        del self._data[key]

    # Every way for Python code to reach a sealed record's values (or give it new
    # ones) is an attribute (methods, properties, __dict__, pickling), an item, or a
    # comparison, which may run the other side's code on our values: each unseals
    # first. Iteration, len, `in` and repr only show keys and atomic values.
    def __getattribute__(self, name):
        if name is not _CLASS:   # isinstance() asks for __class__: nothing escapes
            unseal_record(self)
        return PyObject_GenericGetAttr(self, name)

    def __setattr__(self, name, value):
        unseal_record(self)
        PyObject_GenericSetAttr(self, name, <PyObject *>value)

    def __delattr__(self, name):
        unseal_record(self)
        PyObject_GenericSetAttr(self, name, NULL)

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def __repr__(self):
        return repr(self._data)

    def __eq__(self, other):
        unseal_record(self)
        if isinstance(other, TypedDict):
            unseal_record(<TypedDict>other)
            return self._data == (<TypedDict>other)._data
        if isinstance(other, dict) or PyObject_IsInstance(other, dict):
            return self._data == other
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        if eq is NotImplemented:
            return eq
        return not eq

    def keys(self):
        """D.keys() -> a set-like object providing a view on D's keys."""
        return self._data.keys()

    def values(self):
        """D.values() -> an object providing a view on D's values."""
        return self._data.values()

    def items(self):
        """D.items() -> a set-like object providing a view on D's items."""
        return self._data.items()

    # --- MutableMapping mixin methods, same semantics ---------------------
    def get(self, key, default=None):
        """D.get(k[,d]) -> D[k] if k in D, else d. d defaults to None."""
        cdef PyObject* v
        if self._exact:
            v = PyDict_GetItemWithError(self._data, key)
            return default if v == NULL else <object>v
        try:
            return self[key]
        except KeyError:
            return default

    def pop(self, key, default=_MARKER):
        """D.pop(k[,d]) -> v, remove k; if k is missing return d, else KeyError."""
        cdef PyObject* v
        if self._exact:
            # Not dict.pop: on an empty dict it returns before hashing the key,
            # while the mixin's self[key] raises TypeError for unhashable keys.
            if default is _MARKER:
                value = self._data[key]
            else:
                v = PyDict_GetItemWithError(self._data, key)
                if v == NULL:
                    return default
                value = <object>v
            del self._data[key]
            return value
        try:
            value = self[key]
        except KeyError:
            if default is _MARKER:
                raise
            return default
        else:
            del self[key]
            return value

    def popitem(self):
        """Remove and return the *first* (key, value) pair, like MutableMapping."""
        if self._exact:
            if _DICT_SIZE(self._data) == 0:
                raise KeyError
            key = next(iter(self._data))
            return (key, self._data.pop(key))
        try:
            key = next(iter(self))
        except StopIteration:
            raise KeyError from None
        value = self[key]
        del self[key]
        return key, value

    def clear(self):
        """D.clear() -> None. Remove all items from D."""
        if self._exact:
            self._data.clear()
            return
        try:
            while True:
                self.popitem()
        except KeyError:
            pass

    def update(self, other=(), /, **kwds):
        """D.update([E, ]**F): set D[k] = E[k] for each k of E, then D[k] = F[k], checked."""
        if self._exact:
            if type(other) is dict:
                if _dict_fast(self._kind, <dict>other):
                    PyDict_Update(self._data, other)
                    other = ()
            elif isinstance(other, TypedDict) and (<TypedDict>other)._exact:
                if _dict_fast(self._kind, (<TypedDict>other)._data):
                    PyDict_Update(self._data, (<TypedDict>other)._data)
                    other = ()
        if isinstance(other, Mapping):
            for key in other:
                self._store(key, other[key])
        elif hasattr(other, "keys"):
            for key in other.keys():
                self._store(key, other[key])
        else:
            for key, value in other:
                self._store(key, value)
        for key, value in kwds.items():
            self._store(key, value)

    def setdefault(self, key, default=None):
        """D.setdefault(k[,d]) -> D.get(k,d), also set D[k]=d (checked) if k not in D."""
        cdef PyObject* v
        if self._exact:
            v = PyDict_GetItemWithError(self._data, key)
            if v != NULL:
                return <object>v
            self._set(key, default)
            return default
        try:
            return self[key]
        except KeyError:
            self[key] = default
        return default

    # --- construction, copy, pickle ----------------------------------------
    cdef int _fill(self, object src, object keep_input) except -1:
        """Flower's record __init__ body: copy src in, deleting if not keep_input."""
        self._data = {}
        if not src:
            return 0
        cdef bint keep = bool(keep_input)
        if self._exact and type(src) is dict and _dict_fast(self._kind, <dict>src):
            self._data = PyDict_Copy(src)
            if not keep:
                (<dict>src).clear()
            return 0
        for k in list(src.keys()):
            self._store(k, src[k])
            if not keep:
                del src[k]
        return 0

    def __reduce__(self):
        return (copyreg.__newobj__, (type(self),), self.__getstate__())

    def __getstate__(self):
        extra = getattr(self, "__dict__")
        return (self._data, extra or None, self._check_key_fn, self._check_value_fn,
                self._kind)

    def __setstate__(self, state):
        # Like Flower (which pickles its __dict__), values are not re-checked and
        # copy.copy shares the underlying dict.
        if not (type(state) is tuple and len(state) == 5 and type(state[0]) is dict
                and type(state[4]) is int):
            raise TypeError(f"invalid state for {type(self).__name__}")
        kind = state[4]
        if not K_CUSTOM <= kind <= K_RS_CONFIGS or (self._kind != K_CUSTOM and kind != self._kind):
            raise ValueError(f"invalid record kind {kind} for {type(self).__name__}")
        if self._kind >= K_RS_PARAMS:
            # A RecordSet's view keeps the dict the RecordSet holds (pickle and copy make
            # fresh TypedDicts, so this is only a direct call on a view).
            if state[0] is not self._data:
                self._data.clear()
                self._data.update(state[0])
        else:
            self._data = state[0]
        if state[1]:
            getattr(self, "__dict__").update(state[1])
        self._check_key_fn = state[2]
        self._check_value_fn = state[3]
        self._kind = kind


cdef class MetricsRecord(TypedDict):
    """Flower's ``MetricsRecord``: ``str`` keys; ``int``/``float`` values or lists of them.

    ``bool`` is rejected; a list's elements must all be instances of the type of
    its first element; empty lists are allowed. With ``keep_input=False`` the
    entries are deleted from ``metrics_dict`` as they are copied in.

    >>> record = MetricsRecord({"accuracy": 0.94})
    >>> record["loss-historic"] = [0.9, 0.5, 0.01]
    >>> record.count_bytes()  # (8 + 8) + (3 * 8 + 13)
    53
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_METRICS
        self._exact = type(self) is MetricsRecord

    def __init__(self, metrics_dict=None, keep_input=True):
        self._fill(metrics_dict, keep_input)

    def count_bytes(self):
        """Bytes stored: 8 per number (lists: 8 per element) plus the key lengths.

        >>> MetricsRecord({"a": 1, "bc": [1.0, 2.0]}).count_bytes()
        27
        """
        return _count_bytes(self)


cdef class ConfigsRecord(TypedDict):
    """Flower's ``ConfigsRecord``: ``str`` keys; ``int``/``float``/``str``/``bytes``/``bool``
    values or homogeneous lists of them.

    >>> record = ConfigsRecord({"lr": 0.1, "batch-size": 128})
    >>> record["compute-average"] = True
    >>> record["path"] = "s3://bucket/file.json"
    >>> record.count_bytes()  # (8 + 2) + (8 + 10) + (1 + 15) + (21 + 4)
    69
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_CONFIGS
        self._exact = type(self) is ConfigsRecord

    def __init__(self, configs_dict=None, keep_input=True):
        self._fill(configs_dict, keep_input)

    def count_bytes(self):
        """Bytes stored: bool 1, int/float 8, str/bytes their length; plus key lengths.

        Like Flower, an empty list value raises IndexError and an empty
        ``str``/``bytes`` scalar raises ValueError.

        >>> ConfigsRecord({"flag": True, "name": "abc"}).count_bytes()
        12
        """
        return _count_bytes(self)


cdef class ParametersRecord(TypedDict):
    """Flower's ``ParametersRecord``: ``str`` keys, :class:`fastrec.Array` values.

    Note ``keep_input`` defaults to False: the input dict is emptied.

    >>> import numpy as np
    >>> from fastrec import array_from_numpy
    >>> record = ParametersRecord({"w": array_from_numpy(np.zeros(3))})
    >>> list(record)
    ['w']
    """

    def __cinit__(self, *args, **kwargs):
        self._kind = K_PARAMS
        self._exact = type(self) is ParametersRecord

    def __init__(self, array_dict=None, keep_input=False):
        self._fill(array_dict, keep_input)

    def count_bytes(self):
        """Total length of the arrays' ``data`` plus the key lengths.

        >>> from fastrec import Array
        >>> ParametersRecord({"w": Array("float32", [1], "raw", b"abcd")}).count_bytes()
        5
        """
        return _count_bytes(self)


cdef TypedDict _recordset_dict(int kind):
    cdef TypedDict d = TypedDict.__new__(TypedDict)
    d._kind = kind
    return d


cdef dict _NO_RECORDS = {}   # RecordSet.group() of an empty group: read, never written


cdef class RecordSet:
    """Flower's ``RecordSet``: three typed dicts of parameters, metrics and configs records.

    The given dicts are copied (checked) into fresh typed dicts, which accept only
    the matching record type. ``==`` against anything but a RecordSet raises
    ``NotImplementedError``, as in Flower.

    >>> rs = RecordSet(metrics_records={"m": MetricsRecord({"acc": 0.9})})
    >>> rs.configs_records["c"] = ConfigsRecord({"lr": 0.1})
    >>> rs
    RecordSet(parameters_records={}, metrics_records={'m': {'acc': 0.9}}, configs_records={'c': {'lr': 0.1}})
    """

    __hash__ = None

    def __init__(self, parameters_records=None, metrics_records=None, configs_records=None):
        # A given dict is copied in through the view, whose checks validate it. A group
        # without a view and without a dict (None) is empty.
        self._pd = self._md = self._cd = None
        self._pv = self._mv = self._cv = None
        if parameters_records is not None:
            self.view(0).update(parameters_records)
        if metrics_records is not None:
            self.view(1).update(metrics_records)
        if configs_records is not None:
            self.view(2).update(configs_records)

    cdef dict group(self, int which):
        """The dict of group ``which`` (0 parameters, 1 metrics, 2 configs), for reading:
        an empty group that was never viewed gives a shared empty dict."""
        cdef dict d = self._pd if which == 0 else self._md if which == 1 else self._cd
        return d if d is not None else _NO_RECORDS

    cdef TypedDict view(self, int which):
        """The TypedDict of group ``which``, made (over the group's dict) on first use.
        A view's dict is never replaced (see TypedDict.__init__/__setstate__), so the
        RecordSet reads its groups without going through the views."""
        cdef TypedDict v = self._pv if which == 0 else self._mv if which == 1 else self._cv
        if v is not None:
            return v
        _unseal(self)
        v = _recordset_dict(K_RS_PARAMS + which)
        if which == 0:
            if self._pd is None:
                self._pd = {}
            v._data, self._pv = self._pd, v
        elif which == 1:
            if self._md is None:
                self._md = {}
            v._data, self._mv = self._md, v
        else:
            if self._cd is None:
                self._cd = {}
            v._data, self._cv = self._cd, v
        return v

    @property
    def parameters_records(self):
        """Dictionary holding ParametersRecord instances."""
        return self.view(0)

    @property
    def metrics_records(self):
        """Dictionary holding MetricsRecord instances."""
        return self.view(1)

    @property
    def configs_records(self):
        """Dictionary holding ConfigsRecord instances."""
        return self.view(2)

    def __repr__(self):
        # A view's repr is its dict's: no need to make the views.
        flds = ("parameters_records", "metrics_records", "configs_records")
        view = ", ".join([f"{fld}={self.group(i)!r}" for i, fld in enumerate(flds)])
        return f"{type(self).__qualname__}({view})"

    def __eq__(self, other):
        if not PyObject_IsInstance(other, type(self)):
            raise NotImplementedError
        if not isinstance(other, RecordSet):
            return False
        cdef RecordSet o = <RecordSet>other
        # Comparing records may run a record subclass's __eq__, which sees ours.
        _unseal(self)
        _unseal(o)
        mine = getattr(self, "__dict__")
        theirs = getattr(o, "__dict__")
        # Flower compares the instances' __dict__ ({"_data": ..., extras}).
        if len(mine) != len(theirs):
            return False
        return ((self.group(0), self.group(1), self.group(2))
                == (o.group(0), o.group(1), o.group(2))) and mine == theirs

    def __ne__(self, other):
        return not self.__eq__(other)

    # Every way for Python code to reach a sealed RecordSet's records is an attribute
    # (properties, methods, __dict__, vars(), pickling) or __eq__: each unseals first.
    def __getattribute__(self, name):
        if name is not _CLASS:
            _unseal(self)
        return PyObject_GenericGetAttr(self, name)

    def __setattr__(self, name, value):
        _unseal(self)
        PyObject_GenericSetAttr(self, name, <PyObject *>value)

    def __delattr__(self, name):
        _unseal(self)
        PyObject_GenericSetAttr(self, name, NULL)

    def __reduce__(self):
        return (copyreg.__newobj__, (type(self),), self.__getstate__())

    def __getstate__(self):
        return (self.view(0), self.view(1), self.view(2), getattr(self, "__dict__") or None)

    def __setstate__(self, state):
        if not (type(state) is tuple and len(state) == 4):
            raise TypeError(f"invalid state for {type(self).__name__}")
        for d, kind in zip(state[:3], (K_RS_PARAMS, K_RS_METRICS, K_RS_CONFIGS)):
            if type(d) is not TypedDict or (<TypedDict>d)._kind != kind:
                raise TypeError(f"invalid state for {type(self).__name__}")
        self._pv, self._mv, self._cv = state[0], state[1], state[2]
        self._pd, self._md, self._cd = self._pv._data, self._mv._data, self._cv._data
        if state[3]:
            getattr(self, "__dict__").update(state[3])


cdef RecordSet recordset_from_dicts(dict params, dict metrics, dict configs):
    """A RecordSet holding these dicts (taken over, not copied), whose values
    the caller guarantees are freshly made records of the right type holding only
    exact builtin values (the wire decoder). It is returned sealed."""
    cdef RecordSet rs = RecordSet.__new__(RecordSet)
    rs._pd = params if params else None
    rs._md = metrics if metrics else None
    rs._cd = configs if configs else None
    _seal(rs)
    return rs


# Sealing. A server decodes thousands of replies and keeps them alive while it
# aggregates; each RecordSet's metrics/configs records and their group dicts would be
# a few more objects for every cyclic garbage collection to walk, and for a big heap
# (flwr imports ~55k objects) the full collections that many new objects trigger
# cost more than the decoding. Yet a decoded RecordSet cannot be part of a cycle:
# its records hold only exact builtin values, and nothing but the RecordSet refers
# to them. So, as CPython does for tuples and dicts of atomic values, the decoder
# leaves these out of the collector ("sealed": the RecordSet untracked). The first
# time Python code can reach inside -- any attribute access, attribute assignment,
# __eq__, a view -- _unseal tracks them all again, before any reference escapes.
# Parameters records stay tracked: they are few, and their arrays are not atomic.
# Sealing only ever delays collection of garbage that cannot exist; it never frees.
#
# The same holds for a single decoded metrics/configs record (MetricRecord.inflate,
# metrics_record_from_bytes, the records inside a RecordSet): its values are exact
# builtin scalars and fresh lists of them, which only the record refers to. It,
# its dict and those lists are sealed; TypedDict's entry points unseal it.

cdef void seal_record(TypedDict rec, bint lists_sealed=False):
    """Untrack a fresh, exact metrics/configs record holding only the decoder's values
    (``lists_sealed``: the decoder untracked its lists as it made them)."""
    if not lists_sealed:
        for v in rec._data.values():
            if type(v) is list:
                PyObject_GC_UnTrack(v)
    PyObject_GC_UnTrack(rec._data)
    PyObject_GC_UnTrack(rec)


cdef void _track_record(TypedDict rec):
    for v in rec._data.values():
        if type(v) is list and not PyObject_GC_IsTracked(v):
            PyObject_GC_Track(v)
    if not PyObject_GC_IsTracked(rec._data):
        PyObject_GC_Track(rec._data)
    PyObject_GC_Track(rec)

cdef void _seal(RecordSet rs):
    cdef dict d
    for d in (rs._md, rs._cd):
        if d is not None:
            for rec in d.values():
                seal_record(<TypedDict>rec)
            PyObject_GC_UnTrack(d)
    PyObject_GC_UnTrack(rs)


cdef inline void _unseal(RecordSet rs):
    if not PyObject_GC_IsTracked(rs):
        _track_groups(rs)


cdef void _track_groups(RecordSet rs):
    cdef dict d
    for d in (rs._md, rs._cd):
        if d is not None:
            for rec in d.values():
                unseal_record(<TypedDict>rec)
            if not PyObject_GC_IsTracked(d):
                PyObject_GC_Track(d)
    PyObject_GC_Track(rs)


MutableMapping.register(TypedDict)
