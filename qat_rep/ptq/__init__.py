"""Post-training quantization for re-parameterized networks: CFWS, AdaRound, BRECQ, MRECG, sensitivity."""
