"""The fast spatial-attention path: CBAM's pooled maps and 2 -> 1 conv, fast on CPU.

The call chain, outermost first::

  attention.cbam.SpatialAttention / NnxSpatialAttention (conv_impl=)   # checks x, once
    -> logits.batched_spatial_logits(params, x, impl=)       # (B, *spatial, C) -> logits
         -> pool.mean_max(x, (-1,))                          # channel mean and max
         -> spatial_conv._spatial_conv_planes(planes, kernel, impl=)  # (2, B, *spatial)
              -> 'shift': shifted multiply-adds (custom VJP) | 'xla': lax.conv
  functional.spatial_logits / functional.cbam (one example; check x, once)
    -> spatial_conv._spatial_conv -> _spatial_conv_planes (a batch of one)

``impl`` (``'auto'``, ``'xla'``, ``'shift'``) is interpreted by
:func:`~cbam_jax._fast.spatial_conv.resolve_impl` alone (``'auto'``: ``'shift'`` where
:func:`~cbam_jax._fast.boundary.boundary_pays_off`, i.e. on CPU), once per call, where a
chain enters: ``batched_spatial_logits`` (it picks the layout), ``functional.spatial_logits``
and ``functional.cbam``, and the public ``spatial_conv`` / ``spatial_conv_planes``. The
underscored cores below them take the resolved ``impl`` and trust their caller's checks.

Fusion boundaries (:func:`~cbam_jax._fast.boundary.computed_once`, a one-trip loop XLA:CPU
cannot fuse through) keep the channel max (and a 1-D kernel's correlation) from being
recomputed in every consumer; a 2-D or 3-D correlation ends in a reduction, which XLA:CPU
does not fuse into consumers anyway. :class:`cbam_jax.conv.MaterializedInputConv` uses the
same boundary.

To change the spatial conv, edit :mod:`cbam_jax._fast.spatial_conv` (a new ``impl`` goes
into ``IMPLS``, ``resolve_impl`` and ``_spatial_conv_planes``); ``tests/test_fast_paths.py``
holds every path to ``lax.conv``'s numbers and gradients.

Private: only cbam_jax imports it (and its tests).
"""
