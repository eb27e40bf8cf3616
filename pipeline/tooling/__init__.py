"""Tooling: what builds, checks and drives models, never imported by the runtime.

The fusion model family and its training, the sample data generator, the
demo, ``mmpipe verify``, the command line and the PyTorch reference engine
live here.  The three paths (batch, stream, online) import only the runtime
around this package (records, decoders, preprocessing, the columnar batch,
engines, the Predictor, postprocessing, metrics, config, package loading);
``tests/unit/test_layout.py`` holds that rule.
"""
