"""Export a shipped classifier folder to ONNX: the fp32 graph and its int8 quantization.

Layout of a folder (what `model.onnx_backend` loads):

    model.safetensors            the weights (unchanged)
    model.onnx                   fp32 graph; its weights are ONNX external data that point into
                                 model.safetensors (offset, length), so it adds ~0.2 MB, not a copy
    onnx/model_quantized.onnx    int8 graph (self-contained), only where it met the accuracy bar
    onnx/export.json             how both were made and what the int8 check measured

Why the fp32 graph sits beside the weights and not in onnx/: ONNX Runtime (1.32) and onnx's
checker refuse external data outside the graph's own folder ("External data path escapes model
directory"), symlinks included. The publish command adds the Hub convention's
`onnx/model.onnx` + `onnx/model.onnx_data` (a byte copy of model.safetensors, which the Hub's
content-addressed storage keeps once) for optimum and transformers.js.

Exporter: `torch.onnx.export` (TorchScript path, opset 17) with constant folding off, so every
initializer is a state-dict tensor byte for byte (no Conv+BN fusion, no pre-transposed MatMul
weights; ONNX Runtime does those fusions when it loads the graph). optimum is not used: optimum-onnx
0.1.0, the newest, pins transformers < 4.58 and this project runs transformers 5.

Outputs: `logits` (B, num_labels) of the dx head and, for multi-source MelanomaViT, one
`logits_<head>` (B, n_labels) per extra head in `config.extra_heads` order. Every head's fitted
temperature is folded into its weights (`model.calibration`), so softmax of these logits is the
app's probabilities. Input: `pixel_values` (B, 3, H, W), batch dynamic, H and W the processor's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
# The Hub convention (optimum's ORTModel, transformers.js): the graph in onnx/, its data beside it.
HUB_FP32_FILE, HUB_FP32_DATA = "onnx/model.onnx", "onnx/model.onnx_data"
INT8_FILE = "onnx/model_quantized.onnx"
EXPORT_RECORD = "onnx/export.json"
WEIGHTS_FILE = "model.safetensors"
OPSET = 17


def output_names(config: Any) -> list[str]:
    """Graph output names: `logits`, then `logits_<head>` per extra head (config order)."""
    return ["logits", *(f"logits_{name}" for name in (getattr(config, "extra_heads", None) or {}))]


class _Heads(torch.nn.Module):
    """A classifier as a function of pixel values only, returning the logits of every head as a tuple."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = list(getattr(model.config, "extra_heads", None) or {})

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        head_logits = getattr(out, "head_logits", None) or {}
        return (out.logits, *(head_logits[name] for name in self.heads))


def safetensors_index(path: str | Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, absolute byte offset, length) of every tensor in a safetensors file.

    The format: an 8-byte little-endian header length, the JSON header, then the raw tensors at
    `data_offsets` relative to the end of the header.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        name: (h["dtype"], list(h["shape"]), base + h["data_offsets"][0], h["data_offsets"][1] - h["data_offsets"][0])
        for name, h in header.items()
        if name != "__metadata__"
    }


_ONNX_TO_ST = {1: "F32", 7: "I64", 10: "F16", 16: "BF16"}


def point_into_safetensors(graph: Any, weights: Path, location: str) -> tuple[int, int]:
    """Make every initializer whose bytes equal a tensor of `weights` ONNX external data at that
    tensor's bytes (`location`, relative to the graph's folder); the others stay in the graph.

    Matched by content (dtype, shape, bytes), not by name: transformers 5 renames some checkpoint
    keys when it loads them (DeiT's `attention.attention.query` is `attention.q_proj` in memory),
    and two tensors with equal bytes are interchangeable.

    Returns (initializers moved, initializers kept inside).
    """
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    data = Path(weights).read_bytes()
    by_content = {
        (dtype, tuple(shape), hashlib.sha256(data[offset : offset + length]).digest()): (offset, length)
        for dtype, shape, offset, length in safetensors_index(weights).values()
    }
    moved = kept = 0
    for tensor in graph.initializer:
        key = (_ONNX_TO_ST.get(tensor.data_type), tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
        if not tensor.HasField("raw_data") or key not in by_content:
            kept += 1
            continue
        offset, length = by_content[key]
        set_external_data(tensor, location=location, offset=offset, length=length)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        moved += 1
    return moved, kept


def export_fp32(model: torch.nn.Module, folder: str | Path, image_size: tuple[int, int]) -> dict[str, Any]:
    """Write `folder/model.onnx` for `model` (eval mode, CPU), its weights pointing into model.safetensors.

    Returns what the export record keeps: outputs, opset, initializers shared with / kept beside the weights.
    """
    import onnx

    folder = Path(folder)
    names = output_names(model.config)
    x = torch.zeros(2, 3, *image_size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about traced shape arithmetic.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            _Heads(model).eval(), (x,), str(path), input_names=["pixel_values"], output_names=names,
            dynamic_axes={name: {0: "batch_size"} for name in ["pixel_values", *names]},
            opset_version=OPSET, do_constant_folding=False, dynamo=False,
        )
        graph = onnx.load(str(path))
    moved, kept = point_into_safetensors(graph.graph, folder / WEIGHTS_FILE, WEIGHTS_FILE)
    if moved == 0:
        raise RuntimeError(f"{folder}: no exported initializer matched {WEIGHTS_FILE}; the graph would copy the weights")
    graph.producer_name = "melanoma-vit model.onnx_export"
    onnx.save(graph, str(folder / FP32_FILE))
    logger.info("%s: %d initializers in %s, %d inside the graph", folder / FP32_FILE, moved, WEIGHTS_FILE, kept)
    return {"outputs": names, "opset": OPSET, "exporter": f"torch.onnx.export (TorchScript) torch {torch.__version__}",
            "initializers_in_safetensors": moved, "initializers_in_graph": kept}


def hub_fp32_graph(folder: str | Path) -> bytes:
    """`folder/model.onnx` for the Hub's `onnx/model.onnx`: the same graph with its external data in
    `model.onnx_data` beside it, which is a byte copy of model.safetensors (same offsets)."""
    import onnx

    graph = onnx.load(str(Path(folder) / FP32_FILE), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = Path(HUB_FP32_DATA).name
    return graph.SerializeToString()


class _Calibration:
    """onnxruntime's `CalibrationDataReader` over batches of preprocessed pixel values."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": batch}


def quantize(folder: str | Path, calibration: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Write `folder/onnx/model_quantized.onnx` from `folder/model.onnx`.

    With `calibration` (batches of (B, 3, H, W) float32 pixel values): static QDQ quantization,
    int8 weights per channel and uint8 activations, ranges by MinMax over the batches (the CNNs).
    Without: dynamic quantization of the MatMul / Gemm weights (the ViTs), activations quantized
    per batch at run time. Both start from onnxruntime's shape-inference pre-processing.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = Path(folder)
    out = folder / INT8_FILE
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The quantizer's tools copy graphs to temporary folders: hand them a self-contained one.
        inline, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        onnx.save(onnx.load(str(folder / FP32_FILE)), str(inline))
        quant_pre_process(str(inline), str(pre), skip_symbolic_shape=True)
        if calibration is not None:
            quantize_static(
                str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            how = {"mode": "static", "format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
                   "calibration": "MinMax", "calibration_images": int(sum(len(b) for b in calibration))}
        else:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            how = {"mode": "dynamic", "weights": "int8 per tensor (MatMul, Gemm)", "activations": "uint8 per batch"}
    return {**how, "bytes": out.stat().st_size}
