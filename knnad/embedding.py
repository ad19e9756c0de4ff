"""Patch embeddings: hooked feature maps to one vector per patch (PatchCore-style).

Each layer's map is averaged over a local neighbourhood (3×3 by default), resized bilinearly to
the finest hooked resolution, and the layers are concatenated along channels; optionally the
channels are reduced by adaptive average pooling to a fixed dimension.

Memory-bank augmentation (``augment``): each training image also enters the bank as rotated or
flipped views of it (:data:`VIEWS`), each view as a training image of its own (its patches, its
global feature), so that a part that appears rotated or flipped finds its normal patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_int
from .backbones import FeatureExtractor
from .runtime import one_thread_lanes
from .sources import Batch

#: Views of an image ``[..., H, W]`` a memory bank can be augmented with: the seven
#: non-identity symmetries of the square (rotations counter-clockwise, as numpy's rot90).
VIEWS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: torch.flip(x, (-1,)),  # mirrored left-right
    "vflip": lambda x: torch.flip(x, (-2,)),  # mirrored top-bottom
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),  # mirrored about the main diagonal
    "antitranspose": lambda x: torch.rot90(x.transpose(-2, -1), 2, (-2, -1)),  # the other diagonal
}
#: Named sets of views (``augment="rotations"``).
VIEW_SETS: Dict[str, Tuple[str, ...]] = {
    "flips": ("hflip", "vflip"),
    "rotations": ("rot90", "rot180", "rot270"),
    "dihedral": tuple(VIEWS),
}


def check_augment(value: Any, name: str = "augment") -> Optional[Tuple[str, ...]]:
    """``value`` as the tuple of view names it means, in :data:`VIEWS` order (None: no
    augmentation): a view or set name, several joined by ``+``, or a list of them. A
    ValueError naming ``name`` otherwise."""
    if value is None:
        return None
    parts = ([value] if isinstance(value, str)
             else list(value) if isinstance(value, (list, tuple)) else None)
    tokens = [token.strip() for part in parts or [] if isinstance(part, str)
              for token in part.split("+")]
    unknown = [token for token in tokens if token not in VIEWS and token not in VIEW_SETS]
    if not parts or len(tokens) < len(parts) or not tokens or unknown:
        raise ValueError(f"{name}={value!r}" + (f": unknown {unknown}" if unknown else "")
                         + f"; choose None, views {tuple(VIEWS)} or sets {tuple(VIEW_SETS)}, "
                           f"joined by '+' or as a list, e.g. 'flips', 'rotations', 'hflip+rot180'")
    chosen = {view for token in tokens for view in VIEW_SETS.get(token, (token,))}
    return tuple(view for view in VIEWS if view in chosen)


def check_aggregation_size(value: Any, name: str = "aggregation_size") -> int:
    """``value`` if it is an odd int >= 1, else a ValueError naming ``name``."""
    if check_int(value, name) % 2 == 0:
        raise ValueError(f"{name} must be odd (a window centred on the patch), got {value!r}")
    return int(value)


class PatchEmbedder:
    """``embedder(features)`` turns ``dict[layer -> Tensor[B, C_i, h_i, w_i]]`` into
    ``Tensor[B, h, w, D]`` where ``(h, w)`` is the largest grid of its layers and ``D`` is
    ``sum(C_i)`` or ``reduce_dim``.

    Parameters
    ----------
    aggregation_size
        Side of the local averaging window (odd; 1 disables aggregation).
    reduce_dim
        Target dimension of adaptive average pooling over channels, or None.
    layers
        The names of ``features`` it embeds, in order (one scale of several); None: all.
    """

    def __init__(self, aggregation_size: int = 3, reduce_dim: Optional[int] = None,
                 layers: Optional[Sequence[str]] = None):
        check_aggregation_size(aggregation_size)
        if reduce_dim is not None:
            check_int(reduce_dim, "reduce_dim", hint=" or None")
        self.aggregation_size = aggregation_size
        self.reduce_dim = reduce_dim
        self.layers = None if layers is None else tuple(layers)

    def __repr__(self) -> str:
        return (f"PatchEmbedder(aggregation_size={self.aggregation_size}, "
                f"reduce_dim={self.reduce_dim}"
                + (f", layers={list(self.layers)})" if self.layers is not None else ")"))

    def grid(self, features: Dict[str, torch.Tensor]) -> Tuple[int, int]:
        """The patch grid ``(h, w)``: the largest hooked resolution."""
        return max(((f.shape[-2], f.shape[-1]) for f in features.values()),
                   key=lambda hw: hw[0] * hw[1])

    def __call__(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.layers is not None:
            features = {name: features[name] for name in self.layers}
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


def patch_features(extractor: FeatureExtractor,
                   embedders: Sequence[PatchEmbedder],
                   images: Any) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """One patch embedding ``[B, h_s, w_s, D_s]`` per scale (one per embedder) and SPADE's
    global features ``[B, G]``, on the CPU, of ``images`` ``[B, 3, H, W]`` (tensor or numpy
    array), given a :class:`~knnad.backbones.FeatureExtractor`: one forward pass for all."""
    features = extractor(images)
    embeddings = [embedder(features).cpu() for embedder in embedders]
    return embeddings, extractor.global_features(features).cpu()


@dataclass
class Embedded:
    """What :func:`embed_images` gives, per scale: ``banks[s]`` float32 ``[R_s, D_s]`` (the
    patches of each training image, then those of its views, in order; a later scale's pooled,
    see :func:`embed_images`) and ``image_ids[s]`` int64 ``[R_s]`` (sorted: the bank row's
    image, each view counting as an image); then ``global_features`` float32
    ``[images × views, G]``, the ``paths`` read, the ``skipped`` ones, the ``frame`` ``(height,
    width)`` of the images, the prepared images ``kept`` float32 ``[M, 3, H, W]`` asked for by
    number, with their image ids ``kept_ids`` ``[M]``, and ``patches[s]``: how many patches
    scale ``s`` gave before pooling."""

    banks: List[np.ndarray]
    image_ids: List[np.ndarray]
    global_features: np.ndarray
    paths: List[Optional[str]]
    skipped: List[Optional[str]]
    frame: Tuple[int, int]
    kept: np.ndarray
    kept_ids: np.ndarray
    patches: List[int]


def pooled_rows(patches: int, pool: int, seed: int, image: int, scale: int) -> np.ndarray:
    """Sorted int64 ``[min(pool, patches)]``: the rows of one image's ``patches`` kept in a
    scale's pool, drawn at random, seeded by ``(seed, image, scale)`` (the same in any batch)."""
    if patches <= pool:
        return np.arange(patches)
    return np.sort(np.random.default_rng((seed, image, scale)).choice(patches, pool, replace=False))


def embed_images(batches: Iterable[Batch], extractor: FeatureExtractor,
                 embedders: Sequence[PatchEmbedder], augment: Optional[Tuple[str, ...]] = None,
                 keep: Sequence[int] = (), lanes: int = 1, pool_seed: Optional[int] = None
                 ) -> Embedded:
    """:func:`patch_features` of every image of ``batches`` (from :func:`knnad.sources.batches`)
    and of its ``augment`` views (names of :data:`VIEWS`), and the prepared images numbered
    ``keep`` (0 for the first image read; views are not kept); a ValueError when no image could
    be read, or when the images do not share one size. ``lanes``: how many batches at once, each
    on one thread when more than one (:func:`~knnad.runtime.one_thread_lanes`). With a
    ``pool_seed``, a scale of more patches than the coarsest keeps of each image (view) only a
    random pool of as many (:func:`pooled_rows`): what a coreset of it picks from, in a
    fraction of the memory (the fine scale's bank of wide_resnet50_2 is 4.7x the coarse one's
    bytes; pooled, 1.2x)."""
    transforms = [lambda x: x] + [VIEWS[name] for name in check_augment(augment) or ()]

    def featured(batch: Batch) -> Tuple[Batch, List[Tuple[List[torch.Tensor], torch.Tensor]]]:
        images = torch.as_tensor(batch.images)
        return batch, [patch_features(extractor, embedders, transform(images))
                       for transform in transforms] if len(images) else []

    found = one_thread_lanes(featured, batches, lanes)
    patches: List[List[torch.Tensor]] = [[] for _ in embedders]
    pooled: List[torch.Tensor] = []
    counts: List[List[int]] = [[] for _ in embedders]
    seen = [0 for _ in embedders]  # each scale's patches before pooling
    paths: List[Optional[str]] = []
    skipped: List[Optional[str]] = []
    frame: Optional[Tuple[int, int]] = None
    kept: List[torch.Tensor] = []
    kept_ids: List[int] = []
    wanted, read = set(keep), 0
    for batch, views in found:
        skipped += batch.skipped
        if not len(batch.images):
            continue
        images = torch.as_tensor(batch.images)
        if frame is not None and tuple(images.shape[-2:]) != frame:
            raise ValueError(f"fit: images of {images.shape[-1]}x{images.shape[-2]} pixels after "
                             f"preprocessing among images of {frame[1]}x{frame[0]}; give images of "
                             "one size")
        frame = (images.shape[-2], images.shape[-1])
        for image in range(len(images)):  # each image's views in turn: image ids stay sorted
            if read + image in wanted:
                kept.append(images[image])
                kept_ids.append(len(pooled))
            for embeddings, global_features in views:
                fewest = min(embedding.shape[1] * embedding.shape[2] for embedding in embeddings)
                for scale, embedding in enumerate(embeddings):
                    rows = embedding[image].reshape(-1, embedding.shape[-1])
                    seen[scale] += len(rows)
                    if pool_seed is not None and len(rows) > fewest:
                        rows = rows[torch.from_numpy(pooled_rows(len(rows), fewest, pool_seed,
                                                                 len(pooled), scale))]
                    patches[scale].append(rows)
                    counts[scale].append(len(rows))
                pooled.append(global_features[image])
        read += len(images)
        paths += batch.paths
    if frame is None:  # no image read
        raise ValueError(f"fit: none of the {len(skipped)} images could be read (skipped: "
                         f"{skipped})")
    image_ids = [np.repeat(np.arange(len(pooled), dtype=np.int64), scale_counts)
                 for scale_counts in counts]
    kept_array = torch.stack(kept).numpy() if kept else np.empty((0, 3, *frame), np.float32)
    return Embedded([torch.cat(scale).numpy() for scale in patches], image_ids,
                    torch.stack(pooled).numpy(), paths, skipped, frame, kept_array,
                    np.asarray(kept_ids, np.int64), seen)
