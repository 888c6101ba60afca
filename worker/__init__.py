"""Stream Parquet text through exported BERT models with onnxruntime.

The worker never imports torch or transformers; it reads model directories
written by ``exporter`` (an ONNX file, ``tokenizer.json`` and a manifest).
"""

__version__ = "0.1.0"
