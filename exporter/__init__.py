"""Export Hugging Face BERT checkpoints to validated ONNX model directories.

Importing this package is cheap: torch and transformers are imported inside the
functions that need them, so the worker can read manifests without them.
"""
