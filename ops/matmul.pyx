# cython: language_level=3
"""Weight matrices in their GGUF encoding and their products with float32 activations.

`Weight(raw, qtype, rows, cols)` wraps the raw bytes of a rows x cols matrix
(a zero-copy view into the read-only model map; never written, never copied).
`Weight.matmul(x)` computes x @ W.T. For Q8_0/Q4_0/Q4_1 weights the default
(`act_q8=True`) quantizes each row of x to 8-bit blocks of 32 exactly as
llama.cpp does and sums integer block dot products (the fast path, and what
llama.cpp's logits are made of); `act_q8=False` dequantizes each weight block
to float and does a float dot product (exact up to float32 summation order).
F32/F16/BF16 weights always use float x. K-quant and IQ4_XS weights (cols a multiple of 256)
quantize x to llama.cpp's Q8_K (per 256 values: float scale, 16 sums) instead; Q5_1 uses Q8_1
(as Q4_1), Q5_0 and IQ4_NL Q8_0. kernel_table() says which kernel family runs each type here.

Block layouts are stated in blocks.h; BLOCK_LAYOUTS below is read from it.
"""
include "_common.pxi"

import os

from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from "qdot.h" nogil:
    ctypedef struct dair_act:
        int n
        int cols
        int nb
        int8_t* q
        float* d
        float* s
        int32_t* isum
    enum:
        DAIR_F32
        DAIR_F16
        DAIR_Q8_0
        DAIR_Q4_0
        DAIR_Q4_1
        DAIR_Q4_K
        DAIR_Q6_K
        DAIR_NTYPES
        DAIR_QK
        DAIR_QKK
        DAIR_FAM_SCALAR
        DAIR_FAM_AVX2
        DAIR_FAM_AVX512
    const int* dair_block_values
    const int* dair_block_bytes
    int dair_simd_enabled
    int dair_use_avx512
    const char* dair_simd_name()
    int dair_cpu_family()
    void dair_set_family(int fam)
    int dair_kernel_family(int qtype, int family)
    const char* dair_family_names[3]
    int dair_in_vdot_table(int qtype)
    int dair_uses_q8k(int qtype)
    int dair_is_quantized(int qtype)
    void dair_quantize_act_row(const float* x, int cols, int qtype, int8_t* q, float* d, float* s,
                               int32_t* isum)
    void dair_quantize_q8k_row(const float* x, int cols, int8_t* q, float* d, int32_t* bsums)
    void dair_quantize_q8k_wide(const float* x, int cols, int qtype, int8_t* q, float* d, int32_t* isum)
    int dair_q32_family(int qtype, int family, int n)
    int dair_r512_set(int qtype, int op, int use16)
    void* dair_alloc64(size_t n)
    void dair_prefetch_bytes(const void* p, size_t n)
    void dair_dequant_row(const uint8_t* src, int qtype, int cols, float* dst)
    void dair_mm_float(const uint8_t* w, size_t rb, int qtype, int cols, int r0, int r1, const float* x, int n,
                       float* out, size_t ldo, float* scratch)
    void dair_mm_q(const uint8_t* w, size_t rb, int qtype, int r0, int r1, const dair_act* a, float* out,
                   size_t ldo)
    void dair_mm_qk_wide(const uint8_t* w, size_t rb, int qtype, int r0, int r1, const dair_act* a, float* out,
                         size_t ldo)

# In the order of blocks.h's enum.
_QT_NAMES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K",
             "Q5_K", "IQ4_XS", "BF16")
assert len(_QT_NAMES) == DAIR_NTYPES
_QT_CODES = {name: i for i, name in enumerate(_QT_NAMES)}

#: qtype -> (values per block, bytes per block), from the C structs in blocks.h.
BLOCK_LAYOUTS = {name: (dair_block_values[i], dair_block_bytes[i]) for i, name in enumerate(_QT_NAMES)}

# Work per pool chunk, in weight-byte equivalents: ~1 us of kernel time, so that
# claiming a chunk (~0.1 us, a cache line moving between cores) stays small.
cdef double _CHUNK_BYTES = 32 * 1024.0


# Kernel families, best first: "avx512" (AVX-512 VNNI; for Q8_0/Q4_0/Q4_1 the 16-row kernels of
# rows16_avx512.h, or rows8_avx2.h's where its table says they are faster), "avx2" (AVX2 + FMA + F16C, no AVX-512 instruction) and "scalar" (plain C). One build
# holds all of them; cpu.h says at run time which this CPU can run.
# On ARM "neon" (ops/neon_quants.h) takes "avx2"'s slot: the names come from cpu.h.
_FAMILIES = tuple(dair_family_names[i].decode() for i in range(3))
_ALIASES = {"image": "avx512", "block": "avx2"}  # the families' former names
cdef int _best = dair_cpu_family()
# DAIR_KERNELS=avx2 (or scalar) caps the families, e.g. to run a whole test suite as an AVX2-only
# CPU would; a family this CPU cannot run is never selected.
_cap = _ALIASES.get(os.environ.get("DAIR_KERNELS", ""), os.environ.get("DAIR_KERNELS", ""))
if _cap in _FAMILIES:
    _best = min(_best, _FAMILIES.index(_cap))
dair_set_family(_best)
cdef bint _use_avx512 = _best == DAIR_FAM_AVX512

#: Quantized-kernel families this CPU can run with this build, best first.
KERNELS = tuple(_FAMILIES[f] for f in range(_best, -1, -1))
#: The same before a DAIR_KERNELS cap.
CPU_KERNELS = tuple(_FAMILIES[f] for f in range(dair_cpu_family(), -1, -1))


def simd_name() -> str:
    """Instruction set of the best quantized kernels on this CPU ("avx512vnni", "avx2" or "scalar")."""
    return dair_simd_name().decode()


def get_kernels() -> str:
    """The quantized-kernel family in use: "avx512", "avx2" or "scalar"."""
    return _FAMILIES[DAIR_FAM_AVX512 if dair_use_avx512 else DAIR_FAM_AVX2 if dair_simd_enabled else DAIR_FAM_SCALAR]


def set_kernels(str name) -> str:
    """Select a kernel family from KERNELS (tests and benchmarks compare them); returns the previous one.

    Not thread-safe: only for tests and benchmarks."""
    global _use_avx512
    name = _ALIASES.get(name, name)
    if name not in KERNELS:
        raise ValueError(f"kernels {name!r} not available on this CPU (have {', '.join(KERNELS)})")
    old = get_kernels()
    dair_set_family(_FAMILIES.index(name))
    _use_avx512 = name == "avx512"
    return old


def set_worker_prefetch(Py_ssize_t nbytes) -> int:
    """How much of each next matrix an idle pool worker reads ahead into the caches (0: none);
    returns the previous value. For benchmarks that measure it."""
    global _WORKER_PREFETCH
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    old = _WORKER_PREFETCH
    _WORKER_PREFETCH = <size_t>nbytes
    return old


def set_simd(bint enabled) -> bool:
    """Best kernels (True) or the portable scalar fallback (False); returns whether SIMD was on."""
    old = get_kernels() != "scalar"
    set_kernels(KERNELS[0] if enabled else "scalar")
    return old


def kernel_table(family=None) -> dict:
    """For every weight type, the kernel family that runs its products when `family` (default: the
    best on this CPU) is selected: "avx512", "avx2" or "scalar" for 8-bit activation products, or
    "float" for types multiplied in float32 (F32, F16, BF16)."""
    name = _ALIASES.get(family, family) if family else KERNELS[0]
    if name not in KERNELS:
        raise ValueError(f"kernels {family!r} not available on this CPU (have {', '.join(KERNELS)})")
    fam = _FAMILIES.index(name)
    table = {}
    for qt, name in enumerate(_QT_NAMES):
        if not dair_is_quantized(qt):
            table[name] = "float"
        elif dair_in_vdot_table(qt):
            table[name] = _FAMILIES[dair_kernel_family(qt, fam)]
        else:  # qdot.h / kquants.h / rows16_avx512.h cover every family for their types
            table[name] = _FAMILIES[fam]
    return table


def kernel_ops(family=None) -> dict:
    """For every weight type, the kernel family whose code runs its decode (up to 3 activation rows:
    weights stream) and its prefill (4 or more) products when `family` (default: the best on this CPU) is selected, as
    {type: {"decode": ..., "prefill": ...}}. It differs from kernel_table's family where the
    avx512 family runs an AVX2 kernel for one operation because that is faster here (the table in
    ops/rows16_avx512.h says which and why); the results are the same bits either way."""
    table = kernel_table(family)
    ops = {}
    for qt, name in enumerate(_QT_NAMES):
        fam = table[name]
        if fam in _FAMILIES and DAIR_Q8_0 <= qt <= DAIR_Q4_1:
            f = _FAMILIES.index(fam)
            ops[name] = {"decode": _FAMILIES[dair_q32_family(qt, f, 1)], "prefill": _FAMILIES[dair_q32_family(qt, f, 4)]}
        else:
            ops[name] = {"decode": fam, "prefill": fam}
    return ops


def _set_avx512_op(str qtype, str op, bint use_16_rows) -> bool:
    """Make the avx512 family run the AVX-512 16-row kernel (True) or the AVX2 8-row one (False) for
    Q8_0/Q4_0/Q4_1 `op` ("decode": up to 3 activation rows, or "prefill"); returns the previous choice. For tests (each
    kernel is checked whatever the table picks) and benchmarks; not thread-safe."""
    if qtype not in ("Q8_0", "Q4_0", "Q4_1") or op not in ("decode", "prefill"):
        raise ValueError(f"no avx512 kernel choice for {qtype} {op}")
    return dair_r512_set(_QT_CODES[qtype], 0 if op == "decode" else 1, use_16_rows) != 0


cdef Py_ssize_t _activation_rows(object x, Py_ssize_t cols) except -1:
    """Rows of x, checked as a product's input: float32 [n >= 1, cols], C-contiguous."""
    _check(x, "x", cnp.NPY_FLOAT32, 2, False)
    cdef Py_ssize_t n = _dim(x, 0)
    if _dim(x, 1) != cols:
        raise ValueError(f"x: expected shape (n, {cols}), got {x.shape}")
    if n < 1:
        raise ValueError("x: needs at least one row")
    return n


ctypedef struct _Job:
    const uint8_t* w
    size_t rb
    int qt
    int cols
    int rows
    int n
    int per             # rows (or activation rows, for _prep_chunk) per chunk
    bint kw             # K-quants with the AVX-512 kernels (their own activation layout)
    dair_act* act
    const float* x
    const int32_t* ids
    float* out
    float* scratch


cdef int _rows_per_chunk(int rows, int nchunks) noexcept nogil:
    """A multiple of 16: the 4-row tiles are never split and chunks write whole cache lines of out."""
    cdef int per = (rows + nchunks - 1) // nchunks
    return ((per + 15) // 16) * 16


cdef void _mm_q_chunk(void* p, int c) noexcept nogil:
    cdef _Job* j = <_Job*>p
    cdef int r0 = c * j.per
    cdef int r1 = r0 + j.per
    if r1 > j.rows:
        r1 = j.rows
    if r0 >= r1:
        return
    if j.kw:
        dair_mm_qk_wide(j.w, j.rb, j.qt, r0, r1, j.act, j.out, j.rows)
    else:
        dair_mm_q(j.w, j.rb, j.qt, r0, r1, j.act, j.out, j.rows)


cdef void _mm_f_chunk(void* p, int c) noexcept nogil:
    cdef _Job* j = <_Job*>p
    cdef int r0 = c * j.per
    cdef int r1 = r0 + j.per
    if r1 > j.rows:
        r1 = j.rows
    if r0 < r1:
        dair_mm_float(j.w, j.rb, j.qt, j.cols, r0, r1, j.x, j.n, j.out, j.rows, j.scratch + <size_t>c * j.cols)


cdef void _prep_chunk(void* p, int c) noexcept nogil:
    """Quantize activation rows [c * per, (c + 1) * per)."""
    cdef _Job* j = <_Job*>p
    cdef int i
    cdef size_t qo, bo
    cdef dair_act* a = j.act
    for i in range(c * j.per, min((c + 1) * j.per, j.n)):
        qo = <size_t>i * j.cols
        bo = <size_t>i * a.nb
        if dair_uses_q8k(j.qt):
            if j.kw:
                dair_quantize_q8k_wide(j.x + qo, j.cols, j.qt, a.q + qo, a.d + bo, a.isum + bo * 16)
            else:
                dair_quantize_q8k_row(j.x + qo, j.cols, a.q + qo, a.d + bo, a.isum + bo * 16)
            continue
        dair_quantize_act_row(j.x + qo, j.cols, j.qt, a.q + qo, a.d + bo, a.s + bo, a.isum + bo)


cdef void _rows_chunk(void* p, int c) noexcept nogil:
    """get_rows: dequantize output rows [c * per, (c + 1) * per)."""
    cdef _Job* j = <_Job*>p
    cdef int i
    for i in range(c * j.per, min((c + 1) * j.per, j.n)):
        dair_dequant_row(j.w + <size_t>j.ids[i] * j.rb, j.qt, j.cols, j.out + <size_t>i * j.cols)


# The Weight whose matmul ran last (a borrowed pointer, cleared by its __dealloc__).
# A forward pass calls its matrices in the same order every token, so each Weight
# learns which one follows it and, when its product is done, prefetches the head of
# that next matrix: the memory system then streams it while Python runs between
# the two calls instead of idling (~15% of a decode step's weight time in a
# 30-layer sweep with 3 us gaps).
cdef void* _last_weight = NULL
cdef size_t _NEXT_PREFETCH = 4096
# ... and, with two or more threads, asks the idle worker to read the next matrices whole (up to
# this much of each) while the caller runs attention, norms and Python (ops/pool.h).
cdef size_t _WORKER_PREFETCH = 1 << 20


cdef class Weight:
    """A rows x cols weight matrix in one of the types of _QT_NAMES (layouts: blocks.h)."""

    cdef readonly object raw
    cdef readonly int rows
    cdef readonly int cols
    cdef readonly str qtype
    cdef int qt
    cdef size_t row_bytes
    cdef const uint8_t* ptr
    cdef const uint8_t* next_ptr  # start of the matrix used after this one last time
    cdef size_t next_len
    cdef const void* nx_p[4]  # the matrices used after this one last time (a group: all of them)
    cdef size_t nx_len[4]
    cdef int nx_n

    def __cinit__(self, raw, str qtype, int rows, int cols):
        if qtype not in _QT_CODES:
            raise ValueError(f"Weight: unsupported qtype {qtype!r} (expected one of {', '.join(_QT_NAMES)})")
        if rows < 1 or cols < 1:
            raise ValueError(f"Weight: rows and cols must be >= 1, got {rows} x {cols}")
        if not cnp.PyArray_Check(raw) or cnp.PyArray_TYPE(<cnp.ndarray>raw) != cnp.NPY_UINT8:
            raise ValueError(f"Weight: raw must be a uint8 numpy array, got {_dtname(raw)}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>raw):
            raise ValueError("Weight: raw must be C-contiguous")
        cdef int qt = _QT_CODES[qtype]
        cdef int bv = dair_block_values[qt]
        if cols % bv:
            raise ValueError(f"Weight: {qtype} needs cols divisible by {bv}, got {cols}")
        cdef size_t rb = <size_t>(cols // bv) * dair_block_bytes[qt]
        cdef size_t want = rb * <size_t>rows
        if <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>raw) != want:
            raise ValueError(f"Weight: {qtype} {rows} x {cols} needs {want} bytes, raw has "
                             f"{cnp.PyArray_NBYTES(<cnp.ndarray>raw)}")
        self.raw = raw
        self.qtype = qtype
        self.qt = qt
        self.rows = rows
        self.cols = cols
        self.row_bytes = rb
        self.ptr = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>raw)

    def __dealloc__(self):
        global _last_weight
        if _last_weight == <void*>self:
            _last_weight = NULL

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.rows

    def __repr__(self) -> str:
        return f"Weight({self.qtype}, {self.rows} x {self.cols})"

    def matmul(self, x, out=None, bint act_q8=True):
        """out[n, rows] = x[n, cols] @ W.T (float32). act_q8 selects llama.cpp's 8-bit activation path
        for quantized weights; it is ignored for F32/F16."""
        cdef Py_ssize_t n = _activation_rows(x, self.cols)
        cdef cnp.npy_intp dims[2]
        if out is None:
            dims[0] = n
            dims[1] = self.rows
            out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        else:
            _check(out, "out", cnp.NPY_FLOAT32, 2, True)
            if _dim(out, 0) != n or _dim(out, 1) != self.rows:
                raise ValueError(f"out: expected shape ({n}, {self.rows}), got {out.shape}")
            _no_overlap(out, x, "out", "x")
        cdef const float* xp = <const float*>_data(x)
        cdef float* op = <float*>_data(out)
        cdef int rc
        global _last_weight
        cdef Weight prev
        if _last_weight != NULL and _last_weight != <void*>self:
            prev = <Weight>_last_weight
            prev.next_ptr = self.ptr
            prev.next_len = min(self.row_bytes * self.rows, _NEXT_PREFETCH)
            prev.nx_p[0] = self.ptr
            prev.nx_len[0] = min(self.row_bytes * self.rows, _WORKER_PREFETCH)
            prev.nx_n = 1
        _last_weight = <void*>self
        with nogil:
            if act_q8 and dair_is_quantized(self.qt):
                rc = self._mm_q8(xp, <int>n, op)
            else:
                rc = self._mm_float(xp, <int>n, op)
            if self.next_ptr != NULL:
                dair_prefetch_bytes(self.next_ptr, self.next_len)
                dair_pool_prefetch(self.nx_p, self.nx_len, self.nx_n)
        if rc:
            raise MemoryError("matmul: out of memory for scratch buffers")
        return out

    cdef void _job(self, _Job* j, const float* x, int n, float* out) noexcept nogil:
        j.w = self.ptr
        j.rb = self.row_bytes
        j.qt = self.qt
        j.cols = self.cols
        j.rows = self.rows
        j.n = n
        j.x = x
        j.out = out
        j.kw = False

    cdef int _mm_float(self, const float* x, int n, float* out) noexcept nogil:
        cdef _Job j
        self._job(&j, x, n, out)
        cdef double work = <double>self.rows * (self.row_bytes + <double>n * self.cols * 4.0)
        cdef int nch = _chunks(work, _CHUNK_BYTES, (self.rows + 15) // 16)
        j.per = _rows_per_chunk(self.rows, nch)
        # One dequantized row per chunk, allocated up front so no chunk can fail alone.
        j.scratch = <float*>malloc(<size_t>self.cols * nch * sizeof(float))
        if j.scratch == NULL:
            return 1
        dair_parallel_for(nch, _mm_f_chunk, &j)
        free(j.scratch)
        return 0

    cdef int _mm_q8(self, const float* x, int n, float* out) noexcept nogil:
        cdef _Job j
        cdef dair_act act
        cdef char* buf = self._q8_prep(&j, &act, x, n, out)
        if buf == NULL:
            return 1
        cdef double work = <double>self.rows * (self.row_bytes + <double>n * self.cols * 0.5)
        cdef int nch = _chunks(work, _CHUNK_BYTES, (self.rows + 15) // 16)
        j.per = _rows_per_chunk(self.rows, nch)
        dair_parallel_for(nch, _mm_q_chunk, &j)
        free(buf)
        return 0

    cdef char* _q8_prep(self, _Job* jp, dair_act* ap, const float* x, int n, float* out) noexcept nogil:
        """Set up *jp for this matrix and quantize x into *ap; returns the buffer
        that holds them (free it after the product), NULL when out of memory."""
        cdef _Job* j = jp
        cdef dair_act* act = ap
        self._job(j, x, n, out)
        cdef bint kq = dair_uses_q8k(self.qt)
        cdef int nb = self.cols // (DAIR_QKK if kq else DAIR_QK)
        # per block: d, s, and isum (K-quants: 16 sums, s unused)
        cdef size_t per_block = 4 * (2 + (16 if kq else 1))
        j.kw = (self.qt == DAIR_Q4_K or self.qt == DAIR_Q6_K) and _use_avx512
        act.n = n
        act.cols = self.cols
        act.nb = nb
        j.act = act
        cdef size_t qbytes = ((<size_t>n * self.cols + 63) // 64) * 64
        cdef char* buf = <char*>dair_alloc64(qbytes + <size_t>n * nb * per_block)
        if buf == NULL:
            return NULL
        act.q = <int8_t*>buf
        act.d = <float*>(buf + qbytes)
        act.s = act.d + <size_t>n * nb
        act.isum = <int32_t*>(act.s + <size_t>n * nb)
        # Activation rows: ~16 bytes of work per value (quantize).
        cdef int nch = _chunks(<double>n * self.cols * 16.0, _CHUNK_BYTES, n)
        j.per = (n + nch - 1) // nch
        dair_parallel_for(nch, _prep_chunk, j)
        return buf

    def get_rows(self, ids, out=None):
        """out[i] = dequantized row ids[i] (embedding lookup); ids int32[n]."""
        _check(ids, "ids", cnp.NPY_INT32, 1, False)
        cdef Py_ssize_t n = _dim(ids, 0)
        cdef cnp.npy_intp dims[2]
        if out is None:
            dims[0] = n
            dims[1] = self.cols
            out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        else:
            _check(out, "out", cnp.NPY_FLOAT32, 2, True)
            if _dim(out, 0) != n or _dim(out, 1) != self.cols:
                raise ValueError(f"out: expected shape ({n}, {self.cols}), got {out.shape}")
        cdef const int32_t* ip = <const int32_t*>_data(ids)
        cdef float* op = <float*>_data(out)
        cdef Py_ssize_t i, bad = -1
        with nogil:
            for i in range(n):
                if ip[i] < 0 or ip[i] >= self.rows:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"get_rows: id {ip[bad]} (at index {bad}) out of range [0, {self.rows})")
        cdef _Job j
        self._job(&j, NULL, <int>n, op)
        j.ids = ip
        cdef int nch = _chunks(<double>n * self.row_bytes * 4.0, _CHUNK_BYTES, <int>n)
        j.per = <int>((n + nch - 1) // nch)
        with nogil:
            dair_parallel_for(nch, _rows_chunk, &j)
        return out


# A layer's q, k and v products (and gate and up) read the same activations, and each is small:
# on two threads a decode step's k or v product (69 KB of Q4_1) takes ~3 us, about what handing
# half of it to the other core costs. matmul_many runs such a group as one job.
cdef enum:
    _MANY_MAX = 4

ctypedef struct _Many:
    int count
    _Job jobs[_MANY_MAX]
    int first[_MANY_MAX + 1]  # chunk index where each matrix's chunks start; first[count] = all


cdef void _mm_many_chunk(void* p, int c) noexcept nogil:
    cdef _Many* m = <_Many*>p
    cdef int k = 0
    while c >= m.first[k + 1]:
        k += 1
    _mm_q_chunk(&m.jobs[k], c - m.first[k])


def matmul_many(weights, x, bint act_q8=True) -> list:
    """[w.matmul(x, act_q8=act_q8) for w in weights], the same results, as one parallel job when
    the (at most 4) weights share a quantized type and width: x is quantized once and the rows of
    all of them are split between the threads together. Other groups run one matrix at a time."""
    cdef list ws = list(weights)
    cdef Weight w0, w
    cdef int k, count = len(ws)
    if count == 0:
        return []
    w0 = ws[0]
    cdef bint fuse = act_q8 and 1 < count <= _MANY_MAX and dair_is_quantized(w0.qt)
    for w in ws:
        fuse = fuse and w.qt == w0.qt and w.cols == w0.cols
    if not fuse:
        return [w.matmul(x, act_q8=act_q8) for w in ws]
    cdef Py_ssize_t n = _activation_rows(x, w0.cols)
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    outs = []
    cdef _Many m
    cdef dair_act act
    m.count = count
    for k in range(count):
        w = ws[k]
        dims[1] = w.rows
        outs.append(cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0))
        m.jobs[k].w = w.ptr
        m.jobs[k].rows = w.rows
        m.jobs[k].out = <float*>_data(outs[k])
    global _last_weight
    cdef Weight prev
    if _last_weight != NULL and _last_weight != <void*>w0:
        prev = <Weight>_last_weight
        prev.next_ptr = w0.ptr
        prev.next_len = min(w0.row_bytes * w0.rows, _NEXT_PREFETCH)
        prev.nx_n = min(count, 4)
        for k in range(prev.nx_n):
            w = ws[k]
            prev.nx_p[k] = w.ptr
            prev.nx_len[k] = min(w.row_bytes * w.rows, _WORKER_PREFETCH)
    w = ws[count - 1]
    _last_weight = <void*>w
    cdef const float* xp = <const float*>_data(x)
    cdef char* buf
    cdef _Job j0
    cdef double work
    cdef int nch
    with nogil:
        buf = w0._q8_prep(&j0, &act, xp, <int>n, m.jobs[0].out)
        if buf != NULL:
            m.first[0] = 0
            for k in range(count):
                # the shared activations and settings of j0, this matrix's rows and output
                j0.w, j0.rows, j0.out = m.jobs[k].w, m.jobs[k].rows, m.jobs[k].out
                work = <double>j0.rows * (j0.rb + <double>n * j0.cols * 0.5)
                nch = _chunks(work, _CHUNK_BYTES, (j0.rows + 15) // 16)
                j0.per = _rows_per_chunk(j0.rows, nch)
                m.jobs[k] = j0
                m.first[k + 1] = m.first[k] + nch
            dair_parallel_for(m.first[count], _mm_many_chunk, &m)
            free(buf)
            if w.next_ptr != NULL:
                dair_prefetch_bytes(w.next_ptr, w.next_len)
                dair_pool_prefetch(w.nx_p, w.nx_len, w.nx_n)
    if buf == NULL:
        raise MemoryError("matmul_many: out of memory for scratch buffers")
    return outs
