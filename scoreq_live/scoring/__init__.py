"""The ONNX side: model contract and catalogue, sessions, batching, references,
the model store and its downloader, stored references, int8/fp16 variants."""
