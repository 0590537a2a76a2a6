"""lensgraph: TransformerLens-style weight processing on exported ONNX graphs."""

__version__ = "0.1.0"
