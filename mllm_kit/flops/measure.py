"""FLOPs measured by running code under torch's ``FlopCounterMode`` — the reference the closed forms are checked against
(tests/test_flops.py, tests/test_efficiency.py, benchmarks/efficiency.py).

On CPU, SDPA runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch's table does not know; it is counted as
the CUDA kernels are (4·B·H·Tq·Tk·d forward) and its backward as the gradient products, 2× the forward — this
package's convention (torch's own backward formula for the CUDA kernels adds the kernel's recomputation of the scores,
2.5×). torch counts a grouped convolution's weight gradient as a dense one; here each gradient of a convolution costs
the forward's multiply-adds, which is exact for any stride, padding and grouping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

ATEN = torch.ops.aten


def _sdpa(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return 2 * sdpa_flop_count(query, key, value)


def _conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups, output_mask,
                   out_shape=None, **kwargs):
    return conv_flop_count(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1]))


CPU_SDPA = {ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa,
            ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
            ATEN.convolution_backward: _conv_backward}


def measured_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``fn()`` runs (every matmul, convolution and attention kernel, backward and recomputation included)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as mode:
        fn()
    return mode.get_total_flops()
