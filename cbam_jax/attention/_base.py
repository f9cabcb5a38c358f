"""The family's shared pieces; they live in :mod:`cbam_jax._base`, which the CBAM modules
and the NNX skin use too. Re-exported here for the members' imports."""

from cbam_jax._base import (
                            ALL_SPATIAL_DIMS,
                            Activation,
                            Array,
                            AttentionModule,
                            Dtype,
                            Initializer,
                            batch_norm,
                            batch_norm_fields,
                            channel_map_shape,
                            check_has_batch,
                            check_param_shape,
                            check_positive,
                            check_positive_int,
                            check_spatial_dims,
                            check_spatial_kernel_shape,
                            check_stored_shape,
                            default_kernel_init,
                            refine_along_axis,
                            spatial_pool,
                            torch_default_kernel_init,
)

__all__ = ['ALL_SPATIAL_DIMS', 'Activation', 'Array', 'AttentionModule', 'Dtype',
           'Initializer', 'batch_norm', 'batch_norm_fields', 'channel_map_shape',
           'check_has_batch', 'check_param_shape', 'check_positive', 'check_positive_int',
           'check_spatial_dims',
           'check_spatial_kernel_shape', 'check_stored_shape', 'default_kernel_init',
           'refine_along_axis', 'spatial_pool', 'torch_default_kernel_init']
