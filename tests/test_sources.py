"""Image sources: folders as fit and predict read them."""
import logging

import numpy as np
import pytest
from PIL import Image

from knnad.decoding import decode_batch
from knnad.preprocessing import ImageLoadError, Preprocessor
from knnad.sources import batches, image_items


def test_a_broken_link_in_an_image_folder_is_an_unreadable_image(tmp_path, caplog):
    """A symbolic link to a file that is gone is listed with the folder's images: on_error
    'raise' names it, 'skip' warns and lists it (issue #21; it was left out without a word)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    items = image_items(folder, "predict data")
    assert items == [folder / "a.png", folder / "gone.png"]
    preprocessor = Preprocessor(32, 32)
    with pytest.raises(ImageLoadError,
                       match=r"gone.png: a broken symbolic link to .*moved.*restore"):
        list(batches(items, preprocessor, 4, "raise"))
    with caplog.at_level(logging.WARNING):
        loaded = list(batches(items, preprocessor, 4, "skip"))
    assert loaded[0].paths == [str(folder / "a.png")]
    assert loaded[0].skipped == [str(folder / "gone.png")]
    assert "gone.png" in caplog.text


def test_decoding_for_ray_needs_a_fixed_frame(tmp_path):
    """A whole-image preprocessor before fit has no frame to decode into: a ValueError that
    says so (it was a TypeError about unpacking None)."""
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    batch = {"path": np.array([str(tmp_path / "a.png")])}
    with pytest.raises(ValueError, match="decode_batch needs the frame of the model's images"):
        decode_batch(batch, Preprocessor(32, None))
    assert decode_batch(batch, Preprocessor(32, 32))["image"].shape == (1, 3, 32, 32)
