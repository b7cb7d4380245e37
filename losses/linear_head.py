"""An LM head [V, H] multiplied in the loss's compute dtype, never copied whole into that dtype.

The fused KD loss (losses/kd_fused.py) needs the logits of a chunk of tokens and the gradient back
to their hidden states. A head stored in bf16 (as a bf16 model holds it) on a device without bf16
kernels, or beside float32 hidden states, is upcast a block of vocabulary rows at a time into one
reused buffer, so a Phi-4-mini head (200064 x 3072, 2.46 GB in float32) never exists in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

# A head stored in a lower precision than the loss computes in is upcast this many elements at a
# time: 2**23, 32 MB of float32, 2730 vocabulary rows at H = 3072.
UPCAST_BLOCK_ELEMENTS = 2**23


def native_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` multiplies in the reduced precision ``dtype`` (bf16, fp16) natively: any
    device but the CPU, or a CPU whose oneDNN has the kernels (AVX512-BF16, AMX). Without them the
    product is emulated, slower than float32."""
    if device.type != "cpu":
        return True
    check = {
        torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"
    }.get(dtype)
    try:
        return check is not None and bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


class LinearHead:
    """``rows @ weight.T`` (the logits) and ``grad_logits @ weight`` for an LM head [V, H], in the
    loss's compute dtype (float32; float64 stays float64), never a [V, H] copy of the weight in it.

    How the matmuls run:
      weight in the compute dtype: as they are, rows upcast if they are not;
      rows and weight in one reduced precision that the device multiplies natively
      (``native_matmul``): in that precision, as the model's own LM head does, the (C, V) logits
      upcast after the product;
      otherwise (a bf16 weight on a CPU without bf16 kernels, or float32 rows beside a bf16 weight):
      ``block`` vocabulary rows of the weight at a time are upcast into one reused (block, H)
      buffer and multiplied in the compute dtype. Upcasting is exact, so the logits are those of the
      float32 product of the stored weights. A head of at most ``block`` rows is upcast whole.
    """

    def __init__(self, weight: Tensor, rows_dtype: torch.dtype, dtype: torch.dtype,
                 block: int | None):
        self.weight, self.dtype = weight, dtype  # weight (V, H)
        upcast = weight.dtype != dtype and not (
            rows_dtype == weight.dtype and native_matmul(weight.dtype, weight.device)
        )
        default_block = max(1, UPCAST_BLOCK_ELEMENTS // max(weight.shape[1], 1))
        self.block = (block or default_block) if upcast else None  # rows upcast at a time
        self._buffer: Tensor | None = None  # (block, H) in the compute dtype, once used

    def _upcast_blocks(self):
        """(first vocabulary row, (rows, H) block of the weight in the compute dtype), in order;
        each block overwrites the previous one in the same buffer."""
        vocab_size = self.weight.shape[0]
        if self._buffer is None:
            self._buffer = torch.empty(
                (min(self.block, vocab_size), self.weight.shape[1]),
                dtype=self.dtype, device=self.weight.device,
            )
        for start in range(0, vocab_size, self.block):
            rows = min(self.block, vocab_size - start)
            yield start, self._buffer[:rows].copy_(self.weight[start : start + rows])

    def logits(self, rows: Tensor) -> Tensor:
        """(C, H) hidden states -> (C, V) logits, compute dtype."""
        if self.block is None:
            matmul_dtype = self.weight.dtype  # the compute dtype or a natively multiplied one
            return (rows.to(matmul_dtype) @ self.weight.T).to(self.dtype)
        rows = rows.to(self.dtype)
        logits = torch.empty(
            (rows.shape[0], self.weight.shape[0]), dtype=self.dtype, device=rows.device
        )  # (C, V)
        for start, block in self._upcast_blocks():  # (Vb, H)
            torch.mm(rows, block.T, out=logits[:, start : start + block.shape[0]])
        return logits

    def input_grad(self, grad_logits: Tensor) -> Tensor:
        """(C, V) d loss / d logits -> (C, H) d loss / d hidden states."""
        if self.block is None:
            return grad_logits.to(self.weight.dtype) @ self.weight
        grad_rows = None  # (C, H), compute dtype
        for start, block in self._upcast_blocks():  # (Vb, H)
            grad_block = grad_logits[:, start : start + block.shape[0]]  # (C, Vb), a view
            if grad_rows is None:
                grad_rows = grad_block @ block
            else:
                grad_rows.addmm_(grad_block, block)
        return grad_rows
