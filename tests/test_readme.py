"""The README's quickstart code runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  namespace: dict = {}
  exec(compile(blocks[0], "README quickstart", "exec"), namespace)  # pylint: disable=exec-used
  first_loss = float(namespace["loss_fn"](
      {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, namespace["x"], namespace["y"]))
  assert float(namespace["loss"]) < first_loss  # it trained
  exec(compile(blocks[1], "README functional core", "exec"), namespace)  # pylint: disable=exec-used
  assert int(namespace["state"].count) == 2
