"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Several tests compile the same train step (resume, preemption, init_from): a
# persistent compilation cache keyed by the program text makes repeats cheap.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "qaff_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_collection_modifyitems(config, items):
  on_accelerator = jax.default_backend() in ("gpu", "tpu")
  skip = pytest.mark.skip(reason="needs a GPU/TPU")
  for item in items:
    if "accelerator" in item.keywords and not on_accelerator:
      item.add_marker(skip)
