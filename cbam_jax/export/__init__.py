"""Deploy a trained model: StableHLO (JAX alone) and ONNX (onnxruntime, TensorRT, ...).

::

  from cbam_jax import export
  blob = export.to_stablehlo(model, variables, images)        # bytes, any batch size
  export.to_onnx(model, variables, images, 'model.onnx')      # checked with onnxruntime

Both export the inference function: linen ``model.apply(variables, x, train=False)``, NNX
``model.eval()``. ``python -m cbam_jax.export --model DIR --format onnx --out FILE`` exports
a saved model directory or a training workdir. See docs/deploy.md.
"""

from cbam_jax.export._inference import ExportError
from cbam_jax.export.onnx import to_onnx
from cbam_jax.export.stablehlo import to_stablehlo

__all__ = ['ExportError', 'to_onnx', 'to_stablehlo']
