"""A fitted detector as one self-contained ONNX file that scores like it, without torch or faiss.

The graph is the detector's own computation: the hooked backbone and patch embedding (exported
by ``torch.onnx``), then exact k-nearest-neighbour distances to the memory bank (an initializer)
the way :class:`~knnad.index.FlatL2Index` finds them — candidates ranked by matrix-product
distances ``|x|² − 2q·x``, tile by tile over the bank with a running top list, their distances
recomputed by differences ``|q − x|``, equal distances by ascending bank row — then the mean
over ``k``, the anomaly map (upsampling and Gaussian smoothing as two matrix products) and its
maximum. Settings, thresholds and the backbone's identity go into the file's metadata
(``metadata_props``, each value JSON), never into the graph; a digest of the metadata in the
graph's ``doc_string`` lets readers refuse an edited or stripped file.

Input ``images``: float32 ``[N, 3, H, W]``, RGB, prepared as
:class:`~knnad.preprocessing.Preprocessor` does (shorter side resized to ``image_size`` with
Pillow's bilinear filter, centre crop, values / 255, then ``(x − mean) / std`` per channel with
ImageNet's mean and std); ``H = W = crop_size``, or in whole-image mode (``crop_size=None``, no
crop) the frame the model was fit on. Outputs ``image_scores`` ``[N]`` and ``anomaly_maps``
``[N, H, W]`` (float32, Euclidean distance units).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._checks import check_int
from .._types import PathLike
from .._version import __version__
from ..anomaly_map import map_matrices
from ..archive import atomic_write, check_target
from ..backbones import FeatureExtractor
from ..embedding import PatchEmbedder
from ..fusion import Scale, normal_scores, refine_steps
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from ..thresholds import Thresholds
from .onnx_detector import (
    DIGEST_PREFIX,
    FORMAT,
    INPUT,
    METADATA_PREFIX,
    OUTPUTS,
    WHOLE_IMAGE_FORMAT,
    metadata_digest,
)

logger = logging.getLogger(__name__)

#: Bank rows per distance tile: the tile's distance block holds 4 · h · w · TILE_ROWS bytes per
#: image of the batch (49 MiB for mobilenet_v2's 28 × 28 grid at crop 224).
TILE_ROWS = 16384
#: Oldest ONNX opset whose operators the graph is written for (Reduce* take axes as inputs).
MIN_OPSET = 18
#: ONNX files are protocol buffers, which cannot exceed 2 GiB.
_PROTOBUF_LIMIT = 2**31 - 2**20


def import_onnx():
    """The ``onnx`` module, or an ImportError naming the extra that installs it."""
    try:
        import onnx
        import onnxscript  # noqa: F401 (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({error.name} is missing): "
                          f"pip install 'knnad[export]'") from None
    return onnx


class _Embedding(nn.Module):
    """images ``[N, 3, H, W]`` -> one patch embedding ``[N, h_s, w_s, D_s]`` per scale, as the
    detector computes them."""

    def __init__(self, extractor: FeatureExtractor, embedders: List[PatchEmbedder]):
        super().__init__()
        self.model, self.extractor, self.embedders = extractor.model, extractor, embedders

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        # The whole model runs (torch.export cannot trace the early stop); the layers after
        # the last hooked one do not reach the outputs and are dropped from the ONNX graph.
        outputs = self.extractor.hooked_outputs(images, stop_early=False)
        features = {name: outputs[name].float() for name in self.extractor.layers}
        return tuple(embedder(features) for embedder in self.embedders)


def _export_embedding(extractor: FeatureExtractor, embedders: List[PatchEmbedder],
                      frame: Tuple[int, int], batch_size: Optional[int], opset: int):
    """The backbone and patch embeddings as an ONNX ModelProto (input ``images`` of ``frame``
    size, outputs ``embedding_0``, ``embedding_1``, ... one per scale); a ValueError naming the
    backbone when torch.onnx cannot export it."""
    example = torch.zeros(batch_size or 2, 3, *frame, device=extractor.device)
    dynamic = None if batch_size else ({0: torch.export.Dim("batch", min=1)},)
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [noisy.level for noisy in quiet]
    for noisy in quiet:  # they log every pass at INFO
        noisy.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # The hooks keep outputs on the extractor: a side effect torch.export warns of,
            # harmless.
            warnings.filterwarnings("ignore",
                                    message="While compiling, we found certain side effects")
            # torch.export first: it refuses what does not trace (data-dependent branches),
            # where torch.onnx alone would fall back to a graph specialised to the example.
            program = torch.export.export(_Embedding(extractor, embedders).eval(), (example,),
                                          dynamic_shapes=dynamic, strict=False)
            outputs = [f"embedding_{number}" for number in range(len(embedders))]
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT],
                                             output_names=outputs, opset_version=opset,
                                             verbose=False)
    except Exception as error:  # torch.export and onnxscript raise many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"backbone {extractor.backbone_name!r} (layers {list(extractor.layers)}) "
                         f"cannot be exported to ONNX: tracing or conversion failed "
                         f"({type(error).__name__}: {first}). A module whose forward branches on "
                         f"values does not trace; torchvision backbones do") from None
    finally:
        for noisy, level in zip(quiet, levels):
            noisy.setLevel(level)
    assert onnx_program is not None  # None only without dynamo=True
    return onnx_program.model_proto


class _GraphWriter:
    """Appends nodes and initializers to an ONNX graph under unique ``knnad/`` names."""

    def __init__(self, onnx, graph):
        self.onnx, self.graph, self.count = onnx, graph, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"knnad/{hint}_{self.count}"

    def constant(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.graph.initializer.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: List[str], outputs: int = 1, name: Optional[str] = None,
             **attributes: Any) -> Any:
        names = [name] if name else [self.name(op.lower()) for _ in range(outputs)]
        self.graph.node.append(self.onnx.helper.make_node(op, inputs, names, **attributes))
        return names[0] if outputs == 1 else names

    def top(self, values: str, count: int) -> Tuple[str, str]:
        """The ``count`` smallest of each row, ascending, ties by position (ONNX TopK's rule)."""
        return self.node("TopK", [values, self.constant("count", np.array([count], np.int64))],
                         outputs=2, axis=1, largest=0, sorted=1)


def _squared_norms(bank: torch.Tensor, chunk: int = 65536) -> np.ndarray:
    """float32 ``[n]``: |x|² of each bank row, summed in float64 chunk by chunk (no full copy)."""
    vectors = bank.numpy()
    pieces = [vectors[start:start + chunk] for start in range(0, len(vectors), chunk)]
    return np.concatenate([np.einsum("ij,ij->i", piece, piece, dtype=np.float64).astype(np.float32)
                           for piece in pieces] or [np.empty(0, np.float32)])


def _add_patch_scores(writer: _GraphWriter, embedding: str, bank: torch.Tensor,
                      grid: Tuple[int, int], settings: Dict[str, Any]) -> str:
    """Nodes from ``embedding`` ``[N, h, w, D]`` to its patch scores ``[N, h, w]``: the mean
    exact distance to the ``k`` nearest rows of ``bank``; returns the scores' name.

    Each tile of the bank is an initializer of its own: no node slices or gathers the whole
    bank, so runtimes hold it once (constant folding of slices would copy it). Per tile, the
    ``k + rerank`` best candidates by ranking value get their exact distances from the tile;
    the running top list keeps ranking values and exact distances together, so that the
    candidates are those of a search of the whole bank. Which of equally distant rows is
    chosen does not change the ``k`` smallest distances, so no row numbers are carried."""
    rows, dim = bank.shape
    k, candidates = settings["k"], min(settings["k"] + settings["rerank"], rows)
    queries = writer.node("Reshape",
                          [embedding, writer.constant("shape", np.array([-1, dim], np.int64))])
    axis_1 = writer.constant("axes", np.array([1], np.int64))
    expanded = writer.node("Unsqueeze", [queries, axis_1])
    best = None  # (ranking values, exact distances), each [M, count]
    for start in range(0, rows, TILE_ROWS):
        tile = bank[start:start + TILE_ROWS]
        tile_name = writer.constant("memory_bank", tile.numpy())
        norms = writer.constant("bank_norms", _squared_norms(tile))
        ranking = writer.node("Gemm", [queries, tile_name, norms],
                              alpha=-2.0, beta=1.0, transB=1)  # |x|² − 2q·x, ranked as |q − x|²
        values, local = writer.top(ranking, min(candidates, len(tile)))
        gathered = writer.node("Gather", [tile_name, local], axis=0)
        difference = writer.node("Sub", [gathered, expanded])
        squares = writer.node("ReduceSum", [writer.node("Mul", [difference, difference]),
                                            writer.constant("axes", np.array([2], np.int64))],
                              keepdims=0)
        found = (values, writer.node("Sqrt", [squares]))
        if best is not None:
            merged = [writer.node("Concat", [old, new], axis=1) for old, new in zip(best, found)]
            values, order = writer.top(merged[0], min(candidates, start + len(tile)))
            found = (values, writer.node("GatherElements", [merged[1], order], axis=1))
        best = found
    assert best is not None  # the bank holds rows
    nearest, _ = writer.top(best[1], k)
    patch_scores = writer.node("ReduceMean", [nearest, axis_1], keepdims=0)
    shape = writer.constant("shape", np.array([-1, *grid], np.int64))
    return writer.node("Reshape", [patch_scores, shape])


def _add_refined_map(writer: _GraphWriter, coarse: str, fine: str, radius: int,
                     name: Optional[str]) -> str:
    """Nodes of :func:`knnad.fusion.refined_map` of two normalised maps ``[B, H, W]``."""
    window = 2 * radius + 1
    axis_1 = writer.constant("axes", np.array([1], np.int64))
    rows = writer.node("MaxPool", [writer.node("Unsqueeze", [fine, axis_1])],
                       kernel_shape=[window, 1], pads=[radius, 0, radius, 0])
    pooled = writer.node("MaxPool", [rows], kernel_shape=[1, window], pads=[0, radius, 0, radius])
    local = writer.node("Squeeze", [pooled, axis_1])
    zero, one = (writer.constant("bound", np.array(value, np.float32)) for value in (0.0, 1.0))
    outline = writer.node("Clip", [writer.node("Div", [fine, writer.node("Max", [local, one])]),
                                   zero, one])
    found = writer.node("Clip", [writer.node("Sub", [local, one]), zero, one])
    gate = writer.node("Sub", [one, writer.node("Mul", [found,
                                                         writer.node("Sub", [one, outline])])])
    return writer.node("Max", [fine, writer.node("Mul", [coarse, gate])], name=name)


def _add_scoring(writer: _GraphWriter, scales: List[Scale], grids: List[Tuple[int, int]],
                 frame: Tuple[int, int], settings: Dict[str, Any]) -> None:
    """Nodes from the scales' embeddings (``embedding_<s>``) to the outputs ``image_scores`` and
    ``anomaly_maps`` (see the module docstring): each scale's map (upsampling and smoothing as
    two matrix products); with several scales each normalised by its normal scores and fused
    as :func:`knnad.fusion.fused_maps` does (scales of weight 0 left out)."""
    several = len(scales) > 1
    normals = normal_scores(scales) if several else []
    maps: List[str] = []
    patch_sizes: List[float] = []  # of the scales in maps, in map pixels
    for number, (scale, grid) in enumerate(zip(scales, grids)):
        if scale.weight == 0:
            continue
        bank = scale.index.rows(0, len(scale.index)).cpu()
        patch_scores = _add_patch_scores(writer, f"embedding_{number}", bank, grid, settings)
        rows_matrix, columns_matrix = map_matrices(grid, frame, settings["sigma"],
                                                   settings["upsampling"])
        half = writer.node("MatMul",
                           [writer.constant("map_rows", rows_matrix.numpy()), patch_scores])
        columns = writer.constant("map_columns", columns_matrix.T.contiguous().numpy())
        anomaly_map = writer.node("MatMul", [half, columns], name=None if several else OUTPUTS[1])
        if several:  # (map − location) · (weight / spread); max, refine: weights do not count
            weighted = settings["fusion"] in ("mean", "auto")
            factor = (scale.weight if weighted else 1.0) / normals[number].spread
            location = writer.constant("location", np.array(normals[number].location, np.float32))
            shifted = writer.node("Sub", [anomaly_map, location])
            anomaly_map = writer.node("Mul", [shifted, writer.constant(
                "factor", np.array(factor, np.float32))])
        maps.append(anomaly_map)
        patch_sizes.append(frame[0] / grid[0])
    if several and len(maps) == 1:  # one scale of non-zero weight
        writer.node("Identity", maps, name=OUTPUTS[1])
    elif several and settings["fusion"] == "refine":
        coarsest, steps = refine_steps(patch_sizes)
        fused = maps[coarsest]
        for step, (finer, radius) in enumerate(steps, 1):
            fused = _add_refined_map(writer, fused, maps[finer], radius,
                                     OUTPUTS[1] if step == len(steps) else None)
    elif several:
        writer.node("Max" if settings["fusion"] == "max" else "Sum", maps, name=OUTPUTS[1])
    writer.node("ReduceMax", [OUTPUTS[1], writer.constant("axes", np.array([1, 2], np.int64))],
                keepdims=0, name=OUTPUTS[0])


def export_onnx(path: PathLike, settings: Dict[str, Any], extractor: FeatureExtractor,
                scales: List[Scale], thresholds: Optional[Thresholds], frame: Tuple[int, int], *,
                batch_size: Optional[int] = None, opset: int = MIN_OPSET) -> Path:
    """Write a fitted detector's parts (``settings``: its checked parameters; ``scales``: its
    fitted scales; ``frame``: the ``(height, width)`` of its input images) to one ONNX file at
    ``path`` (``.onnx``), atomically; returns the path. ``batch_size`` None: any batch size.

    Memory at inference: the weights and the bank (ONNX Runtime holds the bank twice: it
    prepacks the tiles for its matrix product, unless ``session.disable_prepacking`` is set)
    and, per image of a batch, one distance tile of 4 · h · w · :data:`TILE_ROWS` bytes
    (49 MiB at a 28 × 28 grid), never bank size × patches. Export adds up to about twice the
    bank's bytes (initializers, serialised file). Measured with 1,083,456 × 128 rows (529 MiB):
    export +616 MiB; a process scoring one 576² image peaks at 1.58 GiB, 1.06 GiB without
    prepacking (``benchmarks/results/export-bottle-cpu2.md``).
    """
    if settings["image_score"] != "max":
        raise ValueError(f"image_score={settings['image_score']!r} cannot be exported: the ONNX "
                         f"graph computes the map maximum; set image_score='max' before export")
    onnx = import_onnx()
    path = check_target(path, ".onnx")
    # The rows and their norms.
    bank_bytes = sum(4 * len(scale.index) * (scale.index.dim + 1) for scale in scales)
    if bank_bytes > _PROTOBUF_LIMIT:
        shapes = " + ".join(f"{len(scale.index)} x {scale.index.dim}" for scale in scales)
        raise ValueError(f"a memory bank of {shapes} takes {bank_bytes / 2**30:.1f} GiB, over "
                         f"ONNX's 2 GiB single-file limit; fit with a smaller coreset")
    if batch_size is not None:
        check_int(batch_size, "batch_size", hint=" or None (any batch size)")
    check_int(opset, "opset", MIN_OPSET, onnx.defs.onnx_opset_version())
    height, width = frame
    frame = (height, width)
    model = _export_embedding(extractor, [scale.embedder for scale in scales], frame, batch_size,
                              opset)
    grids = [tuple(output.type.tensor_type.shape.dim[i].dim_value for i in (1, 2))
             for output in model.graph.output]
    del model.graph.output[:]
    _add_scoring(_GraphWriter(onnx, model.graph), scales, grids, frame, settings)
    batch = batch_size if batch_size else "batch"
    model.graph.output.extend([
        onnx.helper.make_tensor_value_info(OUTPUTS[0], onnx.TensorProto.FLOAT, [batch]),
        onnx.helper.make_tensor_value_info(OUTPUTS[1], onnx.TensorProto.FLOAT, [batch, *frame])])
    metadata = _metadata(settings, extractor, scales, grids, frame, thresholds, batch_size)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.graph.doc_string = DIGEST_PREFIX + metadata_digest(metadata)
    model.producer_name, model.producer_version = "knnad", __version__
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ValueError(f"the model would take {model.ByteSize() / 2**30:.1f} GiB, over ONNX's "
                         f"2 GiB single-file limit; fit with a smaller coreset")
    written = atomic_write(path, lambda stream: stream.write(model.SerializeToString()))
    logger.info("exported %s: bank rows %s, %.1f MiB", written,
                " + ".join(f"{len(scale.index)} x {scale.index.dim}" for scale in scales),
                written.stat().st_size / 2**20)
    return written


def _metadata(settings: Dict[str, Any], extractor: FeatureExtractor, scales: List[Scale],
              grids: List[Tuple[int, int]], frame: Tuple[int, int],
              thresholds: Optional[Thresholds], batch_size: Optional[int]) -> Dict[str, str]:
    """The file's ``metadata_props``: what a reader needs to prepare images and label scores
    (``bank``: the first scale's; ``scales``: each scale's layers, bank, normal scores and
    weight)."""
    embedder, first, grid = scales[0].embedder, scales[0].index, grids[0]
    usable = thresholds if thresholds is not None and thresholds.usable(settings) else None
    coreset = settings["coreset"]
    entries = {
        "format": FORMAT if settings["crop_size"] is not None else WHOLE_IMAGE_FORMAT,
        "version": __version__, "backbone": extractor.backbone_name,
        "weights": extractor.weights_id, "layers": list(extractor.layers),
        "preprocessing": {"image_size": settings["image_size"], "crop_size": settings["crop_size"],
                          "bit_depth": settings["bit_depth"], "frame": list(frame),
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "scoring": {"k": settings["k"], "rerank": settings["rerank"],
                    "image_score": settings["image_score"], "image_k": settings["image_k"],
                    "sigma": settings["sigma"], "upsampling": settings["upsampling"],
                    "aggregation_size": embedder.aggregation_size,
                    "reduce_dim": embedder.reduce_dim},
        "bank": {"rows": int(len(first)), "dim": int(first.dim), "grid": list(grid),
                 "coreset": list(coreset) if isinstance(coreset, tuple) else coreset,
                 "augment": list(settings["augment"] or [])},
        "scales": [{"layers": list(layers), "rows": len(scale.index), "dim": scale.index.dim,
                    "grid": list(grid), "normal": asdict(scale.normal) if scale.normal else None,
                    "weight": scale.weight}
                   for layers, scale, grid in zip(extractor.scales, scales, grids)],
        "fusion": settings["fusion"] if len(scales) > 1 else None,
        "io": {"input": INPUT, "outputs": list(OUTPUTS), "batch_size": batch_size},
        "thresholds": asdict(usable) if usable is not None else None}
    return {METADATA_PREFIX + key: json.dumps(value) for key, value in entries.items()}
