"""Image datasets with labels and masks: MVTec AD, BTAD, and users' own folders.

Each dataset is a list of :class:`Sample` (``ds.samples``) built and checked at construction:
a missing root or category, an empty split, a defect image without a mask, a mask whose size
differs from its image, or a broken symbolic link raise a clear error; files that are not
images are skipped with a warning that lists them. Detectors accept these datasets directly.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._types import PathLike
from .preprocessing import IMAGE_SUFFIXES, Preprocessor, broken_link, upright_size

logger = logging.getLogger(__name__)

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper")
BTAD_CATEGORIES = ("01", "02", "03")
#: Folder the BTAD archive unpacks to; a root above it is accepted too.
BTAD_ARCHIVE_FOLDER = "BTech_Dataset_transformed"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image: ``label`` 0 = good, 1 = defect; ``defect`` the defect type ("good" for good
    images); ``mask_path`` None where there is no mask (good images, or masks allowed missing)."""

    path: Path
    label: int
    defect: str
    mask_path: Optional[Path] = None


def _image_size(path: Path) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from the file header, or None when it is not an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None


def _check_link(path: Path) -> None:
    """FileNotFoundError naming ``path`` and its target when it is a broken symbolic link."""
    broken = broken_link(path)
    if broken:
        raise FileNotFoundError(f"{path} is {broken}")


def _images_in(folder: Path, not_images: List[Path]) -> List[Path]:
    """Sorted image files in ``folder``; other files are appended to ``not_images``. A broken
    symbolic link raises FileNotFoundError naming it."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        _check_link(path)
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and _image_size(path) is not None:
            found.append(path)
        else:
            not_images.append(path)
    return found


class ImageDataset:
    """Base of the datasets: ``samples``, ``len(ds)``, iteration, ``labels`` and ``defects``."""

    samples: List[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __repr__(self) -> str:
        defects = sorted({s.defect for s in self.samples})
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, types {defects})"

    @property
    def name(self) -> str:
        return getattr(self, "category", type(self).__name__)

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]``: 0 good, 1 defect."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def defects(self) -> List[str]:
        return [s.defect for s in self.samples]

    def _finish(self, samples: List[Sample], not_images: List[Path], where: Path) -> None:
        if not_images:
            logger.warning("skipped %d files that are not images under %s: %s", len(not_images),
                           where, ", ".join(str(p) for p in not_images[:20])
                           + (" ..." if len(not_images) > 20 else ""))
        if not samples:
            raise ValueError(f"no images found in {where}; check the path and the dataset layout")
        for sample in samples:
            if sample.mask_path is None:
                continue
            image_size, mask_size = _image_size(sample.path), _image_size(sample.mask_path)
            if mask_size is None:
                raise ValueError(f"mask {sample.mask_path} of {sample.path} is not a readable "
                                 f"image")
            if image_size is not None and image_size != mask_size:
                raise ValueError(f"mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} but "
                                 f"its image {sample.path} is {image_size[0]}x{image_size[1]}")
        self.samples = samples
        self.not_images = not_images


def _category_root(root: PathLike, category: str, known: Sequence[str], dataset: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {root} does not exist")
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir()
                       if (p / "train").is_dir() or (p / "test").is_dir())
        hint = (f"categories found under {root}: {found}" if found
                else f"no {dataset} category under {root}")
        raise ValueError(f"unknown {dataset} category {category!r} ({hint}; {dataset} has "
                         f"{list(known)})")
    return folder


def _split_folders(root: PathLike, category: str, split: str, known: Sequence[str], dataset: str
                   ) -> Tuple[Path, Path]:
    """``(category folder, split folder)``, each checked to exist."""
    if not isinstance(category, str):
        raise ValueError(f"{dataset} category must be a folder name such as {known[0]!r}, got "
                         f"{category!r}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    folder = _category_root(root, category, known, dataset)
    split_folder = folder / split
    if not split_folder.is_dir():
        raise ValueError(f"{dataset} category {category!r} has no {split}/ folder at "
                         f"{split_folder}")
    return folder, split_folder


def _find_mask(folder: Path, stems: Sequence[str]) -> Optional[Path]:
    """The first mask file in ``folder`` named after one of ``stems``, or None; a broken
    symbolic link in its place raises FileNotFoundError naming it."""
    for stem in stems:
        for suffix in (".png", ".bmp", ".PNG", ".BMP", ".tif", ".tiff"):
            candidate = folder / f"{stem}{suffix}"
            _check_link(candidate)
            if candidate.is_file():
                return candidate
    return None


def _defect_samples(image_folder: Path, defect: str, mask_folder: Path, mask_stems,
                    allow_missing_masks: bool, not_images: List[Path]) -> List[Sample]:
    samples = []
    for path in _images_in(image_folder, not_images):
        mask = _find_mask(mask_folder, mask_stems(path.stem))
        if mask is None:
            if not allow_missing_masks:
                raise ValueError(f"defect image {path} has no mask in {mask_folder} (looked for "
                                 f"{mask_stems(path.stem)}); pass allow_missing_masks=True to "
                                 f"use it without one")
            logger.warning("defect image %s has no mask; pixel metrics will treat it as unmasked",
                           path)
        samples.append(Sample(path, 1, defect, mask))
    return samples


class MVTecAD(ImageDataset):
    """MVTec AD: ``ROOT/CATEGORY/train/good``, ``ROOT/CATEGORY/test/<defect>``,
    ``ROOT/CATEGORY/ground_truth/<defect>/<stem>_mask.png``."""

    def __init__(self, root: PathLike, category: str, split: str = "train",
                 allow_missing_masks: bool = False):
        folder, split_folder = _split_folders(root, category, split, MVTEC_CATEGORIES, "MVTec AD")
        self.root, self.category, self.split = Path(root), category, split
        samples: List[Sample] = []
        not_images: List[Path] = []
        for defect_folder in sorted(p for p in split_folder.iterdir() if p.is_dir()):
            defect = defect_folder.name
            if defect == "good":
                samples += [Sample(p, 0, "good") for p in _images_in(defect_folder, not_images)]
            else:
                samples += _defect_samples(defect_folder, defect, folder / "ground_truth" / defect,
                                           lambda stem: [f"{stem}_mask"], allow_missing_masks,
                                           not_images)
        self._finish(samples, not_images, split_folder)


class BTAD(ImageDataset):
    """BTAD (beanTech): ``ROOT/NN/train/ok``, ``ROOT/NN/test/{ok,ko}``,
    ``ROOT/NN/ground_truth/ko/<stem>.png`` (images .bmp or .png, masks .png or .bmp).
    ``ROOT`` may also be the folder above ``BTech_Dataset_transformed``."""

    def __init__(self, root: PathLike, category: str, split: str = "train",
                 allow_missing_masks: bool = False):
        root = Path(root)
        if isinstance(category, str) and (root / BTAD_ARCHIVE_FOLDER).is_dir() \
                and not (root / category).is_dir():
            root = root / BTAD_ARCHIVE_FOLDER
        folder, split_folder = _split_folders(root, category, split, BTAD_CATEGORIES, "BTAD")
        self.root, self.category, self.split = root, category, split
        samples: List[Sample] = []
        not_images: List[Path] = []
        if (split_folder / "ok").is_dir():
            samples += [Sample(p, 0, "good") for p in _images_in(split_folder / "ok", not_images)]
        if split == "test" and (split_folder / "ko").is_dir():
            samples += _defect_samples(split_folder / "ko", "ko", folder / "ground_truth" / "ko",
                                       lambda stem: [stem, f"{stem}_mask"], allow_missing_masks,
                                       not_images)
        self._finish(samples, not_images, split_folder)


class ImageFolder(ImageDataset):
    """Your own data: ``normal_dir`` (good images), optional ``abnormal_dir`` (defect images)
    and ``mask_dir`` (a mask per defect image named ``<stem>.<ext>`` or ``<stem>_mask.<ext>``).
    Without ``mask_dir`` defect images have no mask. The folders must be distinct (a folder
    inside another is another folder: only the files directly in each are read)."""

    def __init__(self, normal_dir: PathLike, abnormal_dir: Optional[PathLike] = None,
                 mask_dir: Optional[PathLike] = None, allow_missing_masks: bool = False):
        folders = [("normal_dir", normal_dir), ("abnormal_dir", abnormal_dir),
                   ("mask_dir", mask_dir)]
        for argument, folder in folders:
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"{argument} {folder} does not exist")
        given = [(argument, Path(folder)) for argument, folder in folders if folder is not None]
        for (first, folder), (second, other) in itertools.combinations(given, 2):
            if folder.samefile(other):
                raise ValueError(f"{first} and {second} are the same folder {folder}: each file "
                                 f"there would play both roles; put the normal images, the "
                                 f"defect images and the masks in separate folders")
        if mask_dir is not None and abnormal_dir is None:
            raise ValueError("mask_dir is given without abnormal_dir: masks belong to defect "
                             "images")
        self.category = Path(normal_dir).name
        not_images: List[Path] = []
        samples = [Sample(p, 0, "good") for p in _images_in(Path(normal_dir), not_images)]
        if abnormal_dir is not None:
            if mask_dir is None:
                samples += [Sample(p, 1, "abnormal")
                            for p in _images_in(Path(abnormal_dir), not_images)]
            else:
                samples += _defect_samples(Path(abnormal_dir), "abnormal", Path(mask_dir),
                                           lambda stem: [stem, f"{stem}_mask"], allow_missing_masks,
                                           not_images)
        self._finish(samples, not_images, Path(normal_dir))


DatasetPair = Tuple[str, ImageDataset, ImageDataset]  # (name, train, test)


def discover_categories(kind: str, root: PathLike) -> List[str]:
    """Category folders under ``root`` (those holding ``train/`` and ``test/``), sorted."""
    root = Path(root)
    if kind == "btad" and (root / BTAD_ARCHIVE_FOLDER).is_dir():
        root = root / BTAD_ARCHIVE_FOLDER
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    found = sorted(p.name for p in root.iterdir()
                   if (p / "train").is_dir() and (p / "test").is_dir())
    if not found:
        raise ValueError(f"no category folders (with train/ and test/) under {root}")
    return found


def dataset_pairs(kind: str, root: PathLike, categories: Optional[Sequence[str]] = None
                  ) -> List[DatasetPair]:
    """``(name, train, test)`` for each category of an MVTec AD (``kind="mvtec"``) or BTAD
    (``"btad"``) root: ``categories`` (one name or a list), or all found when it is None."""
    loaders = {"mvtec": MVTecAD, "btad": BTAD}
    if kind not in loaders:
        raise ValueError(f"dataset kind {kind!r}; choose one of {sorted(loaders)}")
    if isinstance(categories, str):  # one name, not its letters
        categories = [categories]
    names = list(categories) if categories else discover_categories(kind, root)
    return [(name, loaders[kind](root, name, "train"), loaders[kind](root, name, "test"))
            for name in names]


def load_masks(dataset: ImageDataset, preprocessor: Preprocessor, original: bool = False
               ) -> Optional[np.ndarray]:
    """Ground-truth masks ``[N, H, W]`` (bool) with the detector's geometry (the crop, or in
    whole-image mode the whole resized frame; with ``original`` the images' own size): all
    False for good images. None when a defect image has no mask (pixel metrics are then
    undefined); a ValueError when the masks do not share one size."""
    if any(s.label == 1 and s.mask_path is None for s in dataset.samples):
        return None
    masks = []
    for sample in dataset.samples:
        if sample.mask_path is not None:
            masks.append(preprocessor.mask(sample.mask_path, original))
        else:
            width, height = upright_size(sample.path)
            shape = (height, width) if original else preprocessor.frame_of(width, height)
            masks.append(np.zeros(shape, bool))
    shapes = sorted({mask.shape for mask in masks})
    if len(shapes) > 1:
        raise ValueError(f"the masks of {dataset!r} have several sizes "
                         f"({', '.join(f'{w}x{h}' for h, w in shapes)}) and cannot share one "
                         "array: the images have several "
                         f"{'sizes' if original else 'aspect ratios'}; evaluate each shape apart")
    return np.stack(masks) if masks else np.zeros((0, 0, 0), bool)
