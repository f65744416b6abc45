# cython: language_level=3
"""Vocabulary-sized string work in C, where a Python loop over 262k pieces costs a large part of
a second: GGUF string arrays (stepped over, or decoded) and SentencePiece tokenization.

- `skip_strings(buf, pos, count, big_endian)`: steps over up to `count` GGUF strings (u64 length +
  bytes) starting at buf[pos] while their length fields lie in `buf`: (strings stepped, position
  after them; it may lie past the end of buf, where the last string's bytes run on).
- `decode_strings(raw, count, big_endian)`: the `count` strings of `raw` as str (UTF-8, errors
  replaced), or ValueError if `raw` holds fewer.
- `SpmEncoder(tokens, scores, unk_id)`: llama.cpp's SentencePiece tokenization over a hash table
  of the tokens' UTF-8 bytes (built in tens of milliseconds for 262k tokens: no merges list).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

cdef extern from "Python.h":
    bint PyUnicode_Check(object o)

# A length field beyond this is garbage (as model/gguf_header.py's _MAX_SANE).
cdef uint64_t _MAX_SANE = (<uint64_t>1) << 40


cdef inline uint64_t _u64(const unsigned char* p, bint big) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    if big:
        v = __builtin_bswap64(v)
    return v


cdef extern from *:
    uint64_t __builtin_bswap64(uint64_t x) nogil


def skip_strings(const unsigned char[::1] buf, Py_ssize_t pos, Py_ssize_t count, bint big_endian):
    cdef Py_ssize_t end = buf.shape[0], done = 0
    cdef uint64_t n = 0
    cdef const unsigned char* p = &buf[0] if end > 0 else NULL
    with nogil:
        while done < count and pos >= 0 and pos + 8 <= end:
            n = _u64(p + pos, big_endian)
            if n > _MAX_SANE:
                break
            pos += 8 + <Py_ssize_t>n
            done += 1
    if done < count and pos >= 0 and pos + 8 <= end:
        raise ValueError(f"corrupt header: a string length field of {n} bytes")
    return done, pos


def decode_strings(bytes raw, Py_ssize_t count, bint big_endian):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(raw), pos = 0, i
    cdef uint64_t n
    out = [None] * count
    for i in range(count):
        if pos + 8 > size:
            raise ValueError(f"string array truncated after {i} of {count} strings")
        n = _u64(p + pos, big_endian)
        pos += 8
        if n > <uint64_t>(size - pos):
            raise ValueError(f"string array truncated in string {i} of {count}")
        out[i] = PyUnicode_DecodeUTF8(<const char*>(p + pos), <Py_ssize_t>n, "replace")
        pos += <Py_ssize_t>n
    return out


# ---- SentencePiece tokenization as llama.cpp does it (llm_tokenizer_spm) ----------------------

cdef inline uint64_t _hash_bytes(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL  # FNV-1a
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ s[i]) * 0x100000001B3ULL
    return h


cdef inline uint64_t _slot(uint64_t h) noexcept nogil:
    """A hash table slot from a hash (its high bits, mixed)."""
    return (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ULL


cdef struct _Bigram:
    float score
    int left
    int right
    Py_ssize_t size


cdef inline bint _before(const _Bigram* a, const _Bigram* b) noexcept nogil:
    """llama.cpp's order: the higher score first, then the leftmost."""
    return a.score > b.score or (a.score == b.score and a.left < b.left)


cdef class SpmEncoder:
    """llama.cpp's SentencePiece search over a vocabulary: split UTF-8 text into characters, then
    repeatedly merge the adjacent pair whose union is a token of the highest score (the leftmost
    on ties), and spell what formed no token as byte tokens ("<0xNN>", else the byte as a piece,
    else `unk_id`). Every token takes part, as in llama.cpp; a text stated twice is the last id.

    `encode(text)` takes text already escaped (spaces as U+2581, the space prefix added) as
    UTF-8 bytes and returns the ids. Special tokens are split off by the caller."""

    cdef unsigned char* text      # every token's UTF-8 bytes, concatenated
    cdef int64_t* off             # token i is text[off[i]:off[i + 1]]
    cdef uint64_t* full           # hash of each token
    cdef int32_t* slots           # open addressing: token id + 1, 0 empty
    cdef float* scores
    cdef uint64_t mask
    cdef Py_ssize_t n
    cdef int32_t byte_ids[256]

    def __cinit__(self, list tokens, const float[::1] scores, int unk_id):
        cdef Py_ssize_t n = PyList_GET_SIZE(tokens), i, total = 0, blen
        cdef const char* s
        if scores.shape[0] != n:
            raise ValueError(f"SpmEncoder: {n} tokens and {scores.shape[0]} scores")
        self.n = n
        encoded = [None] * n
        for i in range(n):
            t = <object>PyList_GET_ITEM(tokens, i)
            if not PyUnicode_Check(t):
                raise TypeError(f"SpmEncoder: tokens[{i}] is {type(t).__name__}, not str")
            b = (<str>t).encode("utf-8", "surrogatepass")
            encoded[i] = b
            total += PyBytes_GET_SIZE(b)
        cdef uint64_t size = 1
        while size < <uint64_t>(2 * n + 2):
            size <<= 1
        self.mask = size - 1
        self.text = <unsigned char*>malloc(<size_t>total + 1)
        self.off = <int64_t*>malloc(<size_t>(n + 1) * 8)
        self.full = <uint64_t*>malloc(<size_t>(n + 1) * 8)
        self.slots = <int32_t*>malloc(<size_t>size * 4)
        self.scores = <float*>malloc(<size_t>(n + 1) * 4)
        if not (self.text and self.off and self.full and self.slots and self.scores):
            raise MemoryError("SpmEncoder: out of memory")
        memset(self.slots, 0, <size_t>size * 4)
        cdef int64_t o = 0
        for i in range(n):
            b = encoded[i]
            blen = PyBytes_GET_SIZE(b)
            self.off[i] = o
            memcpy(self.text + o, PyBytes_AS_STRING(b), <size_t>blen)
            o += blen
            self.scores[i] = scores[i]
        self.off[n] = o
        cdef uint64_t h, k
        cdef int64_t r
        with nogil:
            for i in range(n):
                h = _hash_bytes(self.text + self.off[i], self.off[i + 1] - self.off[i])
                self.full[i] = h
                k = (_slot(h) >> 20) & self.mask
                while True:
                    r = self.slots[k] - 1
                    if r < 0:
                        self.slots[k] = <int32_t>(i + 1)
                        break
                    if (self.full[r] == h and self.off[r + 1] - self.off[r] == self.off[i + 1] - self.off[i]
                            and memcmp(self.text + self.off[r], self.text + self.off[i],
                                       <size_t>(self.off[i + 1] - self.off[i])) == 0):
                        self.slots[k] = <int32_t>(i + 1)  # the last id of a duplicate
                        break
                    k = (k + 1) & self.mask
        cdef unsigned char piece[6]
        cdef int c
        for c in range(256):
            piece[0], piece[1], piece[2] = 60, 48, 120  # "<0x"
            piece[3] = b"0123456789ABCDEF"[c >> 4]
            piece[4] = b"0123456789ABCDEF"[c & 15]
            piece[5] = 62  # ">"
            r = self._find(piece, 6)
            if r < 0:
                piece[0] = <unsigned char>c
                r = self._find(piece, 1)
            self.byte_ids[c] = <int32_t>(r if r >= 0 else unk_id)

    def __dealloc__(self):
        free(self.text)
        free(self.off)
        free(self.full)
        free(self.slots)
        free(self.scores)

    cdef int64_t _find(self, const unsigned char* s, Py_ssize_t length) noexcept nogil:
        """The id of the token with these bytes, or -1."""
        cdef uint64_t h = _hash_bytes(s, length)
        cdef uint64_t k = (_slot(h) >> 20) & self.mask
        cdef int64_t r
        while True:
            r = self.slots[k] - 1
            if r < 0:
                return -1
            if (self.full[r] == h and self.off[r + 1] - self.off[r] == length
                    and memcmp(self.text + self.off[r], s, <size_t>length) == 0):
                return r
            k = (k + 1) & self.mask

    cdef Py_ssize_t _push(self, _Bigram* heap, Py_ssize_t nheap, const unsigned char* s, const Py_ssize_t* start,
                          const Py_ssize_t* nbytes, int left, int right) noexcept nogil:
        """llama.cpp's try_add_bigram: queue (left, right) if their union is a token."""
        if left < 0 or right < 0:
            return nheap
        cdef Py_ssize_t size = nbytes[left] + nbytes[right]
        cdef int64_t tid = self._find(s + start[left], size)
        if tid < 0:
            return nheap
        cdef Py_ssize_t k = nheap, parent
        cdef _Bigram b
        b.score, b.left, b.right, b.size = self.scores[tid], left, right, size
        while k > 0:
            parent = (k - 1) >> 1
            if not _before(&b, &heap[parent]):
                break
            heap[k] = heap[parent]
            k = parent
        heap[k] = b
        return nheap + 1

    def token_id(self, bytes piece) -> int:
        """The id of the token spelled `piece` (UTF-8), or -1."""
        return self._find(<const unsigned char*>PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))

    def encode(self, bytes text) -> list:
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(text)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(text), pos = 0, m = 0, length, cap, nout = 0, j
        if size == 0:
            return []
        # symbols: start, byte length (0 once merged away), prev, next
        cdef Py_ssize_t* start = <Py_ssize_t*>malloc(<size_t>size * sizeof(Py_ssize_t))
        cdef Py_ssize_t* nbytes = <Py_ssize_t*>malloc(<size_t>size * sizeof(Py_ssize_t))
        cdef int* prev = <int*>malloc(<size_t>size * sizeof(int))
        cdef int* nxt = <int*>malloc(<size_t>size * sizeof(int))
        cap = 3 * size + 4  # m - 1 pairs, then at most two per merge
        cdef _Bigram* heap = <_Bigram*>malloc(<size_t>cap * sizeof(_Bigram))
        cdef int32_t* out = <int32_t*>malloc(<size_t>size * sizeof(int32_t))
        cdef Py_ssize_t nheap = 0
        cdef _Bigram top
        cdef int i, bad = 0
        cdef int64_t tid
        cdef unsigned char c
        try:
            if not (start and nbytes and prev and nxt and heap and out):
                raise MemoryError("SpmEncoder.encode: out of memory")
            with nogil:
                while pos < size:  # UTF-8 characters, as llama.cpp's unicode_len_utf8
                    c = s[pos]
                    length = 1 if c < 0x80 or (c & 0xC0) == 0x80 else 2 if (c & 0xE0) == 0xC0 else \
                        3 if (c & 0xF0) == 0xE0 else 4
                    if length > size - pos:
                        length = size - pos
                    start[m], nbytes[m], prev[m] = pos, length, m - 1
                    pos += length
                    nxt[m] = m + 1 if pos < size else -1
                    m += 1
                for i in range(1, m):
                    nheap = self._push(heap, nheap, s, start, nbytes, i - 1, i)
                while nheap > 0:
                    top = heap[0]
                    nheap -= 1
                    if nheap > 0:
                        heap[0] = heap[nheap]
                        _sift_down(heap, nheap, 0)
                    if (nbytes[top.left] == 0 or nbytes[top.right] == 0
                            or nbytes[top.left] + nbytes[top.right] != top.size):
                        continue  # one side was merged since
                    nbytes[top.left] += nbytes[top.right]
                    nbytes[top.right] = 0
                    nxt[top.left] = nxt[top.right]
                    if nxt[top.right] >= 0:
                        prev[nxt[top.right]] = top.left
                    nheap = self._push(heap, nheap, s, start, nbytes, prev[top.left], top.left)
                    nheap = self._push(heap, nheap, s, start, nbytes, top.left, nxt[top.left])
                i = 0
                while i != -1:
                    tid = self._find(s + start[i], nbytes[i])
                    if tid >= 0:
                        out[nout] = <int32_t>tid
                        nout += 1
                    else:
                        for j in range(start[i], start[i] + nbytes[i]):
                            out[nout] = self.byte_ids[s[j]]
                            bad |= out[nout] < 0
                            nout += 1
                    i = nxt[i]
            if bad:
                raise ValueError("SpmEncoder: a byte has no token and the vocabulary no <unk>")
            return [out[j] for j in range(nout)]
        finally:
            free(start)
            free(nbytes)
            free(prev)
            free(nxt)
            free(heap)
            free(out)


cdef void _sift_down(_Bigram* heap, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    cdef _Bigram b = heap[k]
    cdef Py_ssize_t child
    while True:
        child = 2 * k + 1
        if child >= n:
            break
        if child + 1 < n and _before(&heap[child + 1], &heap[child]):
            child += 1
        if not _before(&heap[child], &b):
            break
        heap[k] = heap[child]
        k = child
    heap[k] = b
