"""Train a Flax MLP on scikit-learn's 8x8 handwritten digits, data-parallel.

The digits (1,797 images of 8x8 pixels, 10 classes) ship inside
scikit-learn: nothing is downloaded. Every step splits a global batch over all
local devices with ``jadam.parallel.DataParallel``, averages the gradients
and applies one AdamW update everywhere. At the end it prints the loss of
the final params on the whole training set and on the test set, the test
accuracy and the wall time; its last line is ``final loss: <test-set loss of
the final params, 6 decimals>``.

With --checkpoint-dir it saves the params and the optimizer state (with every
strategy's own state, and the dynamic loss scale) every --save-every steps and
after the last one. Started again with the same command, after a crash or a
``kill -9``, it resumes from the newest checkpoint and ends on the same
numbers as an uninterrupted run: the batches are one random stream from
--seed, and a resumed run skips the batches of the steps it restored.
(--plot draws the steps the last process ran.)

  python examples/train_digits.py                     # all local devices
  python examples/train_digits.py --fake-devices 8    # 8 fake CPU devices
  python examples/train_digits.py --optimizer optax   # optax.adamw instead
  python examples/train_digits.py --mu-dtype q8 --nu-dtype q8  # 8-bit moments
  python examples/train_digits.py --plot docs/digits_loss.png  # curves
  python examples/train_digits.py --checkpoint-dir /tmp/digits --save-every 50
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from _cli import add_checkpoint_args
from _cli import check_run_args
from _cli import check_strategy_and_devices
from _cli import non_negative_float
from _cli import non_negative_int
from _cli import positive_float
from _cli import positive_int
from _cli import resume
from _cli import use_fake_devices

# Moment formats: float dtypes, or jadam's quantized moments ("q8": 8-bit
# block-wise, "q4": 4-bit), passed to the optimizer as they are.
DTYPES = ("float32", "bfloat16", "q8", "q4")
QUANTIZED = ("q8", "q4")
# scikit-learn's 1,797 digits less the 20% test split.
TRAIN_IMAGES = 1437




def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizer", default="jadam",
                      choices=("jadam", "optax"),
                      help="jadam.adamw or optax.adamw (same arguments)")
  parser.add_argument("--strategy", default="shard_map",
                      help="a DataParallel strategy: shard_map, jit, pmap, "
                      "zero1, zero2, fsdp, onebit, local "
                      "(jadam.parallel.available_strategies())")
  parser.add_argument("--layout", default="tree", choices=("tree", "flat"),
                      help="jadam's optimizer-state layout")
  parser.add_argument("--mu-dtype", default=None, choices=DTYPES,
                      help="format of Adam's first moment: a dtype, or q8/q4 "
                      "quantized (jadam only; default: params' dtype)")
  parser.add_argument("--nu-dtype", default=None, choices=DTYPES,
                      help="format of Adam's second moment: a dtype, or q8/q4 "
                      "quantized (jadam only; default: params' dtype)")
  parser.add_argument("--param-dtype", default="float32",
                      choices=("float32", "bfloat16", "float16"),
                      help="dtype of the params (and of the forward and "
                      "backward passes); moments stay float32 unless "
                      "--mu-dtype/--nu-dtype say otherwise")
  parser.add_argument("--loss-scale", default=None,
                      help="'dynamic' or a number: loss scaling for float16 "
                      "(DataParallel(loss_scale=...)); 'dynamic' skips an "
                      "overflowing step (skip_nonfinite=True) and halves the scale")
  parser.add_argument("--steps", type=positive_int, default=300,
                      help="optimizer steps")
  parser.add_argument("--batch-size", type=positive_int, default=128,
                      help="global batch size, at most the 1437 training "
                      "images; must divide by the devices")
  parser.add_argument("--learning-rate", type=positive_float, default=3e-3,
                      help="peak of the cosine-decay schedule")
  parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
  parser.add_argument("--hidden", type=positive_int, default=256,
                      help="width of the MLP's two hidden layers")
  parser.add_argument("--eval-every", type=positive_int, default=25,
                      help="steps between test-set evaluations")
  parser.add_argument("--seed", type=non_negative_int, default=0,
                      help="seeds the params, the test split and the batches")
  parser.add_argument("--fake-devices", type=positive_int, default=None,
                      help="run on this many fake CPU devices")
  parser.add_argument("--plot", default=None, metavar="PNG",
                      help="save the loss and test-accuracy curves here")
  add_checkpoint_args(parser)
  args = parser.parse_args(argv)
  if args.loss_scale not in (None, "dynamic"):
    text = args.loss_scale
    try:
      args.loss_scale = float(text)
    except ValueError:
      args.loss_scale = math.nan
    if not (math.isfinite(args.loss_scale) and args.loss_scale > 0):
      parser.error(f"argument --loss-scale: expected 'dynamic' or a positive "
                   f"number, got {text!r}")
  if args.batch_size > TRAIN_IMAGES:
    parser.error(f"argument --batch-size: expected at most the "
                 f"{TRAIN_IMAGES} training images, got {args.batch_size}")
  check_run_args(parser, args)
  if args.loss_scale == "dynamic" and args.optimizer == "optax":
    parser.error("--loss-scale dynamic skips overflowing steps with jadam's "
                 "skip_nonfinite (use --optimizer jadam)")
  if args.optimizer == "optax":
    # optax.adamw has a mu_dtype, but neither a nu_dtype nor quantized moments.
    if args.mu_dtype in QUANTIZED:
      parser.error(f"--mu-dtype {args.mu_dtype}: quantized moments are "
                   "jadam's; optax.adamw has none (use --optimizer jadam)")
    if args.nu_dtype is not None:
      parser.error("--nu-dtype: optax.adamw keeps nu in the params' dtype "
                   "(use --optimizer jadam)")
  return args


def main(argv=None) -> int:
  start = time.perf_counter()
  args = parse_args(argv)
  use_fake_devices(args.fake_devices)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import tqdm
  from flax import linen as nn
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  import jadam
  import jadam.parallel

  n_devices = check_strategy_and_devices(args)

  # Data: standardize with the training set's statistics.
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.2, stratify=y, random_state=args.seed)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  x_train = ((x_train - mean) / std).astype(np.float32)
  x_test = ((x_test - mean) / std).astype(np.float32)
  y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)

  class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.gelu(nn.LayerNorm()(nn.Dense(self.hidden)(x)))
      return nn.Dense(10)(x)

  model = MLP(args.hidden)

  def loss_fn(params, batch):
    images, labels = batch
    # The passes in the params' dtype; the loss in float32.
    logits = model.apply({"params": params}, images.astype(args.param_dtype))
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss.mean(), {"accuracy": accuracy}

  def moment_format(name):
    """A dtype, or a quantized format's name ("q8", "q4") as it is."""
    if name is None or name in QUANTIZED:
      return name
    return jnp.dtype(name)

  schedule = optax.cosine_decay_schedule(args.learning_rate, args.steps)
  # Low-precision params keep float32 moments unless asked otherwise.
  float32_moments = None if args.param_dtype == "float32" else jnp.float32
  if args.optimizer == "jadam":
    tx = jadam.adamw(schedule, weight_decay=args.weight_decay,
                     mu_dtype=moment_format(args.mu_dtype) or float32_moments,
                     nu_dtype=moment_format(args.nu_dtype) or float32_moments,
                     layout=args.layout, skip_nonfinite=args.loss_scale == "dynamic")
  else:
    tx = optax.adamw(schedule, weight_decay=args.weight_decay,
                     mu_dtype=moment_format(args.mu_dtype) or float32_moments)

  mesh = jax.make_mesh((n_devices,), ("data",))
  trainer = jadam.parallel.DataParallel(
      loss_fn, tx, mesh, strategy=args.strategy, has_aux=True,
      loss_scale=args.loss_scale)
  # jit: one compiled program instead of dozens of small eager ones.
  params = jax.jit(model.init)(jax.random.key(args.seed), x_train[:1])
  params = jax.tree.map(lambda p: p.astype(args.param_dtype), params["params"])
  n_params = sum(p.size for p in jax.tree.leaves(params))
  params, opt_state = trainer.init(params)

  @jax.jit
  def evaluate(params, images, labels):
    """(loss, accuracy) over a whole set, on one device."""
    loss, aux = loss_fn(params, (images, labels))
    return loss, aux["accuracy"]

  # The batches: one random stream from --seed.
  rng = np.random.default_rng(args.seed)

  def next_batch():
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    return x_train[idx], y_train[idx]

  # Resuming: the newest checkpoint's params, optimizer state (the
  # strategy's own state, the loss scale and the step count inside it) and
  # step; the data stream skips the batches of the steps done.
  first_step, ckpt, save_options, params, opt_state = resume(
      args, trainer, params, opt_state, next_batch)

  # Quantized moments are jadam.QArray leaves of the state (codes and
  # scales); leaves under 4096 elements keep float32 moments.
  quantized = sum(isinstance(x, jadam.QArray) for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, jadam.QArray)))
  formats = args.mu_dtype is not None or args.nu_dtype is not None
  moments = (f"mu {args.mu_dtype or 'float32'}, "
             f"nu {args.nu_dtype or 'float32'}, " if formats else "")
  optimizer = "optax.adamw" + (f" ({moments[:-2]})" if formats else "")
  if args.optimizer == "jadam":
    optimizer = (f"jadam.adamw ({moments}state sharded over the devices)"
                 if args.strategy.startswith("zero")
                 else f"jadam.adamw ({moments}layout={args.layout})")
  print(f"digits: {len(x_train)} train / {len(x_test)} test images (8x8), "
        f"MLP with {n_params:,} params", flush=True)
  print(f"{args.param_dtype} params; {optimizer}, strategy {args.strategy} on {n_devices} "
        f"{jax.devices()[0].platform} device(s), global batch "
        f"{args.batch_size}, {args.steps} steps", flush=True)
  if formats:
    print(f"optimizer state: {quantized} quantized moments", flush=True)
  if first_step:
    scale = ("" if args.loss_scale is None
             else f", loss scale {trainer.loss_scale(opt_state):g}")
    print(f"resumed at step {first_step} from {ckpt.directory}{scale}",
          flush=True)

  losses, evals = [], []  # this process's steps only
  bar = tqdm.tqdm(range(first_step, args.steps), desc="train", unit="step",
                  initial=first_step, total=args.steps)
  for step in bar:
    params, opt_state, (loss, aux) = trainer.step(
        params, opt_state, next_batch())
    # Reading the loss waits for the step. It also keeps one step in flight:
    # on fake CPU devices (JAX 0.10), queuing several steps whose collectives
    # wait on each other can starve XLA's thread pool and abort the process.
    losses.append(float(loss))
    if ckpt is not None and ((step + 1) % args.save_every == 0
                             or step == args.steps - 1):
      # Written in the background while the next steps run.
      ckpt.save(step + 1, params, opt_state, **save_options)
    if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
      test_loss, test_acc = evaluate(trainer.gather(params), x_test, y_test)
      evals.append((step + 1, float(test_loss), float(test_acc)))
      bar.set_postfix(loss=f"{losses[-1]:.4f}", test_acc=f"{test_acc:.3f}")
  bar.close()
  losses = np.asarray(losses, np.float32)
  if ckpt is not None:
    ckpt.close()  # waits for the last save

  # The final params on whole sets: numbers a resumed run reproduces.
  final_params = trainer.gather(params)
  train_loss = float(evaluate(final_params, x_train, y_train)[0])
  test_loss, accuracy = map(float, evaluate(final_params, x_test, y_test))
  print(f"final train loss: {train_loss:.4f}, test loss: {test_loss:.4f}")
  print(f"test accuracy: {accuracy:.3f} "
        f"({round(accuracy * len(y_test))}/{len(y_test)})")
  if args.loss_scale is not None:
    skipped = optax.tree_utils.tree_get(opt_state, "total_notfinite", 0)
    print(f"loss scale: {trainer.loss_scale(opt_state):g} at the end, "
          f"{int(np.sum(trainer.gather(skipped)))} steps skipped")
  print(f"wall time: {time.perf_counter() - start:.1f} s")

  if args.plot and not evals:
    print(f"--plot: no steps left to run after step {first_step}; no plot")
  elif args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, test_losses, test_accs = map(np.asarray, zip(*evals))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(np.arange(first_step + 1, first_step + len(losses) + 1), losses,
             lw=0.8, alpha=0.5, label="train (batch)")
    ax1.plot(steps, test_losses, "o-", ms=3, label="test (360 images)")
    ax1.set(xlabel="step", ylabel="cross-entropy", yscale="log",
            title="Loss")
    ax1.legend()
    ax2.plot(steps, test_accs, "o-", ms=3, color="C2")
    ax2.axhline(0.95, color="k", ls=":", lw=1)
    ax2.set(xlabel="step", ylabel="test accuracy", ylim=(0.8, 1.0),
            title=f"Test accuracy (final {accuracy:.3f})")
    fig.suptitle(f"8x8 digits: Flax MLP, {optimizer}, {args.strategy} on "
                 f"{n_devices} device(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"saved {args.plot}")
  print(f"final loss: {test_loss:.6f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
