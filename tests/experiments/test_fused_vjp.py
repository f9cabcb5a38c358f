"""experiments.bench.fused_vjp: the hand-written whole-module backward is CBAM's gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import fused_vjp


def test_the_hand_written_backward_equals_autodiff_of_the_same_math():
  keys = jax.random.split(jax.random.key(0), 8)
  batch, size, features, hidden = 3, 6, 16, 2
  args = [jax.random.normal(keys[0], (batch, size, size, features)),
          jax.random.normal(keys[1], (features, hidden)) * 0.3,
          jnp.full((hidden,), 5.0),  # Every hidden unit active: each pool gets a gradient.
          jax.random.normal(keys[3], (hidden, features)) * 0.3,
          jax.random.normal(keys[4], (features,)) * 0.1,
          jax.random.normal(keys[5], (7, 7, 2, 1)) * 0.2, jnp.array([0.7]), jnp.array([0.1])]
  # Ties in both maxes, over positions and over channels (a position of zeros): the
  # gradient is split as JAX splits it.
  args[0] = args[0].at[:, :2, :2, 0].set(3.0).at[:, 4, 4, :].set(0.0)
  cotangent = jax.random.normal(keys[6], (batch, size, size, features))
  arguments = tuple(range(len(args)))

  def gradients(cbam):
    return jax.jit(jax.grad(lambda *a: (cbam(*a)[0] * cotangent).sum(), arguments))(*args)

  want = gradients(fused_vjp._forward)
  got = gradients(fused_vjp.fused_cbam)
  for name, g, w in zip(['x', 'w1', 'b1', 'w2', 'b2', 'kernel', 'scale', 'bias'], got, want,
                        strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=name)


def test_the_command_compares_the_steps(capsys):
  # Compile only: timing the steps too (--time_rounds) would initialise three networks, ~25 s.
  text = fused_vjp.main(['--model', 'resnet_tiny', '--batch', '2', '--image_size', '16',
                         '--rounds', '1'])
  assert '| none | ' in text and '| cbam | ' in text and '| one hand-written VJP |' in text
  assert text in capsys.readouterr().out
