"""rkld: a thin pipeline for RKLD unlearning (finetune -> strengthen -> teacher cache -> unlearn)
built on the fused losses of ``rkld_kernels``.

Modules: ``rkld.data`` (benchmarks and tokenisation), ``rkld.synthetic`` (the built-in
fictitious-authors benchmark), ``rkld.models`` (loading and tiny models), ``rkld.train``
(finetune / strengthen / unlearn), ``rkld.teacher_cache``, ``rkld.cli`` (the ``rkld`` command).
"""
__version__ = "0.1.0"
