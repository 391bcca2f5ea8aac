"""Shared command-line plumbing of the `python -m qaff_jax.*` entry points.

One convention for every entry point:

* `--help` (absl: also `-h`, `--helpshort`, `--helpfull`) prints the usage on
  stdout and exits 0 (absl alone exits 1).
* A usage mistake (a missing, unknown or conflicting flag, a bad flag value, a
  config file that does not load, a folder that is not what the flag wants)
  prints ONE line `error: <what is wrong; what to pass>` on stderr and exits 2,
  without a traceback and without the full usage text.
* Bad input files found while working are the entry point's business (most
  print `error: <msg>` and exit 1).
* jax's probing of platforms that are not there ("Unable to initialize
  backend 'tpu'", 'cuda', 'rocm', ...) is not logged, unless the log level is
  DEBUG (`--verbosity=1`); the platform choice itself is left alone.

absl entry points call `run(main)` in place of `app.run(main)`; argparse ones
build a `cli_util.ArgumentParser`. This module imports nothing heavy (no jax).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import glob
import logging
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags

# The logger jax's backend set-up writes to (`jax._src.xla_bridge`).
XLA_BRIDGE_LOGGER = "jax._src.xla_bridge"
_PROBE_PREFIX = "Unable to initialize backend"
_HELP_ARGS = re.compile(r"^--?(help|helpshort|helpfull|helpxml|\?)(=.*)?$")
_REQUIRED = re.compile(r"Flag --([\w.-]+) must have a value other than None")


class UsageError(ValueError):
  """A usage mistake (missing or conflicting flags, a wrong folder): exit 2.

  A `ValueError`, so that library callers catching bad-input errors still
  catch it; `run` prints it as one `error:` line and exits 2.
  """


def one_line(message: str) -> str:
  """`message` on one line: a traceback it carries shrinks to its last line."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if not lines:
    return "unknown error"
  if "Traceback (most recent call last):" in lines:
    head = lines[0].removesuffix(":").removesuffix("Error whilst parsing config file")
    return f"{head.rstrip(': ')}: {lines[-1]}"
  return "; ".join(lines)


def usage_error(message: str) -> NoReturn:
  """Prints `error: <message>` as one line on stderr and exits with code 2."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(2)


def program_name() -> str:
  """How the running entry point is invoked, e.g. `python -m qaff_jax.train`."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return f"python -m {spec.name.removesuffix('.__main__')}"
  return sys.argv[0] if sys.argv and sys.argv[0] else "this program"


class _BackendProbeFilter(logging.Filter):
  """Drops jax's "Unable to initialize backend ..." probe records below DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.getMessage().startswith(_PROBE_PREFIX):
      return True
    return logging.getLogger(XLA_BRIDGE_LOGGER).isEnabledFor(logging.DEBUG)


def quiet_backend_probe() -> None:
  """Hides jax's platform-probing failures ("Unable to initialize backend 'tpu'").

  jax tries every platform it knows when it first needs a device and logs each
  one that is not there; on a machine without TPUs that line is noise. This
  only filters those records on jax's logger (they still show at DEBUG level,
  absl `--verbosity=1`); it does not choose a platform (`JAX_PLATFORMS` is
  left as the user set it). Idempotent; call it before jax picks its backends.
  """
  logger = logging.getLogger(XLA_BRIDGE_LOGGER)
  if not any(isinstance(f, _BackendProbeFilter) for f in logger.filters):
    logger.addFilter(_BackendProbeFilter())
  quiet_libtpu_without_tpu()


# What a TPU VM's metadata server would tell libtpu; set only where no TPU is attached.
# Without chips, libtpu only compiles (`qaff_jax.compile`), so several processes may
# load it at once (its lockfile guards the chips).
_NO_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
               "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def quiet_libtpu_without_tpu() -> None:
  """With libtpu installed (the `tpu` extra, e.g. for `qaff_jax.compile`) on a
  machine without TPU chips, libtpu's probe asks for the absent TPU VM metadata
  and prints warnings on stderr (not through Python logging). Where no TPU
  device node exists (/dev/accel*, /dev/vfio), the metadata it wants is given
  (values already set are kept); a TPU VM is left alone."""
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    return
  for key, value in _NO_TPU_ENV.items():
    os.environ.setdefault(key, value)


def _split_at_double_dash(args: Sequence[str]) -> tuple[list[str], list[str]]:
  args = list(args)
  if "--" in args:
    i = args.index("--")
    return args[:i], args[i:]
  return args, []


def _flag_error_message(err: Exception) -> str:
  """One line for an absl flag-parsing error (or a config override's KeyError)."""
  text = str(err)
  missing = _REQUIRED.findall(text)
  if missing:
    return "missing " + ", ".join(f"--{name}" for name in dict.fromkeys(missing))
  if isinstance(err, (KeyError, AttributeError)):
    # ml_collections: an unknown field of a `--config.a.b=v` override; the
    # message is the repr of a KeyError's text ("'lrr'\nDid you mean ...").
    try:
      text = ast.literal_eval(text) if text[:1] in "'\"" else text
    except (ValueError, SyntaxError):
      pass
    return f"no such config field {one_line(text)}"
  return one_line(text)


def _check_config_files() -> None:
  """A config file flag whose file did not load: one line now, not a traceback later."""
  # pylint: disable-next=import-outside-toplevel
  from ml_collections.config_flags import config_flags
  seen = set()
  for key in list(flags.FLAGS):
    flag = flags.FLAGS[key]
    if flag.name in seen or not (flag.present and config_flags.is_config_flag(flag)):
      continue
    seen.add(flag.name)
    try:
      getattr(flag.value, "get", None)
    except OSError as err:  # ml_collections defers "file not found" to first use
      last = one_line(err).split("; ")[-1]
      usage_error(f"--{flag.name}={config_flags.get_config_filename(flag)}: cannot load "
                  f"the config file ({last})")


def parse_flags(argv: Sequence[str], *, example: str | None = None) -> list[str]:
  """absl flag parsing: `--help` exits 0, mistakes are one `error:` line, exit 2.

  Args:
    argv: the command line, program name first.
    example: a command line that works, shown after "missing --flag" errors.

  Returns:
    The arguments left after the flags, program name first (what `main` gets).
  """
  head, tail = _split_at_double_dash(argv[1:])
  if "h" not in flags.FLAGS:
    head = ["--help" if a == "-h" else a for a in head]
  argv = [argv[0], *head, *tail]
  wants_help = any(_HELP_ARGS.match(a) for a in head)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as done:
    # absl's help flags print the usage on stdout and exit 1.
    if wants_help and done.code == 1:
      raise SystemExit(0) from None
    raise
  except (flags.Error, KeyError, AttributeError) as err:
    dotted = any(a.startswith("-") and "." in a.partition("=")[0] for a in head)
    if not isinstance(err, flags.Error) and not dotted:
      raise  # not from a `--config.a.b=v` override: a bug, keep the traceback
    message = _flag_error_message(err)
    if message.startswith("missing ") and example:
      usage_error(f"{message}; e.g. {example}")
    usage_error(f"{message}; see {program_name()} --help")
  _check_config_files()
  return rest


def run(main: Callable[[Any], Any], *, example: str | None = None,
        flags_parser: Callable[[Sequence[str]], Any] | None = None) -> NoReturn:
  """`app.run(main)` with this module's conventions.

  Flags are parsed by `flags_parser` (default: `parse_flags` with `example`);
  `app.UsageError` or `UsageError` raised by `main` prints one `error:` line
  and exits 2; jax's backend probing is quiet.
  """
  quiet_backend_probe()

  def guarded(args):
    try:
      return main(args)
    except (app.UsageError, UsageError) as err:
      usage_error(str(err))

  parser = flags_parser or (lambda argv: parse_flags(argv, example=example))
  app.run(guarded, flags_parser=parser)
  raise AssertionError("app.run returned")  # it always exits


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors are one `error:` line, exit 2.

  (argparse prints the whole usage before its error line.)
  """

  def error(self, message: str) -> NoReturn:
    usage_error(f"{message}; see {self.prog} --help")


# ---------------------------------------------------------------------------
# Dotted config overrides on top of a config loaded at run time.


def split_config_overrides(argv: Sequence[str], name: str = "config"
                           ) -> tuple[list[str], dict[str, str]]:
  """Takes `--NAME.a.b=v` (or `--NAME.a.b v`) out of `argv` when no `--NAME FILE` is given.

  absl knows `--config.a.b` only once `--config FILE` has loaded; without a
  file these set single fields of a config the program loads itself (e.g. a
  run's saved config.json). A bare `--NAME.a.b` means `true`.

  Returns:
    (argv without those arguments, {"a.b": "v"}); argv untouched and {} when
    `--NAME`/`--NAME=FILE` is on the command line.
  """
  head, tail = _split_at_double_dash(argv[1:])
  names = (f"--{name}", f"-{name}")
  if any(a in names or a.startswith(tuple(n + "=" for n in names)) for a in head):
    return list(argv), {}
  rest, overrides = [argv[0]], {}
  i = 0
  while i < len(head):
    arg = head[i]
    if arg.startswith(tuple(n + "." for n in names)):
      key, eq, value = arg.split(".", 1)[1].partition("=")
      if not eq:
        if i + 1 < len(head) and not head[i + 1].startswith("-"):
          value, i = head[i + 1], i + 1
        else:
          value = "true"
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest + tail, overrides


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def _parse_as(current: Any, text: str, flag: str) -> Any:
  """`text` as a value of the type of `current` (a config field's value)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  if isinstance(current, ml_collections.ConfigDict):
    fields = ", ".join(sorted(current.keys())[:4])
    raise UsageError(f"{flag} is a group of fields; set one of them ({fields}, ...)")
  try:
    if isinstance(current, bool):
      low = text.strip().lower()
      if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return low in ("true", "1", "yes")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = (_literal(text) if text.strip().startswith(("(", "["))
               else tuple(_literal(p) for p in text.split(",") if p.strip()))
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
      if current and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                         for v in current):
        kind = float if any(isinstance(v, float) for v in current) else int
        value = tuple(kind(v) for v in value)
      return type(current)(value)
  except (ValueError, TypeError) as err:
    kind = type(current).__name__
    raise UsageError(f"{flag}={text}: want {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                     f"like {current!r}") from err
  return _literal(text)  # a field that is None: any literal, else the text


def apply_config_overrides(config, overrides: dict[str, str], name: str = "config"):
  """Sets dotted fields of `config` from command-line text (`{"eval.max_side": "512"}`).

  Each value is parsed as the field's current type (bool, int, float, str,
  tuple: `0.7,1.0` or `(0.7, 1.0)`). An unknown field or a value of the wrong
  type is a `UsageError` naming `--NAME.<field>`.
  """
  from qaff_jax import config_lib  # pylint: disable=import-outside-toplevel
  typed = {}
  for key, text in overrides.items():
    flag = f"--{name}.{key}"
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=1)
        where = ".".join(parts[:depth])
        hint = (f"; did you mean --{name}.{where + '.' if where else ''}{close[0]}?"
                if close else "")
        raise UsageError(f"{flag}: no such config field{hint}")
      node = node[part]
    typed[key] = _parse_as(node, text, flag)
  return config_lib.apply_overrides(config, typed)
