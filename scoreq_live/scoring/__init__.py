"""The ONNX side: model contract and catalogue, sessions, batching, references,
the model store and its downloader, stored references, int8/fp16 variants,
and a scorer loaded from options (:mod:`scoreq_live.scoring.load`)."""
