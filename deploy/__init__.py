"""Serving and operations artefacts built around mmpipe model packages.

A package so that ``deploy.serve.app:build_app`` is an import path Ray Serve
(and KubeRay) can resolve.  ``deploy.triton.server`` starts a tritonserver
(``mmpipe serve --backend triton``); ``deploy/triton/preprocess`` and
``deploy/triton/onnxruntime_cpu`` hold python-backend model sources that are
copied into model repositories, not imported here.
"""
