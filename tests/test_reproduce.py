"""qaff_jax.reproduce: the demo recipe end to end (data check -> train -> evaluate ->
report with fingerprint and paper columns), and the real recipes' data checks."""

import json
import os

import pytest

from qaff_jax import reproduce
from qaff_jax.data import download


def test_demo_recipe_end_to_end(tmp_path):
  body = reproduce.reproduce("demo", workdir=str(tmp_path / "run"))
  assert [c["ok"] for c in body["checks"]] == [True, True, True]
  fp = body["fingerprint"]
  assert len(fp["sha256"]) == 64 and fp["query_crop"] is True
  gnd = fp["datasets"]["demo"]
  assert len(gnd["gnd_sha256"]) == 64 and gnd["queries"] == 3 and gnd["db_images"] == 16
  assert fp["extraction"] == {"scales": [1.0], "max_side": 96, "scale_reduce": "mean"}
  assert fp["search"]["backend"] == "exact" and fp["rerank"]["method"] == "none"
  rows = body["rows"]
  assert {(r["dataset"], r["protocol"]) for r in rows} == {("demo", "M"), ("demo", "H")}
  assert all(0.0 <= r["measured"] <= 100.0 for r in rows)
  assert all(r["paper"] is None and "paper_source" in r for r in rows)
  with open(body["report_md"]) as f:
    md = f.read()
  assert "| measured mAP | paper mAP |" in md and fp["sha256"] in md
  assert "gnd_sha256" in md and "query_crop" in md
  with open(os.path.join(tmp_path, "run", "reproduce", "report.json")) as f:
    assert json.load(f)["fingerprint"]["sha256"] == fp["sha256"]
  # The same data and settings give the same fingerprint.
  plan = reproduce.make_plan("demo", data="", records_dir=None, r1m=False,
                             workdir=str(tmp_path / "run"))
  assert reproduce.fingerprint(plan)["sha256"] == fp["sha256"]
  plan.config.eval.max_side = 128
  assert reproduce.fingerprint(plan)["sha256"] != fp["sha256"]


def test_real_recipe_stops_until_the_data_is_verified(tmp_path):
  data = str(tmp_path / "data")
  with pytest.raises(reproduce.DataNotReady) as e:
    reproduce.make_plan("gldv2_r101_dolg", data=data, records_dir=None, r1m=True,
                        workdir=str(tmp_path / "w"))
  text = str(e.value)
  for name in ("gldv2-clean", "roxford5k", "rparis6k", "revisitop1m"):
    assert f"python -m qaff_jax.data.download {name} --out {data}" in text
  assert "python -m qaff_jax.data.build_gldv2" in text

  # A manifest saying all is verified and a finished build: the recipe's config.
  m = download.Manifest(data)
  for name in ("gldv2-clean", "roxford5k", "rparis6k"):
    m.set_dataset(name, {"complete": True, "verified": 1, "files": 1})
  records = os.path.join(data, "gldv2", "records")
  os.makedirs(records)
  with open(os.path.join(records, "build_report.json"), "w") as f:
    json.dump({"records": {"train": 1_264_376, "validation": 316_094}, "classes": 81_313,
               "num_missing_images": 0, "num_bad_images": 0}, f)
  plan = reproduce.make_plan("gldv2_r101_dolg", data=data, records_dir=None, r1m=False,
                             workdir=str(tmp_path / "w"))
  c = plan.config
  assert c.model.head == "dolg" and c.model.backbone == "resnet101"
  assert c.data.train_files == records and c.data.num_classes == 81_313
  assert c.data.num_train_images == 1_264_376
  assert c.eval.data_root == os.path.join(data, "revisitop")
  assert plan.datasets == ["roxford5k", "rparis6k"]


def test_every_baseline_has_a_recipe_and_a_cited_entry():
  from qaff_jax import config_lib
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  baselines = config_lib.load_config_module(os.path.join(here, "configs", "baselines.py"))
  assert tuple(baselines.METHODS) == reproduce.METHODS
  for method in reproduce.METHODS:
    assert f"gldv2_r101_{method}" in reproduce.RECIPES
    entry = reproduce.PUBLISHED[method]
    assert entry["paper"] and entry["table"]
    if not entry["verified"]:
      assert entry["numbers"] == {} or "not" in entry["table"].lower()


def test_cli_usage(capsys):
  with pytest.raises(SystemExit) as e:
    reproduce.main(["--help"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    reproduce.main(["--recipe", "nope"])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")
