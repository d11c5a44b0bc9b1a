/* pipeline.gho._native: the byte-serial parts of the GHO reader in C (a CPython extension).
 *
 * Built at install time by setuptools (setup.py, `pip install -e .` / `make venv`); never at run time.
 * pipeline/gho/native.py imports it when it is there and otherwise leaves the pure-Python code in
 * pipeline/gho/codecs.py and pipeline/gho/crypto.py in charge; both give identical output
 * (tests/test_gho_codecs.py runs them on the same inputs).
 *
 *   fast_decode(payload, limit) -> bytes | None   Fast-LZ token stream (docs/gho-format.md 7.4) of payload[4:];
 *                                                 None when the output would exceed limit bytes
 *   decrypt(data, seed, keys) -> bytes            Ghost keystream cipher (docs/gho-format.md 9.2), one unit;
 *                                                 keys: the 256 16-bit table entries, native order
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

static const unsigned char DIGITS[] = "123456789012345678";

static inline unsigned h3(unsigned x, unsigned y, unsigned z) {
    uint32_t v = (uint32_t)(z ^ (y << 4) ^ (x << 8));
    return (uint32_t)(v * 0xFFFF9E5Fu) >> 4 & 0xFFFu;
}

/* Decode the token stream s[4..n) into out (capacity cap). Returns the output length or -1. */
static Py_ssize_t fast_decode_into(const unsigned char *s, size_t n, unsigned char *out, size_t cap) {
    int64_t table[4096];
    size_t i = 4, o = 0, run_start = 0, p, j;
    unsigned bits = 0;
    int nbits = 0;
    for (j = 0; j < 4096; j++) table[j] = -1;
    while (i < n) {
        if (nbits == 0) {
            if (n - i < 2) break;
            bits = s[i] | ((unsigned)s[i + 1] << 8);
            nbits = 16;
            i += 2;
            continue;
        }
        if (!(bits & 1)) {
            bits >>= 1; nbits--;
            if (o >= cap) return -1;
            out[o++] = s[i++];
            continue;
        }
        bits >>= 1; nbits--;
        if (n - i < 2) break;
        {
            unsigned b0 = s[i], b1 = s[i + 1];
            unsigned slot = ((b0 & 0xF0u) << 4) | b1;
            size_t ln = 3 + (b0 & 0x0Fu), start = o;
            int64_t src;
            i += 2;
            if (o + ln > cap) return -1;
            for (p = run_start; p + 2 < start; p++) table[h3(out[p], out[p + 1], out[p + 2])] = (int64_t)p;
            src = table[slot];
            if (src < 0) memcpy(out + o, DIGITS, ln);
            else for (j = 0; j < ln; j++) out[o + j] = out[(size_t)src + j];
            o += ln;
            for (; p < start; p++) table[h3(out[p], out[p + 1], out[p + 2])] = (int64_t)p;
            table[slot] = (int64_t)start;
            run_start = o;
        }
    }
    return (Py_ssize_t)o;
}

static PyObject *py_fast_decode(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t limit, got;
    PyObject *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*n:fast_decode", &in, &limit)) return NULL;
    if (limit < 0) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "limit must be >= 0");
        return NULL;
    }
    if (in.len < 4) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "payload shorter than its 4-byte prefix");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, limit);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    got = fast_decode_into((const unsigned char *)in.buf, (size_t)in.len,
                           (unsigned char *)PyBytes_AS_STRING(out), (size_t)limit);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    if (got < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    if (got != limit && _PyBytes_Resize(&out, got) < 0) return NULL;
    return out;
}

static PyObject *py_decrypt(PyObject *self, PyObject *args) {
    Py_buffer in, keys;
    unsigned int seed;
    PyObject *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Iy*:decrypt", &in, &seed, &keys)) return NULL;
    if (keys.len != 256 * (Py_ssize_t)sizeof(uint16_t)) {
        PyBuffer_Release(&in);
        PyBuffer_Release(&keys);
        PyErr_SetString(PyExc_ValueError, "keys must be 256 16-bit entries (512 bytes)");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, in.len);
    if (out != NULL) {
        const unsigned char *src = (const unsigned char *)in.buf;
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        uint16_t k[256];
        unsigned st = seed & 0xFFFFu;
        Py_ssize_t i;
        memcpy(k, keys.buf, sizeof k);
        Py_BEGIN_ALLOW_THREADS
        for (i = 0; i < in.len; i++) {
            unsigned c = src[i];
            dst[i] = (unsigned char)(c ^ (st & 0xFFu));
            st = (((st & 0xFFu) << 8) ^ k[(st >> 8) ^ c]) & 0xFFFFu;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&keys);
    return out;
}

static PyMethodDef methods[] = {
    {"fast_decode", py_fast_decode, METH_VARARGS,
     "fast_decode(payload, limit) -> bytes | None: decode a Fast block's token stream (payload[4:]); "
     "None if the output would exceed limit bytes."},
    {"decrypt", py_decrypt, METH_VARARGS,
     "decrypt(data, seed, keys) -> bytes: decrypt one cipher unit (keys: 256 native-order uint16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pipeline.gho._native",
    "Fast-LZ decoder and keystream cipher of the GHO reader, in C (see pipeline/gho/native.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
