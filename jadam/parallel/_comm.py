"""Bytes each device sends per step, read from the compiled step's HLO.

:func:`comm_bytes` compiles a trainer's step for the given arguments and reads
every collective out of the optimized HLO text (``compiled.as_text()``):
its kind, its operands' shapes and dtypes, its replica groups, and how many
times it runs per step (collectives inside a ``while`` loop, say one per
micro-batch, count once per iteration of the loop's known trip count). Nothing
is estimated from the model: what XLA will run is what is counted.

Per-device send model, for a collective over a group of ``n`` devices whose
operands hold ``B`` bytes on each device (the bandwidth-optimal ring
algorithms, which NCCL and XLA's CPU and GPU collectives use for large
messages):

================== ===================================================
all-reduce         ``2 (n - 1) / n * B`` (a reduce-scatter, then an
                   all-gather, of ``B``)
reduce-scatter     ``(n - 1) / n * B`` (``B``: the full input)
all-gather         ``(n - 1) * B`` (``B``: this device's shard, so
                   ``(n - 1) / n`` of the gathered result)
all-to-all         ``(n - 1) / n * B``
collective-permute ``B`` per (source, target) pair whose source is the
                   device; the busiest device is reported
collective-broadcast ``B`` (each device forwards the buffer once)
================== ===================================================

So one all-reduce of a gradient costs the same as a reduce-scatter of it plus
an all-gather of the result: ZeRO moves no more bytes than plain data
parallelism.
"""

from __future__ import annotations

import dataclasses
import math
import re


KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all",
         "collective-permute", "collective-broadcast")

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
    "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32,
    "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
    "token": 0,
}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled step.

  Attributes:
    kind: ``"all-reduce"``, ``"reduce-scatter"``, ``"all-gather"``,
      ``"all-to-all"``, ``"collective-permute"`` or ``"collective-broadcast"``.
    name: the HLO instruction's name.
    operands: the operands' shapes, as HLO writes them (``"f32[1024]"``).
    operand_bytes: bytes of all operands on one device.
    group_size: devices in each replica group.
    count: times it runs per step (the trip counts of enclosing loops; a
      fraction inside a conditional that runs every few steps).
    bytes_sent: bytes one device sends per step for it (see the module's
      send model), ``count`` runs included.
    computation: the HLO computation it is in.
  """

  kind: str
  name: str
  operands: tuple[str, ...]
  operand_bytes: int
  group_size: int
  count: float
  bytes_sent: float
  computation: str


@dataclasses.dataclass(frozen=True)
class CommReport:
  """The collectives of one compiled step and the bytes each device sends.

  Attributes:
    collectives: every collective, in program order.
    num_devices: devices the program runs on.
    unknown_trip_counts: names of loops whose trip count XLA did not record
      (their collectives were counted once).
  """

  collectives: tuple[Collective, ...]
  num_devices: int
  unknown_trip_counts: tuple[str, ...] = ()

  @property
  def bytes_per_device(self) -> int:
    """Bytes one device sends per step, all collectives together."""
    return int(round(sum(c.bytes_sent for c in self.collectives)))

  @property
  def by_kind(self) -> dict[str, int]:
    """Bytes sent per step by each kind of collective."""
    out: dict[str, float] = {}
    for c in self.collectives:
      out[c.kind] = out.get(c.kind, 0.0) + c.bytes_sent
    return {k: int(round(v)) for k, v in out.items()}

  def kinds(self) -> set[str]:
    return {c.kind for c in self.collectives}

  def __str__(self) -> str:
    lines = [f"{'collective':<20} {'operands':<34} {'group':>5} {'runs':>4} "
             f"{'bytes sent':>12}"]
    for c in self.collectives:
      ops = ", ".join(c.operands)
      if len(ops) > 34:
        ops = ops[:31] + "..."
      lines.append(f"{c.kind:<20} {ops:<34} {c.group_size:>5} {c.count:>4g} "
                   f"{c.bytes_sent:>12,.0f}")
    lines.append(f"{'total per device':<66} {self.bytes_per_device:>12,}")
    return "\n".join(lines)


def _shape_bytes(shape: str) -> int:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
      if dtype.startswith("f8") or dtype.startswith("f4") or dtype.startswith("f6"):
        bits = int(re.match(r"f(\d+)", dtype)[1])
      else:
        continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * bits / 8
  return int(math.ceil(total))


def _split_top(text: str, sep: str = ",") -> list[str]:
  """Splits at ``sep`` outside brackets."""
  out, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{<":
      depth += 1
    elif ch in ")]}>":
      depth -= 1
    if ch == sep and depth == 0:
      out.append("".join(cur).strip())
      cur = []
    else:
      cur.append(ch)
  if "".join(cur).strip():
    out.append("".join(cur).strip())
  return out


def _call_args(rest: str) -> tuple[str, str]:
  """``rest`` after the opening parenthesis: (operands, attributes)."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:]
  return rest, ""


def _attr(attrs: str, name: str) -> str | None:
  """The value of ``name=...`` in an attribute list (balanced brackets)."""
  m = re.search(r"(?:^|[,\s])" + re.escape(name) + r"=", attrs)
  if not m:
    return None
  i = m.end()
  depth, j = 0, i
  while j < len(attrs):
    ch = attrs[j]
    if ch in "([{<":
      depth += 1
    elif ch in ")]}>":
      if depth == 0:
        break
      depth -= 1
    elif ch == "," and depth == 0:
      # a mesh group list "mesh[...] {...}" continues past a space, not a comma
      break
    j += 1
  return attrs[i:j].strip()


def _group_size(groups: str | None, num_devices: int) -> int:
  """Devices per replica group, from any of HLO's three spellings."""
  if groups is None or groups in ("{}", ""):
    return num_devices
  if groups.startswith("{"):  # {{0,1,2,3},{4,5,6,7}}
    first = re.search(r"\{([\d,\s]*)\}", groups[1:])
    if first is None:
      return num_devices
    ids = [x for x in first[1].split(",") if x.strip()]
    return len(ids) or num_devices
  if groups.startswith("["):  # iota: [groups,size]<=[...]T(...)
    dims = [int(x) for x in re.match(r"\[([\d,]+)\]", groups)[1].split(",")]
    return dims[-1] if len(dims) > 1 else dims[0]
  if groups.startswith("mesh"):  # mesh['a'=4,'b'=2] {'a'} or {'a':(1)2}
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", groups)}
    axes = re.search(r"\{([^}]*)\}", groups)
    if axes is None:
      return num_devices
    n = 1
    for token in _split_top(axes[1]):
      sub = re.match(r"'([^']+)'(?::\((\d+)\)(\d+))?", token.strip())
      if sub is None:
        continue
      n *= int(sub[3]) if sub[3] else sizes.get(sub[1], 1)
    return n
  return num_devices


def _sources_per_device(pairs: str | None) -> int:
  if not pairs:
    return 0
  sources = [int(a) for a, _ in re.findall(r"\{(\d+),(\d+)\}", pairs)]
  if not sources:
    return 0
  return max(sources.count(s) for s in set(sources))


def _send_bytes(kind: str, nbytes: int, n: int, pairs: str | None) -> float:
  if kind == "collective-permute":
    return float(nbytes * _sources_per_device(pairs))
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n * nbytes
  if kind in ("reduce-scatter", "all-to-all"):
    return (n - 1) / n * nbytes
  if kind == "all-gather":
    return float((n - 1) * nbytes)
  if kind == "collective-broadcast":
    return float(nbytes)
  raise ValueError(f"unknown collective {kind!r}")


def _trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?', attrs)
  return int(m[1]) if m else None


def _module_devices(text: str) -> int:
  header = next((l for l in text.splitlines() if l.startswith("HloModule")), "")
  replicas = re.search(r"replica_count=(\d+)", header)
  partitions = re.search(r"num_partitions=(\d+)", header)
  return (int(replicas[1]) if replicas else 1) * (int(partitions[1]) if partitions else 1)


def parse_hlo_collectives(hlo_text: str, branch_weight: float = 1.0) -> CommReport:
  """The collectives of an optimized HLO module (``compiled.as_text()``).

  Args:
    hlo_text: the module's text.
    branch_weight: how often a collective inside a conditional's branch runs
      per step (1: every step, an upper bound; ``LocalSteps``: ``1 / H``).

  Returns:
    A :class:`CommReport`.
  """
  computations: dict[str, list[tuple[str, str, str, str, str]]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and not line.startswith("HloModule"):
        current = m[2]
        computations[current] = []
        if m[1]:
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      name, shape, op, rest = m.groups()
      operands, attrs = _call_args(rest)
      computations[current].append((name, shape, op, operands, attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  num_devices = _module_devices(hlo_text)
  shapes = {c: {name: shape for name, shape, *_ in insts}
            for c, insts in computations.items()}
  found: list[Collective] = []
  unknown: list[str] = []

  def visit(comp: str, count: float, stack: tuple[str, ...]):
    if comp in stack or comp not in computations:
      return
    for name, shape, op, operands, attrs in computations[comp]:
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base in KINDS and not op.endswith("-done"):
        ops = _split_top(operands)
        if base == "collective-permute":
          ops = ops[:1]  # the in-place form also lists its output buffers
        op_shapes = []
        for token in ops:
          inline = _ARRAY.search(token)
          ref = re.search(r"%?([\w.\-]+)\s*$", token)
          if inline:
            op_shapes.append(token[:token.rfind(" ")].strip() if " " in token else token)
          elif ref and ref[1] in shapes[comp]:
            op_shapes.append(shapes[comp][ref[1]])
        nbytes = sum(_shape_bytes(s) for s in op_shapes)
        n = _group_size(_attr(attrs, "replica_groups"), num_devices)
        pairs = _attr(attrs, "source_target_pairs")
        per_run = _send_bytes(base, nbytes, n, pairs)
        found.append(Collective(
            base, name, tuple(re.sub(r"\{[\d,]*\}", "", s) for s in op_shapes),
            nbytes, n, count, per_run * count, comp))
      if op in ("async-done", "async-update"):
        continue  # the wrapped computation is counted at async-start
      if op == "while":
        body = _attr(attrs, "body")
        cond = _attr(attrs, "condition")
        trips = _trip_count(attrs)
        if trips is None:
          unknown.append(name)
          trips = 1
        if body:
          visit(body.lstrip("%"), count * trips, stack + (comp,))
        if cond:
          visit(cond.lstrip("%"), count * (trips + 1), stack + (comp,))
        continue
      for key in ("calls", "to_apply", "true_computation", "false_computation"):
        called = _attr(attrs, key)
        if called:
          weight = branch_weight if key.endswith("_computation") else 1
          for c in _split_top(called.strip("{}")):
            visit(c.strip().lstrip("%"), count * weight, stack + (comp,))
      branches = _attr(attrs, "branch_computations")
      if branches:
        for c in _split_top(branches.strip("{}")):
          visit(c.strip().lstrip("%"), count * branch_weight, stack + (comp,))

  visit(entry, 1, ())
  return CommReport(tuple(found), num_devices, tuple(unknown))


def comm_report(trainer, params, opt_state, batch) -> CommReport:
  """The collectives of ``trainer``'s compiled step and the bytes each device
  sends per step (see :func:`comm_bytes`)."""
  compiled = trainer.lower(params, opt_state, batch).compile()
  # A strategy whose exchange runs under a conditional (LocalSteps: once
  # every H steps) says how often: its bytes are averaged over the period.
  weight = getattr(getattr(trainer, "_strategy", None), "branch_weight", 1.0)
  return parse_hlo_collectives(compiled.as_text(), branch_weight=weight)


def comm_bytes(trainer, params, opt_state, batch) -> int:
  """Bytes each device sends per training step, read from the compiled HLO.

  The step of ``trainer`` (any strategy of :class:`jadam.parallel.DataParallel`)
  is lowered and compiled for these arguments (nothing runs and nothing is
  donated) and every collective of the optimized HLO is counted with the
  per-device send model of this module's docstring: ring all-reduce
  ``2 (n - 1) / n`` of its operand, reduce-scatter ``(n - 1) / n`` of its
  input, all-gather ``(n - 1)`` times its shard, all-to-all ``(n - 1) / n``,
  collective-permute its operand per pair the device sends on; collectives in
  a loop count once per iteration.

  Args:
    trainer: a ``jadam.parallel.DataParallel``.
    params: params in the trainer's layout (from ``trainer.init``).
    opt_state: the optimizer state in the trainer's layout.
    batch: a global batch as passed to ``trainer.step``.

  Returns:
    Bytes one device sends per step (the busiest device when they differ).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jadam, jadam.parallel
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
    >>> trainer = jadam.parallel.DataParallel(loss, jadam.adam(1e-3), mesh)
    >>> params, state = trainer.init({"w": np.ones((4, 256), np.float32)})
    >>> batch = np.ones((jax.device_count(), 4), np.float32)
    >>> n = jadam.parallel.comm_bytes(trainer, params, state, batch)

  .. seealso:: :func:`jadam.parallel.comm_report` for the collectives one by one.
  """
  return comm_report(trainer, params, opt_state, batch).bytes_per_device
