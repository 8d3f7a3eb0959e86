"""rkld: a thin pipeline for RKLD unlearning (finetune -> strengthen -> teacher cache -> unlearn)
built on the fused losses of ``rkld_kernels``.

Modules: ``rkld.data`` (benchmarks and tokenisation), ``rkld.synthetic`` (the built-in
fictitious-authors benchmark), ``rkld.models`` (loading and tiny models), ``rkld.train``
(finetune / strengthen / unlearn), ``rkld.teacher_cache``, ``rkld.teacher_boost`` (the paper's
raw-logit boost and the log-probability extension), ``rkld.inspect_teacher`` (what a teacher
pushes down), ``rkld.cli`` (the ``rkld`` command).
"""
__version__ = "0.1.0"

import os as _os

if "DS_ACCELERATOR" not in _os.environ:
    import torch as _torch
    if not _torch.cuda.is_available():
        # DeepSpeed (if installed) is imported by accelerate and transformers as a side effect;
        # without CUDA it picks its CPU accelerator anyway but first prints a warning to standard
        # output, where the rkld command writes its JSON report. Naming the choice it would make
        # keeps that output clean; a DS_ACCELERATOR set by the user is left alone.
        _os.environ["DS_ACCELERATOR"] = "cpu"
