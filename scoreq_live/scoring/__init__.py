"""The ONNX side: model contract and catalogue, sessions, batching, references."""
