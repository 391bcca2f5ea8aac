"""Every backbone, head and loss trains 2 steps under the (4, 2) mesh."""

import jax
import numpy as np
import pytest

from qaff_jax import config_lib, parallel, train_lib

VARIANTS = [
    # (backbone, head, loss, extra overrides)
    ("resnet_tiny", "qaff", "arcface", {"loss.aux_weight": 0.25}),
    ("resnet_tiny", "spca", "arcface", {}),
    ("resnet_tiny", "delg", "arcface", {"loss.learn_scale": True}),
    ("resnet_tiny", "dolg", "arcface", {}),
    ("resnet_tiny", "cvnet", "curricularface", {}),
    ("resnet_tiny", "superglobal", "cosface", {}),
    ("resnet_tiny", "gem", "madacos", {}),
    ("resnet_tiny", "gem", "contrastive", {}),
    ("resnet_tiny", "gem", "triplet", {"loss.pair_margin": 0.1}),
    # QAFF ablations (fusion modes, plain-GeM global branch)
    *[("resnet_tiny", "qaff", "arcface", {"model.qaff.fusion": mode})
      for mode in ("uniform", "static", "concat", "global", "regional", "scale")],
    ("resnet_tiny", "qaff", "arcface", {"model.qaff.global_pool": "gem"}),
    # QAFF fusion training: attention fusion, routing distillation, entropy,
    # fusion learning-rate multiplier, per-feature / routed auxiliary losses
    ("resnet_tiny", "qaff", "arcface", {
        "model.qaff.fusion": "attention", "model.qaff.route_weight": 1.0,
        "model.qaff.entropy_weight": 0.01, "model.qaff.fusion_lr_mult": 5.0,
        "loss.aux_weight": 0.25, "loss.aux_mode": "routed"}),
    ("resnet_tiny", "qaff", "arcface", {
        "model.qaff.fusion": "attention", "model.qaff.route_weight": 1.0,
        "model.qaff.route_signal": "distinct", "model.qaff.route_tau": 0.05,
        "loss.aux_weight": 1.0, "loss.aux_mode": "per_feature"}),
    ("resnet_tiny", "qaff", "curricularface", {
        "model.qaff.route_weight": 1.0, "model.qaff.route_over": "types",
        "loss.aux_weight": 0.25, "loss.aux_mode": "per_feature", "grad_accum": 2}),
    ("resnet50", "gem", "arcface", {}),  # the Bottleneck path at real width
    ("ultron_tiny", "gem", "arcface", {}),
    ("vit_tiny", "gem", "arcface", {}),
]


def small_config(backbone, head, loss, extra):
  c = config_lib.base_config()
  c.model.update(dict(backbone=backbone, head=head, dim=16, dtype="float32"))
  c.model.qaff.mlp_hidden = 8
  c.model.qaff.num_tokens = 4
  c.model.qaff.token_dim = 8
  c.model.qaff.heads = 2
  c.loss.name = loss
  c.data.num_classes = 12
  c.data.num_train_images = 64
  c.data.image_size = 32
  c.batch_size = 16
  c.total_steps = 2
  c.optim.warmup_epochs = 0.0
  c.mesh.model = 2
  return config_lib.apply_overrides(c, extra)


@pytest.mark.parametrize("backbone,head,loss,extra", VARIANTS,
                         ids=[f"{b}-{h}-{l}" + "".join(f"-{v}" for v in e.values())
                              for b, h, l, e in VARIANTS])
def test_two_steps_on_a_4x2_mesh(backbone, head, loss, extra):
  config = small_config(backbone, head, loss, extra)
  mesh = parallel.make_mesh(config.mesh.model)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  tx, schedule = train_lib.make_optimizer(config)
  graphdef, state, shardings = train_lib.create_train_state(config, mesh, tx)
  step = train_lib.jit_train_step(graphdef, tx, schedule, config, mesh, shardings)
  rng = np.random.default_rng(0)
  before = jax.device_get(state.params)
  for i in range(2):
    batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             # pairs of the same class, so pair losses have positives in the batch
             "label": (np.arange(16) // 2 % 12).astype(np.int32),
             "skipped": np.zeros((16,), np.int32)}
    state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(i))
    assert np.isfinite(float(metrics["loss"])), (i, metrics)
  assert int(state.step) == 2
  after = jax.device_get(state.params)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert sum(moved) > len(moved) // 2
  if loss == "curricularface":
    assert float(state.loss_state["t"]) != 0.0  # the running positive cosine moved
  if extra.get("loss.learn_scale"):
    assert float(after["loss_scale"]["scale"]) != config.loss.scale
