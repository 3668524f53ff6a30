"""rnnserve: a stateful gRPC inference server for recurrent models (ONNX Runtime, held state, batching)."""

__version__ = "0.1.0"
