"""Training-free visual-token reductions that AVG-LLaVA and FocusLLaVA compare themselves against.

- ``fastv``: FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): after LLM layer K,
  keep the visual tokens that receive the most attention in layer K.
- ``vtw``: VTW (Lin et al. 2024, "Boosting Multimodal LLMs with Visual Tokens Withdrawal"): after LLM
  layer K, withdraw every visual token.
- ``prumerge_plus``: LLaVA-PruMerge+ (Shang et al. 2024): before the LLM, per AnyRes tile, keep the
  tokens the vision encoder's [CLS] attends to most (interquartile-range outliers) plus spatially uniform
  samples, and merge the others into the kept ones by key similarity.

A reduction is attached to a core as ``core.reduction`` (``build_reduction``); the core calls it by
duck typing (core sits below this package), so ``reduce=none`` leaves every code path as it was.
"""
