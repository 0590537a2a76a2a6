"""Reading, checking, running and writing model files: the protobuf scan, the safety checks,
lazy and deferred weights, the streaming writer, atomic staging, LensModel and the
onnxruntime runner.

The lowest layer: it imports only the leaf modules and `graph.match`.
"""
