"""The functional core and optimizers: state typing, dtypes, errors, composition."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from _trees import adam_node, grads_like, nested_tree, side_by_side

ALL = {
    "adam": lambda **kw: jadam.adam(1e-2, **kw),
    "adamw": lambda **kw: jadam.adamw(1e-2, weight_decay=0.1, **kw),
    "nadam": lambda **kw: jadam.nadam(1e-2, **kw),
    "nadamw": lambda **kw: jadam.nadamw(1e-2, **kw),
    "amsgrad": lambda **kw: jadam.amsgrad(1e-2, **kw),
    "adamax": lambda **kw: jadam.adamax(1e-2, **kw),
    "adamaxw": lambda **kw: jadam.adamaxw(1e-2, **kw),
    "radam": lambda **kw: jadam.radam(1e-2, **kw),
    "lamb": lambda **kw: jadam.lamb(1e-2, weight_decay=0.01, **kw),
    "scale_by_adam": lambda **kw: jadam.scale_by_adam(**kw),
}


def _types(tree):
  return jax.tree.map(jax.typeof, tree)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("moment_dtype", [None, jnp.bfloat16])
def test_state_types_stable_across_update(name, moment_dtype):
  params = nested_tree(jnp.float32)
  params["half"] = jnp.ones((3,), jnp.bfloat16)
  params["weak"] = jnp.asarray(1.5)  # a weakly typed scalar param
  tx = ALL[name](mu_dtype=moment_dtype, nu_dtype=moment_dtype)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads_like(params, 0), state, params)
  assert _types(new_state) == _types(state)
  assert _types(tx.update(grads_like(params, 1), new_state, params)[1]) == _types(state)
  chex.assert_trees_all_equal_dtypes(updates, params)
  s = state if hasattr(state, "mu") else state[0]
  assert jax.typeof(s.count) == jax.typeof(jnp.zeros([], jnp.int32))
  if moment_dtype is not None:
    assert all(x.dtype == moment_dtype for x in jax.tree.leaves(s.mu))


def test_functional_state_types_stable():
  params = nested_tree()
  state = jadam.init(params, mu_dtype=jnp.bfloat16)
  _, new_state = jadam.update(grads_like(params, 0), state, params)
  assert _types(new_state) == _types(state)
  _, new_state = jax.jit(jadam.step)(grads_like(params, 0), state, params)
  assert _types(new_state) == _types(state)


@pytest.mark.parametrize("name", list(ALL))
def test_init_accepts_shape_dtype_structs(name):
  params = nested_tree()
  tx = ALL[name]()
  shapes = jax.eval_shape(lambda: params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  from_shapes = tx.init(shapes)
  chex.assert_trees_all_equal(from_shapes, tx.init(params))
  abstract = jax.eval_shape(tx.init, shapes)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, from_shapes)
  abstract = jax.eval_shape(jadam.init, shapes)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, jadam.init(params))


def test_init_keeps_shape_dtype_struct_sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  shapes = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)}
  state = jadam.init(shapes)
  assert state.mu["w"].sharding == sharding and state.nu["w"].sharding == sharding


@pytest.mark.parametrize("name", list(ALL))
def test_state_never_aliases_params_and_both_donate(name):
  params = nested_tree()
  tx = ALL[name]()
  state = tx.init(params)
  param_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params) if x.size}
  state_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state) if x.size}
  assert not param_ptrs & state_ptrs

  @jax.jit
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donating = jax.jit(train_step.__wrapped__, donate_argnums=(0, 1))
  expect = train_step(params, state, grads_like(params, 0))
  got = donating(params, state, grads_like(params, 0))
  chex.assert_trees_all_equal(got, expect)  # donation changes nothing, to the bit
  # Both params and state were donated (every array with bytes to reuse).
  assert all(x.is_deleted() for x in jax.tree.leaves((params, state)) if x.size)


def test_functional_step_donates_params_and_state():
  params = nested_tree()
  state = jadam.init(params)
  step = jax.jit(jadam.step, donate_argnums=(1, 2))
  expect = jax.jit(jadam.step)(grads_like(params, 0), state, params)
  new_params, new_state = step(grads_like(params, 0), state, params)
  assert all(x.is_deleted() for x in jax.tree.leaves((params, state)) if x.size)
  chex.assert_trees_all_equal((new_params, new_state), expect)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "amsgrad", "radam", "lamb"])
def test_complex_params_follow_optax(name):
  rng = np.random.default_rng(3)
  params = {"z": jnp.asarray(rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3)), jnp.complex64)}
  ctor = dict(adamw=dict(weight_decay=0.1), lamb=dict(weight_decay=0.01)).get(name, {})
  tx_j, tx_o = getattr(jadam, name)(1e-2, **ctor), getattr(optax, name)(1e-2, **ctor)
  sj, so, pj, po = tx_j.init(params), tx_o.init(params), params, params
  uj_fn, uo_fn = jax.jit(tx_j.update), jax.jit(tx_o.update)
  for i in range(20):
    g = {"z": jnp.asarray(rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3)), jnp.complex64)}
    uj, sj = uj_fn(g, sj, pj)
    uo, so = uo_fn(g, so, po)
    pj, po = optax.apply_updates(pj, uj), optax.apply_updates(po, uo)
    chex.assert_trees_all_close((uj, pj), (uo, po), rtol=1e-6, atol=0)
  so_m = so[0]
  chex.assert_trees_all_close((sj[0].mu, sj[0].nu), (so_m.mu, so_m.nu), rtol=1e-6, atol=0)
  # nu is the running mean of |g|^2 = (g.conj() * g).real: no imaginary part.
  assert float(jnp.max(jnp.abs(sj[0].nu["z"].imag))) == 0.0


@pytest.mark.parametrize("name", list(ALL))
def test_float16_zero_gradients_give_exact_updates_and_zero_moments(name):
  """optax issue 1754: in float16, eps=1e-8 rounds to 0 and 0/0 gives NaN.

  jadam computes in float32: zero gradients leave every moment exactly 0, and
  the update is exactly optax's float32 update (0, or the weight decay's)
  rounded once to float16."""
  params = {"w": jnp.full((4, 4), 0.75, jnp.float16), "b": jnp.zeros((4,), jnp.float16)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = ALL[name]()
  ref = getattr(optax, name)(*((1e-2,) if name != "scale_by_adam" else ()),
                             **dict(adamw=dict(weight_decay=0.1),
                                    lamb=dict(weight_decay=0.01)).get(name, {}))
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  for _ in range(5):
    u, state = update(zeros, state, p)
    u_ref, _ = jax.jit(ref.update)(up(zeros), ref.init(up(p)), up(p))
    chex.assert_trees_all_equal(u, jax.tree.map(lambda x: x.astype(jnp.float16), u_ref))
    for name_, moment in adam_node(state)._asdict().items():
      if name_ != "count":
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(moment)), name_
    p = optax.apply_updates(p, u)
  # The functional core too: zero updates, zero moments.
  u, s = jadam.update(zeros, jadam.init(params), params)
  chex.assert_trees_all_equal((u, s.mu, s.nu), (zeros, zeros, zeros))


def test_optax_float16_zero_gradients_give_nan():
  """Documents the intended difference: optax.adam gives NaN here, jadam does not."""
  params = {"w": jnp.ones((3,), jnp.float16)}
  tx = optax.adam(1e-3)
  u, _ = tx.update({"w": jnp.zeros((3,), jnp.float16)}, tx.init(params), params)
  assert bool(jnp.all(jnp.isnan(u["w"])))


def test_learning_rate_array_does_not_retrace():
  params = nested_tree()
  tx = jadam.adam(jnp.asarray(1e-3))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(lr, grads, state, params):
    u, state = jadam.update(grads, state, params, learning_rate=lr, b1=0.9)
    return optax.apply_updates(params, u), state

  state, p = jadam.init(params), params
  ref = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  ref_update = jax.jit(ref.update)
  ref_state, ref_p = ref.init(params), params
  for i, lr in enumerate([1e-3, 2e-3, 5e-4, 1e-2]):
    p, state = train_step(jnp.asarray(lr, jnp.float32), grads_like(params, i), state, p)
    ref_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    u, ref_state = ref_update(grads_like(params, i), ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
  # Each new learning rate took effect, as in optax (same values).
  chex.assert_trees_all_close(p, ref_p, rtol=1e-6, atol=0)
  # The learning rate really is used: a zero learning rate leaves params alone.
  p0, _ = train_step(jnp.asarray(0.0, jnp.float32), grads_like(params, 9), state, p)
  chex.assert_trees_all_equal(p0, p)
  del tx


def test_inject_hyperparams_does_not_retrace():
  params = nested_tree()
  tx = optax.inject_hyperparams(jadam.adamw)(learning_rate=1e-3, weight_decay=0.1)
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(grads, state, params):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  ref = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.1)
  ref_state, ref_p, p = ref.init(params), params, params
  for i in range(4):
    state.hyperparams["learning_rate"] = jnp.asarray(1e-3 * (i + 1))
    ref_state.hyperparams["learning_rate"] = jnp.asarray(1e-3 * (i + 1))
    p, state = train_step(grads_like(params, i), state, p)
    u, ref_state = jax.jit(ref.update)(grads_like(params, i), ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
  chex.assert_trees_all_close(p, ref_p, rtol=1e-6, atol=0)


def test_chain_with_clipping_equals_optax():
  params = nested_tree()
  mk = lambda lib: optax.chain(optax.clip_by_global_norm(0.5), lib.adamw(1e-2, weight_decay=0.1))
  tx_j, tx_o = mk(jadam), mk(optax)
  sj, so, pj, po = tx_j.init(params), tx_o.init(params), params, params
  for i in range(10):
    g = grads_like(params, i, scale=10.0)
    uj, sj = jax.jit(tx_j.update)(g, sj, pj)
    uo, so = jax.jit(tx_o.update)(g, so, po)
    pj, po = optax.apply_updates(pj, uj), optax.apply_updates(po, uo)
  chex.assert_trees_all_close(pj, po, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("default_kernel_mode")  # optax's bits
def test_flax_train_state():
  from flax.training import train_state

  params = nested_tree()
  loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  states = [train_state.TrainState.create(apply_fn=None, params=params, tx=lib.adam(1e-2))
            for lib in (jadam, optax)]

  @jax.jit
  def train(s):
    return s.apply_gradients(grads=jax.grad(loss)(s.params))

  for _ in range(10):
    states = [train(s) for s in states]
  chex.assert_trees_all_close(states[0].params, states[1].params, rtol=1e-6, atol=0)
  assert loss(states[0].params) < loss(params)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jadam.adam(-1e-3), r"adam\(learning_rate=...\)` must be a finite number >= 0"),
        (lambda: jadam.adam(1e-3, b1=1.0), r"adam\(b1=...\)` must be in \[0, 1\)"),
        (lambda: jadam.adam(1e-3, b1=-0.1), r"adam\(b1=...\)` must be in \[0, 1\)"),
        (lambda: jadam.adamw(1e-3, b2=1.2), r"adamw\(b2=...\)` must be in \[0, 1\), got 1.2"),
        (lambda: jadam.amsgrad(1e-3, eps=-1e-8), r"amsgrad\(eps=...\)` must be a finite number >= 0"),
        (lambda: jadam.radam(1e-3, eps_root=-1.0), r"radam\(eps_root=...\)` must be"),
        (lambda: jadam.adam(float("nan")), r"adam\(learning_rate=...\)"),
        (lambda: jadam.adam(jnp.asarray(-1.0)), r"adam\(learning_rate=...\)"),
        (lambda: jadam.adam(1e-3, mu_dtype=jnp.int32), r"adam\(mu_dtype=...\)` must be None or a floating or complex dtype"),
        (lambda: jadam.adam(1e-3, nu_dtype="int8"), r"adam\(nu_dtype=...\)` must be None or a floating or complex dtype"),
        (lambda: jadam.lamb(1e-3, mu_dtype="not a dtype"), r"lamb\(mu_dtype=...\)"),
        (lambda: jadam.adamw(1e-3, weight_decay=-0.1), r"adamw\(weight_decay=...\)"),
        (lambda: jadam.adamw(1e-3, mask={"w": 1.0}), r"adamw\(mask=...\)"),
        (lambda: jadam.adam(1e-3, layout="rows"), r"adam\(layout=...\)` must be one of"),
        (lambda: jadam.init({"w": jnp.ones(2)}, mu_dtype=jnp.int8), r"jadam.init\(mu_dtype=...\)"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("kw, match", [
    (dict(learning_rate=-1.0), r"jadam.update\(learning_rate=...\)"),
    (dict(b1=1.5), r"jadam.update\(b1=...\)` must be in \[0, 1\)"),
    (dict(b2=-0.5), r"jadam.update\(b2=...\)"),
    (dict(eps=-1.0), r"jadam.update\(eps=...\)"),
    (dict(eps_root=-1.0), r"jadam.update\(eps_root=...\)"),
])
def test_functional_bad_hyperparameters(kw, match):
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=match):
    jadam.update(params, jadam.init(params), params, **kw)


def test_mask_of_another_structure_raises():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx = jadam.adamw(1e-3, mask={"w": True, "c": False})
  with pytest.raises(ValueError, match=r"adamw\(mask=...\)` must be a tree of bools with the structure of the params"):
    tx.init(params)
  tx = jadam.lamb(1e-3, mask=lambda p: [True, False])
  with pytest.raises(ValueError, match=r"lamb\(mask=...\)"):
    tx.init(params)


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_callable_mask_equals_optax(layout):
  """A callable mask (called with the params) decays exactly where optax's does."""
  params = nested_tree()
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = jadam.adamw(1e-2, weight_decay=0.3, mask=mask, layout=layout)
  ref = optax.adamw(1e-2, weight_decay=0.3, mask=mask)
  p, _, rp, _ = side_by_side(tx, ref, params, lambda t: grads_like(params, t), 5)
  chex.assert_trees_all_close(p, rp, rtol=1e-6, atol=0)
  # The mask mattered: without it the result is another.
  unmasked = optax.adamw(1e-2, weight_decay=0.3)
  u_all, _ = unmasked.update(grads_like(params, 0), unmasked.init(params), params)
  u_mask, _ = ref.update(grads_like(params, 0), ref.init(params), params)
  assert not np.allclose(u_all["dense"]["b"], u_mask["dense"]["b"])


def test_mask_prefix_and_callable_work():
  params = {"enc": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": jnp.ones(3)}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = jadam.adamw(1.0, weight_decay=0.5, mask={"enc": False, "head": True})
  u, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(u, {"enc": {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, "head": -0.5 * jnp.ones(3)})


def test_grads_of_another_structure_name_the_first_differing_path():
  params = {"a": jnp.ones(2), "b": {"c": jnp.ones(3), "d": jnp.ones(1)}}
  state = jadam.init(params)
  bad = {"a": jnp.ones(2), "b": {"c": jnp.ones(3), "e": jnp.ones(1)}}
  with pytest.raises(ValueError, match=r"first difference is at \['b'\]\['e'\] in `grads` versus \['b'\]\['d'\]"):
    jadam.update(bad, state, params)
  tx = jadam.adam(1e-3)
  with pytest.raises(ValueError, match=r"\['b'\]\['e'\]"):
    jax.jit(tx.update)(bad, tx.init(params), params)
  with pytest.raises(ValueError, match=r"\['b'\]\['d'\] is only in `state.mu`"):
    jadam.update({"a": jnp.ones(2), "b": {"c": jnp.ones(3)}}, state, params)


def test_grads_of_another_shape_never_broadcast():
  params = {"a": jnp.ones((3, 1))}
  state = jadam.init(params)
  with pytest.raises(ValueError, match=r"\['a'\]: shape \(3, 3\) versus \(3, 1\)"):
    jadam.update({"a": jnp.ones((3, 3))}, state, params)
  with pytest.raises(ValueError, match=r"differ at \['a'\]: one holds None"):
    jadam.update({"a": None}, state, params)


def test_missing_params_and_wrong_state_are_named():
  params = {"a": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"`jadam.step` needs `params`"):
    jadam.step(params, jadam.init(params), None)
  tx = jadam.lamb(1e-3)
  with pytest.raises(ValueError, match=r"`lamb` needs `params`"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"amsgrad\(state=...\)` must be this optimizer's state"):
    jadam.amsgrad(1e-3).update(params, jadam.init(params), params)
  with pytest.raises(ValueError, match=r"floating or complex arrays, got dtype int32 at \['i'\]"):
    jadam.init({"i": jnp.ones(3, jnp.int32)})


def test_new_float_learning_rate_does_not_recompile_eager_update():
  """Learning rate and weight decay are traced float32, even from Python floats."""
  from jadam import _update

  params = {"w": jnp.ones((2, 3))}
  state = jadam.init(params)
  jadam.update(params, state, params, learning_rate=1e-3, weight_decay=0.1)
  size = _update._jitted._cache_size()
  for lr in (2e-3, 3e-3, 4e-3):
    u, _ = jadam.update(params, state, params, learning_rate=lr, weight_decay=lr)
  assert _update._jitted._cache_size() == size
  ref, _ = jax.jit(optax.adamw(4e-3, weight_decay=4e-3).update)(params, optax.adamw(4e-3).init(params), params)
  chex.assert_trees_all_close(u, ref, rtol=1e-6, atol=0)
