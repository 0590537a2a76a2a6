"""Finding the transformer in an ONNX graph: norms, the linear maps that read them, the residual
stream and its writers, the unembedding, attention's V->O path, and where hook points sit.

A lower layer: it imports only `store/` and the leaf modules (`errors`, `progress`, `_version`).
`match` imports nothing of lensgraph, so `store/` may use it too.
"""
