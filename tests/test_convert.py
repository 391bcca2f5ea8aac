"""Weight import: torchvision-layout ResNet parity against an independent NumPy
forward pass, key reports, wrong-architecture / corrupt-file errors, the CLI and
`--init_from` on a real TrainState."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from qaff_jax import convert
from qaff_jax import parallel
from qaff_jax import train_lib
from qaff_jax.convert import common
from qaff_jax.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(bottleneck=False, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128))


# ---------------------------------------------------------------------------
# torchvision's state-dict layout, written out independently of the converter.


def torchvision_resnet(bottleneck, layers, widths, *, seed=0, zeros=False,
                       dtype=np.float32, num_classes=10):
  """{key: array} exactly as torchvision's ResNet(...).state_dict() names it."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, o, i, k):
    sd[name] = (np.zeros((o, i, k, k)) if zeros else
                rng.normal(0.0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k)))

  def bn(name, c):
    z = zeros
    sd[f"{name}.weight"] = np.ones(c) if z else rng.uniform(0.5, 1.5, c)
    sd[f"{name}.bias"] = np.zeros(c) if z else rng.normal(0.0, 0.1, c)
    sd[f"{name}.running_mean"] = np.zeros(c) if z else rng.normal(0, 0.1, c)
    sd[f"{name}.running_var"] = np.ones(c) if z else rng.uniform(0.5, 1.5, c)
    sd[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

  expansion = 4 if bottleneck else 1
  conv("conv1.weight", widths[0], 3, 7)
  bn("bn1", widths[0])
  inplanes = widths[0]
  for s, (n, planes) in enumerate(zip(layers, widths)):
    for j in range(n):
      p = f"layer{s + 1}.{j}"
      stride = 2 if s > 0 and j == 0 else 1
      if bottleneck:
        conv(f"{p}.conv1.weight", planes, inplanes, 1)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2.weight", planes, planes, 3)
        bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3.weight", planes * 4, planes, 1)
        bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1.weight", planes, inplanes, 3)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2.weight", planes, planes, 3)
        bn(f"{p}.bn2", planes)
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        conv(f"{p}.downsample.0.weight", planes * expansion, inplanes, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  sd["fc.weight"] = rng.normal(0.0, 0.01, (num_classes, inplanes))
  sd["fc.bias"] = np.zeros(num_classes)
  return {k: (v.astype(dtype) if v.dtype.kind == "f" else v)
          for k, v in sd.items()}


def write(path, tensors):
  safetensors.numpy.save_file(tensors, str(path))
  return str(path)


# ---------------------------------------------------------------------------
# Independent NumPy reference (NCHW, torch semantics, float64).


def np_conv(x, w, stride=1, pad=0):
  """Cross-correlation by im2col: one gathered slice per kernel offset."""
  n, c, h, wd = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (wd + 2 * pad - kw) // stride + 1
  cols = np.empty((n, c, kh, kw, ho, wo))
  for i in range(kh):
    for j in range(kw):
      cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride,
                            j:j + stride * wo:stride]
  return np.einsum("ncijuv,ocij->nouv", cols, w)


def np_bn(x, sd, name, eps=1e-5):
  g = lambda k: np.asarray(sd[f"{name}.{k}"], np.float64)[None, :, None, None]
  return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * \
      g("weight") + g("bias")


def np_maxpool_3x3_s2_p1(x):
  """torch MaxPool2d(3, 2, 1): implicit -inf padding, floor output size."""
  n, c, h, w = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
  out = np.full((n, c, ho, wo), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, xp[:, :, i:i + 2 * ho:2, j:j + 2 * wo:2])
  return out


def np_resnet(sd, x_nhwc, bottleneck, layers):
  """torchvision ResNet.forward up to layer4 (inference-mode BatchNorm)."""
  relu = lambda t: np.maximum(t, 0.0)
  w = lambda k: np.asarray(sd[k], np.float64)
  x = np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2))
  x = relu(np_bn(np_conv(x, w("conv1.weight"), 2, 3), sd, "bn1"))
  x = np_maxpool_3x3_s2_p1(x)
  for s, n in enumerate(layers):
    for j in range(n):
      p = f"layer{s + 1}.{j}"
      stride = 2 if s > 0 and j == 0 else 1
      if bottleneck:
        y = relu(np_bn(np_conv(x, w(f"{p}.conv1.weight")), sd, f"{p}.bn1"))
        y = relu(np_bn(np_conv(y, w(f"{p}.conv2.weight"), stride, 1), sd,
                       f"{p}.bn2"))
        y = np_bn(np_conv(y, w(f"{p}.conv3.weight")), sd, f"{p}.bn3")
      else:
        y = relu(np_bn(np_conv(x, w(f"{p}.conv1.weight"), stride, 1), sd,
                       f"{p}.bn1"))
        y = np_bn(np_conv(y, w(f"{p}.conv2.weight"), 1, 1), sd, f"{p}.bn2")
      if f"{p}.downsample.0.weight" in sd:
        x = np_bn(np_conv(x, w(f"{p}.downsample.0.weight"), stride), sd,
                  f"{p}.downsample.1")
      x = relu(y + x)
  return np.transpose(x, (0, 2, 3, 1))


def flax_forward(model, x):
  model.eval()
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, x))


def assert_close(got, want):
  assert got.shape == want.shape
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# Parity.


def test_resnet_tiny_safetensors_matches_numpy_forward(tmp_path):
  sd = torchvision_resnet(**TINY)
  src = write(tmp_path / "tiny.safetensors", sd)
  converted, folder = convert.convert_file(src, "resnet_tiny",
                                           str(tmp_path / "out"))
  # Every key used except the classifier and the BatchNorm counters.
  counters = [k for k in sd if k.endswith("num_batches_tracked")]
  assert sorted(converted.unused) == sorted(["fc.bias", "fc.weight"]
                                            + counters)
  assert len(converted.used) == len(sd) - 2 - len(counters)
  record = json.load(open(os.path.join(folder, "conversion.json")))
  assert record["arch"] == "resnet_tiny" and record["unused"]

  model = convert.load_backbone(folder, "resnet_tiny")
  x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  assert_close(flax_forward(model, x),
               np_resnet(sd, x, False, TINY["layers"]))


def test_bottleneck_with_module_prefix_matches_numpy_forward(tmp_path):
  layers, widths = (2, 1, 1, 1), (8, 16, 32, 64)
  sd = torchvision_resnet(True, layers, widths, seed=3)
  src = write(tmp_path / "ddp.safetensors",
              {f"module.{k}": v for k, v in sd.items()})
  tensors = convert.read_state_dict(src)
  assert set(tensors) == set(sd)
  make = functools.partial(resnet.ResNet, resnet.Bottleneck, layers, widths)
  converted = convert.convert_resnet(tensors, make, source=src)
  model = common.materialize(make, converted.params, converted.model_state)
  # Odd sizes exercise torch's padding / floor semantics of conv and max-pool.
  x = np.random.default_rng(2).normal(size=(2, 35, 29, 3)).astype(np.float32)
  assert_close(flax_forward(model, x), np_resnet(sd, x, True, layers))


# ---------------------------------------------------------------------------
# Errors.


def test_resnet50_weights_for_resnet101_is_a_clear_error(tmp_path):
  sd = torchvision_resnet(True, (3, 4, 6, 3), (64, 128, 256, 512), zeros=True,
                          dtype=np.float16, num_classes=2)
  src = write(tmp_path / "r50.safetensors", sd)
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_file(src, "resnet101", str(out))
  msg = str(err.value)
  assert src in msg and "--arch resnet101" in msg and "missing" in msg
  assert "layer3.6." in msg
  assert not out.exists()


def test_shape_mismatch_and_unexpected_keys(tmp_path):
  sd = torchvision_resnet(**TINY)
  with pytest.raises(convert.ConversionError, match=r"shape mismatch.*conv1"
                     r"\.weight: file has \(16, 3, 7, 7\), --arch resnet18 "
                     r"wants \(64, 3, 7, 7\)"):
    convert.convert_tensors(sd, "resnet18", source="tiny.safetensors")

  bigger = torchvision_resnet(False, (2, 1, 1, 1), TINY["widths"])
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected keys.*layer1\.1\.") as err:
    convert.convert_tensors(bigger, "resnet_tiny", source="big.safetensors")
  assert "big.safetensors" in str(err.value)
  converted = convert.convert_tensors(bigger, "resnet_tiny",
                                      allow_unused=True)
  assert "layer1.1.conv1.weight" in converted.unused


def test_truncated_and_corrupt_files(tmp_path):
  src = write(tmp_path / "ok.safetensors", torchvision_resnet(**TINY))
  data = open(src, "rb").read()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError,
                     match=r"cut\.safetensors.*truncated or corrupt"):
    convert.convert_file(str(cut), "resnet_tiny", str(tmp_path / "o1"))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x00" * 64)
  with pytest.raises(convert.ConversionError, match=r"junk\.safetensors"):
    convert.read_state_dict(str(junk))
  with pytest.raises(convert.ConversionError, match="no such file"):
    convert.read_state_dict(str(tmp_path / "absent.safetensors"))


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  pth = tmp_path / "resnet.pth"
  pth.write_bytes(b"not really a pickle")
  with pytest.raises(convert.ConversionError) as err:
    convert.read_state_dict(str(pth))
  msg = str(err.value)
  assert "resnet.pth" in msg and "qaff_jax[torch]" in msg
  assert "safetensors" in msg


def test_unwraps_wrapper_dicts():
  inner = {"conv1.weight": np.zeros(1)}
  assert common._unwrap({"state_dict": inner, "epoch": 3}, "f") is inner
  assert common._unwrap({"model": {"state_dict": inner}}, "f") is inner
  assert common._unwrap(inner, "f") is inner


def test_unknown_or_unsupported_arch(tmp_path):
  with pytest.raises(convert.ConversionError, match="unknown --arch"):
    convert.converter_for("resnet7")
  with pytest.raises(convert.ConversionError, match="no PyTorch weight import"):
    convert.converter_for("ultron_small")


# ---------------------------------------------------------------------------
# CLI + --init_from on a real TrainState.


def _tiny_train_config():
  sys.path.insert(0, os.path.join(REPO, "configs"))
  try:
    import demo as demo_config  # configs/demo.py
  finally:
    sys.path.pop(0)
  c = demo_config.get_config("quick,head=gem")
  c.data.num_classes = 8
  c.data.num_train_images = 32
  c.model.dim = 16
  return c


def test_cli_output_is_accepted_by_init_from(tmp_path):
  sd = torchvision_resnet(**TINY, seed=5)
  src = write(tmp_path / "tiny.safetensors", sd)
  out = str(tmp_path / "converted")
  cmd = [sys.executable, "-m", "qaff_jax.convert", f"--from={src}",
         "--arch=resnet_tiny", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "fc.weight" in run.stdout and "num_batches_tracked" in run.stdout
  assert f"--init_from {out}" in run.stdout
  # A second run into the same folder refuses to overwrite it.
  again = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
  assert again.returncode == 1 and "already holds a checkpoint" in again.stderr

  config = _tiny_train_config()
  mesh = parallel.make_mesh(config.mesh.model)
  tx, _ = train_lib.make_optimizer(config)
  _, state, shardings = train_lib.create_train_state(config, mesh, tx)
  loaded = train_lib.init_backbone_from(state, out, shardings)
  backbone = loaded.params["net"]["backbone"]
  np.testing.assert_array_equal(
      jax.device_get(backbone["conv1"]["kernel"][...]),
      np.transpose(sd["conv1.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(
      jax.device_get(backbone["layer2"][0]["downsample"][0]["kernel"][...]),
      np.transpose(sd["layer2.0.downsample.0.weight"], (2, 3, 1, 0)))
  stats = loaded.model_state["net"]["backbone"]["layer3"][0]["bn2"]
  np.testing.assert_array_equal(jax.device_get(stats["var"][...]),
                                sd["layer3.0.bn2.running_var"])
  np.testing.assert_array_equal(  # the head is not touched
      jax.device_get(loaded.params["net"]["head"]["whiten"]["kernel"][...]),
      jax.device_get(state.params["net"]["head"]["whiten"]["kernel"][...]))


# ---------------------------------------------------------------------------
# init_backbone_from on hand-built trees (the checkpoint read is replaced).


class _Backbone(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Linear(2, 3, rngs=rngs)
    self.layer1 = nnx.List([nnx.BatchNorm(3, rngs=rngs)])


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.backbone = _Backbone(rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)


class _Trainable(nnx.Module):
  def __init__(self, rngs):
    self.net = _Net(rngs)
    self.classifier = nnx.Linear(2, 4, rngs=rngs)


def _hand_state():
  from qaff_jax import state as state_lib
  m = _Trainable(nnx.Rngs(0))
  return state_lib.TrainState(
      step=np.zeros((), np.int32), params=nnx.state(m, nnx.Param),
      model_state=nnx.state(m, nnx.Not(nnx.Param)), opt_state={}, loss_state={})


def test_key_and_pure_helpers():
  tu = jax.tree_util
  path = (tu.GetAttrKey("layer1"), tu.SequenceKey(0), tu.DictKey("scale"))
  assert train_lib._key(path) == ("layer1", "0", "scale")  # list 0 == restored '0'
  x, y = np.arange(3.0), np.ones((2, 2))
  assert train_lib._pure(None) == {}
  got = train_lib._pure({"a": {"value": x}, "b": {"0": {"value": y}, "c": x},
                         "d": {"value": x, "other": y}})
  assert set(got) == {"a", "b", "d"} and got["a"] is x and got["b"]["0"] is y
  assert got["b"]["c"] is x
  assert set(got["d"]) == {"value", "other"}  # not a lone {"value": ...} wrapper


def test_init_backbone_from_copies_only_the_backbone(monkeypatch):
  state = _hand_state()
  rng = np.random.default_rng(0)
  want = {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=3),  # float64
          "scale": rng.uniform(1, 2, 3), "bn_bias": rng.normal(size=3),
          "mean": rng.normal(size=3), "var": rng.uniform(1, 2, 3)}
  # As Orbax gives a checkpoint back: list items under string keys, some
  # leaves wrapped in {"value": ...}, extra keys that the model lacks.
  source = {
      "params": {"net": {
          "backbone": {"conv1": {"kernel": {"value": want["kernel"]}, "bias": want["bias"]},
                       "layer1": {"0": {"scale": {"value": want["scale"]},
                                        "bias": want["bn_bias"]}},
                       "fc": {"kernel": np.zeros((3, 9))}},
          "head": {"kernel": np.full((3, 2), 7.0), "bias": np.full(2, 7.0)}}},
      "model_state": {"net": {"backbone": {"layer1": {"0": {
          "mean": {"value": want["mean"]}, "var": {"value": want["var"]}}}}}}}
  monkeypatch.setattr(train_lib.ckpt_lib, "restore_params_from", lambda path: source)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = train_lib.init_backbone_from(state, "ckpt", one)
  bb = out.params["net"]["backbone"]
  stats = out.model_state["net"]["backbone"]["layer1"][0]
  for got, key in [(bb["conv1"]["kernel"], "kernel"), (bb["conv1"]["bias"], "bias"),
                   (bb["layer1"][0]["scale"], "scale"), (bb["layer1"][0]["bias"], "bn_bias"),
                   (stats["mean"], "mean"), (stats["var"], "var")]:
    assert got[...].dtype == np.float32, key
    np.testing.assert_array_equal(np.asarray(got[...]), want[key].astype(np.float32))
  for part in (("net", "head", "kernel"), ("net", "head", "bias"),
               ("classifier", "kernel")):
    before, after = state.params, out.params
    for k in part:
      before, after = before[k], after[k]
    np.testing.assert_array_equal(np.asarray(after[...]), np.asarray(before[...]))

  def broken(**edit):
    bad = jax.tree.map(lambda v: v, source)
    bb = bad["params"]["net"]["backbone"]
    for key, value in edit.items():
      if key == "no_bias":
        del bb["layer1"]["0"]["bias"]
      elif key == "no_backbone":
        del bad["params"]["net"]["backbone"]
      else:
        bb["conv1"]["kernel"] = value
    monkeypatch.setattr(train_lib.ckpt_lib, "restore_params_from", lambda path: bad)
    return bad

  broken(no_bias=True)
  with pytest.raises(ValueError, match=r"--init_from ckpt: backbone params missing "
                                       r"\[\"\['layer1'\]\[0\]\['bias'\]\"\]"):
    train_lib.init_backbone_from(state, "ckpt", one)
  broken(kernel=np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"params \['conv1'\]\['kernel'\] has shape "
                                       r"\(3, 2\), the model wants \(2, 3\)"):
    train_lib.init_backbone_from(state, "ckpt", one)
  broken(no_backbone=True)
  with pytest.raises(ValueError, match=r"no params\['net'\]\['backbone'\]"):
    train_lib.init_backbone_from(state, "ckpt", one)


# ---------------------------------------------------------------------------
# Model card (bench/model.py) against a hand count from the torchvision keys.


def test_model_card_counts_resnet_tiny():
  from qaff_jax.bench import model as bench_model

  row = bench_model.card_row("resnet_tiny", (64,), dim=16)
  sd = torchvision_resnet(**TINY)
  params = sum(v.size for k, v in sd.items() if not k.startswith("fc.")
               and not k.endswith(("running_mean", "running_var",
                                   "num_batches_tracked")))
  assert round(row["params_backbone_m"] * 1e6) == params
  assert round(row["params_total_m"] * 1e6) == params + 128 * 16 + 16 + 1
  # Conv multiply-adds, counting (like XLA) only taps that land inside the
  # input, not on zero padding: 64 px -> conv1 32, pool 16, layers 16/8/4/2.
  def taps(n_in, k, stride, pad):
    n_out = (n_in + 2 * pad - k) // stride + 1
    return sum(0 <= o * stride - pad + t < n_in
               for o in range(n_out) for t in range(k))

  side_in = {"layer1": 16, "layer2": 16, "layer3": 8, "layer4": 4}
  macs = 0
  for k, v in sd.items():
    if v.ndim != 4:
      continue
    o, i, kh, _ = v.shape
    if k == "conv1.weight":
      n, stride = 64, 2
    elif ".conv2." in k:
      n, stride = side_in[k[:6]] // (1 if k[:6] == "layer1" else 2), 1
    else:  # block conv1 / downsample: the stage's input, strided after layer1
      n, stride = side_in[k[:6]], 1 if k[:6] == "layer1" else 2
    macs += o * i * taps(n, kh, stride, kh // 2) ** 2
  # Convs dominate; BatchNorm, ReLU, pooling and the head add a little.
  assert 2 * macs <= row["gflops_64"] * 1e9 <= 1.05 * 2 * macs
  table = bench_model.format_card([row], (64,))
  assert "| resnet_tiny |" in table and "GFLOPs @64" in table
