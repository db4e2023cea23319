"""What the training examples share: argument types that name the flag and
what it expects, the run flags (fake devices, checkpoints) and their checks,
and resuming from the newest intact checkpoint.

Only the standard library at the top: the examples parse their arguments
before JAX starts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys


def checked(kind, expected: str, ok):
  """An argparse ``type=``: ``kind(text)`` when ``ok`` of it, else an error
  that names the flag and what it expects."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not ok(value):
      raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value

  return parse


positive_int = checked(int, "a positive integer", lambda n: n >= 1)
non_negative_int = checked(int, "a non-negative integer", lambda n: n >= 0)
positive_float = checked(float, "a positive number",
                         lambda x: math.isfinite(x) and x > 0)
non_negative_float = checked(float, "a non-negative number",
                             lambda x: math.isfinite(x) and x >= 0)


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                      help="save checkpoints here, and resume from the newest "
                      "one found there")
  parser.add_argument("--save-every", type=positive_int, default=None,
                      metavar="N", help="with --checkpoint-dir: save every N "
                      "steps and after the last one (default: 100)")


def check_run_args(parser: argparse.ArgumentParser, args) -> None:
  """The checks across flags every example needs (``parser.error``), and
  ``--save-every``'s default."""
  if args.fake_devices and args.batch_size % args.fake_devices:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of "
                 f"--fake-devices {args.fake_devices} (every device takes an "
                 "equal share of the batch)")
  if args.save_every is not None and args.checkpoint_dir is None:
    parser.error("--save-every needs --checkpoint-dir")
  if args.checkpoint_dir is not None and args.save_every is None:
    args.save_every = 100


def use_fake_devices(n: int | None) -> None:
  """``n`` fake CPU devices (before JAX starts: XLA reads the flag once, when
  the CPU backend starts)."""
  if not n:
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"
  os.environ["JAX_PLATFORMS"] = "cpu"


def check_strategy_and_devices(args) -> int:
  """Exits with a message unless ``--strategy`` exists and the batch splits
  over the local devices (once JAX has started); returns their number."""
  import jax  # pylint: disable=import-outside-toplevel
  import jadam.parallel  # pylint: disable=import-outside-toplevel

  if args.strategy not in jadam.parallel.available_strategies():
    sys.exit(f"--strategy {args.strategy!r}: this jadam has "
             f"{', '.join(jadam.parallel.available_strategies())}")
  n_devices = jax.local_device_count()
  if args.batch_size % n_devices:
    sys.exit(f"--batch-size {args.batch_size} must be a multiple of the "
             f"{n_devices} local devices (every device takes an equal share "
             "of the batch)")
  return n_devices


def resume(args, trainer, params, opt_state, next_batch):
  """``(first_step, ckpt, save_options, params, opt_state)``: with
  ``--checkpoint-dir``, the newest intact checkpoint's step, params and
  optimizer state (the strategy's own state, the loss scale and the step
  count inside it), the data stream moved past the batches of the steps done
  (``next_batch`` called once per step); else step 0 and the given values.
  ``save_options`` is what later saves pass on (``overwrite`` where newer
  checkpoints were damaged)."""
  if args.checkpoint_dir is None:
    return 0, None, {}, params, opt_state
  import jadam.checkpoint  # pylint: disable=import-outside-toplevel

  first_step, save_options = 0, {}
  ckpt = jadam.checkpoint.Checkpointer(args.checkpoint_dir, max_to_keep=3)
  if ckpt.latest_step() is not None:
    try:  # the newest intact checkpoint (damaged ones are skipped)
      first_step, params, opt_state = ckpt.restore(trainer)
    except ValueError as e:
      sys.exit(f"--checkpoint-dir {args.checkpoint_dir}: cannot resume "
               f"this run from it: {e}")
    if ckpt.latest_step() != first_step:
      # Newer checkpoints were damaged: this run saves over them.
      save_options["overwrite"] = True
    if first_step > args.steps:
      sys.exit(f"--checkpoint-dir {args.checkpoint_dir} holds step "
               f"{first_step}, past --steps {args.steps}")
    for _ in range(first_step):
      next_batch()
  return first_step, ckpt, save_options, params, opt_state
