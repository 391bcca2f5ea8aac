"""Benchmarks (qaff_jax.bench.train / .extract): what they report is what happened.

The clock is replaced by a fake one, so times, images/s and MFU are checked
exactly against the arithmetic they claim; the train step's FLOPs are checked
against a closed-form count of ResNet-tiny's convolutions.
"""

import os
import resource
import types

import jax
import numpy as np
import pytest

from qaff_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


def fake_clock(*readings):
  """A stand-in for the `time` module: perf_counter() returns `readings` in order."""
  left = list(readings)
  return types.SimpleNamespace(perf_counter=lambda: left.pop(0), left=left)


# ---------------------------------------------------------------------------
# ResNet-tiny (basic blocks, one per stage, widths 16/32/64/128) by hand.


def taps(n_in, k, stride, pad):
  """(kernel taps inside the input summed over the outputs, output size), 1-D.

  XLA counts only the taps of a convolution that land inside the input, not
  those on zero padding.
  """
  n_out = (n_in + 2 * pad - k) // stride + 1
  inside = sum(0 <= o * stride - pad + t < n_in for o in range(n_out) for t in range(k))
  return inside, n_out


def resnet_tiny_conv_macs(side, widths=(16, 32, 64, 128)):
  """Multiply-adds per image of every conv: [(name, macs)], stem first."""
  t, n = taps(side, 7, 2, 3)                   # conv1 7x7 / 2
  out = [("conv1", widths[0] * 3 * t * t)]
  n = (n + 2 - 3) // 2 + 1                     # max-pool 3x3 / 2
  c_in = widths[0]
  for s, width in enumerate(widths):
    stride = 1 if s == 0 else 2
    t1, m = taps(n, 3, stride, 1)
    t2, _ = taps(m, 3, 1, 1)
    out += [(f"layer{s + 1}.conv1", width * c_in * t1 * t1),
            (f"layer{s + 1}.conv2", width * width * t2 * t2)]
    if stride != 1 or c_in != width:
      t3, _ = taps(n, 1, stride, 0)
      out.append((f"layer{s + 1}.downsample", width * c_in * t3 * t3))
    c_in, n = width, m
  return out


def test_train_benchmark_reports_its_own_measurements(monkeypatch):
  from qaff_jax.bench import train as bench

  c = load("gldv2").get_config("runlocal,head=gem")
  c.data.num_classes = 32
  c.batch_size = 64                 # 8 images per device: the convs dominate
  c.data.image_size = 64
  # Compile 0 -> 2.5 s; two timed steps 10 -> 10.5 s (0.25 s each).
  clock = fake_clock(0.0, 2.5, 10.0, 10.5)
  monkeypatch.setattr(bench, "time", clock)
  monkeypatch.setattr(bench, "peak_flops", lambda device: 1e9)
  out = bench.run(c, steps=2, warmup=0)
  assert clock.left == []
  devices = jax.device_count()
  assert out["device"] == f"{devices} x {jax.devices()[0].device_kind}"
  assert (out["backbone"], out["head"], out["image_size"], out["global_batch"],
          out["dtype"]) == ("resnet_tiny", "gem", 64, 64, "float32")
  assert out["compile_s"] == 2.5
  assert out["step_ms"] == 250.0
  assert out["img_per_s"] == 64 / 0.25
  assert out["img_per_s_per_device"] == 64 / 0.25 / devices
  # Training FLOPs of the per-device program (8 images): each conv once forward,
  # once for its weight gradient, once for its input gradient (not the stem's:
  # the images need none); XLA counts a multiply-add as 2. BatchNorm, ReLU,
  # pooling, the head, the loss and the optimizer add a little.
  macs = resnet_tiny_conv_macs(64)
  conv_flops = 2 * (3 * sum(m for _, m in macs) - macs[0][1]) * (64 // devices)
  assert conv_flops <= out["step_gflops"] * 1e9 <= 1.15 * conv_flops
  assert out["mfu"] == pytest.approx(out["step_gflops"] * 1e9 / 0.25 / 1e9, abs=1e-4)
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  assert 0.05 < out["host_max_rss_gib"] <= rss_gib + 1e-3


def test_peak_flops_by_device_kind():
  from qaff_jax.bench import train as bench
  kind = lambda k: types.SimpleNamespace(device_kind=k)
  # Dense bf16 peaks from the data sheets.
  assert bench.peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
  assert bench.peak_flops(kind("NVIDIA A100-SXM4-40GB")) == 312e12
  assert bench.peak_flops(kind("TPU v4")) == 275e12
  assert bench.peak_flops(kind("TPU v5 lite")) == 197e12
  assert bench.peak_flops(kind("cpu")) is None  # no MFU on CPU


def test_extraction_benchmark_reports_its_own_measurements(monkeypatch):
  from qaff_jax.bench import extract as bench
  from qaff_jax.evaluation import extract

  c = load("gldv2").get_config("runlocal,head=gem")
  c.data.num_classes = 8
  c.eval.bucket = 16
  seen = []
  make_forward = extract.make_forward

  def recording_make_forward(*args, **kwargs):
    forward = make_forward(*args, **kwargs)

    def run(images, mask):
      seen.append(tuple(images.shape[1:3]))
      return forward(images, mask)
    return run

  monkeypatch.setattr(extract, "make_forward", recording_make_forward)
  # First (compiling) pass 0 -> 3 s; timed pass 10 -> 10.6 s.
  clock = fake_clock(0.0, 3.0, 10.0, 10.6)
  monkeypatch.setattr(bench, "time", clock)
  out = bench.run(c, n_images=3, max_side=32, scales=(1.0, 0.5))
  assert clock.left == []
  assert (out["backbone"], out["head"], out["max_side"], out["scales"],
          out["images"]) == ("resnet_tiny", "gem", 32, [1.0, 0.5], 3)
  assert out["first_pass_s"] == 3.0
  assert out["img_per_s"] == pytest.approx(3 / 0.6)
  assert out["ms_per_image"] == pytest.approx(1e3 * 0.6 / 3)
  # Long side 32 at scale 1, 16 at scale 0.5; the short sides (21..32 px, then
  # half) pad up to the same multiples of 16: two shapes, each in both passes.
  assert sorted(set(seen)) == [(16, 16), (32, 32)]
  assert out["shape_buckets"] == len(set(seen)) == 2


# ---------------------------------------------------------------------------
# bench.search: the round-robin re-timing of the ScaNN rows.


def test_search_retime_takes_each_rows_best_round(monkeypatch):
  from qaff_jax.bench import search as bench
  from qaff_jax.evaluation import ann

  # A fake clock that only the searchers advance, by a per-call cost: row 'a'
  # is slowed in round 0 only (a load spike), row 'b' in round 2 only.
  now = [0.0]
  monkeypatch.setattr(ann.time, "perf_counter", lambda: now[0])

  class Fake:
    def __init__(self, costs):
      self.costs = list(costs)

    def search_batched_parallel(self, q, k, reorder, leaves):
      now[0] += self.costs.pop(0)

  queries = np.zeros((100, 4), np.float32)
  rows = [{"row": "a", "qps": 1.0}, {"row": "b", "qps": 2.0}]
  retime = [(rows[0], Fake([4.0, 1.0, 2.0]), 5, 200),
            (rows[1], Fake([0.5, 0.25, 8.0]), 5, 200)]
  bench.retime_rows(retime, queries, 100, rounds=3)
  assert rows[0] == {"row": "a", "qps": 100.0, "qps_in_place": 1.0}
  assert rows[1] == {"row": "b", "qps": 400.0, "qps_in_place": 2.0}


def test_search_oracle_leaves_is_the_fewest_meeting_the_target():
  from qaff_jax.bench import search as bench
  from qaff_jax.evaluation import ann

  db, queries, _, _ = bench.make_data(30_000, 32, 200, 0, None, 1.0, 0, kind="flat")
  exact = np.argsort(-(queries.astype(np.float64) @ db.T.astype(np.float64)), axis=1)[:, :50]
  _, searcher, _, _ = bench.build_scann_for(db, 300, 30_000, 50)
  recall = lambda leaves: ann.recall_at_k(
      ann.scann_search(searcher, queries, 50, leaves, 200)[1], exact, 50)
  for target in (0.9, 0.97):
    fewest = bench.oracle_leaves(searcher, queries, exact, 50, 300, 200, target)
    assert fewest is not None and 1 < fewest < 300
    assert recall(fewest) >= target > recall(fewest - 1), (target, fewest)
  assert bench.oracle_leaves(searcher, queries, exact, 50, 300, 200, 1.01) is None
