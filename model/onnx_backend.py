"""ONNX Runtime backend of `model.classifier.Classifier`: the folder's exported graphs
(`model.onnx_export`), run on the CPU provider.

Backends: "torch" (PyTorch eager), "onnx" (fp32 graph), "onnx-int8" (quantized graph, shipped only
where it met the accuracy bar), "auto" (the default: the one `onnx/export.json` records as the
fastest measured among those that pass, else fp32 ONNX where the folder has it, else torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .onnx_export import EXPORT_RECORD, FP32_FILE, INT8_FILE

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
_FILES = {"onnx": FP32_FILE, "onnx-int8": INT8_FILE}


@dataclass
class OnnxOutput:
    """What the classifier reads of a forward pass: dx logits (B, C) and extra heads' logits {name: (B, C_head)}."""

    logits: torch.Tensor
    head_logits: dict[str, torch.Tensor] | None = None


def available_backends(folder: str | Path) -> list[str]:
    """The backends a folder can run: torch always, ONNX ones where their graph is there."""
    folder = Path(folder)
    return ["torch", *(name for name, file in _FILES.items() if (folder / file).is_file())]


def export_record(folder: str | Path) -> dict:
    """`onnx/export.json` of a folder ({} when absent)."""
    path = Path(folder) / EXPORT_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_backend(folder: str | Path, backend: str = "auto") -> str:
    """The concrete backend for `backend` in `folder` ("auto" per the module docstring).

    Raises:
        ValueError: unknown backend, or an ONNX backend whose graph the folder does not have.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends(folder) if Path(folder).is_dir() else ["torch"]
    if backend == "auto":
        default = export_record(folder).get("default_backend")
        if default in available:
            return default
        return "onnx" if "onnx" in available else "torch"
    if backend not in available:
        raise ValueError(f"{folder} has no {_FILES[backend]} for backend {backend!r} (available: {available}); "
                         "export with `python train/export_onnx.py models --write`")
    return backend


class OnnxModel:
    """One ONNX graph of a classifier folder in an onnxruntime CPU session.

    Args:
        path: the .onnx file. heads: extra head names, in the graph's output order after `logits`.
        threads: intra-op threads (default: torch's, so both backends use the same cores).
    """

    def __init__(self, path: str | Path, heads: list[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.heads = heads
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = ["logits", *(f"logits_{h}" for h in heads)]
        if self.output_names != expected:
            raise ValueError(f"{path}: outputs {self.output_names}, the config's heads need {expected}; re-export it")

    def __call__(self, pixel_values: torch.Tensor) -> OnnxOutput:
        """(B, 3, H, W) pixel values -> logits of every head, float32 CPU tensors."""
        x = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        logits, *heads = (torch.from_numpy(z) for z in self.session.run(None, {"pixel_values": x}))
        return OnnxOutput(logits, dict(zip(self.heads, heads)) or None)


def load_onnx(folder: str | Path, backend: str, heads: list[str], threads: int | None = None) -> OnnxModel:
    """The session of an ONNX `backend` ("onnx" or "onnx-int8") of a folder."""
    return OnnxModel(Path(folder) / _FILES[backend], heads, threads)
