"""Shared parts of the weight import: read a state dict, match keys, write Orbax.

A converter walks the abstract Flax backbone (`nnx.eval_shape`, nothing is
materialised), asks a `KeyMatcher` for the source tensor of every leaf, and
collects every problem (missing key, wrong shape) before raising one
`ConversionError` that names the file. The result is written as an Orbax
checkpoint that `--init_from` reads:

  <out>/<step>/state   {params: {net: {backbone: ...}},
                        model_state: {net: {backbone: ...}}}
  <out>/conversion.json  what was converted, from where, what was left out
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# Wrapper dicts that training scripts put around a state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module",
                "state_dict_ema", "model_ema")
# Prefixes that DDP / EMA wrappers put on every key.
KEY_PREFIXES = ("module.",)


class ConversionError(ValueError):
  """The source file cannot become the requested backbone (message says why)."""


@dataclasses.dataclass
class Converted:
  """A converted backbone.

  Attributes:
    params: nested dict (nnx pure-dict layout, string keys) of nnx.Param arrays.
    model_state: the same for the other variables (BatchNorm statistics).
    used: source keys that were used.
    unused: source keys that were deliberately left out (classifier, counters).
    notes: transformations worth knowing (resampled/folded embeddings, ...).
  """

  params: dict
  model_state: dict
  used: list[str]
  unused: list[str]
  notes: list[str]


# ---------------------------------------------------------------------------
# Reading.


def read_state_dict(path: str, *, strip_prefix: str = ""
                    ) -> dict[str, np.ndarray]:
  """Reads a PyTorch/timm state dict as {key: numpy array}.

  `.safetensors` files are read with the safetensors numpy API (no PyTorch);
  `.pth`/`.pt`/`.bin` need PyTorch (the `torch` extra). A wrapper dict
  ({"state_dict": ...}, {"model": ...}) is unwrapped, a `module.` prefix on
  every key and `strip_prefix` (e.g. "backbone.") are removed.

  Raises:
    ConversionError: unreadable, truncated or corrupt file, unknown format,
      or PyTorch missing for a pickle.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    tensors = _read_safetensors(path)
  elif ext in (".pth", ".pt", ".bin", ".ckpt"):
    tensors = _read_torch(path)
  else:
    raise ConversionError(f"{path}: unknown weight format {ext!r}; expected "
                          ".safetensors, or .pth/.pt with PyTorch installed")
  if not tensors:
    raise ConversionError(f"{path}: holds no tensors")
  prefixes = KEY_PREFIXES + ((strip_prefix,) if strip_prefix else ())
  for prefix in prefixes:
    if all(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items()}
  return tensors


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=import-outside-toplevel

  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except (safetensors.SafetensorError, OSError, ValueError,
          TypeError) as err:
    raise ConversionError(
        f"{path}: not a readable safetensors file ({err}); the file is "
        f"truncated or corrupt, re-download or re-export it") from err


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ConversionError(
        f"{path}: reading a PyTorch pickle needs PyTorch; install the extra "
        f"(pip install 'qaff_jax[torch]') or convert the file to .safetensors "
        f"(safetensors.torch.save_file(state_dict, 'weights.safetensors'))"
    ) from err
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises many types for a bad file.
    raise ConversionError(f"{path}: PyTorch cannot read it ({err}); the file "
                          f"is truncated or corrupt") from err
  obj = _unwrap(obj, path)
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      if v.dtype == torch.bfloat16:
        v = v.float()
      out[k] = v.numpy()
  return out


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """The state dict inside a checkpoint dict (one wrapper level at a time)."""
  for _ in range(3):
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a "
                            f"state dict")
    inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      return obj
    obj = obj[inner[0]]
  return obj


# ---------------------------------------------------------------------------
# Matching.


Transform = Callable[[np.ndarray], np.ndarray]


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch conv weight OIHW -> Flax HWIO."""
  return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax [in, out]."""
  return np.transpose(w)


def torch_shape(flax_shape: tuple[int, ...], transform: Transform | None
                ) -> tuple[int, ...]:
  """The shape the source tensor needs for `flax_shape` after `transform`."""
  if transform is conv_kernel:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if transform is linear_kernel:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


class KeyMatcher:
  """Takes tensors from a state dict; records what is used, missing, misshapen."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str,
               arch: str):
    self.tensors = tensors
    self.source = source
    self.arch = arch
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []

  def has(self, key: str) -> bool:
    return key in self.tensors

  def get(self, key: str) -> np.ndarray | None:
    """The raw tensor (marked used), or None (recorded as missing)."""
    if key not in self.tensors:
      self.missing.append(key)
      return None
    self.used.add(key)
    return self.tensors[key]

  def take(self, key: str, shape: tuple[int, ...],
           transform: Transform | None = None) -> np.ndarray | None:
    """tensors[key] transformed to `shape`, or None after recording why not."""
    value = self.get(key)
    if value is None:
      return None
    want = torch_shape(shape, transform)
    if tuple(value.shape) != want:
      self.mismatched.append(f"{key}: file has {tuple(value.shape)}, "
                             f"--arch {self.arch} wants {want}")
      return None
    return transform(value) if transform is not None else value

  def mismatch(self, message: str) -> None:
    self.mismatched.append(message)

  def finish(self, ignorable: Iterable[str], *, allow_unused: bool = False
             ) -> list[str]:
    """Raises on missing/misshapen/unexpected keys; returns the ignored keys.

    Args:
      ignorable: regexes of source keys that may stay unused (classifier,
        BatchNorm counters, ...).
      allow_unused: accept any unused key instead of raising.
    """
    patterns = [re.compile(p) for p in ignorable]
    unused = sorted(set(self.tensors) - self.used)
    unexpected = [k for k in unused
                  if not any(p.search(k) for p in patterns)]
    problems = []
    if self.missing:
      problems.append(f"{len(self.missing)} missing keys "
                      f"({_show(self.missing)})")
    if self.mismatched:
      problems.append(f"{len(self.mismatched)} shape mismatches "
                      f"({_show(self.mismatched)})")
    if unexpected and not allow_unused:
      problems.append(f"{len(unexpected)} unexpected keys the backbone does "
                      f"not use ({_show(unexpected)}; pass --allow_unused to "
                      f"drop them)")
    if problems:
      raise ConversionError(
          f"{self.source}: does not match --arch {self.arch}: "
          + "; ".join(problems)
          + ". Is it the right architecture and a complete file?")
    return unused


def _show(items: list[str], n: int = 6) -> str:
  head = ", ".join(items[:n])
  return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def summarize_keys(keys: Iterable[str]) -> str:
  """'fc.weight, fc.bias, 53 x *.num_batches_tracked' style summary."""
  keys = list(keys)
  counters = [k for k in keys if k.endswith("num_batches_tracked")]
  rest = [k for k in keys if not k.endswith("num_batches_tracked")]
  parts = list(rest[:8]) + ([f"... {len(rest) - 8} more"]
                            if len(rest) > 8 else [])
  if counters:
    parts.append(f"{len(counters)} x *.num_batches_tracked")
  return ", ".join(parts) if parts else "none"


# ---------------------------------------------------------------------------
# Target structure and writing.


def abstract_backbone(make: Callable[..., Any]):
  """(abstract module, params pure dict, other-state pure dict) of a builder.

  Leaves are ShapeDtypeStructs: nothing is allocated, so this is cheap even
  for ResNet-152 or ViT-B.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  model = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return model, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def materialize(make: Callable[..., Any], params: Mapping,
                model_state: Mapping, **kwargs):
  """The backbone `make(**kwargs)` holding the given pure-dict variables.

  Nothing is randomly initialised: the module is built abstractly and every
  variable is replaced; a variable left without a value is an error.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  model = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0), **kwargs))
  graphdef, p, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(p, _to_jax(params))
  nnx.replace_by_pure_dict(rest, _to_jax(model_state))
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      (nnx.to_pure_dict(p), nnx.to_pure_dict(rest)))[0]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ConversionError(f"no value for {jax.tree_util.keystr(path)}")
  return nnx.merge(graphdef, p, rest)


def _to_jax(tree: Mapping) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and set(v) == {"value"}:  # a saved nnx.State
      v = v["value"]
    out[k] = _to_jax(v) if isinstance(v, Mapping) else jnp.asarray(v)
  return out


def fill(abstract: dict, value_of: Callable[[tuple[str, ...], Any], Any]
         ) -> dict:
  """Maps every leaf of a pure dict, keys as strings; `value_of(path, leaf)`."""

  def walk(node, path):
    if isinstance(node, Mapping):
      return {str(k): walk(v, path + (str(k),)) for k, v in node.items()}
    return value_of(path, node)

  return walk(abstract, ())


def save_backbone(out: str, converted: Converted, *, step: int = 0,
                  info: Mapping[str, Any] | None = None,
                  whole_net: bool = False) -> str:
  """Writes `converted` as an Orbax checkpoint `<out>/<step>/state`.

  `whole_net`: `converted` holds the whole network ({"backbone", "head"},
  e.g. `convert.spca`), written as `net` instead of `net.backbone`;
  `--init_from` still takes only the backbone from it.

  Returns the absolute checkpoint folder (what `--init_from` takes).

  Raises:
    ConversionError: `out` already holds a checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  out = os.path.abspath(out)
  if os.path.isdir(out) and any(n.isdigit() for n in os.listdir(out)):
    raise ConversionError(f"{out} already holds a checkpoint; choose an empty "
                          f"--out folder")
  if whole_net:
    tree = {"params": {"net": converted.params},
            "model_state": {"net": converted.model_state}}
  else:
    tree = {"params": {"net": {"backbone": converted.params}},
            "model_state": {"net": {"backbone": converted.model_state}}}
  options = ocp.CheckpointManagerOptions(create=True,
                                         enable_async_checkpointing=False)
  with ocp.CheckpointManager(out, options=options) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    mngr.wait_until_finished()
  record = dict(info or {})
  record.update(step=step, used=len(converted.used),
                unused=converted.unused, notes=converted.notes)
  with open(os.path.join(out, "conversion.json"), "w") as f:
    json.dump(record, f, indent=2)
  return out


def torch_name(path: tuple[str, ...], leaf_to_torch: dict[str, str]) -> str:
  """Flax path ('layer1', '0', 'bn1', 'mean') -> torch key 'layer1.0.bn1.running_mean'."""
  *module, leaf = path
  if leaf not in leaf_to_torch:
    raise KeyError(f"no torch name for the Flax leaf {'/'.join(path)}")
  return ".".join(list(module) + [leaf_to_torch[leaf]])


def kernel_transform(path: tuple[str, ...], ndim: int) -> Transform | None:
  """torch -> Flax layout change for a leaf: conv OIHW->HWIO, linear (out,in)->(in,out)."""
  if path[-1] != "kernel":
    return None
  return conv_kernel if ndim == 4 else linear_kernel
