"""How every launcher ends on an error: one message, an exit code, no traceback.

`errors.run(main)` replaces `absl.app.run(main)`:

- a user mistake (a bad flag or config value, an unknown preset, an incompatible or busy
  workdir, a step that cannot fit, missing data) prints `error: <message>` on stderr and
  exits with code 2 (`USAGE`);
- a fault of the run itself (a checkpoint that cannot be written or read back, non-finite
  losses) prints the same one-message form and exits with code 1 (`FAULT`);
- anything else is a bug: the traceback as usual.

`--verbose` shows the traceback in every case, and the log lines of the libraries'
background threads that are otherwise summed up by the final message (orbax's writer
threads print a traceback per failed file when a disk is full).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable, NoReturn

from absl import app, flags

USAGE = 2
FAULT = 1

flags.DEFINE_bool("verbose", False, "On an error, print the full traceback and every "
                  "background thread's log instead of one message.")


def verbose() -> bool:
  """--verbose, also before the flags are parsed (config files load while flags are
  defined)."""
  try:
    return bool(flags.FLAGS.verbose)
  except flags.UnparsedFlagAccessError:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in sys.argv[1:])


def fail(message: str, code: int = USAGE, *, from_exception: bool = False) -> NoReturn:
  """Prints `error: message` (one line where the message is) and exits with `code`."""
  text = message if message.startswith("error: ") else f"error: {message}"
  if from_exception and not verbose():
    text += " [--verbose shows the traceback]"
  print(text, file=sys.stderr, flush=True)
  sys.exit(code)


def seeds(text: str, flag: str = "--seeds") -> list[int]:
  """A flag of comma-separated integers (seeds), or a usage error naming it."""
  try:
    out = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    fail(f"{flag}={text!r}: comma-separated integers expected")
  if not out:
    fail(f"{flag}: at least one seed")
  return out


def _user_errors() -> tuple[type[BaseException], ...]:
  from bert_jax import workdir_lock
  return (ValueError, FileNotFoundError, MemoryError, app.UsageError,
          workdir_lock.WorkdirLockedError)


def _fault_errors() -> tuple[type[BaseException], ...]:
  from bert_jax import checkpoint
  return (checkpoint.CheckpointSaveError, checkpoint.UnreadableCheckpointError,
          FloatingPointError)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}. Pass --helpshort or --helpfull to see the flags.")
  except Exception as e:  # noqa: BLE001  (a config file's get_config refusing its argument)
    if verbose():
      raise
    fail(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))


class _QuietLibraries(logging.Filter):
  """Drops the error records of orbax, tensorstore and asyncio (a failed checkpoint write
  logs a traceback per array written, from several threads): the exception that ends the
  run reports the failure once."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    return not (record.name == "asyncio" or "orbax" in record.pathname
                or "tensorstore" in record.pathname)


def _quiet_libraries() -> None:
  quiet = _QuietLibraries()
  for logger in (logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")):
    logger.addFilter(quiet)
    for handler in logger.handlers:
      handler.addFilter(quiet)

  def thread_hook(args):  # a worker thread's uncaught exception: one line
    if args.exc_type is SystemExit:
      return
    name = args.thread.name if args.thread is not None else "?"
    print(f"warning: background thread {name}: {args.exc_type.__name__}: "
          f"{str(args.exc_value)[:200]}", file=sys.stderr)

  def unraisable_hook(args):  # "Exception ignored in ...": a closed event loop's writers
    del args

  threading.excepthook = thread_hook
  sys.unraisablehook = unraisable_hook


def _exit_now(message: str, code: int) -> NoReturn:
  """Prints the message and exits without the interpreter's shutdown, where the libraries'
  writer threads and event loops print their own failures again."""
  try:
    fail(message, code, from_exception=True)
  except SystemExit:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run(main: Callable[[list[str]], object]) -> None:
  """absl.app.run(main) with the error handling above."""

  def wrapped(argv):
    if not verbose():
      _quiet_libraries()
    try:
      return main(argv)
    except _user_errors() as e:
      if verbose():
        raise
      fail(str(e), USAGE, from_exception=True)
    except _fault_errors() as e:
      if verbose():
        raise
      _exit_now(str(e), FAULT)

  app.run(wrapped, flags_parser=_parse_flags)
