"""The Lightning layer of qat-rep, imported as ``qat_rep.callbacks``.

Thin by design: every callback here delegates to the torch-only core in :mod:`qat_rep`.
"""

__all__: list[str] = []
