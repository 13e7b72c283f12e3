/* .npy header encoder / parser and data copies. See npy.h. */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise */
#endif
#include "npy.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

static const uint8_t NPY_MAGIC[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

/* ------------------------------------------------------------------ */
/* Parser                                                              */
/* ------------------------------------------------------------------ */

/* The header text is parsed with Python's tokenizer rules in mind, since
 * numpy.load evaluates it with ast.literal_eval: whatever literal_eval reads
 * as the same dict must give the same answer here. */
typedef struct {
    const uint8_t *s; /* header text */
    size_t n;         /* its length */
    size_t i;         /* cursor */
    size_t base;      /* offset of s within the whole buffer */
    fr_npy_header *h;
} parser;

static fr_status fail(parser *p, fr_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(p->h->msg, FR_NPY_MSG_LEN, fmt, ap);
    va_end(ap);
    if (k >= 0 && (size_t)k < FR_NPY_MSG_LEN && p->s != NULL) {
        snprintf(p->h->msg + k, FR_NPY_MSG_LEN - (size_t)k, " (at header byte %zu)", p->i);
    }
    return st;
}

static int peek(const parser *p, size_t ahead)
{
    return p->i + ahead < p->n ? p->s[p->i + ahead] : -1;
}

static int is_ident_char(int c)
{
    /* Non-ASCII bytes may start or continue a Python identifier. */
    return c >= 0 && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      (c >= '0' && c <= '9') || c == '_' || c >= 0x80);
}

static int is_newline(int c) { return c == '\n' || c == '\r'; }

static void skip_newline(parser *p)
{
    if (peek(p, 0) == '\r' && peek(p, 1) == '\n') {
        p->i += 2;
    } else {
        p->i += 1;
    }
}

static void skip_comment(parser *p)
{
    while (p->i < p->n && !is_newline(p->s[p->i])) {
        p->i++;
    }
}

/* Runs of plain spaces: numpy pads every header with up to 64 of them plus
 * the growth-axis spare room, so this is the hot loop of a small parse.
 * Compares 8 bytes at a time. Returns how many were skipped. */
static size_t skip_spaces(parser *p)
{
    static const uint64_t SPACES = 0x2020202020202020ull;
    size_t start = p->i;
    while (p->n - p->i >= 8) {
        uint64_t w;
        memcpy(&w, p->s + p->i, 8);
        if (w != SPACES) {
            break;
        }
        p->i += 8;
    }
    while (p->i < p->n && p->s[p->i] == ' ') {
        p->i++;
    }
    return p->i - start;
}

/* Whitespace between tokens inside brackets: Python joins lines implicitly
 * there, so newlines, comments and backslash continuations are all blank. */
static void skip_ws(parser *p)
{
    for (;;) {
        int c = peek(p, 0);
        if (c == ' ' || c == '\t' || c == '\f' || c == '\n' || c == '\r') {
            p->i++;
        } else if (c == '#') {
            skip_comment(p);
        } else if (c == '\\' && is_newline(peek(p, 1))) {
            p->i++;
            skip_newline(p);
        } else {
            return;
        }
    }
}

/* Before the opening brace: literal_eval strips leading spaces and tabs;
 * then blank lines, comment lines and backslash continuations may follow,
 * and the line holding '{' must not be indented (a form feed resets the
 * column, as in the tokenizer). numpy's Python 2 retry (format <= 2.0)
 * rescues an indented first line: its tokenize round trip drops the indent. */
static fr_status skip_leading(parser *p)
{
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t')) {
        p->i++;
    }
    int first_line = 1;
    for (;;) {
        size_t col = 0;
        int c;
        while ((c = peek(p, 0)) == ' ' || c == '\t' || c == '\f') {
            col = c == '\f' ? 0 : col + 1;
            p->i++;
        }
        if (c == '#') {
            skip_comment(p);
            c = peek(p, 0);
        }
        if (is_newline(c)) {
            skip_newline(p);
            first_line = 0;
            continue;
        }
        if (c == '{' || (c == '\\' && is_newline(peek(p, 1)))) {
            if (col > 0) {
                if (!(first_line && p->h->major <= 2)) {
                    return fail(p, FR_ERR_VALUE, "cannot parse header: unexpected indent");
                }
                p->h->py2_retry = 1;
            }
            if (c == '{') {
                return FR_OK;
            }
            /* A continuation: the next physical line starts afresh. */
            p->i++;
            skip_newline(p);
            first_line = 0;
            continue;
        }
        if (c < 0) {
            return fail(p, FR_ERR_VALUE, "cannot parse header: it is empty");
        }
        return fail(p, FR_ERR_VALUE, "cannot parse header: expected '{'");
    }
}

/* Whether the text after the last '\n' holds only spaces, tabs and form feeds. */
static int last_line_is_blank(const parser *p)
{
    size_t k = p->n;
    while (k > 0 && p->s[k - 1] != '\n') {
        int c = p->s[k - 1];
        if (c != ' ' && c != '\t' && c != '\f') {
            return 0;
        }
        k--;
    }
    return 1;
}

/* After the closing brace: the rest of that line and any further lines may
 * only be blank or comments; a last, unterminated line of spaces counts as
 * an unexpected indent for the tokenizer. */
static fr_status skip_trailing(parser *p)
{
    int first = 1;
    for (;;) {
        size_t col = skip_spaces(p);
        int c, comment = 0;
        while ((c = peek(p, 0)) == ' ' || c == '\t' || c == '\f') {
            col = c == '\f' ? 0 : col + 1;
            p->i++;
        }
        if (c == '#') {
            skip_comment(p);
            comment = 1;
            c = peek(p, 0);
        }
        if (c == '\\' && !comment && is_newline(peek(p, 1))) {
            /* an explicit line join: the next line continues this one */
            p->i++;
            skip_newline(p);
            continue;
        }
        if (is_newline(c)) {
            skip_newline(p);
            first = 0;
            continue;
        }
        if (c < 0) {
            if (!first && col > 0 && !comment) {
                /* literal_eval fails on this; for format <= 2.0 numpy retries
                 * after a tokenize round trip, which drops a last line of
                 * blanks -- but tokenize splits lines at '\n' only, so not
                 * when a lone '\r' started that line. */
                if (p->h->major <= 2 && last_line_is_blank(p)) {
                    p->h->py2_retry = 1;
                    return FR_OK;
                }
                return fail(p, FR_ERR_VALUE, "cannot parse header: unexpected indent");
            }
            return FR_OK;
        }
        return fail(p, FR_ERR_VALUE, "cannot parse header: unexpected text after the dict");
    }
}

/* A plain string literal (optional u/r prefix, single or double quotes, no
 * escapes). Returns FR_ERR_TYPE, without moving the cursor, for a string
 * this simple reader does not handle (escapes, triple quotes), so that the
 * caller can decide; FR_ERR_VALUE for anything that is not a string. */
static fr_status parse_plain_string(parser *p, size_t *off, size_t *len)
{
    size_t start = p->i;
    int c = peek(p, 0);
    if (c == 'u' || c == 'U' || c == 'r' || c == 'R') {
        p->i++;
        c = peek(p, 0);
    }
    if (c != '\'' && c != '"') {
        p->i = start;
        return fail(p, FR_ERR_VALUE, "cannot parse header: expected a string");
    }
    int q = c;
    p->i++;
    if (peek(p, 0) == q && peek(p, 1) == q) {
        p->i = start;
        return FR_ERR_TYPE; /* triple-quoted */
    }
    size_t s0 = p->i;
    for (;;) {
        c = peek(p, 0);
        if (c == q) {
            break;
        }
        if (c == '\\') {
            p->i = start;
            return FR_ERR_TYPE;
        }
        if (c < 0 || is_newline(c)) {
            return fail(p, FR_ERR_VALUE, "cannot parse header: unterminated string");
        }
        p->i++;
    }
    *off = s0;
    *len = p->i - s0;
    p->i++; /* closing quote */
    return FR_OK;
}

static int at_string_start(const parser *p)
{
    int c = peek(p, 0);
    if (c == 'u' || c == 'U' || c == 'r' || c == 'R') {
        c = peek(p, 1);
    }
    return c == '\'' || c == '"';
}

/* Skip one Python literal of any kind, up to a ',' or '}' at bracket depth
 * zero, so that its source can be handed to literal_eval. */
static fr_status skip_value(parser *p)
{
    int depth = 0;
    size_t start = p->i;
    for (;;) {
        int c = peek(p, 0);
        if (c < 0) {
            return fail(p, FR_ERR_VALUE, "cannot parse header: unterminated value");
        }
        if (c == '\'' || c == '"') {
            int triple = peek(p, 1) == c && peek(p, 2) == c;
            p->i += triple ? 3 : 1;
            for (;;) {
                int d = peek(p, 0);
                if (d < 0) {
                    return fail(p, FR_ERR_VALUE, "cannot parse header: unterminated string");
                }
                if (d == '\\') {
                    p->i += p->i + 1 < p->n ? 2 : 1;
                    continue;
                }
                if (!triple && is_newline(d)) {
                    return fail(p, FR_ERR_VALUE, "cannot parse header: unterminated string");
                }
                if (d == c && (!triple || (peek(p, 1) == c && peek(p, 2) == c))) {
                    p->i += triple ? 3 : 1;
                    break;
                }
                p->i++;
            }
            continue;
        }
        if (c == '#') {
            skip_comment(p);
            continue;
        }
        if (c == '(' || c == '[' || c == '{') {
            /* Python's own parser stops far below this; keep literal_eval cheap. */
            if (++depth > 32) {
                return fail(p, FR_ERR_VALUE, "cannot parse header: value nested too deeply");
            }
        } else if (c == ')' || c == ']' || c == '}') {
            if (depth == 0) {
                if (c == '}') {
                    break;
                }
                return fail(p, FR_ERR_VALUE, "cannot parse header: unbalanced '%c'", c);
            }
            depth--;
        } else if (c == ',' && depth == 0) {
            break;
        }
        p->i++;
    }
    if (p->i == start) {
        return fail(p, FR_ERR_VALUE, "cannot parse header: missing value");
    }
    return FR_OK;
}

static fr_status parse_descr(parser *p)
{
    size_t start = p->i;
    if (at_string_start(p)) {
        size_t off = 0, len = 0; /* set on FR_OK (GCC -O3 cannot tell) */
        fr_status st = parse_plain_string(p, &off, &len);
        if (st == FR_OK) {
            size_t after = p->i;
            skip_ws(p);
            if (!at_string_start(p)) {
                p->i = after;
                p->h->descr_kind = FR_NPY_DESCR_STR;
                p->h->descr_off = p->base + off;
                p->h->descr_len = len;
                return FR_OK;
            }
            /* implicit concatenation: literal_eval reads it below */
        } else if (st != FR_ERR_TYPE) {
            return st;
        }
    }
    /* Lists (structured dtypes), tuples, escaped strings: keep the source
     * text for literal_eval. */
    p->i = start;
    fr_status st = skip_value(p);
    if (st != FR_OK) {
        return st;
    }
    p->h->descr_kind = FR_NPY_DESCR_OTHER;
    p->h->descr_off = p->base + start;
    p->h->descr_len = p->i - start;
    return FR_OK;
}

static fr_status parse_bool(parser *p, int *out)
{
    static const char T[] = "True", F[] = "False";
    size_t rest = p->n - p->i;
    if (rest >= 4 && memcmp(p->s + p->i, T, 4) == 0 && !is_ident_char(peek(p, 4))) {
        p->i += 4;
        *out = 1;
        return FR_OK;
    }
    if (rest >= 5 && memcmp(p->s + p->i, F, 5) == 0 && !is_ident_char(peek(p, 5))) {
        p->i += 5;
        *out = 0;
        return FR_OK;
    }
    return fail(p, FR_ERR_VALUE, "fortran_order is not a valid bool");
}

static int digit_value(int c, int base)
{
    int v;
    if (c >= '0' && c <= '9') {
        v = c - '0';
    } else if (c >= 'a' && c <= 'f') {
        v = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
        v = c - 'A' + 10;
    } else {
        return -1;
    }
    return v < base ? v : -1;
}

/* One integer literal as literal_eval reads it: decimal (no leading zeros),
 * 0x / 0o / 0b, single underscores between digits. A Python 2 'L' suffix is
 * dropped for format <= 2.0, as numpy's retry with its header filter does. */
static fr_status parse_int_literal(parser *p, uint64_t *out, int *overflow_out)
{
    int c = peek(p, 0);
    if (!(c >= '0' && c <= '9')) {
        return fail(p, FR_ERR_VALUE, "shape is not valid: expected an integer");
    }
    int base = 10;
    if (c == '0') {
        int x = peek(p, 1);
        if (x == 'x' || x == 'X') {
            base = 16;
        } else if (x == 'o' || x == 'O') {
            base = 8;
        } else if (x == 'b' || x == 'B') {
            base = 2;
        }
        if (base != 10) {
            p->i += 2;
            if (peek(p, 0) == '_') {
                p->i++; /* Python allows 0x_1f */
            }
        }
    }
    uint64_t v = 0;
    int overflow = 0, ndigits = 0, leading_zero = (base == 10 && c == '0');
    for (;;) {
        int d = digit_value(peek(p, 0), base);
        if (d < 0) {
            break;
        }
        if (leading_zero && d != 0) {
            return fail(p, FR_ERR_VALUE, "shape is not valid: leading zeros in an integer");
        }
        /* Below 2^59, v * 16 + 15 cannot wrap: skip the division then. */
        if (v >= ((uint64_t)1 << 59) && v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base) {
            overflow = 1;
        } else {
            v = v * (uint64_t)base + (uint64_t)d;
        }
        ndigits++;
        p->i++;
        if (peek(p, 0) == '_') {
            if (digit_value(peek(p, 1), base) < 0) {
                return fail(p, FR_ERR_VALUE, "shape is not valid: bad '_' in an integer");
            }
            p->i++;
        }
    }
    if (ndigits == 0) {
        return fail(p, FR_ERR_VALUE, "shape is not valid: integer without digits");
    }
    c = peek(p, 0);
    if (c == '.' || (base == 10 && (c == 'e' || c == 'E' || c == 'j' || c == 'J'))) {
        return fail(p, FR_ERR_VALUE, "shape is not valid: dimensions must be integers");
    }
    if (is_ident_char(c) || c == '.') {
        if (c == 'L' && p->h->major <= 2 && !is_ident_char(peek(p, 1))) {
            p->i++;
            p->h->py2_retry = 1;
        } else {
            return fail(p, FR_ERR_VALUE, "shape is not valid: bad integer literal");
        }
    } else if (p->h->major <= 2) {
        size_t save = p->i;
        skip_ws(p);
        if (peek(p, 0) == 'L' && !is_ident_char(peek(p, 1))) {
            p->i++;
            p->h->py2_retry = 1;
        } else {
            p->i = save;
        }
    }
    *out = v;
    *overflow_out = overflow;
    return FR_OK;
}

/* One dimension: an int literal in any number of parentheses, with at most
 * one unary sign (literal_eval allows no more). True/False pass numpy's
 * isinstance(x, int) check but then fail its reshape, so they are errors. */
static fr_status parse_dim(parser *p, int64_t *out)
{
    int opens = 0, neg = 0, signed_ = 0, overflow = 0;
    uint64_t v = 0;
    for (;;) {
        int c = peek(p, 0);
        if (c == '(') {
            if (++opens > 32) {
                return fail(p, FR_ERR_VALUE, "shape is not valid: nested too deeply");
            }
        } else if ((c == '+' || c == '-') && !signed_) {
            signed_ = 1;
            neg = c == '-';
        } else {
            break;
        }
        p->i++;
        skip_ws(p);
    }
    fr_status st = parse_int_literal(p, &v, &overflow);
    if (st != FR_OK) {
        return st;
    }
    for (; opens > 0; opens--) {
        skip_ws(p);
        if (peek(p, 0) != ')') {
            return fail(p, FR_ERR_VALUE, "shape is not valid: expected ')' after a dimension");
        }
        p->i++;
    }
    if (neg && v != 0) {
        return fail(p, FR_ERR_VALUE, "shape is not valid: negative dimension");
    }
    if (overflow || v > (uint64_t)INT64_MAX) {
        return fail(p, FR_ERR_OVERFLOW, "shape is not valid: dimension does not fit in 64 bits");
    }
    *out = (int64_t)v;
    return FR_OK;
}

static fr_status parse_shape(parser *p)
{
    fr_npy_header *h = p->h;
    if (peek(p, 0) != '(') {
        return fail(p, FR_ERR_VALUE, "shape is not valid: expected a tuple");
    }
    p->i++;
    skip_ws(p);
    h->ndim = 0;
    if (peek(p, 0) == ')') {
        p->i++;
        return FR_OK;
    }
    int comma = 0;
    for (;;) {
        int64_t d = 0; /* set on FR_OK (GCC -O3 cannot tell) */
        fr_status st = parse_dim(p, &d);
        if (st != FR_OK) {
            return st;
        }
        if (h->ndim >= FR_NPY_MAXDIMS) {
            return fail(p, FR_ERR_VALUE, "shape is not valid: more than %d dimensions",
                        FR_NPY_MAXDIMS);
        }
        h->shape[h->ndim++] = d;
        skip_ws(p);
        int c = peek(p, 0);
        if (c == ',') {
            comma = 1;
            p->i++;
            skip_ws(p);
            if (peek(p, 0) == ')') {
                p->i++;
                return FR_OK;
            }
        } else if (c == ')') {
            p->i++;
            if (!comma) {
                return fail(p, FR_ERR_VALUE, "shape is not valid: not a tuple");
            }
            return FR_OK;
        } else {
            return fail(p, FR_ERR_VALUE, "shape is not valid: expected ',' or ')'");
        }
    }
}

enum { KEY_DESCR = 1, KEY_FORTRAN = 2, KEY_SHAPE = 4 };

/* Whether the value skipped from `start` is one literal_eval could read: a
 * bare word must be True, False or None (anything else is a name). */
static int plain_literal(const parser *p, size_t start)
{
    size_t a = start, b = p->i;
    while (a < b && (p->s[a] == ' ' || p->s[a] == '\t'))
        a++;
    while (b > a && (p->s[b - 1] == ' ' || p->s[b - 1] == '\t' || is_newline(p->s[b - 1])))
        b--;
    if (a < b && (is_ident_char(p->s[a]) && !(p->s[a] >= '0' && p->s[a] <= '9'))) {
        size_t n = b - a;
        const char *w = (const char *)p->s + a;
        return (n == 4 && (memcmp(w, "True", 4) == 0 || memcmp(w, "None", 4) == 0)) ||
               (n == 5 && memcmp(w, "False", 5) == 0);
    }
    return a < b;
}

static fr_status parse_dict(parser *p)
{
    fr_npy_header *h = p->h;
    int seen = 0;
    fr_status pending[3] = {FR_OK, FR_OK, FR_OK};
    char pending_msg[3][FR_NPY_MSG_LEN];
    p->i++; /* '{' */
    skip_ws(p);
    if (peek(p, 0) != '}') {
        for (;;) {
            /* Adjacent literals concatenate ('desc' 'r' is 'descr'); only
             * the first 32 bytes matter, as longer keys are wrong anyway. */
            char k[32];
            size_t len = 0;
            fr_status st;
            do {
                size_t off = 0, n = 0; /* set on FR_OK (GCC -O3 cannot tell) */
                st = parse_plain_string(p, &off, &n);
                if (st != FR_OK) {
                    if (st == FR_ERR_TYPE) {
                        return fail(p, FR_ERR_VALUE,
                                    "header keys must be plain strings without escapes");
                    }
                    return st;
                }
                if (len < sizeof k) {
                    size_t take = n < sizeof k - len ? n : sizeof k - len;
                    memcpy(k + len, p->s + off, take);
                }
                len += n;
                skip_ws(p);
            } while (at_string_start(p));
            size_t shown = len < sizeof k ? len : sizeof k;
            int key;
            if (len == 5 && memcmp(k, "descr", 5) == 0) {
                key = KEY_DESCR;
            } else if (len == 13 && memcmp(k, "fortran_order", 13) == 0) {
                key = KEY_FORTRAN;
            } else if (len == 5 && memcmp(k, "shape", 5) == 0) {
                key = KEY_SHAPE;
            } else {
                return fail(p, FR_ERR_VALUE,
                            "header does not contain the correct keys: unexpected key '%.*s%s'",
                            (int)shown, k, len > shown ? "..." : "");
            }
            if (peek(p, 0) != ':') {
                return fail(p, FR_ERR_VALUE, "cannot parse header: expected ':'");
            }
            p->i++;
            skip_ws(p);
            /* A repeated key overrides, as in a Python dict literal. numpy
             * evaluates the whole dict before checking the values, so a value
             * of the wrong type only counts if no later key overrides it. */
            size_t value_start = p->i;
            if (key == KEY_DESCR) {
                st = parse_descr(p);
            } else if (key == KEY_FORTRAN) {
                st = parse_bool(p, &h->fortran_order);
            } else {
                st = parse_shape(p);
            }
            int slot = key == KEY_DESCR ? 0 : key == KEY_FORTRAN ? 1 : 2;
            if (st != FR_OK) {
                size_t fail_at = p->i;
                memcpy(pending_msg[slot], h->msg, FR_NPY_MSG_LEN);
                p->i = value_start;
                if (skip_value(p) != FR_OK || !plain_literal(p, value_start)) {
                    memcpy(h->msg, pending_msg[slot], FR_NPY_MSG_LEN);
                    p->i = fail_at;
                    return st;
                }
                pending[slot] = st;
            } else {
                pending[slot] = FR_OK;
            }
            seen |= key;
            skip_ws(p);
            int c = peek(p, 0);
            if (c == ',') {
                p->i++;
                skip_ws(p);
                if (peek(p, 0) == '}') {
                    break;
                }
            } else if (c == '}') {
                break;
            } else {
                return fail(p, FR_ERR_VALUE, "cannot parse header: expected ',' or '}'");
            }
        }
    }
    p->i++; /* '}' */
    for (int slot = 0; slot < 3; slot++) {
        if (pending[slot] != FR_OK) {
            memcpy(h->msg, pending_msg[slot], FR_NPY_MSG_LEN);
            return pending[slot];
        }
    }
    if (seen != (KEY_DESCR | KEY_FORTRAN | KEY_SHAPE)) {
        return fail(p, FR_ERR_VALUE, "header does not contain the correct keys: missing %s",
                    !(seen & KEY_DESCR) ? "'descr'"
                    : !(seen & KEY_FORTRAN) ? "'fortran_order'" : "'shape'");
    }
    return FR_OK;
}

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF);
 * returns the number of code points, or -1. */
static int64_t utf8_count(const uint8_t *s, size_t n)
{
    int64_t count = 0;
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            count++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1; cp = c & 0x1F; min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2; cp = c & 0x0F; min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3; cp = c & 0x07; min = 0x10000;
        } else {
            return -1;
        }
        if (n - i <= k) {
            return -1;
        }
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) {
                return -1;
            }
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return -1;
        }
        i += k + 1;
        count++;
    }
    return count;
}

fr_status fr_npy_parse_header(const uint8_t *buf, size_t len, fr_npy_header *h)
{
    parser p = {NULL, 0, 0, 0, h};
    memset(h, 0, offsetof(fr_npy_header, shape));
    h->py2_retry = 0;
    h->msg[0] = '\0';
    if (len < 8 || memcmp(buf, NPY_MAGIC, 6) != 0) {
        if (len < 6 || memcmp(buf, NPY_MAGIC, 6) == 0) {
            return fail(&p, FR_ERR_VALUE, "not .npy data: only %zu bytes, too short for the magic string",
                        len);
        }
        return fail(&p, FR_ERR_VALUE, "not .npy data: the magic string is not correct");
    }
    h->major = buf[6];
    h->minor = buf[7];
    size_t prefix, hlen;
    if (h->minor == 0 && h->major == 1) {
        if (len < 10) {
            return fail(&p, FR_ERR_VALUE, "truncated .npy data: no header length");
        }
        hlen = (size_t)buf[8] | ((size_t)buf[9] << 8);
        prefix = 10;
    } else if (h->minor == 0 && (h->major == 2 || h->major == 3)) {
        if (len < 12) {
            return fail(&p, FR_ERR_VALUE, "truncated .npy data: no header length");
        }
        hlen = (size_t)buf[8] | ((size_t)buf[9] << 8) | ((size_t)buf[10] << 16) |
               ((size_t)buf[11] << 24);
        prefix = 12;
    } else {
        return fail(&p, FR_ERR_VALUE, "unsupported .npy format version %d.%d (expected 1.0, 2.0 or 3.0)",
                    h->major, h->minor);
    }
    if (hlen > len - prefix) {
        return fail(&p, FR_ERR_VALUE,
                    "truncated .npy data: header length %zu runs past the end (%zu bytes left)",
                    hlen, len - prefix);
    }
    const uint8_t *s = buf + prefix;
    if (memchr(s, 0, hlen) != NULL) {
        return fail(&p, FR_ERR_VALUE, "cannot parse header: it contains a NUL byte");
    }
    int64_t nchars = (int64_t)hlen;
    if (h->major == 3) {
        nchars = utf8_count(s, hlen);
        if (nchars < 0) {
            return fail(&p, FR_ERR_VALUE, "cannot parse header: format 3.0 header is not valid UTF-8");
        }
    }
    if (nchars > FR_NPY_MAX_HEADER_CHARS) {
        return fail(&p, FR_ERR_VALUE,
                    "header is %lld characters long; like numpy.load, fastrec refuses headers "
                    "longer than %d characters",
                    (long long)nchars, FR_NPY_MAX_HEADER_CHARS);
    }
    p.s = s;
    p.n = hlen;
    p.base = prefix;
    h->data_offset = prefix + hlen;
    fr_status st = skip_leading(&p);
    if (st == FR_OK) {
        st = parse_dict(&p);
    }
    if (st == FR_OK) {
        st = skip_trailing(&p);
    }
    return st;
}

fr_status fr_npy_data_nbytes(fr_npy_header *h, size_t itemsize, size_t *nbytes)
{
    /* numpy requires the non-zero dimensions times the item size to fit in
     * npy_intp even when another dimension is zero. */
    uint64_t count = 1, bytes = itemsize;
    int empty = 0;
    for (int k = 0; k < h->ndim; k++) {
        uint64_t d = (uint64_t)h->shape[k];
        if (d == 0) {
            empty = 1;
            continue;
        }
        if (count > (uint64_t)INT64_MAX / d) {
            snprintf(h->msg, FR_NPY_MSG_LEN,
                     "shape is not valid: its element count overflows 64 bits");
            return FR_ERR_OVERFLOW;
        }
        count *= d;
        if (bytes != 0 && bytes > (uint64_t)INT64_MAX / d) {
            snprintf(h->msg, FR_NPY_MSG_LEN,
                     "shape is not valid: its size in bytes overflows 64 bits");
            return FR_ERR_OVERFLOW;
        }
        bytes *= d;
    }
    /* ... and in numpy's npy_intp, i.e. ptrdiff_t: on a 32-bit build the caller's
     * cast of each dimension to npy_intp would otherwise truncate it silently (a
     * (0, 2**33) header read as shape (0, 0)). No-op where ptrdiff_t is 64-bit. */
    if (count > (uint64_t)PTRDIFF_MAX || bytes > (uint64_t)PTRDIFF_MAX) {
        snprintf(h->msg, FR_NPY_MSG_LEN, "shape is not valid: too large for this platform");
        return FR_ERR_OVERFLOW;
    }
    *nbytes = empty ? 0 : (size_t)bytes;
    return FR_OK;
}

/* ------------------------------------------------------------------ */
/* Encoder                                                             */
/* ------------------------------------------------------------------ */

#define GROWTH_AXIS_MAX_DIGITS 21 /* numpy pads the growth axis repr to this */

static size_t put(uint8_t *dst, size_t at, const char *src, size_t n)
{
    memcpy(dst + at, src, n);
    return at + n;
}

/* Decimal digits of v (repr of a Python int). */
static size_t fmt_int(char *out, int64_t v)
{
    char tmp[24];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + (u % 10));
        u /= 10;
    } while (u != 0);
    size_t k = 0;
    if (v < 0) {
        out[k++] = '-';
    }
    while (n > 0) {
        out[k++] = tmp[--n];
    }
    return k;
}

size_t fr_npy_header_bound(size_t descr_len, int ndim)
{
    /* prefix 12 + fixed text < 64 + descr + 22 per dim + growth 21 + pad 64 */
    return 12 + 64 + descr_len + 22 * (size_t)(ndim > 0 ? ndim : 0) + 21 + 64 + 16;
}

fr_status fr_npy_write_header(uint8_t *dst, size_t cap, const char *descr_lit, size_t descr_len,
                              int fortran_order, int ndim, const int64_t *shape, int utf8,
                              size_t *out_len, int *out_major)
{
    static const char K_DESCR[] = "{'descr': ";
    static const char K_FORTRAN[] = ", 'fortran_order': ";
    static const char K_SHAPE[] = ", 'shape': ";
    if (ndim < 0 || ndim > FR_NPY_MAXDIMS || descr_len > SIZE_MAX / 2 ||
        cap < fr_npy_header_bound(descr_len, ndim)) {
        return FR_ERR_VALUE;
    }
    /* Text goes after the largest prefix, then moves left if 1.0 fits. */
    size_t at = 12, growth_digits = 0;
    at = put(dst, at, K_DESCR, sizeof K_DESCR - 1);
    at = put(dst, at, descr_lit, descr_len);
    at = put(dst, at, K_FORTRAN, sizeof K_FORTRAN - 1);
    at = fortran_order ? put(dst, at, "True", 4) : put(dst, at, "False", 5);
    at = put(dst, at, K_SHAPE, sizeof K_SHAPE - 1);
    dst[at++] = '(';
    for (int k = 0; k < ndim; k++) {
        char num[24];
        size_t n = fmt_int(num, shape[k]);
        if (k == (fortran_order ? ndim - 1 : 0)) {
            growth_digits = n;
        }
        if (k > 0) {
            at = put(dst, at, ", ", 2);
        }
        at = put(dst, at, num, n);
    }
    if (ndim == 1) {
        dst[at++] = ',';
    }
    at = put(dst, at, "), }", 4);
    /* Spare room so that the growth axis can be rewritten in place. */
    if (ndim > 0 && growth_digits < GROWTH_AXIS_MAX_DIGITS) {
        size_t n = GROWTH_AXIS_MAX_DIGITS - growth_digits;
        memset(dst + at, ' ', n);
        at += n;
    }
    size_t text = at - 12;
    size_t hlen = text + 1; /* with the final newline */
    int major = utf8 ? 3 : 1;
    size_t prefix = 10;
    size_t padlen = 64 - ((prefix + hlen) % 64);
    if (major == 1 && hlen + padlen > 0xFFFF) {
        major = 2;
    }
    if (major != 1) {
        prefix = 12;
        padlen = 64 - ((prefix + hlen) % 64);
        if (hlen + padlen > 0xFFFFFFFFu) {
            return FR_ERR_OVERFLOW;
        }
    }
    memmove(dst + prefix, dst + 12, text);
    at = prefix + text;
    memset(dst + at, ' ', padlen);
    at += padlen;
    dst[at++] = '\n';
    memcpy(dst, NPY_MAGIC, 6);
    dst[6] = (uint8_t)major;
    dst[7] = 0;
    size_t field = hlen + padlen;
    dst[8] = (uint8_t)(field & 0xFF);
    dst[9] = (uint8_t)((field >> 8) & 0xFF);
    if (prefix == 12) {
        dst[10] = (uint8_t)((field >> 16) & 0xFF);
        dst[11] = (uint8_t)((field >> 24) & 0xFF);
    }
    *out_len = at;
    *out_major = major;
    return FR_OK;
}

/* ------------------------------------------------------------------ */
/* Strided gather                                                      */
/* ------------------------------------------------------------------ */

/* The common widths, four independent loads per step: the loads of a
 * strided row miss cache, and independent ones overlap their latency.
 * Called with a constant w (4 or 8), so each call inlines into a loop of
 * fixed-size moves. */
/* Source elements are addressed as src + k * stride: stepping a pointer past the
 * row's last element (or before its first, for a negative stride) is undefined
 * behaviour even if it is never read. */
static inline void copy_row_x4(uint8_t *dst, const uint8_t *src, int64_t n, int64_t stride,
                               size_t w)
{
    int64_t k = 0;
    for (; k + 4 <= n; k += 4, dst += 4 * w) {
        const uint8_t *s = src + k * stride;
        uint8_t a[8], b[8], c[8], d[8];
        memcpy(a, s, w);
        memcpy(b, s + stride, w);
        memcpy(c, s + 2 * stride, w);
        memcpy(d, s + 3 * stride, w);
        memcpy(dst, a, w);
        memcpy(dst + w, b, w);
        memcpy(dst + 2 * w, c, w);
        memcpy(dst + 3 * w, d, w);
    }
    for (; k < n; k++, dst += w)
        memcpy(dst, src + k * stride, w);
}

static void copy_row(uint8_t *dst, const uint8_t *src, int64_t n, int64_t stride,
                     size_t itemsize)
{
    if (stride == (int64_t)itemsize) {
        memcpy(dst, src, (size_t)n * itemsize);
        return;
    }
    /* Fixed-size memcpy compiles to a single load/store per element. */
    switch (itemsize) {
    case 1:
        for (int64_t k = 0; k < n; k++) dst[k] = src[k * stride];
        break;
    case 2:
        for (int64_t k = 0; k < n; k++, dst += 2) memcpy(dst, src + k * stride, 2);
        break;
    case 4:
        copy_row_x4(dst, src, n, stride, 4);
        break;
    case 8:
        copy_row_x4(dst, src, n, stride, 8);
        break;
    case 16:
        for (int64_t k = 0; k < n; k++, dst += 16) memcpy(dst, src + k * stride, 16);
        break;
    default:
        for (int64_t k = 0; k < n; k++, dst += itemsize) memcpy(dst, src + k * stride, itemsize);
        break;
    }
}

void fr_npy_gather(uint8_t *dst, const uint8_t *src, int ndim, const int64_t *shape,
                   const int64_t *strides, size_t itemsize)
{
    int64_t n[FR_NPY_MAXDIMS], st[FR_NPY_MAXDIMS], idx[FR_NPY_MAXDIMS];
    int m = 0;
    if (itemsize == 0 || ndim > FR_NPY_MAXDIMS) {
        return;
    }
    /* Drop length-1 axes and merge an axis into the next one when the pair
     * is walked like a single axis: fewer, longer inner rows. */
    for (int k = 0; k < ndim; k++) {
        if (shape[k] == 0) {
            return;
        }
        if (shape[k] == 1) {
            continue;
        }
        if (m > 0 && st[m - 1] == strides[k] * shape[k]) {
            n[m - 1] *= shape[k];
            st[m - 1] = strides[k];
        } else {
            n[m] = shape[k];
            st[m] = strides[k];
            m++;
        }
    }
    if (m == 0) {
        memcpy(dst, src, itemsize);
        return;
    }
    int64_t inner = n[m - 1], inner_stride = st[m - 1];
    size_t row_bytes = (size_t)inner * itemsize;
    for (int k = 0; k < m - 1; k++) {
        idx[k] = 0;
    }
    const uint8_t *p = src;
    for (;;) {
        copy_row(dst, p, inner, inner_stride, itemsize);
        dst += row_bytes;
        int k = m - 2;
        for (; k >= 0; k--) {
            if (++idx[k] < n[k]) {
                p += st[k];
                break;
            }
            p -= st[k] * (n[k] - 1);
            idx[k] = 0;
        }
        if (k < 0) {
            return;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Large buffers                                                       */
/* ------------------------------------------------------------------ */

void fr_npy_advise_huge(void *p, size_t n)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* Same policy as numpy's allocator: a fresh multi-megabyte buffer is
     * filled once and completely, so transparent huge pages save thousands
     * of page faults (the kernel only honours this in "madvise" THP mode). */
    const uintptr_t page = 4096u;
    if (n < ((size_t)1 << 22)) {
        return;
    }
    uintptr_t start = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t end = (uintptr_t)p + n;
    if (end > start) {
        (void)madvise((void *)start, (size_t)(end - start), MADV_HUGEPAGE);
    }
#else
    (void)p;
    (void)n;
#endif
}
