"""README promises of the trainer, each against a closed form or a hand count.

The learning-rate schedule (linear warm-up, then cosine to zero), the
weight-decay mask (kernels and the class matrix decay; biases, norm scales,
GeM p and DELG's scale do not), global-norm gradient clipping, keep-N
checkpoints and the per-process split of the global batch.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaff_jax import checkpoint as ckpt_lib
from qaff_jax import config_lib, parallel, train_lib


def _config(**overrides):
  c = config_lib.base_config()
  c.model.update(dict(backbone="resnet_tiny", head="gem", dim=16, dtype="float32"))
  c.data.num_classes = 12
  return config_lib.apply_overrides(c, overrides)


# ---------------------------------------------------------------------------
# Learning-rate schedule.


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
  # 1000 images / batch 10 = 100 steps per epoch; 3 epochs = 300 steps;
  # 0.5 warm-up epochs = 50 steps.
  config = _config(**{"data.num_train_images": 1000, "batch_size": 10, "num_epochs": 3.0,
                      "optim.lr": 0.2, "optim.warmup_epochs": 0.5})
  assert train_lib.total_steps(config) == 300
  _, schedule = train_lib.make_optimizer(config)

  def want(t):
    if t < 50:
      return 0.2 * t / 50
    return 0.2 * 0.5 * (1 + math.cos(math.pi * (t - 50) / 250))

  for t in (0, 1, 25, 49, 50, 51, 100, 175, 250, 299, 300):
    assert float(schedule(t)) == pytest.approx(want(t), rel=1e-5, abs=1e-7), t
  assert float(schedule(175)) == pytest.approx(0.1, rel=1e-5)   # half-way down the cosine

  # No warm-up: the cosine starts at lr; total_steps overrides num_epochs.
  config = _config(**{"data.num_train_images": 1000, "batch_size": 10, "num_epochs": 3.0,
                      "total_steps": 40, "optim.lr": 0.1, "optim.warmup_epochs": 0.0})
  _, schedule = train_lib.make_optimizer(config)
  for t in (0, 10, 20, 39, 40):
    assert float(schedule(t)) == pytest.approx(
        0.05 * (1 + math.cos(math.pi * t / 40)), rel=1e-5, abs=1e-7), t

  # A warm-up longer than the run is cut to total - 1 steps (peak at the last step).
  config = _config(**{"data.num_train_images": 100, "batch_size": 10, "total_steps": 20,
                      "optim.lr": 0.1, "optim.warmup_epochs": 5.0})
  _, schedule = train_lib.make_optimizer(config)
  for t in (0, 5, 19):
    assert float(schedule(t)) == pytest.approx(0.1 * t / 19, rel=1e-5, abs=1e-7), t


def test_the_optimizer_steps_with_the_scheduled_lr():
  """Plain SGD (momentum 0, no decay) on a gradient of ones moves by exactly -lr(t)."""
  config = _config(**{"data.num_train_images": 40, "batch_size": 10, "total_steps": 8,
                      "optim.lr": 0.4, "optim.warmup_epochs": 1.0,   # 4 warm-up steps
                      "optim.momentum": 0.0, "optim.weight_decay": 0.0})
  tx, _ = train_lib.make_optimizer(config)
  params = {"w": jnp.zeros((3,))}
  state = tx.init(params)
  want = [0.0, 0.1, 0.2, 0.3] + [0.2 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
  for t in range(8):
    updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
    np.testing.assert_allclose(updates["w"], -want[t], rtol=1e-5, atol=1e-9, err_msg=str(t))


# ---------------------------------------------------------------------------
# Weight decay: kernels (and the class matrix) only.


def _decayed(path_names) -> bool:
  """Decay on kernels, the class matrix `weight` and QAFF/SpCa embedding
  matrices; not on ViT tokens / position embeddings or relative-position bias
  tables (timm's no_weight_decay), biases, norm scales or scalars."""
  return path_names[-1] in ("kernel", "weight", "fusion_embed", "templates")


def _names(path):
  out = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return [n for n in out if n != "value"]


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_weight_decay_mask_on_a_toy_tree(optim):
  """Zero gradients: the update is the weight decay alone, on the kernels only."""
  lr, wd, mu = 0.1, 0.01, 0.9
  config = _config(**{"optim.name": optim, "optim.lr": lr, "optim.weight_decay": wd,
                      "optim.momentum": mu, "optim.warmup_epochs": 0.0, "total_steps": 10})
  tx, _ = train_lib.make_optimizer(config)
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
            "norm": {"scale": rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
            "dense": {"kernel": rng.normal(size=(4, 5))},
            "pool": {"p": np.float32(3.0)},
            "classifier": {"weight": rng.normal(size=(6, 5))},
            "vit": {"cls_token": rng.normal(size=(1, 1, 5)),
                    "reg_token": rng.normal(size=(1, 4, 5)),
                    "pos_embed": rng.normal(size=(1, 9, 5))},
            "block": {"rel_bias": rng.normal(size=(3, 3, 2))},
            "qaff": {"fusion_embed": rng.normal(size=(3, 5)),
                     "templates": rng.normal(size=(4, 5))}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  # SGD (nesterov): -lr (1 + mu) wd p on the first step; AdamW: -lr wd p (Adam's
  # part of a zero gradient is 0).
  factor = lr * wd * ((1 + mu) if optim == "sgd" else 1.0)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    names = _names(path)
    p = params[names[0]][names[1]]
    want = -factor * np.asarray(p) if _decayed(names) else np.zeros(np.shape(p))
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg="/".join(names))


def test_weight_decay_mask_on_the_model_params():
  """The real parameter tree (ResNet + DELG head with its learned scale, GeM p):
  exactly the kernels and the class matrix decay."""
  lr, wd, mu = 0.1, 0.01, 0.9
  config = _config(**{"model.head": "delg", "loss.learn_scale": True, "optim.lr": lr,
                      "optim.weight_decay": wd, "optim.momentum": mu,
                      "optim.warmup_epochs": 0.0, "total_steps": 10})
  mesh = parallel.make_mesh(1, jax.devices()[:1])
  tx, _ = train_lib.make_optimizer(config)
  _, abstract, _ = train_lib.abstract_train_state(config, mesh, tx)
  params = jax.tree.map(lambda a: np.full(a.shape, 2.0, a.dtype), abstract.params)
  # One jitted update (eager dispatch over ~40 leaves is slower than the compile).
  updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(
      params)
  seen = set()
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    names = _names(path)
    seen.add(names[-1])
    want = -lr * (1 + mu) * wd * 2.0 if _decayed(names) else 0.0
    np.testing.assert_allclose(u, np.full(u.shape, want), rtol=1e-5, atol=1e-12,
                               err_msg="/".join(names))
  # The tree holds every kind the rule distinguishes.
  assert {"kernel", "weight", "bias", "scale", "p"} <= seen, seen


# ---------------------------------------------------------------------------
# Gradient clipping.


def test_grad_clip_bounds_the_global_norm():
  lr, mu, clip = 0.1, 0.9, 2.0
  config = _config(**{"optim.lr": lr, "optim.momentum": mu, "optim.weight_decay": 0.0,
                      "optim.warmup_epochs": 0.0, "total_steps": 10, "optim.grad_clip": clip})
  tx, _ = train_lib.make_optimizer(config)
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  huge = {"a": jnp.array([3e6, 0.0, -4e6]), "b": jnp.full((2, 2), 6e6)}   # norm 1.3e7
  updates, _ = tx.update(huge, tx.init(params), params)
  # Clipped as ONE vector (global norm 13e6 -> clip), then SGD's first nesterov
  # step: -lr (1 + mu) g clip / |g|.
  k = -lr * (1 + mu) * clip / 13e6
  np.testing.assert_allclose(updates["a"], k * np.array([3e6, 0.0, -4e6]), rtol=1e-5)
  np.testing.assert_allclose(updates["b"], k * np.full((2, 2), 6e6), rtol=1e-5)
  norm = math.sqrt(sum(float(jnp.sum(u ** 2)) for u in jax.tree.leaves(updates)))
  assert norm == pytest.approx(lr * (1 + mu) * clip, rel=1e-5)
  # A gradient inside the bound passes unchanged.
  small = {"a": jnp.array([0.3, 0.0, -0.4]), "b": jnp.full((2, 2), 0.6)}     # norm 1.3
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], -lr * (1 + mu) * np.array([0.3, 0.0, -0.4]),
                             rtol=1e-5)
  # grad_clip = 0: no clipping.
  tx, _ = train_lib.make_optimizer(config_lib.apply_overrides(config, {"optim.grad_clip": 0.0}))
  updates, _ = tx.update(huge, tx.init(params), params)
  np.testing.assert_allclose(updates["b"], -lr * (1 + mu) * np.full((2, 2), 6e6), rtol=1e-5)


# ---------------------------------------------------------------------------
# Keep-N checkpoints.


def _step_dirs(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_keep_n_checkpoints_keeps_the_newest(tmp_path):
  directory = str(tmp_path / "ck")
  ckpt = ckpt_lib.Checkpointer(directory, keep=2)   # async, as the trainer
  for step in range(1, 6):
    ckpt.save(step, {"x": jnp.full((2,), float(step))}, force=True)
  ckpt.close()
  assert _step_dirs(directory) == [4, 5]
  assert sorted(os.listdir(directory)) == ["4", "5"]   # no half-written folder left
  ckpt = ckpt_lib.Checkpointer(directory, keep=2)
  assert ckpt.latest_step() == 5
  restored = ckpt.restore(5, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
  ckpt.close()
  np.testing.assert_array_equal(restored["x"], [5.0, 5.0])


# ---------------------------------------------------------------------------
# The global batch split over processes.


@pytest.mark.parametrize("processes,local_devices,batch,want", [
    (1, 8, 32, 32),
    (2, 4, 32, 16),
    (4, 2, 32, 8),
    (4, 1, 12, 3),
])
def test_each_process_loads_its_share_of_the_global_batch(
    monkeypatch, processes, local_devices, batch, want):
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(jax, "device_count", lambda: processes * local_devices)
  assert parallel.local_batch_size(batch) == want


@pytest.mark.parametrize("processes,local_devices,batch", [
    (2, 4, 20),    # 20 rows do not split over 8 devices
    (4, 4, 24),    # 6 rows per process, but not over its 4 devices
    (4, 1, 6),
])
def test_a_batch_that_does_not_split_is_an_error_naming_the_key(
    monkeypatch, processes, local_devices, batch):
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(jax, "device_count", lambda: processes * local_devices)
  with pytest.raises(ValueError, match=rf"config.batch_size={batch}\b.*"
                                       rf"{processes * local_devices} devices"):
    parallel.local_batch_size(batch)
