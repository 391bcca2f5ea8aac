"""The Grain GLDv2 training pipeline: batches, determinism, resume, corrupt data."""

import collections
import io
import logging
import os
import threading

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from qaff_jax.data import convert
from qaff_jax.data import pipeline
from qaff_jax.data import records
from qaff_jax.data import transforms

NUM_FILES = 4
PER_FILE = 6          # valid records per file
NUM_VALID = NUM_FILES * PER_FILE
NUM_CORRUPT = 4       # one per file, see `_write_shards`


def _jpeg(seed, h=32, w=32):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _label(shard, k):
  return shard * 10 + k


def _write_shards(root):
  """4 shards x 6 valid records (label = 10*shard + k), each with one corruption.

  shard 0: a garbage record; shard 1: a non-JPEG payload; shard 2: a flipped
  data byte (bad CRC); shard 3: a truncated tail. Every file starts valid.
  """
  os.makedirs(root, exist_ok=True)
  expected = []
  for s in range(NUM_FILES):
    framed = []
    for k in range(PER_FILE):
      label = _label(s, k)
      raw = records.make_gldv2_example(_jpeg(label), label, f"id{label:03d}", 32, 32)
      framed.append(records.encode_record(raw))
      expected.append((f"id{label:03d}", label))
    if s == 0:
      framed.insert(2, records.encode_record(b"\x0bnot an example\xff"))
    elif s == 1:
      framed.insert(3, records.encode_record(
          records.make_gldv2_example(b"GIF89a nope", 99, "bad_jpeg", 1, 1)))
    elif s == 2:
      bad = bytearray(records.encode_record(
          records.make_gldv2_example(_jpeg(999), 98, "bad_crc", 32, 32)))
      bad[40] ^= 0x10
      framed.insert(4, bytes(bad))
    else:
      cut = records.encode_record(records.make_gldv2_example(_jpeg(998), 97, "cut", 32, 32))
      framed.append(cut[: len(cut) // 3])
    with open(os.path.join(root, records.shard_name("train", s, NUM_FILES)), "wb") as f:
      f.write(b"".join(framed))
  return sorted(expected)


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gldv2_tf"))
  _write_shards(root)
  return root


@pytest.fixture(scope="module")
def ar_dir(tf_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gldv2_ar"))
  convert.convert_tfrecords_to_arrayrecord(tf_dir, root, num_shards=3)
  return root


def _cfg(train_files, **kw):
  c = ml_collections.ConfigDict(dict(
      train_files=train_files, format="auto", image_size=16, shuffle_buffer=8,
      min_scale=0.2, color_jitter=0.3, num_workers=0, class_allowlist="",
      relabel=False))
  for k, v in kw.items():
    c[k] = v
  return c


def _take(ds, n):
  it = iter(ds)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("fmt", ["tfrecord", "arrayrecord"])
def test_batch_shapes_and_dtypes(fmt, tf_dir, ar_dir):
  path = tf_dir if fmt == "tfrecord" else ar_dir
  (b,) = _take(pipeline.make_train_dataset(_cfg(path), local_batch_size=4, seed=0), 1)
  assert set(b) == {"image", "label", "skipped"}
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  assert b["skipped"].shape == (4,) and b["skipped"].dtype == np.int32


def test_same_seed_same_batches(tf_dir):
  cfg = _cfg(tf_dir)
  a = _take(pipeline.make_train_dataset(cfg, local_batch_size=4, seed=7), 4)
  b = _take(pipeline.make_train_dataset(cfg, local_batch_size=4, seed=7), 4)
  _assert_batches_equal(a, b)
  c = _take(pipeline.make_train_dataset(cfg, local_batch_size=4, seed=8), 4)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_every_corrupt_record_is_skipped_counted_and_logged(tf_dir, caplog):
  # One file at a time and no window: the first NUM_VALID elements are exactly
  # epoch 1, and the next one carries any corrupt records left at its end.
  cfg = _cfg(tf_dir, shuffle_buffer=0, cycle_length=1)
  with caplog.at_level(logging.WARNING, logger="qaff_jax.data.pipeline"):
    batches = _take(pipeline.make_train_dataset(cfg, local_batch_size=1, seed=3),
                    NUM_VALID + 1)
  labels = [int(b["label"][0]) for b in batches[:NUM_VALID]]
  assert sorted(labels) == sorted(_label(s, k) for s in range(NUM_FILES)
                                  for k in range(PER_FILE))
  assert sum(int(b["skipped"].sum()) for b in batches) == NUM_CORRUPT
  text = caplog.text
  for s in range(NUM_FILES):
    assert records.shard_name("train", s, NUM_FILES) in text
  assert "bad data checksum" in text and "truncated" in text
  assert "not a tf.train.Example" in text and "'bad_jpeg'" in text


@pytest.mark.parametrize("fmt", ["tfrecord", "arrayrecord"])
def test_checkpoint_resume_gives_exact_next_batch(fmt, tf_dir, ar_dir, tmp_path):
  path = tf_dir if fmt == "tfrecord" else ar_dir
  ds = pipeline.make_train_dataset(_cfg(path), local_batch_size=4, seed=11)
  it = iter(ds)
  for _ in range(5):  # an epoch is 6 batches: resume crosses the epoch boundary
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  it.close()

  fresh = iter(pipeline.make_train_dataset(_cfg(path), local_batch_size=4, seed=11))
  mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal([next(fresh) for _ in range(3)], expected)
  fresh.close()
  mngr.close()


def test_process_split_takes_disjoint_files(tf_dir):
  seen = []
  for p in range(2):
    ds = pipeline.make_train_dataset(_cfg(tf_dir), local_batch_size=4, seed=0,
                                     process_index=p, process_count=2)
    labels = np.concatenate([b["label"] for b in _take(ds, 6)])
    seen.append(set((labels // 10).tolist()))
  assert seen[0] == {0, 2} and seen[1] == {1, 3}
  with pytest.raises(ValueError, match="got no TFRecord file") as e:
    pipeline.make_train_dataset(_cfg(tf_dir), local_batch_size=4, seed=0,
                                process_index=4, process_count=5)
  assert tf_dir in str(e.value)


def _rows(batch):
  """A batch as a sorted list of (label, image bytes): the set of examples."""
  return sorted((int(l), img.tobytes()) for l, img in zip(batch["label"], batch["image"]))


def test_arrayrecord_global_batches_do_not_depend_on_the_process_count(tf_dir, tmp_path):
  """Each global batch (the union of the processes' local batches) is the
  same examples, augmented the same way, for 1, 2 or 4 processes (on records
  that all decode: a skipped record shifts only its own process's stream)."""
  ar_dir = str(tmp_path / "clean")
  convert.convert_tfrecords_to_arrayrecord(tf_dir, ar_dir, num_shards=3, check_images=True)
  global_batch, steps = 8, 4
  single = _take(pipeline.make_train_dataset(_cfg(ar_dir), local_batch_size=global_batch,
                                             seed=5), steps)
  for count in (2, 4):
    local = [_take(pipeline.make_train_dataset(
        _cfg(ar_dir), local_batch_size=global_batch // count, seed=5, process_index=p,
        process_count=count), steps) for p in range(count)]
    for t in range(steps):
      union = {k: np.concatenate([local[p][t][k] for p in range(count)]) for k in ("label", "image")}
      assert _rows(union) == _rows(single[t]), f"{count} processes, step {t}"


@pytest.mark.parametrize("relabel", [False, True])
def test_class_allowlist(relabel, tf_dir, tmp_path):
  allowed = [30, 1, 0, 11, 10]
  path = tmp_path / "allow.txt"
  path.write_text("# RGLDv2 kept labels\n" + "\n".join(map(str, allowed)) + "\n\n")
  assert pipeline.read_class_allowlist(str(path)) == sorted(allowed)
  # Full-image crops at the stored size and no jitter: each output image is
  # its source image or its mirror, which identifies the original label.
  cfg = _cfg(tf_dir, class_allowlist=str(path), relabel=relabel, shuffle_buffer=0,
             image_size=32, min_scale=1.0, color_jitter=0.0)
  batches = _take(pipeline.make_train_dataset(cfg, local_batch_size=5, seed=0), 4)
  originals = {lab: transforms.decode_image(_jpeg(lab)) for lab in allowed}
  want = {lab: (sorted(allowed).index(lab) if relabel else lab) for lab in allowed}
  seen = set()
  for b in batches:
    for img, got in zip(b["image"], b["label"]):
      (src,) = [lab for lab, o in originals.items()
                if np.array_equal(img, o) or np.array_equal(img, o[:, ::-1])]
      assert got == want[src]
      seen.add(src)
  assert seen == set(allowed)
  assert pipeline.num_classes(_cfg(tf_dir, class_allowlist=str(path), relabel=relabel,
                                   num_classes=81313)) == (5 if relabel else 81313)


def test_missing_or_empty_path_raises(tmp_path):
  for pattern in [str(tmp_path / "nope" / "train-*"), str(tmp_path)]:
    with pytest.raises(FileNotFoundError, match="no shard matched") as e:
      pipeline.make_train_dataset(_cfg(pattern), local_batch_size=2, seed=0)
    assert pattern in str(e.value)


def test_resolve_files_forms_and_format_detection(tf_dir, ar_dir):
  files = pipeline.resolve_files(tf_dir)
  assert len(files) == NUM_FILES
  assert pipeline.resolve_files(os.path.join(tf_dir, "train-*")) == files
  assert pipeline.resolve_files(",".join(files[:2])) == files[:2]
  assert pipeline.detect_format(files) == "tfrecord"
  ar_files = pipeline.resolve_files(ar_dir)
  assert len(ar_files) == 3 and pipeline.detect_format(ar_files) == "arrayrecord"
  with pytest.raises(ValueError, match="mixes"):
    pipeline.detect_format(files + ar_files)


def test_arrayrecord_conversion_keeps_ids_and_labels(tf_dir, tmp_path, capsys):
  out = str(tmp_path / "ar")
  assert convert.main(["--input", tf_dir, "--output", out, "--num_shards", "2"]) == 0
  summary = capsys.readouterr().out
  # garbage record, bad CRC and truncated tail are skipped; the non-JPEG
  # record is a valid Example and only fails at decode time.
  assert f"{NUM_VALID + 1} records written to 2 ArrayRecord shard(s)" in summary
  assert "3 corrupt record(s) skipped" in summary

  def ids(raws):
    return sorted((r.image_id, r.label) for r in map(records.parse_gldv2_example, raws)
                  if r.image_id != "bad_jpeg")

  tf_raws = [raw for f in pipeline.resolve_files(tf_dir)
             for raw in records.iter_tfrecord_skipping(f)]
  tf_raws = [r for r in tf_raws if _parses(r)]
  source = pipeline.ArrayRecordSource(pipeline.resolve_files(out))
  ar_raws = [source[i]["raw"] for i in range(len(source))]
  assert len(ar_raws) == NUM_VALID + 1
  assert ids(ar_raws) == ids(tf_raws)
  assert len(ids(ar_raws)) == NUM_VALID

  with pytest.raises(FileExistsError):
    convert.convert_tfrecords_to_arrayrecord(tf_dir, out)
  stats = convert.convert_tfrecords_to_arrayrecord(tf_dir, out, check_images=True,
                                                   overwrite=True)
  assert (stats.records_written, stats.records_skipped) == (NUM_VALID, NUM_CORRUPT)
  assert len(pipeline.resolve_files(out)) == NUM_FILES

  # Reading them back through the pipeline: one epoch = the same labels.
  cfg = _cfg(out, shuffle_buffer=0)
  batches = _take(pipeline.make_train_dataset(cfg, local_batch_size=1, seed=5), NUM_VALID)
  labels = collections.Counter(int(b["label"][0]) for b in batches)
  assert labels == collections.Counter(label for _, label in ids(tf_raws))


def _parses(raw):
  try:
    records.parse_gldv2_example(raw)
    return True
  except ValueError:
    return False


def test_multiprocess_workers_resume(tf_dir):
  cfg = _cfg(tf_dir, num_workers=2)
  ds = pipeline.make_train_dataset(cfg, local_batch_size=4, seed=1)
  it = iter(ds)
  first = next(it)
  assert first["image"].shape == (4, 16, 16, 3)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  fresh = iter(pipeline.make_train_dataset(cfg, local_batch_size=4, seed=1))
  fresh.set_state(state)
  _assert_batches_equal([next(fresh) for _ in range(2)], expected)
  fresh.close()


# --------------------------------------------------------------------------
# Data that can never yield a batch fails instead of spinning.


def _within(fn, timeout=120):
  """Runs `fn()` in a daemon thread; fails (rather than hangs) past `timeout`.

  Returns ('value', result) or ('error', exception).
  """
  out = {}

  def target():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), f"still running after {timeout}s (busy loop?)"
  return next(iter(out.items()))


def _build_and_take(cfg, n=1, batch=2):
  """Builds the dataset and takes `n` batches (a regression would spin here)."""
  return _take(pipeline.make_train_dataset(cfg, local_batch_size=batch, seed=0), n)


def test_all_shards_empty_fails_at_construction(tmp_path):
  names = [records.shard_name("train", s, 6) for s in range(6)]
  for name in names:
    (tmp_path / name).write_bytes(b"")
  kind, err = _within(lambda: _build_and_take(_cfg(str(tmp_path))), timeout=60)
  assert kind == "error" and isinstance(err, ValueError), (kind, err)
  msg = str(err)
  assert msg.startswith("no record in any of the 6 shards: ")
  assert names[0] in msg and names[3] in msg and "(+2 more)" in msg
  # Construction alone raises: before any iterator or step exists.
  with pytest.raises(ValueError, match="no record in any of the 6 shards"):
    pipeline.make_train_dataset(_cfg(str(tmp_path)), local_batch_size=2, seed=0)


def test_shards_without_a_readable_record_header_fail_at_construction(tmp_path):
  good = records.encode_record(records.make_gldv2_example(_jpeg(1), 1, "id001", 32, 32))
  (tmp_path / "train-00000-of-00003").write_bytes(b"")
  (tmp_path / "train-00001-of-00003").write_bytes(good[:5])  # cut-off header
  (tmp_path / "train-00002-of-00003").write_bytes(good[:40])  # cut-off record
  kind, err = _within(lambda: _build_and_take(_cfg(str(tmp_path))), timeout=60)
  assert kind == "error" and isinstance(err, ValueError), (kind, err)
  assert "no record in any of the 3 shards" in str(err)
  assert "train-00002-of-00003" in str(err)


def test_process_with_only_empty_shards_fails(tf_dir, tmp_path):
  # Process 1 of 2 gets files 1 and 3: make those empty copies.
  for s in range(NUM_FILES):
    name = records.shard_name("train", s, NUM_FILES)
    data = b"" if s % 2 else open(os.path.join(tf_dir, name), "rb").read()
    (tmp_path / name).write_bytes(data)
  with pytest.raises(ValueError, match="no record in any of the 2 shards of process 1 of 2"):
    pipeline.make_train_dataset(_cfg(str(tmp_path)), local_batch_size=2, seed=0,
                                process_index=1, process_count=2)
  kind, value = _within(lambda: _take(pipeline.make_train_dataset(
      _cfg(str(tmp_path)), local_batch_size=2, seed=0, process_index=0,
      process_count=2), 3))
  assert kind == "value", value


@pytest.mark.parametrize("fmt", ["tfrecord", "arrayrecord"])
def test_some_empty_shards_still_train(fmt, tf_dir, ar_dir, tmp_path, caplog):
  src = tf_dir if fmt == "tfrecord" else ar_dir
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f:
      (tmp_path / name).write_bytes(f.read())
  ext = ".array_record" if fmt == "arrayrecord" else ""
  empty = [f"train-{90 + i:05d}-of-00099{ext}" for i in range(3)]
  for name in empty:
    (tmp_path / name).write_bytes(b"")
  with caplog.at_level(logging.WARNING, logger="qaff_jax.data.pipeline"):
    kind, batches = _within(lambda: _build_and_take(_cfg(str(tmp_path)), n=8, batch=4))
  assert kind == "value", batches
  assert len(batches) == 8
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3) and b["label"].shape == (4,)
  labels = set(np.concatenate([b["label"] for b in batches]).tolist())
  assert labels <= {_label(s, k) for s in range(NUM_FILES) for k in range(PER_FILE)}
  assert "3 of" in caplog.text and empty[0] in caplog.text


def test_all_arrayrecord_shards_empty_fails(tmp_path):
  for s in range(2):
    (tmp_path / f"train-{s:05d}-of-00002.array_record").write_bytes(b"")
  with pytest.raises(ValueError, match="no record in any of the 2 shards") as e:
    pipeline.make_train_dataset(_cfg(str(tmp_path)), local_batch_size=2, seed=0)
  assert "train-00001-of-00002.array_record" in str(e.value)


def test_all_corrupt_records_error_names_files_and_last_record(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_SKIPS", 50)
  bad = records.encode_record(records.make_gldv2_example(b"GIF89a nope", 5, "bad_jpeg", 1, 1))
  for s in range(2):
    (tmp_path / records.shard_name("train", s, 2)).write_bytes(bad * 3)
  cfg = _cfg(str(tmp_path), shuffle_buffer=0)
  kind, err = _within(lambda: _build_and_take(cfg), timeout=60)
  assert kind == "error" and isinstance(err, RuntimeError), (kind, err)
  msg = str(err)
  assert "50 records in a row were corrupt (50)" in msg
  assert "last corrupt record: " in msg and "'bad_jpeg'" in msg
  assert records.shard_name("train", 0, 2) in msg and records.shard_name("train", 1, 2) in msg
  assert "2 shard(s)" in msg
