"""Small ONNX models with SCOREQ's signature, built with the onnx helper API.

They are for fast engine and contract tests only: never instead of the real
bundled model where a score must mean something.  The graph frames the input
like wav2vec 2.0's first layer (a strided convolution over 320-sample hops),
mean-pools over time and maps the pooled feature to a MOS (or ``n_scores``
scores in 1-5, kind ``scores``) or an L2-normalised embedding, so padding and batching behave as in the real models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, kind: str = "mos", dim: int = 16, fixed: int | None = None, seed: int = 0,
          input_name: str = "audio_input", output_name: str = "mos_output", rank3: bool = False,
          n_scores: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((dim, 1, 320)) / np.sqrt(320)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv_w"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [
        helper.make_node("Unsqueeze", [input_name, "one"], ["x3"]),
        helper.make_node("Conv", ["x3", "conv_w"], ["feat"], strides=[320]),
        helper.make_node("Abs", ["feat"], ["afeat"]),
        helper.make_node("ReduceMean", ["afeat"], ["pooled"], axes=[2], keepdims=0),
    ]
    if kind in ("mos", "scores"):
        out_dim = 1 if kind == "mos" else n_scores
        head = (rng.standard_normal((dim, out_dim)) * 4).astype(np.float32)
        inits += [numpy_helper.from_array(head, "head"),
                  numpy_helper.from_array(np.array([4.0], np.float32), "four"),
                  numpy_helper.from_array(np.array([1.0], np.float32), "onef")]
        nodes += [helper.make_node("MatMul", ["pooled", "head"], ["logit"]),
                  helper.make_node("Sigmoid", ["logit"], ["sig"]),
                  helper.make_node("Mul", ["sig", "four"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "onef"], [output_name])]
    else:
        nodes += [helper.make_node("LpNormalization", ["pooled"], [output_name], axis=1, p=2)]
        out_dim = dim
    in_shape = ["batch", fixed or "samples"] + ([1] if rank3 else [])
    if rank3:
        nodes.insert(0, helper.make_node("Squeeze", ["audio3", "sq"], [input_name]))
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "sq"))
        graph_in = helper.make_tensor_value_info("audio3", TensorProto.FLOAT, in_shape)
    else:
        graph_in = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)
    graph = helper.make_graph(
        nodes, "tiny_scoreq", [graph_in],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
