"""The trainer: sharded == single device, FSDP layout, resume, preemption, NaN, errors, e2e."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qaff_jax import config_lib, metric_writer, parallel, train_lib
from qaff_jax.data import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = demo.DemoSpec(num_train_classes=8, views_per_class=6, num_test_landmarks=3,
                      db_views_per_landmark=6, queries_per_landmark=1, num_distractors=3,
                      train_size=48, num_shards=2, seed=3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.generate(root, SMALL)
  return root


def tiny_config(root, **overrides):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  try:
    import demo as demo_config  # configs/demo.py
  finally:
    sys.path.pop(0)
  c = demo_config.get_config("quick")
  c.demo_root = ""
  c.model.head = "gem"  # the trainer's tests need no QAFF compile time
  c.loss.aux_weight = 0.0
  c.data.train_files = os.path.join(root, "train")
  c.data.num_classes = SMALL.num_train_classes
  c.data.num_train_images = SMALL.num_train_classes * SMALL.views_per_class
  c.data.image_size = 32
  c.data.shuffle_buffer = 16
  c.model.dim = 16
  c.batch_size = 16
  c.total_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval.at_end = False
  c.eval.data_root = os.path.join(root, "test")
  c.eval.max_side = 64
  c.eval.scales = (1.0,)
  return config_lib.apply_overrides(c, overrides)


def losses_by_step(workdir):
  rows = {}
  for r in metric_writer.read_metrics(workdir):
    if "loss" in r:   # training rows (evaluation rows hold eval/<set>/<metric>)
      rows[r["step"]] = r["loss"]
  return rows


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.batch_size, config.data.image_size
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "label": rng.integers(0, config.data.num_classes, (b,), dtype=np.int32),
          "skipped": np.zeros((b,), np.int32)}


def _one_step(config, mesh):
  tx, schedule = train_lib.make_optimizer(config)
  graphdef, state, shardings = train_lib.create_train_state(config, mesh, tx)
  step = train_lib.jit_train_step(graphdef, tx, schedule, config, mesh, shardings)
  state, metrics = step(state, parallel.global_batch(_batch(config), mesh), jax.random.key(0))
  return jax.device_get(state), jax.device_get(metrics), state


def test_sharded_step_equals_single_device(data_root):
  config = tiny_config(data_root, **{"optim.name": "sgd", "optim.lr": 0.1,
                                     "optim.warmup_epochs": 0.0})
  single, m1, _ = _one_step(config, parallel.make_mesh(1, jax.devices()[:1]))
  sharded, m8, live = _one_step(config, parallel.make_mesh(2))
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(single.model_state), jax.tree.leaves(sharded.model_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Class rows are split over all 8 devices even in plain data parallel.
  w = live.params["classifier"]["weight"][...]
  assert w.sharding.spec == P(parallel.CLASS_AXES, None)


@pytest.mark.parametrize("fsdp", [False, True])
def test_param_shardings_follow_config(data_root, fsdp):
  config = tiny_config(data_root, **{"mesh.fsdp": fsdp, "mesh.model": 2})
  mesh = parallel.make_mesh(2)
  tx, _ = train_lib.make_optimizer(config)
  _, state, shardings = train_lib.create_train_state(config, mesh, tx)
  def check(tree):
    n_sharded = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if not getattr(leaf, "ndim", 0):
        continue
      spec, name = leaf.sharding.spec, jax.tree_util.keystr(path)
      if "classifier" in name:
        assert spec == P(parallel.CLASS_AXES, None), name
      elif fsdp and leaf.size >= parallel.FSDP_MIN_SIZE:
        assert "data" in tuple(spec), (name, spec)
        n_sharded += 1
      else:
        assert all(s is None for s in spec), (name, spec)
    return n_sharded

  n_params = check(state.params)
  assert (n_params > 0) == fsdp
  # Optimizer state (AdamW moments) follows the same layout.
  assert check(state.opt_state) == 2 * n_params


class _Killed(Exception):
  pass


def _kill_at(at):
  """An `on_step` that kills the run (an exception, like kill -9 for the files) at step `at`."""
  def on_step(step):
    if step == at:
      raise _Killed()
  return on_step


def test_killed_run_resumes_with_identical_losses(data_root, tmp_path):
  config = tiny_config(data_root, total_steps=6)
  full = str(tmp_path / "full")
  train_lib.train_and_evaluate(config, full)

  broken = str(tmp_path / "broken")
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, broken, on_step=_kill_at(3))
  assert os.path.isdir(os.path.join(broken, "checkpoints", "2"))
  assert not os.path.exists(os.path.join(broken, "checkpoints", "4"))
  train_lib.train_and_evaluate(config, broken)  # resumes from step 2
  want, got = losses_by_step(full), losses_by_step(broken)
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


def test_sigterm_saves_and_stops_cleanly(data_root, tmp_path):
  config = tiny_config(data_root, total_steps=6, checkpoint_every=100)
  workdir = str(tmp_path / "run")

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  out = train_lib.train_and_evaluate(config, workdir, on_step=preempt)
  assert out["preempted_at"] == 4  # the flag is seen at the next step, which saves
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  out = train_lib.train_and_evaluate(config, workdir)
  assert "preempted_at" not in out
  assert max(losses_by_step(workdir)) == 6


def test_nan_loss_stops_without_a_bad_checkpoint(data_root, tmp_path):
  config = tiny_config(data_root, **{"optim.lr": 1e30, "optim.name": "sgd",
                                     "optim.warmup_epochs": 0.0, "total_steps": 6})
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="loss is nan"):
    train_lib.train_and_evaluate(config, workdir)
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert all(not s.isdigit() or int(s) < 2 for s in steps), steps


def test_bad_config_and_paths_give_clear_errors(data_root, tmp_path):
  with pytest.raises(ValueError, match="config.data.train_files"):
    train_lib.train_and_evaluate(tiny_config(data_root, **{"data.train_files": ""}),
                                 str(tmp_path / "a"))
  missing = str(tmp_path / "nowhere" / "train-*")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train_lib.train_and_evaluate(tiny_config(data_root, **{"data.train_files": missing}),
                                 str(tmp_path / "b"))
  with pytest.raises(ValueError, match="config.loss.name"):
    train_lib.train_and_evaluate(tiny_config(data_root, **{"loss.name": "arcfaec"}),
                                 str(tmp_path / "c"))
  with pytest.raises(ValueError, match="model.backbone"):
    train_lib.train_and_evaluate(tiny_config(data_root, **{"model.backbone": "resnet99"}),
                                 str(tmp_path / "d"))


def test_cli_rejects_misspelled_override(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "qaff_jax.train", "--config", "configs/demo.py:quick",
       "--workdir", str(tmp_path), "--config.optim.lrr=0.1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr
  proc = subprocess.run(
      [sys.executable, "-m", "qaff_jax.train", "--config", "configs/demo.py:quik",
       "--workdir", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "quik" in proc.stderr


def test_end_to_end_train_then_evaluate(data_root, tmp_path):
  """Periodic and final evaluation: one report per step (plus LATEST), the
  numbers in metrics.jsonl and TensorBoard, the run's config as hparams."""
  config = tiny_config(data_root, total_steps=4, **{"eval.at_end": True, "grad_accum": 2,
                                                    "eval.every_steps": 2})
  workdir = str(tmp_path / "run")
  out = train_lib.train_and_evaluate(config, workdir)
  assert np.isfinite(out["loss"])
  m = out["eval"]["demo"]
  for key in ("mAP_E", "mAP_M", "mAP_H", "mP@1_E", "mP@10_H"):
    assert 0.0 <= m[key] <= 1.0
  eval_dir = os.path.join(workdir, "eval")
  reports = sorted(d for d in os.listdir(eval_dir) if d.startswith("step"))
  assert [r.split("_")[0] for r in reports] == ["step2", "step4"]
  assert all("_exact_none_" in r for r in reports)
  from qaff_jax.evaluation import runner
  assert runner.latest_report(workdir) == os.path.join(eval_dir, reports[-1])
  for path in (os.path.join(eval_dir, reports[-1]), eval_dir):
    with open(os.path.join(path, "report.json")) as f:
      assert json.load(f)["results"]["demo"]["mAP_M"] == pytest.approx(m["mAP_M"])
  saved = train_lib.load_config(workdir)
  assert saved.data.image_size == 32
  rows = metric_writer.read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  assert {"loss", "accuracy", "lr", "img_per_sec", "skipped_records"} <= set(train_rows[-1])
  eval_rows = {r["step"]: r for r in rows if "eval/demo/mAP_M" in r}
  assert sorted(eval_rows) == [2, 4]
  assert eval_rows[4]["eval/demo/mAP_M"] == pytest.approx(m["mAP_M"])
  # TensorBoard: the eval scalars and the hparams plugin's run summary.
  from tensorboardX.proto import event_pb2
  from qaff_jax.data import records
  tags = []
  for name in os.listdir(os.path.join(workdir, "tb")):
    for raw in records.iter_tfrecord_skipping(os.path.join(workdir, "tb", name)):
      event = event_pb2.Event.FromString(raw)
      tags += [(v.tag, event.step) for v in event.summary.value]
  assert [st for tag, st in tags if tag == "eval/demo/mAP_M"] == [2, 4]
  assert ("_hparams_/experiment", 0) in tags


def test_init_from_copies_backbone(data_root, tmp_path):
  config = tiny_config(data_root, total_steps=2)
  first = str(tmp_path / "first")
  train_lib.train_and_evaluate(config, first)
  config2 = tiny_config(data_root, total_steps=1, seed=7)
  mesh = parallel.make_mesh(config2.mesh.model)
  tx, _ = train_lib.make_optimizer(config2)
  graphdef, state, shardings = train_lib.create_train_state(config2, mesh, tx)
  loaded = train_lib.init_backbone_from(state, os.path.join(first, "checkpoints"), shardings)
  src = train_lib.ckpt_lib.restore_params_from(os.path.join(first, "checkpoints"))
  got = jax.device_get(loaded.params["net"]["backbone"]["conv1"]["kernel"][...])
  want = np.asarray(train_lib._pure(src["params"])["net"]["backbone"]["conv1"]["kernel"])
  np.testing.assert_array_equal(got, want)
  fresh = jax.device_get(state.params["net"]["head"]["whiten"]["kernel"][...])
  kept = jax.device_get(loaded.params["net"]["head"]["whiten"]["kernel"][...])
  np.testing.assert_array_equal(fresh, kept)  # the head is not touched


def _save_trees(directory, params, model_state, step=1):
  """A checkpoint folder whose `state` item holds the given (pure dict) trees."""
  ckpt = train_lib.ckpt_lib.Checkpointer(str(directory), async_save=False)
  ckpt.save(step, {"params": params, "model_state": model_state}, force=True)
  ckpt.close()
  return str(directory)


def _pure_host(tree):
  from flax import nnx
  return nnx.to_pure_dict(jax.device_get(tree))


def test_init_from_is_not_reapplied_on_resume(data_root, tmp_path, monkeypatch):
  """`--init_from` imports the backbone on a fresh start only: a resumed run starts
  from its own checkpoint (and the checkpoints follow config.keep_checkpoints)."""
  config = tiny_config(data_root, total_steps=4, checkpoint_every=1, keep_checkpoints=2)
  mesh = parallel.make_mesh(config.mesh.model)
  tx, _ = train_lib.make_optimizer(config)
  _, other, _ = train_lib.create_train_state(tiny_config(data_root, seed=7), mesh, tx)
  source = _save_trees(tmp_path / "source", _pure_host(other.params),
                       _pure_host(other.model_state))
  calls, entering = [], []
  real_init, real_jit = train_lib.init_backbone_from, train_lib.jit_train_step
  monkeypatch.setattr(train_lib, "init_backbone_from",
                      lambda state, path, sh: calls.append(path) or real_init(state, path, sh))

  def jit_recording_first_state(*args, **kwargs):
    step = real_jit(*args, **kwargs)
    def run(state, batch, rng):
      if not entering:   # the state the (resumed) run's first step starts from
        entering.append(_pure_host(state.params)["net"]["backbone"])
      return step(state, batch, rng)
    return run

  monkeypatch.setattr(train_lib, "jit_train_step", jit_recording_first_state)
  run = str(tmp_path / "run")
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, run, init_from=source, on_step=_kill_at(3))
  assert calls == [source]
  ckpts = os.path.join(run, "checkpoints")
  assert sorted(os.listdir(ckpts)) == ["2", "3"]      # keep_checkpoints=2 of 3 saves
  imported = entering.pop()
  entering.clear()
  train_lib.train_and_evaluate(config, run, init_from=source)
  assert calls == [source]                            # not imported again
  assert sorted(os.listdir(ckpts)) == ["3", "4"]
  trained = train_lib._pure(train_lib.ckpt_lib.restore_params_from(
      os.path.join(ckpts, "3"))["params"])["net"]["backbone"]
  resumed = entering[0]
  def flat(tree):  # list index 0 and a restored dict key '0' are the same key
    return {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  trained, resumed, imported = flat(trained), flat(resumed), flat(imported)
  assert set(resumed) == set(trained) == set(imported)
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], trained[key], err_msg=key)
  assert not np.allclose(resumed["conv1/kernel"], imported["conv1/kernel"])


def test_init_from_errors_name_the_path_and_the_key(data_root, tmp_path):
  config = tiny_config(data_root)
  mesh = parallel.make_mesh(config.mesh.model)
  tx, _ = train_lib.make_optimizer(config)
  _, state, shardings = train_lib.create_train_state(config, mesh, tx)
  params, model_state = _pure_host(state.params), _pure_host(state.model_state)

  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train_lib.init_backbone_from(state, missing, shardings)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"empty holds no finished checkpoint"):
    train_lib.init_backbone_from(state, str(tmp_path / "empty"), shardings)

  # Another architecture: a ViT's checkpoint has none of the ResNet's keys.
  vit = config_lib.apply_overrides(tiny_config(data_root), {"model.backbone": "vit_tiny"})
  _, abstract_vit, _ = train_lib.abstract_train_state(vit, mesh, tx)
  zeros = lambda tree: _pure_host(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree))
  path = _save_trees(tmp_path / "vit", zeros(abstract_vit.params),
                     zeros(abstract_vit.model_state))
  with pytest.raises(ValueError, match=rf"--init_from {path}: backbone params missing "
                                       r".*\['conv1'\]\['kernel'\]"):
    train_lib.init_backbone_from(state, path, shardings)

  # The same architecture at another width: the key and both shapes are named.
  kernel = params["net"]["backbone"]["conv1"]["kernel"]
  wide = jax.tree.map(lambda a: a, params)
  wide["net"]["backbone"]["conv1"]["kernel"] = np.zeros(kernel.shape[:-1] + (kernel.shape[-1] * 2,),
                                                       kernel.dtype)
  path = _save_trees(tmp_path / "wide", wide, model_state)
  shape = tuple(kernel.shape)
  with pytest.raises(ValueError) as err:
    train_lib.init_backbone_from(state, path, shardings)
  msg = str(err.value)
  assert path in msg and "['conv1']['kernel']" in msg, msg
  assert str(shape[:-1] + (shape[-1] * 2,)) in msg and str(shape) in msg, msg

  # No backbone at all (e.g. a head-only export).
  path = _save_trees(tmp_path / "headonly", {"net": {"head": params["net"]["head"]}},
                     model_state)
  with pytest.raises(ValueError, match=r"has no params\['net'\]\['backbone'\]"):
    train_lib.init_backbone_from(state, path, shardings)


def test_corrupt_records_are_skipped_and_counted_in_the_metrics(data_root, tmp_path):
  import shutil
  from qaff_jax.data import records
  train = tmp_path / "train"
  shutil.copytree(os.path.join(data_root, "train"), train)
  good = next(records.iter_tfrecord(sorted(train.iterdir())[0]))
  bad_jpeg = records.make_gldv2_example(b"not a jpeg", 1, "bad", 10, 10)
  records.write_tfrecord(train / "train-00009-of-00010", [b"garbage", bad_jpeg, good])
  config = tiny_config(data_root, total_steps=5, **{"data.train_files": str(train)})
  workdir = str(tmp_path / "run")
  out = train_lib.train_and_evaluate(config, workdir)
  # 49 good records -> 5 steps of 16 read the 3-record shard at least once.
  assert out["skipped_records_total"] >= 2
  rows = metric_writer.read_metrics(workdir)
  assert sum(r["skipped_records"] for r in rows) == out["skipped_records_total"]


def test_model_restore_ignores_other_train_state_fields(data_root, tmp_path):
  """Inference restores params + model_state even from a checkpoint of another layout."""
  from qaff_jax import checkpoint as ckpt_lib
  config = tiny_config(data_root)
  mesh = parallel.make_mesh(config.mesh.model)
  tx, _ = train_lib.make_optimizer(config)
  _, state, _ = train_lib.create_train_state(config, mesh, tx)
  older = {"step": state.step, "params": state.params, "model_state": state.model_state}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ckpt.save(3, older, force=True)
  ckpt.close()
  _, abstract, _ = train_lib.abstract_train_state(config, mesh, tx)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)  # as evaluation does
  restored = ckpt.restore_model(3, abstract)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(restored.params))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(Exception):  # the full restore insists on the current layout
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    try:
      ckpt.restore(3, abstract)
    finally:
      ckpt.close()


def test_batch_waiter_gives_up_on_a_stalled_pipeline_and_honours_preemption():
  import threading
  import types

  gate = threading.Event()

  def stalled():
    yield {"x": 1}
    gate.wait()          # a hung mount: next() never returns on its own
    yield {"x": 2}

  waiter = train_lib._BatchWaiter(stalled(), limit_s=0.6, what="shards a, b", poll_s=0.05)
  assert waiter.next() == {"x": 1}
  with pytest.raises(train_lib.DataStalled, match="shards a, b"):
    waiter.next()
  gate.set()
  waiter.close()

  gate2 = threading.Event()

  def stalled2():
    gate2.wait()
    yield {"x": 3}

  flag = types.SimpleNamespace(requested=False)
  waiter = train_lib._BatchWaiter(stalled2(), limit_s=0, what="s", poll_s=0.05)
  timer = threading.Timer(0.3, lambda: setattr(flag, "requested", True))
  timer.start()
  assert waiter.next(flag) is None   # SIGTERM while waiting: stop, do not save
  gate2.set()
  waiter.close()


class _FakeCheckpointer:
  def __init__(self, stop_at):
    self.stop_at = stop_at

  def reached_preemption(self, step):
    return step >= self.stop_at


def test_several_processes_stop_only_at_the_agreed_preemption_step():
  preempt = train_lib._Preemption(install=False)
  preempt.requested = True          # a SIGTERM seen by this host alone
  ckpt = _FakeCheckpointer(stop_at=7)
  assert not train_lib.should_stop(preempt, ckpt, 5, process_count=4)
  assert train_lib.should_stop(preempt, ckpt, 7, process_count=4)
  # One process: its own flag is enough.
  assert train_lib.should_stop(preempt, ckpt, 5, process_count=1)
  preempt.requested = False
  assert not train_lib.should_stop(preempt, ckpt, 5, process_count=1)


def test_multi_process_runs_leave_sigterm_to_jax():
  before = signal.getsignal(signal.SIGTERM)
  with train_lib._Preemption(install=False):
    assert signal.getsignal(signal.SIGTERM) is before
  with train_lib._Preemption(install=True) as p:
    assert signal.getsignal(signal.SIGTERM) == p._handler
  assert signal.getsignal(signal.SIGTERM) is before


def test_resume_on_fewer_devices_continues_the_same_run(data_root, tmp_path):
  """Steps 1-2 on 8 devices, then 3-4 in a process with 1 device: the same
  losses as 4 steps on 8 devices (same data stream, same state)."""
  config = tiny_config(data_root, total_steps=4, checkpoint_every=2)
  full = str(tmp_path / "full")
  train_lib.train_and_evaluate(config, full)
  moved = str(tmp_path / "moved")
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, moved, on_step=_kill_at(3))
  script = ("import sys, jax; from qaff_jax import train_lib\n"
            "assert jax.device_count() == 1, jax.device_count()\n"
            "train_lib.train_and_evaluate(train_lib.load_config(sys.argv[1]), sys.argv[1])\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, moved], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want, got = losses_by_step(full), losses_by_step(moved)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=2e-4, err_msg=f"step {step}")


def test_grad_accum_equals_one_step_on_the_full_batch(data_root):
  """Two micro-batches of 8 give the update of one batch of 16 (ViT-tiny: LayerNorm
  only, so no BatchNorm statistics differ between micro-batches and the full batch)."""
  mesh = parallel.make_mesh(1)
  base = {"model.backbone": "vit_tiny", "optim.name": "sgd", "optim.lr": 0.5,
          "optim.warmup_epochs": 0.0,   # warm-up starts at lr 0: step 1 would not move
          "optim.weight_decay": 0.0, "model.dtype": "float32"}
  full, full_metrics, _ = _one_step(tiny_config(data_root, **base), mesh)
  accum, accum_metrics, _ = _one_step(tiny_config(data_root, **base, grad_accum=2), mesh)
  np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  moved = 0
  for a, b, p0 in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params),
                      jax.tree.leaves(_one_step_init(tiny_config(data_root, **base), mesh))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved += int(not np.allclose(b, p0))
  assert moved > 0   # the step did change the parameters


def _one_step_init(config, mesh):
  tx, _ = train_lib.make_optimizer(config)
  _, state, _ = train_lib.create_train_state(config, mesh, tx)
  return jax.device_get(state.params)
