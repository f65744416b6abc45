"""dair's compute kernels: Cython, GIL released, parallel over output rows.

- ``dair.ops.matmul``: ``Weight(raw, qtype, rows, cols)`` for F32/F16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K GGUF bytes;
  ``Weight.matmul(x, out=None, act_q8=True)``, ``Weight.get_rows(ids, out=None)``; ``BLOCK_LAYOUTS``.
- ``dair.ops.norm.rmsnorm``, ``dair.ops.rope.rope_inplace``, ``dair.ops.attention.attention``,
  ``dair.ops.activation.silu_mul`` / ``add_inplace``, ``dair.ops.wire`` (Q8_0 blocks on the wire).
- ``dair.ops.threads``: ``set_num_threads`` / ``get_num_threads`` / ``pool_stats`` for the worker pool
  every kernel shares (ops/pool.h).

Block layouts: ops/blocks.h. Kernels: ops/qdot.h (per-block AVX2 and scalar), ops/qimg.h
(AVX-512 VNNI), ops/attn.h, ops/vmath.h.
"""
