/* Flower 1.15's record schema (flwr/proto/recordset.proto) on the wire.
 *
 * The messages (field numbers in brackets):
 *   MetricsRecordValue  oneof value { double[1] sint64[2] uint64[3]
 *                                     DoubleList[21] SintList[22] UintList[23] }
 *   ConfigsRecordValue  the same plus bool[4] string[5] bytes[6]
 *                                     BoolList[24] StringList[25] BytesList[26]
 *   XList               repeated T vals[1]  (numeric lists packed)
 *   Array               dtype[1] string, shape[2] repeated int32, stype[3], data[4] bytes
 *   map<string, V>      repeated entry { key[1] string; value[2] V }
 * (Flower 1.42's MetricRecordValue / ConfigRecordValue use the same oneofs
 * and field numbers, so this value codec serves both versions.)
 *
 * Decoding follows protobuf's parser: fields may come in any order and any
 * number of times; a scalar (or oneof member) keeps its last value; a
 * submessage that appears again is merged into the first, which is the same
 * as parsing the concatenation of its occurrences, so a value is decoded by
 * feeding each occurrence to fr_wire_value_merge in turn; packed and unpacked
 * repeated numbers are both read; a known field number with another wire type
 * is an unknown field and is skipped. An empty oneof is an error here,
 * because Flower's from_proto cannot convert it.
 *
 * Encoding writes what protobuf's deterministic serializer writes for the
 * message Flower's serde builds: fields in number order, the one oneof member
 * always (even 0, "" or an empty list), numeric lists packed (an empty list
 * is an empty submessage), map entries with both key and value, sorted by
 * key bytes (the caller sorts).
 *
 * A value's strings and bytes are views into the input; decoded list elements
 * live in scratch memory owned by the fr_value, which is reused from value to
 * value and grows only with what the input actually holds.
 *
 * Plain C11, no Python API. */
#ifndef FASTREC_WIRE_H
#define FASTREC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "fastrec_status.h"
#include "pb.h"

/* A value's kind is the field number of the oneof member that is set. */
enum {
    FR_V_NONE = 0,
    FR_V_DOUBLE = 1,
    FR_V_SINT64 = 2,
    FR_V_UINT64 = 3,
    FR_V_BOOL = 4,
    FR_V_STRING = 5,
    FR_V_BYTES = 6,
    FR_V_DOUBLE_LIST = 21,
    FR_V_SINT_LIST = 22,
    FR_V_UINT_LIST = 23,
    FR_V_BOOL_LIST = 24,
    FR_V_STRING_LIST = 25,
    FR_V_BYTES_LIST = 26
};

typedef struct {
    const uint8_t *ptr;
    size_t len;
} fr_span;

/* One metrics or configs value, decoded or to be encoded.
 *   DOUBLE: d; SINT64: i; UINT64: u; BOOL: b (0/1); STRING/BYTES: s;
 *   lists: n elements at `items`, typed double / int64_t / uint64_t /
 *   uint8_t (bools) / fr_span (strings, bytes) by kind.
 * For encoding, the caller points `items` at its own array (the scratch
 * fields are then unused). */
typedef struct {
    int kind;
    double d;
    int64_t i;
    uint64_t u;
    int b;
    fr_span s;
    size_t n;
    void *items;
    /* scratch owned by the value (decoding) */
    void *scratch;
    size_t scratch_cap;   /* bytes */
} fr_value;

void fr_value_init(fr_value *v);
/* Free the scratch memory. */
void fr_value_free(fr_value *v);
/* Forget the contents (kind NONE), keep the scratch for reuse. */
void fr_value_reset(fr_value *v);

/* Parse one occurrence of a MetricsRecordValue (configs = 0) or
 * ConfigsRecordValue (configs = 1) payload ptr[0..len) into v, merging with
 * what v already holds. `depth` is the nesting level of the value message.
 * Errors: FR_ERR_VALUE (malformed; ctx holds offset and reason),
 * FR_ERR_NOMEM. */
fr_status fr_wire_value_merge(fr_pb_ctx *c, fr_value *v, const uint8_t *ptr, size_t len,
                              int configs, int depth);

/* Parse a map entry (key[1] string, value[2] record value) at ptr[0..len):
 * *key is the last key (empty if absent, UTF-8 checked); v is reset, then
 * every value occurrence merged. *unknown is set to 1 if the entry holds any
 * other field (an unknown number, or key/value with another wire type):
 * protobuf's parser then keeps the whole entry as an unknown field of the
 * map's message instead of inserting it, so the caller must drop it (for a
 * repeated entry message, as in Flower 1.42, ignore the flag). A missing value
 * or one with no member set leaves v->kind == FR_V_NONE: Flower's from_proto
 * fails on that empty oneof, but only if no later entry replaces the key, so
 * the caller decides. Errors as fr_wire_value_merge. */
fr_status fr_wire_entry_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int configs,
                               int depth, fr_span *key, fr_value *v, int *unknown);

/* Bytes of a value message's payload. Returns 0 and sets *ok = 0 for an
 * unknown kind. */
size_t fr_wire_value_size(const fr_value *v, int *ok);

/* Write the value payload (the caller reserved fr_wire_value_size bytes). */
void fr_wire_value_put(fr_pb_writer *w, const fr_value *v);

/* Bytes of a whole map-entry field: tag `number`, length, key[1], value[2]. */
size_t fr_wire_entry_size(uint32_t number, size_t key_len, size_t value_size);

/* Write a map-entry field (the caller reserved fr_wire_entry_size bytes). */
void fr_wire_entry_put(fr_pb_writer *w, uint32_t number, const uint8_t *key, size_t key_len,
                       const fr_value *v, size_t value_size);

/* A decoded Array message: spans into the input, shape in `shape` scratch. */
typedef struct {
    fr_span dtype, stype, data;
    size_t ndim;
    int32_t *shape;
    size_t shape_cap;     /* elements */
} fr_wire_array;

void fr_wire_array_init(fr_wire_array *a);
void fr_wire_array_free(fr_wire_array *a);

/* Parse an Array payload. A shape dimension that is not a valid int32 (as
 * a sign-extended varint or a 4-byte-free value) is FR_ERR_VALUE, where
 * protobuf would silently keep its low 32 bits.
 * Errors: FR_ERR_VALUE, FR_ERR_NOMEM. */
fr_status fr_wire_array_decode(fr_pb_ctx *c, const uint8_t *ptr, size_t len, int depth,
                               fr_wire_array *a);

/* Bytes of an Array payload with these field lengths and shape. */
size_t fr_wire_array_size(size_t dtype_len, const int64_t *shape, size_t ndim, size_t stype_len,
                          size_t data_len);

/* Write an Array payload except the data bytes: everything up to and including
 * the data field's tag and length. The caller then copies data_len bytes
 * (possibly without the GIL). */
void fr_wire_array_put_head(fr_pb_writer *w, const uint8_t *dtype, size_t dtype_len,
                            const int64_t *shape, size_t ndim, const uint8_t *stype,
                            size_t stype_len, size_t data_len);

/* ------------------------------------------------------------------------
 * Columns straight from client replies (fastrec.wire.metrics_columns).
 *
 * A leaf is one output column fed by the metric named `name` of the chosen
 * MetricsRecord: the scalar value (width 0, elem -1), the whole list value of
 * exactly `width` elements (elem -1), or element `elem` of a list value of
 * exactly `width` elements. Values are written as double (FR_COL_F64) or as
 * int64 / uint64 within [imin, imax] / [0, umax]; row r of the column starts
 * at out + r * stride bytes.
 * ------------------------------------------------------------------------ */
enum { FR_COL_F64 = 1, FR_COL_I64 = 2, FR_COL_U64 = 3 };
enum { FR_FILL_OK = 0, FR_FILL_KIND = 1, FR_FILL_LENGTH = 2, FR_FILL_RANGE = 3 };

typedef struct {
    const uint8_t *name;
    size_t name_len;
    size_t width;
    int64_t elem;
    int out_type;
    int64_t imin, imax;
    uint64_t umax;
    uint8_t *out;
    size_t stride;
    int seen;          /* scratch for fr_wire_columns_row */
} fr_wire_leaf;

/* Write value v into row `row` of the leaf's column: FR_FILL_OK, or why not
 * (a list where a number is wanted or the reverse, a list of another length,
 * a number outside the column's integer range or a float for an integer
 * column). Nothing is written unless FR_FILL_OK. */
int fr_wire_leaf_fill(const fr_wire_leaf *leaf, size_t row, const fr_value *v);

/* The fast path for one serialized RecordSet (message = 0) or Message
 * (message = 1): validate the whole of buf as the full decoder would and fill
 * row `row` of every leaf from the MetricsRecord named rec. Returns 0 when the
 * row is filled; 1 when the caller must take the general path instead: any
 * error, any missing or unconvertible value, and the rare inputs whose meaning
 * depends on replacement (a record or metric key occurring twice, a map entry
 * with unknown fields, an empty oneof). It never reads outside buf, allocates
 * only scratch bounded by the input, and needs no Python (callable without the
 * GIL). `v` and `a` are reusable scratch. */
int fr_wire_columns_row(const uint8_t *buf, size_t len, int message, const uint8_t *rec,
                        size_t rec_len, fr_wire_leaf *leaves, size_t nleaves, size_t row,
                        fr_value *v, fr_wire_array *a);

/* The fast path for one Flower 1.42 MetricRecord object, i.e. its content
 * "MetricRecord  <body length>\0" + body (MetricRecord.deflate()), where the
 * body is the protobuf MetricRecord { repeated Item items = 1; }. Only the
 * canonical header is accepted: exactly that class name, one space, no child
 * ids, one space, the body's length in decimal without leading zeros, NUL.
 * The body is validated as fastrec.app's MetricRecord.inflate does and row
 * `row` of every leaf filled from the Items. Returns 0 when the row is filled;
 * 1 when the caller must take the general path: any other header, any error,
 * a missing or unconvertible value, and the Items whose meaning depends on
 * 1.42's replacement rules (a leaf's key in two Items, an Item without a
 * value, an Item with fields other than key and value). Leaf names must be
 * valid UTF-8; the leaves of one metric must be consecutive and share one
 * `name` pointer; leaves that do not
 * (a name given twice) are left unfilled, so the row goes to the general path.
 * Same guarantees as fr_wire_columns_row. */
int fr_wire_columns_object(const uint8_t *buf, size_t len, fr_wire_leaf *leaves, size_t nleaves,
                           size_t row, fr_value *v);

#endif
