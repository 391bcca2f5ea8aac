"""Ahead-of-time compilation for TPU slices (libtpu, no TPU): `qaff_jax.aot` and its CLI.

The compile tests fail when the train or extraction step stops compiling for
TPU; they need libtpu (`pip install -e ".[tpu]"`, which `.ci/run` installs) and
are skipped, saying so, without it.
"""

import json
import os
import subprocess
import sys

import pytest

from qaff_jax import aot, config_lib, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import test_train  # noqa: E402  (its tiny_config)

sys.path.pop(0)

try:
  import libtpu  # noqa: F401
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]"')

NUM_CLASSES = 1000   # 1000 rows: 250 per device on 4 devices, 125 on 8
DIM = 24
BATCH = 16


def tiny_config(**overrides):
  """test_train's tiny ResNet + GeM at 32 px with more classes: compiles in
  seconds, but is the real train step (a compile reads no data)."""
  return test_train.tiny_config("/no/data", **{
      "data.num_classes": NUM_CLASSES, "model.dim": DIM, "batch_size": BATCH, **overrides})


# ---------------------------------------------------------------------------
# Names and HLO parsing (no libtpu needed).


@pytest.mark.parametrize("spec,expected", [
    ("v5e-16", ("v5e", "v5e:4x4")), ("v5litepod-16", ("v5e", "v5e:4x4")),
    ("v5e:4x4", ("v5e", "v5e:4x4")), ("v5e-8", ("v5e", "v5e:2x4")),
    ("v6e-256", ("v6e", "v6e:16x16")), ("V6E-1", ("v6e", "v6e:1x1")),
    # v4 / v5p accelerator types count TensorCores: v5p-128 is 64 chips.
    ("v5p-128", ("v5p", "v5p:4x4x4")), ("v5p-8", ("v5p", "v5p:2x2x1")),
    ("v5p-16", ("v5p", "v5p:2x2x2")), ("v5p-64", ("v5p", "v5p:2x4x4")),
    ("v5p-256", ("v5p", "v5p:4x4x8")), ("v5p-512", ("v5p", "v5p:4x8x8")),
    ("v4-8", ("v4", "v4:2x2x1")), ("v4:2x2x1", ("v4", "v4:2x2x1")),
])
def test_topology_spellings(spec, expected):
  # Shapes as in the Cloud TPU v5p / v5e docs' slice tables.
  assert aot.parse_topology(spec) == expected


@pytest.mark.parametrize("bad", ["v5e", "v7x-8", "v5p-12", "v5e:4x4x4", "v5p-2", "tpu-16"])
def test_bad_topology_names_are_refused(bad):
  with pytest.raises(ValueError, match="topology|TensorCores|chips|axes|generation"):
    aot.parse_topology(bad)


HLO = """
ENTRY %main {
  %p = bf16[16,250]{1,0} parameter(0)
  %all-reduce.1 = (f32[16]{0:T(128)}, f32[32,8]{1,0}) all-reduce(%a, %b), channel_id=2
  %all-gather.3 = bf16[4,4,512]{2,1,0:T(4,128)(2,1)S(1)} all-gather(%param_0.5), dimensions={0}
  %all-gather-start.1 = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), dimensions={0}
  %all-gather-done.1 = f32[32]{0} all-gather-done(%all-gather-start.1)
  %fusion.2 = f32[16,1000]{1,0} fusion(%p), kind=kLoop
  ROOT %t = (f32[1000,24]{1,0}) tuple(%w)
}
"""


def test_collective_stats_count_and_bytes_by_hand():
  stats = aot.collective_stats(HLO)
  assert stats["all-reduce"] == {"count": 1, "bytes": 16 * 4 + 32 * 8 * 4}
  # The sync all-gather (bf16 4*4*512) and the async pair counted once by its -done.
  assert stats["all-gather"] == {"count": 2, "bytes": 4 * 4 * 512 * 2 + 32 * 4}
  assert stats["all-to-all"]["count"] == stats["reduce-scatter"]["count"] == 0


def test_whole_class_arrays_are_found_in_any_layout():
  found = aot.whole_class_arrays(HLO, class_sizes=[1000], partners=[16, 24])
  assert found == ["f32[1000,24]", "f32[16,1000]"]
  # A sharded [16, 250] piece is not flagged, nor is a class count without a partner dim.
  assert aot.whole_class_arrays("s32[1000]{0} f32[16,250]", class_sizes=[1000],
                                partners=[16]) == []


# ---------------------------------------------------------------------------
# Compiling (libtpu).


@pytest.fixture(scope="module")
def v5e():
  return aot.Target.from_topology("v5e:2x2") if HAVE_LIBTPU else None


@needs_libtpu
def test_train_and_extract_compile_for_v5e_through_the_cli(tmp_path):
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "qaff_jax.compile", "--config",
         os.path.join(REPO, "configs/demo.py:quick,head=gem"), "--topology", "v5e-4",
         "--what", "both", f"--json={out}", "--config.data.image_size=32",
         f"--config.data.num_classes={NUM_CLASSES}", f"--config.model.dim={DIM}",
         "--config.eval.max_side=64", "--config.eval.scales=(1.0,)", "--config.eval.batch_size=6",
         "--config.loss.aux_weight=0.0"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == result
  assert "| train | batch 16 (4/device), 32 px |" in proc.stdout
  assert result["target"]["devices"] == 4 and result["target"]["chip"] == "TPU v5e"
  train = result["train"]
  assert train["mesh"] == {"data": 4, "model": 1}
  assert train["fits"] and train["class_arrays_sharded"]
  # Data parallel: gradients are all-reduced.
  assert train["collectives"]["all-reduce"]["count"] > 0
  # Ideal time is the FLOPs over the v5e peak of 197 TFLOP/s.
  assert train["ideal_ms"] == pytest.approx(train["flops_per_device"] / 197e12 * 1e3, rel=1e-3)
  (bucket,) = result["extract"]["buckets"]
  assert bucket["shape"] == [8, 64, 64]   # eval.batch_size 6 rounded up to 4 devices


@needs_libtpu
def test_per_device_flops_follow_the_per_device_batch(v5e):
  """v4:2x2x1 lists 8 devices (one per TensorCore): half v5e:2x2's batch per
  device, so about half the FLOPs per device; memory and peak are per core."""
  config = tiny_config()
  a = aot.compile_train(config, v5e)
  v4 = aot.Target.from_topology("v4:2x2x1")
  assert len(v4.devices) == 8 and v4.per_chip == 2
  assert v4.peak_flops == 275e12 / 2 and v4.hbm_bytes == 32e9 / 2
  b = aot.compile_train(config, v4)
  assert b["mesh"] == {"data": 8, "model": 1} and b["class_arrays_sharded"]
  ratio = a["flops_per_device"] / b["flops_per_device"]
  assert 1.6 < ratio < 2.4, ratio


@needs_libtpu
def test_fsdp_shrinks_the_arguments_per_device(v5e):
  dp = aot.compile_train(tiny_config(), v5e)
  fsdp = aot.compile_train(tiny_config(**{"mesh.fsdp": True}), v5e)
  assert fsdp["memory_gib"]["argument"] < 0.6 * dp["memory_gib"]["argument"]
  assert fsdp["collectives"]["all-gather"]["count"] > dp["collectives"]["all-gather"]["count"]


@needs_libtpu
def test_a_replicated_class_matrix_is_caught(v5e, monkeypatch):
  monkeypatch.setattr(parallel, "class_rows_sharding", parallel.replicated)
  report = aot.compile_train(tiny_config(), v5e)
  assert not report["class_arrays_sharded"]
  assert f"f32[{NUM_CLASSES},{DIM}]" in report["whole_class_arrays"]


@pytest.mark.parametrize("peak,hbm", [
    (lambda b: 0.03 + 0.002 * b, 0.1),                              # linear
    (lambda b: 0.03 + 0.002 * b + 0.05 * (b > 100), 0.3),           # a step
    (lambda b: 1.0 + 0.001 * b, 16.0),                              # far away
    (lambda b: 0.03 + 0.002 * b + 1e-5 * b * b, 1.0),               # convex
    (lambda b: 0.5 + 0.01 * b, 0.4),                                # nothing fits
])
def test_max_batch_search_reports_only_compiled_batches(peak, hbm, monkeypatch):
  """The search logic against made-up memory curves (a compile per call)."""
  calls = []

  def fake_compile(config, target):
    calls.append(config.batch_size)
    gib = peak(config.batch_size)
    return {"memory_gib": {"peak": gib}, "fits": gib * aot.GiB <= target.hbm_bytes}

  monkeypatch.setattr(aot, "compile_train", fake_compile)
  target = aot.Target("test", [None] * 4, aot.Chip("test", 1e12, hbm * aot.GiB, ""))
  config = config_lib.apply_overrides(tiny_config(), {})
  result = aot.max_batch(config, target, max_compiles=6)
  assert len(calls) == len(set(calls)) <= 6 and result["step"] == 4
  truth = max((b for b in range(4, 100_000, 4) if peak(b) <= hbm), default=None)
  best = result["max_global_batch"]
  if truth is None:
    assert best is None and not result["proved_largest"]
  elif result["proved_largest"]:
    assert best == truth
  else:   # budget spent: what it reports was compiled and fits
    assert best in calls and peak(best) <= hbm and best <= truth
  assert result["proved_largest"] == (best is not None and best + 4 in calls
                                      and peak(best + 4) > hbm)


def test_bad_topology_is_a_usage_error():
  proc = subprocess.run([sys.executable, "-m", "qaff_jax.compile", "--config",
                         os.path.join(REPO, "configs/demo.py:quick"), "--topology", "v9z-3"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "v9z-3" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
