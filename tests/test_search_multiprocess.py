"""Sharded exact search over several processes (hosts): two CPU processes of
four devices each, joined by `jax.distributed` with gloo collectives on
127.0.0.1, search one database split over all eight devices; every process
gets the same top-k, and it is the float64 NumPy ranking."""

import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import os, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
import numpy as np
from qaff_jax import parallel
from qaff_jax.evaluation import search
assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                              jax.device_count())
rng = np.random.default_rng(0)
db = rng.standard_normal((1003, 16)).astype(np.float32)
q = rng.standard_normal((37, 16)).astype(np.float32)
mesh = parallel.make_mesh(1)
placed = search.place_database(db, mesh)
exact = search.sharded_exact_search(q, placed, 10)[1]
rescored = search.sharded_exact_search(q, placed, 10, score_dtype="bfloat16", rescore=True)
np.savez(os.path.join(out, f"p{pid}.npz"), exact=exact, rescored=rescored[1],
         rescored_scores=rescored[0])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_search_one_sharded_database(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), port, str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  rng = np.random.default_rng(0)
  db = rng.standard_normal((1003, 16)).astype(np.float32)
  q = rng.standard_normal((37, 16)).astype(np.float32)
  scores = q.astype(np.float64) @ db.T.astype(np.float64)
  ref = np.argsort(-scores, axis=1, kind="stable")[:, :10]
  for pid in (0, 1):
    z = np.load(tmp_path / f"p{pid}.npz")
    np.testing.assert_array_equal(z["exact"], ref)
    # bf16 scoring + float32 re-score of each shard's candidates: exact here
    # (no two float64 scores of a top-10 are within bf16's error of each other
    # at the boundary), and the returned scores are the float32 dot products.
    np.testing.assert_array_equal(z["rescored"], ref)
    np.testing.assert_allclose(z["rescored_scores"], np.take_along_axis(scores, ref, 1),
                               rtol=1e-5, atol=1e-5)
