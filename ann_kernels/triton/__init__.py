"""Triton kernels (the GPU path) and their launchers. Importing this package needs triton.

One file per op, named like the op (``multi_exit_ce.py`` <-> ``ann_kernels/ops/multi_exit_ce.py``);
an op whose kernels and launchers together pass ~600 lines keeps its ``@triton.jit`` kernels
in ``<op>_kernels.py`` (``multi_exit_ce_kernels.py``).
The modules are imported lazily by the op registrations, so that ``TRITON_INTERPRET=1``
(CPU testing) can be set before any ``@triton.jit`` function is created.
"""
