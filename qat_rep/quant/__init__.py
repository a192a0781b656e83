"""Quantization core: config, the pytorch-quantization backend, quantizer insertion, calibration, equivalent-kernel QAT."""
