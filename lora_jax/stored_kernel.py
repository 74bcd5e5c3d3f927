"""What every frozen kernel stored in another form (`lora_jax.quant.QuantizedKernel`: NF4/int8,
`lora_jax.fp8.Fp8Kernel`: FP8) answers as the `[..., in, out]` array it replaces: its shape, rank,
size and dtype, and the bytes it really stores. Each form says how it is stored (`shape`,
`arrays`, `kind`) and how it is dequantised (`astype`)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["StoredKernel"]


class StoredKernel:
    __slots__ = ()
    spec: Any  # each form's static spec: its `dtype` is the dtype of the kernel it stands for

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def arrays(self) -> tuple:
        """The stored arrays (codes, scales, ...)."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dtype(self):
        return jnp.dtype(self.spec.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (codes and scales)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self.arrays())
