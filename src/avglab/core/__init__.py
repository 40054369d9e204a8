"""The shared LLaVA-NeXT core every method uses: loading, encoding, pooling levels, packing, generation."""
