"""Bad and awkward inputs give a one-line reason naming the file; usable ones come back as RGB uint8."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from morphfuse.imageio import (BadImageError, binarize_prob, prob_to_uint8, read_image, read_mask, read_prob_mask,
                               write_png, write_prob_mask)


@pytest.mark.parametrize("kind, words", [
    ("corrupt_jpeg", "corrupt"), ("truncated_png", "truncated"), ("zero_byte", "empty"),
    ("text_as_jpg", "not an image"), ("bomb", "decompression-bomb"),
])
def test_unusable_files_raise_a_one_line_reason(bad_inputs, kind, words):
    with pytest.raises(BadImageError) as ei:
        read_image(bad_inputs[kind])
    msg = str(ei.value)
    assert str(bad_inputs[kind]) in msg and words in msg.lower() and "\n" not in msg


@pytest.mark.parametrize("kind", ["grayscale", "png16", "rgba", "cmyk", "good"])
def test_convertible_files_come_back_rgb_uint8(bad_inputs, kind):
    img = read_image(bad_inputs[kind])
    ref = np.asarray(Image.open(bad_inputs["good"]).convert("RGB"))
    assert img.dtype == np.uint8 and img.shape == ref.shape
    if kind == "png16":  # 16-bit green channel scaled back to 8 bits exactly
        assert np.array_equal(img[..., 0], ref[..., 1])
    if kind == "rgba":  # alpha dropped, colours kept
        assert np.array_equal(img, ref)


def test_exif_rotated_photo_is_turned_as_viewers_show_it(bad_inputs):
    img = read_image(bad_inputs["exif_rotated"])
    ref = read_image(bad_inputs["good"])
    assert img.shape == ref.shape  # portrait again
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 4  # same picture up to JPEG re-encoding


def test_probability_masks_round_trip_and_binarise_at_128(tmp_path):
    p = np.array([[0.0, 0.4999, 0.5, 0.50196, 1.0]])
    write_prob_mask(tmp_path / "m.png", p)
    v = np.asarray(Image.open(tmp_path / "m.png"))
    assert v.dtype == np.uint8 and v.ndim == 2
    assert v.tolist() == [[0, 127, 128, 128, 255]]
    assert binarize_prob(v, 0.5).tolist() == [[False, False, True, True, True]]
    assert np.allclose(read_prob_mask(tmp_path / "m.png"), v / 255.0)
    assert prob_to_uint8(np.array([0.5])).tolist() == [128]


def test_mask_size_is_checked(tmp_path):
    write_png(tmp_path / "gt.png", np.full((4, 6), 200, np.uint8))
    assert read_mask(tmp_path / "gt.png").all()
    with pytest.raises(BadImageError, match="mask is 6x4 but its image is 5x4"):
        read_mask(tmp_path / "gt.png", expected_hw=(4, 5))


def test_writes_are_atomic_no_temp_left_behind(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((3, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(TypeError):
        write_png(tmp_path / "b.png", np.zeros((3, 3), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
