# cython: language_level=3
"""Thread count for every OpenMP kernel in dair.ops."""
cimport openmp


def set_num_threads(int n) -> None:
    """Use n threads in every kernel (n <= 0: one per core)."""
    if n <= 0:
        n = openmp.omp_get_num_procs()
    openmp.omp_set_num_threads(n)


def get_num_threads() -> int:
    return openmp.omp_get_max_threads()
