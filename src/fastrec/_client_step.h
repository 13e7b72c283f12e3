/* One client of FinalizeThenSample.next(), in C: read its metrics, convert them, call the
 * finalizers, count non-finite results. Included by _sampling.pyx only (it needs Python.h and
 * NumPy's C API, so it is not a csrc/ kernel).
 *
 * It takes the common clients, whose every value converts without running Python code:
 * exact floats and ints stored into the spec's numpy scalar, exact lists of floats into a
 * 1-d float array, and numpy scalars and arrays already of the spec's dtype and shape handed
 * over as they are. For any other client it returns 0 before calling anything, and
 * _sampling.pyx takes the client the general way; so it changes only the speed, never the
 * result. All values of a client are read and converted before its first finalizer runs
 * (finalizers, Python code, cannot change what is read).
 */
#ifndef FASTREC_CLIENT_STEP_H
#define FASTREC_CLIENT_STEP_H

#include <Python.h>
#include <math.h>
#include <float.h>
#include <stdint.h>
#include <string.h>
#include <numpy/arrayobject.h>
#include <numpy/arrayscalars.h>

/* The per-value helpers are small and run once per value: inlined into fc_client. */
#if defined(__GNUC__) || defined(__clang__)
#define FC_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FC_INLINE static __forceinline
#else
#define FC_INLINE static inline
#endif

/* x rounded to float32 as NumPy (IEEE 754) casts it. Within the float range C's conversion
   rounds to nearest (Annex F); past it C leaves the conversion undefined, so overflow is
   spelled out: 2**128 - 2**103 (FLT_MAX plus half an ulp) is where round-to-nearest reaches
   infinity. NaN fails the first test. */
static inline float fc_narrow(double x) {
    if (x >= -FLT_MAX && x <= FLT_MAX)
        return (float)x;
    if (x != x)
        return NAN;
    if (x >= 3.4028235677973366e38)
        return INFINITY;
    if (x <= -3.4028235677973366e38)
        return -INFINITY;
    return x > 0 ? FLT_MAX : -FLT_MAX;
}

static inline int fc_float_bad(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return (b & 0x7F800000U) == 0x7F800000U;
}

static inline int fc_double_bad(double x) {
    uint64_t b;
    memcpy(&b, &x, sizeof b);
    return (b & 0x7FF0000000000000ULL) == 0x7FF0000000000000ULL;
}

enum { FC_OFF = 0, FC_SCALAR = 1, FC_ARRAY = 2 };                  /* fc_conv.kind */
enum { FC_STORE_NONE = 0, FC_STORE_F32 = 1, FC_STORE_F64 = 2, FC_STORE_INT = 3 };
enum { FC_RES_OTHER = 0, FC_RES_F32 = 1, FC_RES_F64 = 2, FC_RES_UNCOUNTED = 3 };
enum { FC_STAGE_CONVERT = 1, FC_STAGE_FINALIZE = 2, FC_STAGE_MEASURE = 3 };

/* The general measurement of one result (sampled clients, unusual results): 0, or -1 with
   an exception set. */
typedef int (*fc_add_fn)(PyObject *acc, PyObject *result, int64_t slot);

/* A leaf spec, digested once (each CompiledSpec holds one). */
typedef struct {
    int kind;                   /* FC_SCALAR, FC_ARRAY, or FC_OFF (a list/tuple/mapping spec) */
    int store;                  /* how a Python number is stored into the scalar */
    int typenum;
    int itemsize;
    int64_t lo, hi;             /* FC_STORE_INT's range */
    PyTypeObject *scalar_type;  /* the dtype's numpy scalar type */
    int ndim;                   /* FC_ARRAY: the spec's shape, -1 for a None dimension */
    npy_intp dims[8];
    PyObject *spare;            /* owned, NULL at first: the last value made, refilled
                                   if nobody else holds it */
} fc_conv;

/* One metric of a round: its spec, finalizer and accumulator. */
typedef struct {
    PyObject *name;             /* the metric's key (borrowed) */
    fc_conv *conv;
    PyObject *fin;              /* the finalizer (borrowed) */
    vectorcallfunc call;        /* its entry point, NULL: through PyObject_Vectorcall */
    int res;                    /* the result kept in C when it is exactly res_type */
    PyTypeObject *res_type;
    int64_t *count;             /* the accumulator's non-finite count of that result */
    PyObject *acc;              /* the accumulator (borrowed), for fc_add_fn */
} fc_step;

/* The spare scalar to store into when nothing but the spec holds it (the finalizer neither
   kept it nor returned it into a sample), else a new one; a new reference, NULL on error. */
FC_INLINE PyObject *fc_scalar(fc_conv *s) {
    PyObject *p = s->spare;
    if (p != NULL && Py_REFCNT(p) == 1 && Py_TYPE(p) == s->scalar_type) {
        Py_INCREF(p);
        return p;
    }
    PyObject *x = s->scalar_type->tp_alloc(s->scalar_type, 0);
    if (x == NULL)
        return NULL;
    Py_INCREF(x);
    Py_XSETREF(s->spare, x);  /* the old spare is a numpy scalar: freeing it runs no code */
    return x;
}

/* Whether the array made for the previous client can be overwritten for this one: nothing
   else holds it (nor a view, which holds its base, nor a weak reference) and it is still the
   fresh array it was made as (a finalizer may reshape or re-type it in place). */
FC_INLINE int fc_refillable(const fc_conv *s, PyObject *p, npy_intp n) {
    if (p == NULL || Py_REFCNT(p) != 1 || Py_TYPE(p) != &PyArray_Type
            || ((PyArrayObject_fields *)p)->weakreflist != NULL)
        return 0;
    PyArrayObject *a = (PyArrayObject *)p;
    int want = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_OWNDATA | NPY_ARRAY_WRITEABLE
        | NPY_ARRAY_ALIGNED;
    return (PyArray_FLAGS(a) & want) == want && PyArray_NDIM(a) == 1
        && PyArray_DIMS(a)[0] == n && PyArray_STRIDES(a)[0] == s->itemsize
        && PyArray_TYPE(a) == s->typenum && PyArray_ISNOTSWAPPED(a)
        && PyArray_BASE(a) == NULL;
}

/* An exact ndarray already of the spec's native dtype and shape. */
static int fc_exact_array(const fc_conv *s, PyObject *v) {
    PyArrayObject *a = (PyArrayObject *)v;
    if (s->ndim > 8 || PyArray_NDIM(a) != s->ndim || PyArray_TYPE(a) != s->typenum
            || !PyArray_ISNOTSWAPPED(a))
        return 0;
    for (int j = 0; j < s->ndim; j++)
        if (s->dims[j] >= 0 && PyArray_DIMS(a)[j] != s->dims[j])
            return 0;
    return 1;
}

/* A list of exact floats under a 1-d float32/float64 spec, as the spec's array in *out:
   1; 0 for any other list (the general path decides); -1 on a memory error. */
static int fc_float_list(fc_conv *s, PyObject *v, PyObject **out) {
    Py_ssize_t n = PyList_GET_SIZE(v);
    if ((s->store != FC_STORE_F32 && s->store != FC_STORE_F64) || s->ndim != 1
            || (s->dims[0] >= 0 && n != s->dims[0]))
        return 0;
    for (Py_ssize_t j = 0; j < n; j++)
        if (Py_TYPE(PyList_GET_ITEM(v, j)) != &PyFloat_Type)
            return 0;
    npy_intp dim = (npy_intp)n;
    PyObject *a = s->spare, *old = NULL;
    if (fc_refillable(s, a, dim)) {
        Py_INCREF(a);
    } else {
        a = PyArray_SimpleNew(1, &dim, s->typenum);
        if (a == NULL)
            return -1;
        Py_INCREF(a);
        old = s->spare;
        s->spare = a;
    }
    char *data = PyArray_BYTES((PyArrayObject *)a);
    for (Py_ssize_t j = 0; j < n; j++) {
        double x = PyFloat_AS_DOUBLE(PyList_GET_ITEM(v, j));
        if (s->store == FC_STORE_F32) {
            float f = fc_narrow(x);
            memcpy(data + j * 4, &f, 4);
        } else {
            memcpy(data + j * 8, &x, 8);
        }
    }
    /* Only now, v read: freeing the old spare runs its weak references' callbacks (a
       finalizer may have made one), which may free v, borrowed from the client's dict. */
    Py_XDECREF(old);
    *out = a;
    return 1;
}

/* What the finalizer receives for v, in *out (a new reference): 1; 0 where the general
   path decides; -1 on a memory error. */
FC_INLINE int fc_convert(fc_conv *s, PyObject *v, PyObject **out) {
    PyTypeObject *t = Py_TYPE(v);
    if (s->kind == FC_SCALAR) {
        if (t == s->scalar_type) {
            Py_INCREF(v);
            *out = v;
            return 1;
        }
        double x;
        if (s->store == FC_STORE_INT) {
            int overflow = 0;
            long long i;
            if (t != &PyLong_Type)
                return 0;
            i = PyLong_AsLongLongAndOverflow(v, &overflow);  /* cannot fail on an exact int */
            if (overflow || i < s->lo || i > s->hi)
                return 0;
            PyObject *o = fc_scalar(s);
            if (o == NULL)
                return -1;
            /* Integers of every width share the signed struct: an in-range value has the
               same bits whatever the signedness. */
            switch (s->itemsize) {
            case 8: ((PyLongLongScalarObject *)o)->obval = (npy_longlong)i; break;
            case 4: ((PyIntScalarObject *)o)->obval = (npy_int)i; break;
            case 2: ((PyShortScalarObject *)o)->obval = (npy_short)i; break;
            default: ((PyByteScalarObject *)o)->obval = (npy_byte)i; break;
            }
            *out = o;
            return 1;
        }
        if (s->store != FC_STORE_F32 && s->store != FC_STORE_F64)
            return 0;
        if (t == &PyFloat_Type) {
            x = PyFloat_AS_DOUBLE(v);
        } else if (t == &PyLong_Type) {
            /* An int of 64 bits is cast as NumPy casts an int64 or uint64 array: straight to
               float32, rounded once (through a double it could round twice). */
            int overflow = 0;
            long long i = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow)
                return 0;   /* past int64: the general path */
            if (s->store == FC_STORE_F32) {
                PyObject *o = fc_scalar(s);
                if (o == NULL)
                    return -1;
                ((PyFloatScalarObject *)o)->obval = (float)i;
                *out = o;
                return 1;
            }
            x = (double)i;
        } else {
            return 0;
        }
        PyObject *o = fc_scalar(s);
        if (o == NULL)
            return -1;
        if (s->store == FC_STORE_F32)
            ((PyFloatScalarObject *)o)->obval = fc_narrow(x);
        else
            ((PyDoubleScalarObject *)o)->obval = x;
        *out = o;
        return 1;
    }
    if (s->kind == FC_ARRAY) {
        if (t == &PyArray_Type && fc_exact_array(s, v)) {
            Py_INCREF(v);
            *out = v;
            return 1;
        }
        if (t == &PyList_Type)
            return fc_float_list(s, v, out);
    }
    return 0;
}

/* fc_convert as an object: a new reference, Py_None where the general path decides, NULL
   on a memory error. */
static PyObject *fc_convert_obj(fc_conv *s, PyObject *v) {
    PyObject *out;
    int r = fc_convert(s, v, &out);
    if (r > 0)
        return out;
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A dict key matches a metric name as a lookup would: the same object, or an exact str with
   the same characters (a str's hash is cached, so compared first). */
static inline int fc_same_key(PyObject *key, PyObject *name) {
    if (key == name)
        return 1;
    return Py_TYPE(key) == &PyUnicode_Type && Py_TYPE(name) == &PyUnicode_Type
        && PyObject_Hash(key) == PyObject_Hash(name) && PyUnicode_Compare(key, name) == 0;
}

/* Client cv (a dict of exactly m items) with metrics steps[0..m): 1 when done; 0 when it is
   not taken (nothing was called, nothing counted); -1 with an exception set, *failed the
   metric's name and *stage the stage that failed. vals: scratch space for m references,
   left empty. */
static int fc_client(PyObject *cv, Py_ssize_t m, const fc_step *steps, PyObject **vals,
                     int64_t slot, fc_add_fn add, PyObject **failed, int *stage) {
    Py_ssize_t pos = 0, j, k;
    PyObject *key, *raw;
    /* Clients built alike hold their metrics in the names' order: read in order, no hash
       lookups; a client in another order is not taken. */
    for (j = 0; j < m; j++) {
        int r;
        if (!PyDict_Next(cv, &pos, &key, &raw) || !fc_same_key(key, steps[j].name)) {
            r = 0;
        } else {
            r = fc_convert(steps[j].conv, raw, &vals[j]);
        }
        if (r <= 0) {
            for (k = 0; k < j; k++)
                Py_CLEAR(vals[k]);
            if (r < 0) {
                *failed = steps[j].name;
                *stage = FC_STAGE_CONVERT;
                return -1;
            }
            return 0;
        }
    }
    for (j = 0; j < m; j++) {
        const fc_step *s = &steps[j];
        PyObject *f = s->call != NULL ? s->call(s->fin, &vals[j], 1, NULL)
                                      : PyObject_Vectorcall(s->fin, &vals[j], 1, NULL);
        Py_CLEAR(vals[j]);   /* let go at once: the spare may be refilled next client */
        if (f == NULL) {
            *stage = FC_STAGE_FINALIZE;
            goto fail;
        }
        if (slot < 0 && Py_TYPE(f) == s->res_type && s->res != FC_RES_OTHER) {
            if (s->res == FC_RES_F32)
                *s->count += fc_float_bad(((PyFloatScalarObject *)f)->obval);
            else if (s->res == FC_RES_F64)
                *s->count += fc_double_bad(((PyDoubleScalarObject *)f)->obval);
        } else if (add(s->acc, f, slot) < 0) {
            Py_DECREF(f);
            *stage = FC_STAGE_MEASURE;
            goto fail;
        }
        Py_DECREF(f);
    }
    return 1;
fail:
    *failed = steps[j].name;
    for (k = j + 1; k < m; k++)
        Py_CLEAR(vals[k]);
    return -1;
}

#endif
