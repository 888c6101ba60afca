"""The model-directory contract between ``exporter/`` and ``worker/``.

What an export writes and what a run reads: the manifest and the file names of a
model directory (``manifest``), how rows are padded into model inputs (``padding``),
and how onnxruntime sessions are built and whether CUDA really runs (``session``).
The exporter validates through exactly these, so a change here changes what
validation tests and what the worker runs together. Standard library, numpy and
(imported where used) onnxruntime only: never torch or transformers, and of
``worker`` only its atomic writes (``tests/test_layers.py`` checks it).
"""
