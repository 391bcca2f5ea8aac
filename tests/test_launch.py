"""Launch scripts: valid bash, and the by-hand multi-host start sets up jax.distributed."""

import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["tpu_vm.sh", "gpu_multihost.sh", "eval_scann.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], check=True)


def test_gpu_multihost_by_hand_exports_the_coordinator(tmp_path):
  fake = tmp_path / "python"  # records what the trainer would be started with
  fake.write_text("#!/usr/bin/env bash\n"
                  "echo \"ARGS=$*\"\n"
                  "echo \"COORD=$JAX_COORDINATOR_ADDRESS N=$JAX_NUM_PROCESSES ID=$JAX_PROCESS_ID\"\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
  env.update(PATH=f"{tmp_path}:{env['PATH']}", COORDINATOR="10.0.0.1:1234",
             NUM_PROCESSES="2", PROCESS_ID="1")
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_multihost.sh"),
                        "configs/gldv2.py", "/shared/run", "--config.batch_size=64"],
                       env=env, capture_output=True, text=True, check=True).stdout
  assert "COORD=10.0.0.1:1234 N=2 ID=1" in out
  assert ("ARGS=-m qaff_jax.train --config configs/gldv2.py --workdir /shared/run "
          "--config.batch_size=64") in out


def test_maybe_initialize_distributed_reads_the_same_variables(monkeypatch):
  import jax
  from qaff_jax import parallel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  parallel.maybe_initialize_distributed()
  assert calls == []  # a single process is left alone
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  parallel.maybe_initialize_distributed()
  assert calls == [{"num_processes": 2, "process_id": 1}]
