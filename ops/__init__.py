"""dair's compute kernels: Cython, GIL released, parallel over output rows.

- ``dair.ops.matmul``: ``Weight(raw, qtype, rows, cols)`` for F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/
  IQ4_NL/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS GGUF bytes; ``Weight.matmul(x, out=None, act_q8=True)``,
  ``Weight.get_rows(ids, out=None)``; ``BLOCK_LAYOUTS``; kernel families ``KERNELS`` ("avx512",
  "avx2", "scalar": those this CPU runs), ``set_kernels`` / ``get_kernels``, and
  ``kernel_table()``, the dispatch table (which family serves each type here), and ``kernel_ops()``,
  the family whose code runs each type's decode and prefill (ops/rows16_avx512.h's table).
- ``dair.ops.norm.rmsnorm``, ``dair.ops.rope.rope_inplace``, ``dair.ops.attention.attention``,
  ``dair.ops.activation.silu_mul`` / ``add_inplace``, ``dair.ops.wire`` (Q8_0 blocks on the wire).
- ``dair.ops.threads``: ``set_num_threads`` / ``get_num_threads`` / ``pool_stats`` for the worker pool
  every kernel shares (ops/pool.h); ``dair.ops.membw.read_bandwidth``, the memory read rate the
  pool's threads reach (the ceiling under a decode step, printed by `dair bench`).

Laid out like ggml-quants, each header compiling on its own: ops/blocks.h states every block
layout once; ops/cpu.h the families and their run-time (cpuid) choice; ops/act.h the 8-bit
activations. Per (type, operation) one function: ops/quants_ref.h (plain C), quants_avx2.h,
quants_avx512.h for Q5_0/Q5_1/IQ4_NL/Q2_K/Q3_K/Q5_K/IQ4_XS with the table in quants.h;
ops/qdot.h (Q8_0/Q4_0/Q4_1, plain C and AVX2, with rows8_avx2.h), ops/rows16_avx512.h (their
AVX-512 kernels, and the table of which runs each operation), ops/kquants.h (Q4_K/Q6_K);
ops/attn.h, ops/vmath.h.
"""
