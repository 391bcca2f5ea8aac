"""TFRecord framing, CRCs, GLDv2 Examples, corrupt-record handling, transforms."""

import io
import os
import struct

import google_crc32c
import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import records
from qaff_jax.data import transforms


def _jpeg(h=32, w=32, seed=0, mode="RGB", fmt="JPEG"):
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(arr).convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def _example(i, label=None):
  return records.make_gldv2_example(_jpeg(seed=i), label=i if label is None else label,
                                    image_id=f"img{i:04d}", height=32, width=32)


# --------------------------------------------------------------------------
# CRC and framing.


def test_crc32c_known_vector():
  assert google_crc32c.value(b"123456789") == 0xE3069283


def test_masked_crc_formula():
  crc = 0xE3069283
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert records.masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) & 0xFFFFFFFF
  assert records.masked_crc32c(b"123456789") == 0xC78AB0E5  # worked by hand


def test_encode_record_layout():
  data = b"hello tfrecord"
  framed = records.encode_record(data)
  assert len(framed) == 8 + 4 + len(data) + 4
  (length,) = struct.unpack("<Q", framed[:8])
  assert length == len(data)
  assert struct.unpack("<I", framed[8:12])[0] == records.masked_crc32c(framed[:8])
  assert framed[12:-4] == data
  assert struct.unpack("<I", framed[-4:])[0] == records.masked_crc32c(data)


def test_write_and_iterate_roundtrip(tmp_path):
  path = tmp_path / "train-00000-of-00001"
  payloads = [b"", b"a", os.urandom(1000), b"x" * 70000]
  assert records.write_tfrecord(path, payloads) == 4
  assert not os.path.exists(str(path) + ".tmp")
  assert list(records.iter_tfrecord(path)) == payloads
  assert list(records.iter_tfrecord_skipping(path)) == payloads


def test_shard_name():
  assert records.shard_name("train", 3, 128) == "train-00003-of-00128"


# --------------------------------------------------------------------------
# GLDv2 Examples.


def test_gldv2_example_roundtrip_all_features(tmp_path):
  enc = _jpeg(24, 40, seed=3)
  raw = records.make_gldv2_example(enc, label=81312, image_id="6e1b5c1b0d1c9a2f",
                                   height=24, width=40, channels=3,
                                   image_format="JPEG", colorspace="RGB")
  path = tmp_path / "train-00000-of-00001"
  records.write_tfrecord(path, [raw])
  (back,) = list(records.iter_tfrecord(path))
  assert back == raw
  rec = records.parse_gldv2_example(back)
  assert rec == records.ImageRecord(encoded=enc, label=81312,
                                    image_id="6e1b5c1b0d1c9a2f", height=24, width=40)
  feat = records.Example.FromString(back).features.feature
  assert set(feat.keys()) == {
      "image/height", "image/width", "image/colorspace", "image/channels",
      "image/format", "image/id", "image/encoded", "image/class/label"}
  assert feat["image/channels"].int64_list.value[0] == 3
  assert feat["image/format"].bytes_list.value[0] == b"JPEG"
  assert feat["image/colorspace"].bytes_list.value[0] == b"RGB"
  assert feat["image/height"].int64_list.value[0] == 24
  assert feat["image/width"].int64_list.value[0] == 40


def test_parse_rejects_garbage_and_missing_features():
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    records.parse_gldv2_example(b"\xff\xfe garbage \x00\x01")
  ex = records.Example()
  ex.features.feature["image/id"].bytes_list.value.append(b"x")
  ex.features.feature["image/class/label"].int64_list.value.append(1)
  with pytest.raises(ValueError, match="image/encoded"):
    records.parse_gldv2_example(ex.SerializeToString())


def test_object_boxes_roundtrip_and_default_bytes():
  enc = _jpeg(24, 40, seed=5)
  plain = records.make_gldv2_example(enc, 3, "id", 24, 40)
  assert records.make_gldv2_example(enc, 3, "id", 24, 40, boxes=None) == plain
  assert records.parse_object_boxes(plain).shape == (0, 4)
  assert records.parse_object_boxes(plain).dtype == np.float32
  boxes = [[0.1, 0.2, 0.35, 0.6], [0.0, 0.0, 1.0, 1.0]]
  raw = records.make_gldv2_example(enc, 3, "id", 24, 40, boxes=boxes)
  got = records.parse_object_boxes(raw)
  assert got.dtype == np.float32 and got.shape == (2, 4)
  np.testing.assert_array_equal(got, np.float32(boxes))
  # The TF Object Detection features, and the GLDv2 reader ignores them.
  feat = records.Example.FromString(raw).features.feature
  assert list(feat["image/object/bbox/xmin"].float_list.value) == list(np.float32([0.1, 0.0]))
  assert list(feat["image/object/bbox/ymax"].float_list.value) == list(np.float32([0.6, 1.0]))
  assert records.parse_gldv2_example(raw) == records.parse_gldv2_example(plain)
  assert records.parse_object_boxes(
      records.make_gldv2_example(enc, 3, "id", 24, 40, boxes=np.zeros((0, 4)))).shape == (0, 4)


def test_object_boxes_rejected():
  enc = _jpeg(8, 8)
  for boxes, pattern in [([[0.1, 0.2, 0.3]], r"\[n, 4\]"), ([[0.1, 0.2, 1.5, 0.4]], r"\[0, 1\]"),
                         ([[0.5, 0.2, 0.3, 0.4]], "xmin <= xmax"),
                         ([[0.1, float("nan"), 0.3, 0.4]], r"\[0, 1\]")]:
    with pytest.raises(ValueError, match=pattern):
      records.make_gldv2_example(enc, 0, "id", 8, 8, boxes=boxes)
  ex = records.Example()
  ex.features.feature["image/object/bbox/xmin"].float_list.value.extend([0.1, 0.2])
  ex.features.feature["image/object/bbox/xmax"].float_list.value.append(0.3)
  with pytest.raises(ValueError, match="unequal lengths"):
    records.parse_object_boxes(ex.SerializeToString())
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    records.parse_object_boxes(b"\xff\xfe garbage")


# --------------------------------------------------------------------------
# Corrupt files.


def _write_raw(path, chunks):
  with open(path, "wb") as f:
    for c in chunks:
      f.write(c)


def _read_all_skipping(path):
  errors = []
  got = list(records.iter_tfrecord_skipping(path, errors.append))
  return got, errors


def test_flipped_data_byte_is_skipped_and_reading_continues(tmp_path):
  recs = [_example(i) for i in range(3)]
  bad = bytearray(records.encode_record(recs[1]))
  bad[12 + 100] ^= 0x40  # inside the data
  path = tmp_path / "f"
  _write_raw(path, [records.encode_record(recs[0]), bytes(bad),
                    records.encode_record(recs[2])])
  with pytest.raises(records.RecordChecksumError, match="bad data checksum"):
    list(records.iter_tfrecord(path))
  got, errors = _read_all_skipping(path)
  assert got == [recs[0], recs[2]]
  assert len(errors) == 1 and isinstance(errors[0], records.RecordChecksumError)


def test_truncated_tail_ends_file_and_counts_one(tmp_path):
  recs = [_example(i) for i in range(3)]
  path = tmp_path / "f"
  last = records.encode_record(recs[2])
  _write_raw(path, [records.encode_record(recs[0]), records.encode_record(recs[1]),
                    last[: len(last) // 2]])
  got, errors = _read_all_skipping(path)
  assert got == recs[:2]
  assert len(errors) == 1
  assert not isinstance(errors[0], records.RecordChecksumError)
  assert "truncated" in str(errors[0])


def test_truncated_header_and_bad_length_crc(tmp_path):
  r0 = records.encode_record(b"ok")
  path = tmp_path / "hdr"
  _write_raw(path, [r0, b"\x01\x02\x03"])
  got, errors = _read_all_skipping(path)
  assert got == [b"ok"] and len(errors) == 1

  bad = bytearray(records.encode_record(b"payload"))
  bad[9] ^= 0x01  # length CRC
  path = tmp_path / "len"
  _write_raw(path, [r0, bytes(bad), r0])
  with pytest.raises(records.CorruptRecordError, match="length checksum"):
    list(records.iter_tfrecord(path))
  got, errors = _read_all_skipping(path)
  assert got == [b"ok"] and len(errors) == 1  # the rest of the file is lost


def test_garbage_and_non_jpeg_records_fail_parse_or_decode(tmp_path):
  path = tmp_path / "f"
  non_jpeg = records.make_gldv2_example(b"this is not a jpeg", 1, "nj", 1, 1)
  records.write_tfrecord(path, [b"garbage bytes \x00\xff", non_jpeg])
  garbage, nj = list(records.iter_tfrecord(path))  # framing is fine
  with pytest.raises(ValueError):
    records.parse_gldv2_example(garbage)
  rec = records.parse_gldv2_example(nj)
  with pytest.raises(ValueError, match="undecodable"):
    transforms.decode_image(rec.encoded)


# --------------------------------------------------------------------------
# Transforms.


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"),
                                      ("RGBA", "PNG"), ("P", "PNG")])
def test_decode_image_converts_to_rgb(mode, fmt):
  img = transforms.decode_image(_jpeg(20, 30, mode=mode, fmt=fmt))
  assert img.shape == (20, 30, 3) and img.dtype == np.uint8


def test_decode_image_rejects_truncated_jpeg():
  with pytest.raises(ValueError):
    transforms.decode_image(_jpeg(64, 64)[:100])
  with pytest.raises(ValueError):
    transforms.decode_image(b"")


def test_random_resized_crop_shapes_and_determinism():
  img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  a = transforms.random_resized_crop(img, 16, np.random.default_rng(1))
  b = transforms.random_resized_crop(img, 16, np.random.default_rng(1))
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  for s in range(50):
    top, left, h, w = transforms.random_resized_crop_params(
        40, 60, np.random.default_rng(s), scale=(0.2, 1.0))
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
    assert 0.2 * 2400 * 0.9 <= h * w <= 2400


def test_random_resized_crop_fallback_is_center_crop():
  # A 1x100 strip can never fit a 3/4..4/3 box of >= 20% area: fallback.
  top, left, h, w = transforms.random_resized_crop_params(
      4, 100, np.random.default_rng(0), scale=(0.9, 1.0))
  assert (h, w) == (4, round(4 * 4 / 3)) and top == 0 and left == (100 - w) // 2


def test_flip_jitter_resize_and_normalize():
  img = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
  flipped = transforms.random_flip(img, np.random.default_rng(0), p=1.0)
  np.testing.assert_array_equal(flipped, img[:, ::-1])
  assert transforms.random_flip(img, np.random.default_rng(0), p=0.0) is img
  assert transforms.color_jitter(img, np.random.default_rng(0)) is img
  j = transforms.color_jitter(img, np.random.default_rng(0), 0.4, 0.4, 0.4)
  assert j.shape == img.shape and j.dtype == np.uint8
  assert transforms.resize_long_side(img, 10).shape == (5, 10, 3)
  assert transforms.resize_long_side(img, 40) is img
  assert transforms.resize_long_side(img, 40, upscale=True).shape == (20, 40, 3)
  assert transforms.center_crop_resize(img, 8).shape == (8, 8, 3)
  x = transforms.normalize(img)
  assert x.dtype == np.float32
  np.testing.assert_allclose(
      x[0, 0], (img[0, 0] / 255.0 - np.array([0.485, 0.456, 0.406]))
      / np.array([0.229, 0.224, 0.225]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(transforms.normalize_jnp(img)), x,
                             rtol=1e-6, atol=1e-5)
