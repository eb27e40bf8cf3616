"""Triton serving: ``deploy.triton.server`` starts and stops a ``tritonserver``
(used by ``mmpipe serve --backend triton`` and the integration tests).  The
``preprocess/`` and ``onnxruntime_cpu/`` directories hold python-backend model
sources that ``mmpipe triton-repo`` copies into model repositories; they are
not imported here."""
