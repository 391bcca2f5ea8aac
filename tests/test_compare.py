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
  assert "| a | 1 | 50.00 | 25.00 | 12.50 | - | - | 512 | 3.0 |" in compare.markdown(rows)


def test_seeds_give_mean_and_population_std():
  rows = [{"variant": "q", "seed": s, "mAP_E": e, "mAP_M": m, "mAP_H": 0.1,
           "descriptor_bytes": 512, "extract_ms_per_image": 2.0, "region_follow": f,
           "region_follow_chance": 0.2, "weight_std": 0.05}
          for s, e, m, f in ((0, 0.5, 0.2, 0.6), (1, 0.7, 0.4, 0.8))]
  rows.append({"variant": "gem", "seed": 0, "mAP_E": 0.3, "mAP_M": 0.3, "mAP_H": 0.3,
               "descriptor_bytes": 512, "extract_ms_per_image": 1.0})
  summary = compare.summarise(rows)
  assert [e["variant"] for e in summary] == ["q", "gem"]
  assert summary[0]["mAP_E"] == pytest.approx(0.6) and summary[0]["mAP_E_std"] == pytest.approx(0.1)
  table = compare.markdown(rows)
  assert "| q | 2 | 60.00 ± 10.00 | 30.00 ± 10.00 | 10.00 ± 0.00 | 0.70 ± 0.10 (0.20) |" in table
  assert "| gem | 1 | 30.00 | 30.00 | 30.00 | - | - |" in table


def test_fixed_fusions_switch_routing_off_and_seed_is_set():
  config = compare.variant_config({"model.qaff.fusion": "uniform"}, seed=2)
  assert config.model.qaff.route_weight == 0.0 and config.model.qaff.entropy_weight == 0.0
  assert config.seed == 2
