"""Serving and operations artefacts built around mmpipe model packages.

A package so that ``deploy.serve.app:build_app`` is an import path Ray Serve
(and KubeRay) can resolve.  ``deploy/triton`` holds Triton python-backend
model sources that are copied into model repositories, not imported here.
"""
