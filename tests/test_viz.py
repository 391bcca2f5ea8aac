"""Fusion-weight statistics (evaluation.fusion_stats) and pictures (viz.fusion)."""

import glob
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from qaff_jax import train_lib
from qaff_jax.data import demo, revisited
from qaff_jax.evaluation import fusion_stats
from qaff_jax.viz import fusion
from test_train import SMALL, tiny_config

SCALES = (0.5,)
# grid 2, one scale: K = 1 + 4 + 1 = 6. Rows: global-, region-, scale-heavy,
# and one whose largest single weight ties between global and regional.
W = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
              [0.1, 0.3, 0.2, 0.1, 0.1, 0.2],
              [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
              [0.2, 0.2, 0.2, 0.1, 0.1, 0.2]])


def _h(*ps):
  return -sum(p * math.log(p) for p in ps)


def test_fusion_summary_matches_hand_computed_values():
  s = fusion_stats.fusion_summary(W, 2, SCALES)
  assert s["labels"] == ["global", "r0c0", "r0c1", "r1c0", "r1c1", "x0.5"]
  assert s["num_images"] == 4 and s["num_features"] == 6
  for t, want in (("global", 0.225), ("regional", 0.525), ("scale", 0.25)):
    assert s["type_mean"][t] == pytest.approx(want)
  # global totals 0.5, 0.1, 0.1, 0.2: squared deviations sum to 0.1075.
  assert s["type_std"]["global"] == pytest.approx(math.sqrt(0.1075 / 4))
  assert s["type_std"]["regional"] == pytest.approx(math.sqrt(0.0675 / 4))
  ents = [_h(0.5, *[0.1] * 5), _h(0.3, 0.2, 0.2, 0.1, 0.1, 0.1),
          _h(0.5, *[0.1] * 5), _h(*[0.2] * 4, 0.1, 0.1)]
  assert s["entropy_mean"] == pytest.approx(np.mean(ents))
  assert s["entropy_max"] == pytest.approx(math.log(6))
  assert s["entropy_ratio"] == pytest.approx(np.mean(ents) / math.log(6))
  assert s["argmax_type_fraction"] == pytest.approx(
      {"global": 0.25, "regional": 0.5, "scale": 0.25})
  # Row 4's largest weight (0.2) ties; the earlier feature (global) wins.
  assert s["argmax_component_fraction"] == pytest.approx(
      {"global": 0.5, "regional": 0.25, "scale": 0.25})
  np.testing.assert_allclose(s["regional_map"], [[0.175, 0.15], [0.1, 0.1]])
  np.testing.assert_allclose(s["component_mean"], W.mean(0))
  json.dumps(s)  # plain floats / lists
  md = fusion_stats.format_fusion_summary(s)
  assert "| global | 1 | 0.2250 |" in md and "| r0 | 0.1750 | 0.1500 |" in md

  uniform = fusion_stats.fusion_summary(np.full((3, 6), 1 / 6), 2, SCALES)
  assert uniform["entropy_ratio"] == pytest.approx(1.0)
  assert uniform["type_std"]["global"] == pytest.approx(0.0)
  with pytest.raises(ValueError, match=r"expected \[N, 6\]"):
    fusion_stats.fusion_summary(W[:, :5], 2, SCALES)


def _redness(pixel):
  return int(pixel[0]) - int(pixel[2])


def test_render_image_size_and_heat_colours():
  img = np.full((90, 120, 3), 128, np.uint8)
  w = np.full(1 + 9 + 3, 0.05)
  w[1 + 5] = 0.3      # cell (1, 2) highest
  w[1 + 0] = 0.01     # cell (0, 0) lowest
  w /= w.sum()
  scales = (0.5, 0.75, 1.5)
  pic = fusion.render_image(img, w, 3, scales, display_side=None)
  assert pic.mode == "RGB"
  assert pic.size == (120 + fusion.STRIP_WIDTH,
                      max(90, fusion.strip_height(3, scales, False)))
  px = np.asarray(pic)
  # A point a quarter into each cell (away from the printed number).
  sample = {(r, c): px[r * 30 + 7, c * 40 + 9] for r in range(3)
            for c in range(3)}
  hot = _redness(sample[(1, 2)])
  assert hot > 50
  assert all(hot > _redness(v) for k, v in sample.items() if k != (1, 2))
  assert _redness(sample[(0, 0)]) < -50    # lowest cell is blue
  # The image is resized to display_side on its long side.
  big = fusion.render_image(img, w, 3, scales, title="x", display_side=240)
  assert big.size == (240 + fusion.STRIP_WIDTH,
                      max(180, fusion.strip_height(3, scales, True)))
  with pytest.raises(ValueError, match="expected 13"):
    fusion.render_image(img, w[:12], 3, scales)


def test_render_image_draws_the_object_box():
  img = np.full((90, 120, 3), 128, np.uint8)
  w = np.full(1 + 9 + 1, 1 / 11)
  green = list(fusion.BOX_COLOR)
  pic = np.asarray(fusion.render_image(img, w, 3, SCALES, display_side=None,
                                       box=(0.25, 0.2, 0.75, 0.8)))
  # Left / right edges at x = 30 / 90, top / bottom at y = 18 / 72.
  assert pic[45, 30].tolist() == green and pic[45, 90].tolist() == green
  assert pic[18, 60].tolist() == green and pic[72, 60].tolist() == green
  assert pic[45, 60].tolist() != green and pic[5, 5].tolist() != green
  plain = np.asarray(fusion.render_image(img, w, 3, SCALES, display_side=None))
  nan = np.asarray(fusion.render_image(img, w, 3, SCALES, display_side=None,
                                       box=[math.nan] * 4))
  assert plain[45, 30].tolist() != green
  np.testing.assert_array_equal(plain, nan)
  # Gallery thumbnails carry the box too (and a NaN row draws none).
  imgs = [img, img]
  boxes = np.array([[0.0, 0.0, 1.0, 1.0], [math.nan] * 4])
  gal = np.asarray(fusion.render_gallery(imgs, W[:2], 2, SCALES, n=2,
                                         thumb=64, boxes=boxes))
  assert (gal == green).all(axis=-1).any()
  gal_plain = np.asarray(fusion.render_gallery(imgs, W[:2], 2, SCALES, n=2,
                                               thumb=64))
  assert not (gal_plain == green).all(axis=-1).any()


def test_gallery_order_and_revisited_spec():
  g, r = fusion.gallery_indices(W, 2, 2)
  assert list(g) == [0, 3] and list(r) == [1, 3]
  assert fusion.parse_revisited("revisited:/d:x:roxford5k:5") == (
      "/d:x", "roxford5k", 5)
  assert fusion.parse_revisited("revisited:/d:rparis6k") == (
      "/d", "rparis6k", None)
  with pytest.raises(ValueError):
    fusion.parse_revisited("revisited:nothing")
  imgs = [np.full((20, 30, 3), v, np.uint8) for v in (0, 80, 160, 240)]
  pic = fusion.render_gallery([lambda im=im: im for im in imgs], W, 2, SCALES,
                              n=3, thumb=64)
  assert pic.size[0] == 8 + 3 * (64 + 8)


def test_cli_on_a_tiny_trained_qaff_run(tmp_path):
  root = str(tmp_path / "demo")
  paths = demo.generate(root, SMALL)
  config = tiny_config(root, **{"total_steps": 2, "model.head": "qaff", "eval.at_end": True})
  # Plain-GeM global feature: the pictures do not depend on it, and it halves
  # the train step's compile time.
  config.model.qaff.update(dict(global_pool="gem", mlp_hidden=8,
                                scales=(0.5, 1.5)))
  workdir = str(tmp_path / "run")
  out = train_lib.train_and_evaluate(config, workdir)

  # The end-of-training evaluation keeps QAFF's per-image fusion weights with the
  # descriptors (one cache, image ids included) and summarises them in the report.
  from qaff_jax.evaluation import runner
  cache = runner.descriptor_cache(workdir)
  (db_file,) = [f for f in os.listdir(cache) if f.startswith("demo_db_")]
  with np.load(os.path.join(cache, db_file), allow_pickle=False) as z:
    assert z["fusion_weights"].shape == (len(z["ids"]), 12)
    np.testing.assert_allclose(z["fusion_weights"].sum(1), 1.0, atol=1e-5)
  assert out["eval"]["demo"]["fusion"]["num_features"] == 12
  with open(os.path.join(runner.latest_report(workdir), "report.md")) as f:
    assert "## QAFF fusion weights: demo" in f.read()

  # An object sidecar for the first database images: an object with a box,
  # a scene, an object with the whole image as box; the 4th is not listed.
  ds = revisited.RevisitedDataset(paths["test_root"], "demo")
  entries = {}
  for i, (kind, frac) in enumerate([("object", (0.0, 0.0, 0.5, 0.5)),
                                    ("scene", None),
                                    ("object", (0.0, 0.0, 1.0, 1.0))]):
    with Image.open(ds.db_path(i)) as im:
      width, height = im.size
    box = None if frac is None else [frac[0] * width, frac[1] * height,
                                     frac[2] * width, frac[3] * height]
    entries[ds.imlist[i]] = {"kind": kind, "box": box, "width": width,
                             "height": height}
  with open(os.path.join(ds.data_dir, "objects.json"), "w") as f:
    json.dump({"version": 1, "images": entries}, f)

  out = str(tmp_path / "viz")
  one_file = sorted(glob.glob(os.path.join(paths["image_dir"], "*.jpg")))[0]
  fusion.main(["--workdir", workdir, "--out", out, "--max_side", "64",
               "--gallery", "3", "--display_side", "128", "--images",
               f"revisited:{paths['test_root']}:demo:4", one_file])
  pngs = sorted(p for p in os.listdir(out)
                if p.endswith(".png") and p != "gallery.png")
  assert len(pngs) == 5
  for name in pngs + ["gallery.png"]:
    with Image.open(os.path.join(out, name)) as im:
      im.load()
      assert im.width > fusion.STRIP_WIDTH if name != "gallery.png" else True
  with open(os.path.join(out, "fusion_summary.json")) as f:
    summary = json.load(f)
  assert summary["num_images"] == 5 and summary["num_features"] == 12
  assert summary["run"]["step"] == 2
  assert sum(summary["type_mean"].values()) == pytest.approx(1.0, abs=1e-5)
  adapt = summary["adaptivity"]
  assert adapt["num_box_images"] == 2
  assert adapt["region_follow_chance"] == pytest.approx((4 / 9 + 1) / 2)
  assert {k: v["count"] for k, v in adapt["by_kind"].items()} == {
      "object": 2, "scene": 1, "unknown": 2}   # the 4th and the plain file
  with open(os.path.join(out, "fusion_weights.json")) as f:
    weights = json.load(f)
  ids = [e["id"] for e in weights["images"]]
  assert len(set(ids)) == 5 and all(f"{i}.png" in pngs for i in ids)
  for e in weights["images"]:
    assert sum(e["weights"]) == pytest.approx(1.0, abs=1e-5)
  by_id = {e["id"]: e for e in weights["images"]}
  first = by_id[ds.imlist[0]]
  assert first["kind"] == "object"
  assert first["box"] == pytest.approx([0.0, 0.0, 0.5, 0.5])
  assert by_id[ds.imlist[1]]["box"] is None
  assert by_id[ds.imlist[3]]["kind"] == "unknown"
  with Image.open(os.path.join(out, f"{ds.imlist[0]}.png")) as im:
    assert (np.asarray(im.convert("RGB")) == fusion.BOX_COLOR).all(-1).any()
  with open(os.path.join(out, "fusion_summary.md")) as f:
    md = f.read()
  assert "| regional | 9 |" in md and "### Adaptivity" in md
  assert "chance" in md
