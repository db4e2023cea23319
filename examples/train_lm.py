"""Train a small Flax transformer character-level language model, data-parallel.

The text is the opening of Shakespeare's Coriolanus, shipped in
``examples/data/`` (47 KB, public domain). Every step splits a global batch
of random text windows over all local devices with
``jadam.parallel.DataParallel`` and applies one ``jadam.adamw`` update. It
prints the training loss (the mean over the batches since the previous line)
and the validation loss (64 fixed windows of the held-out last 10% of the
text) every --log-every steps, then samples text. Its last line is
``final loss: <validation loss of the final params, 6 decimals>``.

With --checkpoint-dir it saves the params and the optimizer state (with every
strategy's own state: 1-bit Adam's error feedback, the local replicas) every
--save-every steps and after the last one. Started again with the same
command, after a crash or a ``kill -9``, it resumes from the newest checkpoint
and ends on the same final loss as an uninterrupted run: the batches are one
random stream from --seed, and a resumed run skips the batches of the steps it
restored. (A resumed run's first training loss averages only the batches
after the checkpoint, unless --save-every is a multiple of --log-every; the
validation losses, the sample and the final loss are always the uninterrupted
run's.)

  python examples/train_lm.py                                  # all devices
  python examples/train_lm.py --fake-devices 8 --strategy zero1
  python examples/train_lm.py --mu-dtype bfloat16 --nu-dtype bfloat16
  python examples/train_lm.py --mu-dtype q8 --nu-dtype q4      # quantized
  python examples/train_lm.py --checkpoint-dir /tmp/lm --save-every 20
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

from _cli import add_checkpoint_args
from _cli import check_run_args
from _cli import check_strategy_and_devices
from _cli import checked
from _cli import non_negative_float
from _cli import non_negative_int
from _cli import positive_float
from _cli import positive_int
from _cli import resume
from _cli import use_fake_devices

DATA = pathlib.Path(__file__).resolve().parent / "data" / "coriolanus.txt"
# Moment formats: float dtypes, or jadam's quantized moments ("q8": 8-bit
# block-wise, "q4": 4-bit), passed to the optimizer as they are.
DTYPES = ("float32", "bfloat16", "float16", "q8", "q4")


momentum = checked(float, "a number in [0, 1)", lambda x: 0 <= x < 1)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--strategy", default="shard_map",
                      help="a DataParallel strategy: shard_map, jit, pmap, "
                      "zero1, zero2, fsdp, onebit, local "
                      "(jadam.parallel.available_strategies())")
  parser.add_argument("--inner-steps", type=positive_int, default=8,
                      help="--strategy local: inner steps per outer step (H)")
  parser.add_argument("--outer-lr", type=positive_float, default=0.7,
                      help="--strategy local: the outer SGD's learning rate")
  parser.add_argument("--warmup-steps", type=positive_int, default=None,
                      help="--strategy onebit: steps of exact Adam before the "
                      "momentum is compressed (default: 20%% of --steps)")
  parser.add_argument("--outer-momentum", type=momentum, default=0.9,
                      help="--strategy local: the outer SGD's Nesterov "
                      "momentum (0: plain averaging with --outer-lr 1)")
  parser.add_argument("--mu-dtype", default=None, choices=DTYPES,
                      help="format of Adam's first moment: a dtype, or q8/q4 "
                      "quantized (default: params' dtype)")
  parser.add_argument("--nu-dtype", default=None, choices=DTYPES,
                      help="format of Adam's second moment: a dtype, or q8/q4 "
                      "quantized (default: params' dtype)")
  parser.add_argument("--param-dtype", default="float32",
                      choices=("float32", "bfloat16", "float16"),
                      help="dtype of the params and of the passes; moments stay "
                      "float32 unless --mu-dtype/--nu-dtype say otherwise")
  parser.add_argument("--master-weights", default=None, choices=("float32", "q8"),
                      help="master weights for low-precision params: a float32 "
                      "copy, or an 8-bit correction per param")
  parser.add_argument("--layout", default="tree", choices=("tree", "flat"),
                      help="jadam's optimizer-state layout")
  parser.add_argument("--steps", type=positive_int, default=400,
                      help="optimizer steps")
  parser.add_argument("--batch-size", type=positive_int, default=32,
                      help="global batch of windows; must divide by devices")
  parser.add_argument("--seq-len", type=positive_int, default=64,
                      help="characters per window")
  parser.add_argument("--d-model", type=positive_int, default=128,
                      help="the transformer's width")
  parser.add_argument("--layers", type=positive_int, default=2,
                      help="transformer blocks")
  parser.add_argument("--heads", type=positive_int, default=4,
                      help="attention heads; must divide --d-model")
  parser.add_argument("--learning-rate", type=positive_float, default=3e-3,
                      help="peak of the warm-up cosine-decay schedule")
  parser.add_argument("--weight-decay", type=non_negative_float, default=0.01)
  parser.add_argument("--log-every", type=positive_int, default=100,
                      help="steps between loss lines")
  parser.add_argument("--sample-chars", type=non_negative_int, default=300,
                      help="characters to sample at the end (0: none)")
  parser.add_argument("--temperature", type=positive_float, default=0.8,
                      help="the sample's softmax temperature")
  parser.add_argument("--prompt", default="MENENIUS:\n",
                      help="the sample's first characters")
  parser.add_argument("--seed", type=non_negative_int, default=0,
                      help="seeds the params, the batches and the sample")
  parser.add_argument("--fake-devices", type=positive_int, default=None,
                      help="run on this many fake CPU devices")
  add_checkpoint_args(parser)
  args = parser.parse_args(argv)
  if args.d_model % args.heads:
    parser.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
  check_run_args(parser, args)
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

  import jadam
  import jadam.parallel

  n_devices = check_strategy_and_devices(args)

  # Data: characters as integer ids; the last 10% of the text validates.
  text = DATA.read_text(encoding="utf-8")
  chars = sorted(set(text))
  char_id = {c: i for i, c in enumerate(chars)}
  ids = np.array([char_id[c] for c in text], np.int32)
  split = int(0.9 * len(ids))
  train_ids, val_ids = ids[:split], ids[split:]
  if any(c not in char_id for c in args.prompt):
    sys.exit(f"--prompt has characters that are not in {DATA.name}")
  if args.seq_len >= len(val_ids) - 1:
    sys.exit(f"--seq-len {args.seq_len} must be under {len(val_ids) - 1}, "
             "the length of the validation text")

  def windows(data, starts):
    """Input windows and their next-character targets."""
    idx = starts[:, None] + np.arange(args.seq_len + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]

  class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
      causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
      x = x + nn.MultiHeadDotProductAttention(self.heads)(
          nn.LayerNorm()(x), mask=causal)
      h = nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))
      return x + nn.Dense(self.d_model)(nn.gelu(h))

  class CharTransformer(nn.Module):
    vocab: int
    d_model: int
    layers: int
    heads: int
    max_len: int

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(self.vocab, self.d_model)
      pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                       (self.max_len, self.d_model))
      x = embed(tokens) + pos[:tokens.shape[1]]
      for _ in range(self.layers):
        x = Block(self.d_model, self.heads)(x)
      return embed.attend(nn.LayerNorm()(x))  # tied output embedding

  model = CharTransformer(len(chars), args.d_model, args.layers, args.heads,
                          args.seq_len)

  def loss_fn(params, batch):
    inputs, targets = batch
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  def moment_format(name):
    """A dtype, or a quantized format's name ("q8", "q4") as it is."""
    if name is None or name in ("q8", "q4"):
      return name
    return jnp.dtype(name)

  # Warm-up: 10% of the steps (at most 100), none for a run of one step.
  warmup = min(100, args.steps // 10 + 1, args.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.learning_rate, warmup, args.steps)
  # A bare jadam optimizer (no optax.chain around it): the ZeRO strategies
  # apply its rule to each device's slice of the state themselves.
  # Low-precision params keep float32 moments unless asked otherwise.
  float32_moments = None if args.param_dtype == "float32" else jnp.float32
  tx = jadam.adamw(schedule, b2=0.99, weight_decay=args.weight_decay,
                   mu_dtype=moment_format(args.mu_dtype) or float32_moments,
                   nu_dtype=moment_format(args.nu_dtype) or float32_moments,
                   layout=args.layout, master_weights=args.master_weights)

  strategy = args.strategy
  if strategy == "local":  # DiLoCo: H inner steps per replica, then one outer step
    strategy = jadam.parallel.LocalSteps(
        inner_steps=args.inner_steps,
        outer_optimizer=optax.sgd(args.outer_lr, momentum=args.outer_momentum or None,
                                  nesterov=bool(args.outer_momentum)))
  if strategy == "onebit":  # 1-bit Adam: DeepSpeed advises 15-25% of warm-up
    strategy = jadam.parallel.OneBit(
        warmup_steps=(max(1, args.steps // 5) if args.warmup_steps is None
                      else args.warmup_steps))
  mesh = jax.make_mesh((n_devices,), ("data",))
  trainer = jadam.parallel.DataParallel(loss_fn, tx, mesh,
                                        strategy=strategy)
  params = jax.jit(model.init)(
      jax.random.key(args.seed), np.zeros((1, args.seq_len), np.int32))
  params = jax.tree.map(lambda p: p.astype(args.param_dtype), params["params"])
  n_params = sum(p.size for p in jax.tree.leaves(params))
  params, opt_state = trainer.init(params)

  # The data: one random stream from --seed, the validation windows first,
  # then each step's batch.
  rng = np.random.default_rng(args.seed)
  val_batch = windows(val_ids, rng.integers(
      0, len(val_ids) - args.seq_len - 1, size=64))
  val_loss = jax.jit(loss_fn)

  def next_batch():
    starts = rng.integers(0, len(train_ids) - args.seq_len - 1,
                          size=args.batch_size)
    return windows(train_ids, starts)

  # Resuming: the newest checkpoint's params, optimizer state (the
  # strategy's own state and the step count inside it) and step; the data
  # stream skips the batches of the steps done.
  first_step, ckpt, save_options, params, opt_state = resume(
      args, trainer, params, opt_state, next_batch)

  # What the optimizer state holds on one device: its bytes (codes and
  # scales for quantized moments) and how many moments are jadam.QArrays
  # (leaves under 4096 elements keep float32 moments).
  first_device = mesh.devices.flat[0]
  state_bytes = sum(
      shard.data.nbytes for x in jax.tree.leaves(opt_state)
      for shard in getattr(x, "addressable_shards", ())
      if shard.device == first_device)
  quantized = sum(isinstance(x, jadam.QArray) for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, jadam.QArray)))

  moments = (f"mu {args.mu_dtype or 'float32'}, "
             f"nu {args.nu_dtype or 'float32'}")
  print(f"text: {len(text):,} characters, vocabulary {len(chars)}; "
        f"transformer with {n_params:,} params", flush=True)
  layout = ("state sharded over the devices" if args.strategy.startswith("zero")
            else f"layout={args.layout}")
  if args.param_dtype != "float32" or args.master_weights:
    moments += f", {args.param_dtype} params, master weights {args.master_weights}"
  print(f"jadam.adamw ({moments}, {layout}), strategy "
        f"{args.strategy} on {n_devices} {jax.devices()[0].platform} "
        f"device(s), global batch {args.batch_size} x {args.seq_len} "
        f"characters", flush=True)
  print(f"optimizer state: {state_bytes:,} bytes on device 0 "
        f"({state_bytes / n_params:.2f} B/param), {quantized} quantized "
        f"moments", flush=True)
  print(f"step {0:5d}  uniform loss {math.log(len(chars)):.3f}", flush=True)
  if first_step:
    print(f"resumed at step {first_step} from {ckpt.directory}", flush=True)

  losses = []  # since the last loss line
  bar = tqdm.tqdm(range(first_step, args.steps), desc="train", unit="step",
                  initial=first_step, total=args.steps)
  for step in bar:
    params, opt_state, loss = trainer.step(params, opt_state, next_batch())
    # One step in flight: on fake CPU devices (JAX 0.10), queued steps whose
    # collectives wait on each other can starve XLA's thread pool.
    losses.append(float(loss))
    if ckpt is not None and ((step + 1) % args.save_every == 0
                             or step == args.steps - 1):
      # Written in the background while the next steps run.
      ckpt.save(step + 1, params, opt_state, **save_options)
    if (step + 1) % args.log_every == 0 or step == args.steps - 1:
      recent = float(np.mean(losses))
      losses.clear()
      val = float(val_loss(trainer.gather(params), val_batch))
      bar.set_postfix(loss=f"{recent:.3f}")
      tqdm.tqdm.write(f"step {step + 1:5d}  train loss {recent:.3f}  "
                      f"val loss {val:.3f}")
  bar.close()
  sys.stdout.flush()
  if ckpt is not None:
    ckpt.close()  # waits for the last save

  # Sampling: one jitted forward per character over the last seq_len ones.
  params = trainer.gather(params)
  final_loss = float(val_loss(params, val_batch))

  @jax.jit
  def next_char(params, window, length, key):
    logits = model.apply({"params": params}, window[None])[0, length - 1]
    return jax.random.categorical(key, logits / args.temperature)

  context = [char_id[c] for c in args.prompt]
  key = jax.random.key(args.seed + 1)
  for _ in range(args.sample_chars):
    recent = context[-args.seq_len:]
    window = np.zeros(args.seq_len, np.int32)
    window[:len(recent)] = recent
    key, sub = jax.random.split(key)
    context.append(int(next_char(params, window, len(recent), sub)))
  print(f"--- sample (temperature {args.temperature}) ---")
  print("".join(chars[i] for i in context))
  print("---")
  print(f"wall time: {time.perf_counter() - start:.1f} s")
  print(f"final loss: {final_loss:.6f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
