"""Patch embeddings: hooked feature maps to one vector per patch (PatchCore-style).

Each layer's map is averaged over a local neighbourhood (3×3 by default), resized bilinearly to
the finest hooked resolution, and the layers are concatenated along channels; optionally the
channels are reduced by adaptive average pooling to a fixed dimension.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_int
from .sources import Batch


def check_aggregation_size(value: Any, name: str = "aggregation_size") -> int:
    """``value`` if it is an odd int >= 1, else a ValueError naming ``name``."""
    if check_int(value, name) % 2 == 0:
        raise ValueError(f"{name} must be odd (a window centred on the patch), got {value!r}")
    return int(value)


class PatchEmbedder:
    """``embedder(features)`` turns ``dict[layer -> Tensor[B, C_i, h_i, w_i]]`` into
    ``Tensor[B, h, w, D]`` where ``(h, w)`` is the largest hooked grid and ``D`` is
    ``sum(C_i)`` or ``reduce_dim``.

    Parameters
    ----------
    aggregation_size: side of the local averaging window (odd; 1 disables aggregation).
    reduce_dim: target dimension of adaptive average pooling over channels, or None.
    """

    def __init__(self, aggregation_size: int = 3, reduce_dim: Optional[int] = None):
        check_aggregation_size(aggregation_size)
        if reduce_dim is not None:
            check_int(reduce_dim, "reduce_dim", hint=" or None")
        self.aggregation_size = aggregation_size
        self.reduce_dim = reduce_dim

    def __repr__(self) -> str:
        return f"PatchEmbedder(aggregation_size={self.aggregation_size}, reduce_dim={self.reduce_dim})"

    def grid(self, features: Dict[str, torch.Tensor]) -> Tuple[int, int]:
        """The patch grid ``(h, w)``: the largest hooked resolution."""
        return max((tuple(f.shape[-2:]) for f in features.values()), key=lambda hw: hw[0] * hw[1])

    def __call__(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.grid(features)
        maps = []
        for feature in features.values():
            if self.aggregation_size > 1:
                # Zero padding counts at the border, as PatchCore's unfold and anomalib do.
                feature = F.avg_pool2d(feature, self.aggregation_size, stride=1,
                                       padding=self.aggregation_size // 2)
            if tuple(feature.shape[-2:]) != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            maps.append(feature)
        embedding = torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # [B, h, w, D]
        if self.reduce_dim is not None and self.reduce_dim != embedding.shape[-1]:
            batch, height, width, dim = embedding.shape
            embedding = F.adaptive_avg_pool1d(embedding.reshape(-1, 1, dim), self.reduce_dim)
            embedding = embedding.reshape(batch, height, width, self.reduce_dim)
        return embedding.contiguous()


def patch_features(extractor: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
                   embedder: PatchEmbedder, images: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch embeddings ``[B, h, w, D]`` and SPADE's global features ``[B, G]`` (on the CPU) of
    ``images`` ``[B, 3, H, W]`` (tensor or numpy array), given a
    :class:`~knnad.backbones.FeatureExtractor`."""
    features = extractor(images)
    return embedder(features).cpu(), extractor.global_features(features).cpu()


def embed_images(batches: Iterable[Batch], extractor: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
                 embedder: PatchEmbedder) -> Tuple[torch.Tensor, torch.Tensor, List[Optional[str]], List[str]]:
    """:func:`patch_features` of every image of ``batches`` (from :func:`knnad.sources.batches`):
    ``(embeddings [N, h, w, D], global features [N, G], paths, skipped paths)``; a ValueError
    when no image could be read."""
    patches, pooled, paths, skipped = [], [], [], []
    for batch in batches:
        skipped += batch.skipped
        if len(batch.images):
            embedding, global_features = patch_features(extractor, embedder, batch.images)
            patches.append(embedding)
            pooled.append(global_features)
            paths += batch.paths
    if not patches:
        raise ValueError(f"fit: none of the {len(skipped)} images could be read (skipped: {skipped})")
    return torch.cat(patches), torch.cat(pooled), paths, skipped
