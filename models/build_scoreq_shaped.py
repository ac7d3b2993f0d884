"""Build SCOREQ-shaped ONNX models: SCOREQ's architecture, cost and contract, random weights.

SCOREQ (Ragano, Skoglund, Hines, NeurIPS 2024) is a wav2vec 2.0 BASE encoder
with mean pooling over time.  Its published ONNX files take ``audio_input``
float32 ``[batch, samples]`` at 16 kHz (samples a multiple of 320) and give
``mos_output``: ``[batch, 1]`` (no-reference MOS) or ``[batch, 768]`` (the
L2-normalised embedding of the non-matching-reference model).

This script builds the same network in plain ``torch.nn`` with random weights
and exports it the way SCOREQ's files are exported (legacy TorchScript
exporter, opset 14, dynamic batch and sample axes, SCOREQ's tensor names), so
tests and benchmarks see SCOREQ's graph, operator mix, cost and contract
without the real weights.  Its scores mean nothing.

Why torch rather than a graph written with the onnx helper API: SCOREQ's
files are torch exports, and the exporter's decomposition (LayerNorm and GELU
into primitive ops at opset 14, the attention reshapes) decides which fusions
onnxruntime finds and which nodes a quantiser touches.  A hand-written graph
would have SCOREQ's shape but not necessarily its operator mix, its cost or
its behaviour under int8/fp16, which is what the benchmarks and the variant
tests measure.  Building takes about 20 s on two cores.

* feature encoder: 7 convolutions, 512 channels, kernels (10,3,3,3,3,2,2),
  strides (5,2,2,2,2,2,2), no bias, group norm (one group per channel) after
  the first, GELU after each: one frame per 320 samples;
* feature projection: LayerNorm(512) + Linear(512, 768);
* convolutional positional embedding: Conv1d(768, 768, kernel 128, groups 16,
  padding 64), the last frame dropped so the length is kept, GELU, added to
  the input, then LayerNorm;
* 12 post-LN transformer layers: d=768, 12 heads, feed-forward 3072, GELU;
* mean over time, then ``Linear(768, 1)`` (nr) or L2 normalisation (ref).

Torch is needed here only, never at run time.  From the repository root::

    .venv-export/bin/python models/build_scoreq_shaped.py --out DIR [--mode nr|ref|both]

writes ``DIR/scoreq_shaped_nr.onnx`` and/or ``DIR/scoreq_shaped_ref.onnx``
(about 380 MB each) after checking that onnxruntime runs them at several
lengths and batch sizes and agrees with PyTorch.  The tests build them on
demand through ``tests/scoreq_shaped.py``, which caches them keyed by this
file's hash.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# As SCOREQ's own onnx-scripts/export_to_onnx.py: opset 14 (LayerNorm is decomposed into
# primitive ops, which onnxruntime fuses back), axes "batch_size" and "samples".
OPSET = 14
INPUT_NAME = "audio_input"
OUTPUT_NAME = "mos_output"
SEED = 20241210  # fixed: the same script always builds the same weights
CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
D_MODEL, HEADS, FFN, LAYERS = 768, 12, 3072, 12
POS_KERNEL, POS_GROUPS = 128, 16


class FeatureEncoder(nn.Module):
    """wav2vec 2.0's convolutional feature encoder ("default" mode: group norm in the first layer)."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        in_ch = 1
        for i, (ch, k, s) in enumerate(CONV_LAYERS):
            block = [nn.Conv1d(in_ch, ch, k, stride=s, bias=False)]
            if i == 0:
                block.append(nn.GroupNorm(ch, ch, affine=True))
            block.append(nn.GELU())
            layers.append(nn.Sequential(*block))
            in_ch = ch
        self.layers = nn.Sequential(*layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, C, T]
        return self.layers(audio.unsqueeze(1))


class PositionalConv(nn.Module):
    """Convolutional relative positional embedding; even kernel, so one frame is dropped ("SamePad")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D_MODEL, D_MODEL, POS_KERNEL, padding=POS_KERNEL // 2, groups=POS_GROUPS)
        std = (4.0 / (POS_KERNEL * D_MODEL)) ** 0.5  # wav2vec 2.0's initialisation
        nn.init.normal_(self.conv.weight, mean=0.0, std=std)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        y = self.conv(x.transpose(1, 2))[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_MODEL, D_MODEL)
        self.k_proj = nn.Linear(D_MODEL, D_MODEL)
        self.v_proj = nn.Linear(D_MODEL, D_MODEL)
        self.out_proj = nn.Linear(D_MODEL, D_MODEL)
        self.head_dim = D_MODEL // HEADS
        self.scaling = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, Dh]
            return t.unflatten(-1, (HEADS, self.head_dim)).transpose(1, 2)

        q = heads(self.q_proj(x) * self.scaling)
        k = heads(self.k_proj(x))
        v = heads(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        y = (att @ v).transpose(1, 2).flatten(2)
        return self.out_proj(y)


class TransformerLayer(nn.Module):
    """Post-LN layer as in wav2vec 2.0 BASE (layer_norm_first=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.attention_norm = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, FFN)
        self.fc2 = nn.Linear(FFN, D_MODEL)
        self.final_norm = nn.LayerNorm(D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x))
        return self.final_norm(x + self.fc2(F.gelu(self.fc1(x))))


class ScoreqShaped(nn.Module):
    """wav2vec 2.0 BASE + mean pooling + MOS head (nr) or L2-normalised embedding (ref)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.feature_encoder = FeatureEncoder()
        self.feature_norm = nn.LayerNorm(512)
        self.feature_projection = nn.Linear(512, D_MODEL)
        self.pos_conv = PositionalConv()
        self.encoder_norm = nn.LayerNorm(D_MODEL)
        self.layers = nn.ModuleList(TransformerLayer() for _ in range(LAYERS))
        self.head = nn.Linear(D_MODEL, 1) if mode == "nr" else None

    def forward(self, audio_input: torch.Tensor) -> torch.Tensor:
        x = self.feature_encoder(audio_input).transpose(1, 2)  # [B, T, 512]
        x = self.feature_projection(self.feature_norm(x))
        x = self.encoder_norm(x + self.pos_conv(x))
        for layer in self.layers:
            x = layer(x)
        pooled = x.mean(dim=1)
        if self.head is not None:
            return self.head(pooled)
        return F.normalize(pooled, p=2.0, dim=1)


def build(mode: str) -> ScoreqShaped:
    torch.manual_seed(SEED + (0 if mode == "nr" else 1))
    return ScoreqShaped(mode).eval()


def export(model: ScoreqShaped, path: Path) -> None:
    dummy = torch.randn(1, 64_000)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad():
        torch.onnx.export(
            model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch_size", 1: "samples"}, OUTPUT_NAME: {0: "batch_size"}},
            do_constant_folding=True,
        )
    os.replace(tmp, path)  # a half-written file is never left under the final name


def check(model: ScoreqShaped, path: Path) -> None:
    """onnxruntime runs the file at several lengths and batch sizes, and agrees with PyTorch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME, (inp.name, out.name)
    assert len(inp.shape) == 2 and all(isinstance(d, str) for d in inp.shape), inp.shape
    dim = 1 if model.mode == "nr" else D_MODEL
    rng = np.random.default_rng(0)
    # 640 samples: the shortest multiple of 320 that covers the encoder's 400-sample receptive field
    for batch, length in [(1, 64_000), (2, 32_000), (1, 21_120), (3, 4_800), (1, 640)]:
        x = (rng.standard_normal((batch, length)) * 0.1).astype(np.float32)
        t0 = time.perf_counter()
        y = sess.run(None, {INPUT_NAME: x})[0]
        dt = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert y.shape == (batch, dim), (y.shape, batch, dim)
        err = float(np.abs(y - ref).max())
        assert err < 1e-3, f"onnxruntime and PyTorch differ by {err} at {batch}x{length}"
        if model.mode == "ref":
            assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-4)
        print(f"  {path.name}: batch {batch} x {length} samples -> {y.shape}, "
              f"max |onnx - torch| {err:.1e}, {dt * 1000:.0f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for scoreq_shaped_{nr,ref}.onnx")
    p.add_argument("--mode", choices=("nr", "ref", "both"), default="both")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for mode in (("nr", "ref") if a.mode == "both" else (a.mode,)):
        path = a.out / f"scoreq_shaped_{mode}.onnx"
        model = build(mode)
        t0 = time.perf_counter()
        export(model, path)
        print(f"{path}: {path.stat().st_size / 1e6:.0f} MB, exported in {time.perf_counter() - t0:.0f} s", flush=True)
        if not a.no_check:
            check(model, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
