"""The comparison script: every variant is a valid config that builds a model."""

import jax
import pytest
from flax import nnx

from qaff_jax import compare, models


@pytest.mark.parametrize("set_name", sorted(compare.SETS))
def test_every_variant_builds(set_name):
  for name, overrides in compare.SETS[set_name].items():
    config = compare.apply_overrides(compare.demo_config(), overrides)
    model = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m: m(jax.numpy.zeros((2, 64, 64, 3))), model)
    assert out["descriptor"].shape == (2, config.model.dim), name


def test_unknown_override_is_an_error():
  with pytest.raises(KeyError, match="model.qaff.fusoin"):
    compare.apply_overrides(compare.demo_config(), {"model.qaff.fusoin": "uniform"})


def test_markdown_table():
  rows = [{"variant": "a", "mAP_E": 0.5, "mAP_M": 0.25, "mAP_H": 0.125,
           "descriptor_bytes": 512, "extract_ms_per_image": 3.0}]
  assert "| a | 50.00 | 25.00 | 12.50 | 512 | 3.0 |" in compare.markdown(rows)
