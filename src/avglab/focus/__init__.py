"""FocusLLaVA (METHOD 2): vision- and text-guided samplers on the shared core."""
