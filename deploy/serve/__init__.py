"""The Ray Serve application: the Predictor behind the Open Inference
Protocol (KServe v2) and a friendly JSON/multipart API.

``deploy.serve.app:build_app`` is the import path a Serve config names;
``mmpipe serve --config serve.yaml`` runs such a config locally.  Modules
that import Ray are imported only where used, so ``mmpipe --help`` stays
quick and Ray stays optional for the other paths.
"""
