"""Quantizing tickets, in layers (imports run down this list, never up):

- :mod:`~lth.quant.numerics`: the quantizer, STE/LSQ fake quantization, calibration, ``QuantSpec`` (pure jnp);
- :mod:`~lth.quant.wiring`: fake-quantized Flax models (interceptors), activation statistics, evaluation;
- :mod:`~lth.quant.ptq`: post-training quantization (+ bias correction, cross-layer equalization);
- :mod:`~lth.quant.qat`: quantization-aware training on the masked training engine, and its float control
  ``float_ft`` (the same program and schedule with quantization switched off);
- :mod:`~lth.quant.intinfer`: integer inference (int8 operands, int32 accumulation);
- :mod:`~lth.quant.export`: compressed size accounting and the export file format;
- :mod:`~lth.quant.stage`: the store-facing quant stage of an experiment (cells keyed by run id + setting).

The quantizer and why a pruned weight stays exactly 0.0 through PTQ and QAT: :mod:`lth.quant.numerics`.

Weights are quantized per tensor or per output channel (the last axis of a Dense/Conv kernel);
activations per tensor at the input of every ``nn.Dense``/``nn.Conv`` (via
:func:`flax.linen.intercept_methods`), so the model code is never touched. Biases and batch-norm
parameters stay float (the integer path of :mod:`lth.quant.intinfer` adds biases as int32).

Pytrees used here (``K`` = population axis, where stacked):

- ``weight_qparams`` / ``act_qparams``: ``{layer: {"scale", "zero_point"}}`` keyed by the layer's
  module path (``"dense_0"``, ``"stage1_block0/conv_0"``); weight scales are ``[C]`` (per channel)
  or ``[]`` (per tensor); activation scales are ``[]``.
- :class:`FakeQuantModel` variables: ``{"params": {"net": params[, "lsq": {"w": .., "a": ..}]},
  "batch_stats": {"net": batch_stats, "quant": {"acts": act_qparams, "w_zero_point": {..}[, "on": 0 or 1]}}}``
  (``on`` = 0: quantization off, QAT's float control).
  Constants (zero points, fixed ranges) sit in ``batch_stats`` so the optimizer never sees them.
"""

from .export import (ExportError, decode_kernel, encode_kernel, encoded_sizes, eval_export, export_bytes,
                     float_size_report, read_export, size_report, write_export)
from .intinfer import IntegerModel, from_quantized
from ..config import QUANT_METHODS as METHODS
from .numerics import (BITS, CALIBRATIONS, GRANULARITIES, SCHEMES, QuantSpec, calibrate, dequantize,
                       fake_quant, lsq_fake_quant, qrange, quantize, representable_range, scale_zero_point)
from .ptq import (QuantizedTicket, bias_correct, equalize, layer_program, ptq, ptq_population, round_biases)
from .qat import float_ft, freeze_qat, qat, qat_variables
from .stage import (COLUMNS, QuantStage, Setting, cells, export_level, pending, quant_config, quantize_member,
                    quantize_run, read_cells, settings_of)
from .wiring import (Evaluator, FakeQuantModel, act_qparams, call_order, collect_inputs, fake_quant_model,
                     fake_quant_predict, input_ranges, is_weight, layer_key, layer_outputs, quantize_weights,
                     weight_codes, weight_qparams)
from ..config import QuantConfig  # noqa: E402 - the [quant] section's settings
