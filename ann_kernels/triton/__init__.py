"""Triton kernels (the GPU path) and their launchers. Importing this package needs triton.

One file per op, named like the op (``multi_exit_ce.py`` <-> ``ann_kernels/ops/multi_exit_ce.py``).
The modules are imported lazily by the op registrations, so that ``TRITON_INTERPRET=1``
(CPU testing) can be set before any ``@triton.jit`` function is created.
"""
