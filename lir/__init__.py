"""lir: LIVR (Latent Implicit Visual Reasoning, arXiv 2512.21218) on a tiny Flax LMM.

Modules: ``masks`` (role ids -> attention masks for every LIVR variant), ``tasks``
(procedural BLINK-style tasks + registry + vocabulary), ``data`` (records -> fixed-shape
batches with latent slots and K-independent positions), ``model`` (ViT + projector + decoder
LM with latent rows and LoRA), ``config`` (presets tiny / small / paper).
Submodules are imported on use so that, e.g., ``lir.masks`` loads without Flax.
"""
