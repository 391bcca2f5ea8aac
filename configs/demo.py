r"""Demo: train and evaluate on the built-in synthetic landmarks (~10 min on 2 CPU cores).

python -m qaff_jax.train --config configs/demo.py --workdir workdirs/demo

The demo data (GLDv2-format TFRecords + a revisitop-format test set) is written to
`config.demo_root` on first use by `python -m qaff_jax.data.demo`. It exercises the
same code paths as a GLDv2 -> Revisited Oxford run. Variant: `configs/demo.py:quick`
(a few steps, for smoke tests); `configs/demo.py:head=gem` trains plain GeM.
The default head is QAFF with an auxiliary ArcFace loss per feature type.

`configs/demo.py:mixed` trains on the mixed demo (scene classes + small-object
classes pasted at 10-35% of the side on shared cluttered backgrounds; data in
`demo_data_mixed`, test set `mixed` with an `objects.json` of object boxes)
with a recipe that keeps small objects in view: 112 px crops covering at least
70% of the image, output stride 16 (a 7x7 map, so a 3x3 grid cell is about
two feature cells).
"""

from qaff_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, mixed=False, backbone="resnet_tiny",
                             head="qaff")
  c = config_lib.base_config()
  c.demo_root = "demo_data"
  c.demo_layout = "landmarks"
  c.data.train_files = "demo_data/train"
  c.data.num_classes = 48
  c.data.num_train_images = 48 * 24
  c.data.image_size = 96
  c.data.min_scale = 0.35
  c.data.color_jitter = 0.2
  c.data.shuffle_buffer = 512
  c.data.num_workers = 0

  c.model.backbone = arg.backbone
  c.model.head = arg.head
  c.model.dim = 128
  c.model.dtype = "float32"

  c.loss.scale = 30.0
  c.loss.margin = 0.15
  c.loss.aux_weight = 0.25
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 1.0

  c.batch_size = 64
  c.num_epochs = 20.0
  c.log_every = 10
  c.checkpoint_every = 200
  c.keep_checkpoints = 2

  c.eval.data_root = "demo_data/test"
  c.eval.datasets = "demo"
  c.eval.max_side = 160
  c.eval.batch_size = 16
  c.eval.at_end = True
  if arg.mixed:
    from qaff_jax.data import demo  # noqa: PLC0415 (its spec sizes the run)
    spec = demo.spec_for("mixed")
    c.demo_root = "demo_data_mixed"
    c.demo_layout = "mixed"
    c.data.train_files = "demo_data_mixed/train"
    c.data.num_classes = spec.num_train_classes + spec.num_object_classes
    c.data.num_train_images = c.data.num_classes * spec.views_per_class
    c.data.image_size = 112
    c.data.min_scale = 0.7
    c.model.output_stride = 16
    c.eval.data_root = "demo_data_mixed/test"
    c.eval.datasets = "mixed"
    c.eval.max_side = 192
    # One extraction scale and 96 px shape buckets: extraction is compile-bound
    # on CPU, and the comparison runs 30 trainings (padding is mask-exact, so
    # the bucket size does not change a descriptor).
    c.eval.scales = (1.0,)
    c.eval.bucket = 96
    c.num_epochs = 12.0
    # QAFF's fusion recipe here: attention fusion, routing distillation
    # (tau 0.5), fusion parameters at 10x the learning rate, and an ArcFace
    # loss on every feature (each cell learns to classify, so the routing
    # target has something to compare). See README "QAFF on demo-mixed".
    c.model.qaff.fusion = "attention"
    c.model.qaff.route_weight = 1.0
    c.model.qaff.route_tau = 0.5
    c.model.qaff.fusion_lr_mult = 10.0
    c.loss.aux_mode = "per_feature"
    c.loss.aux_weight = 1.0
  if arg.quick:
    c.total_steps = 4
    c.batch_size = 16
    c.log_every = 1
    c.checkpoint_every = 2
  return c
