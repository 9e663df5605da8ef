"""Pretrained vision-language backbones ported to Flax NNX for LIVR fine-tuning (docs/lir.md D20).

``qwen2_5_vl``: Qwen2.5-VL (3B / 7B Instruct) with a local safetensors loader, parity-tested
against the Hugging Face PyTorch reference on tiny random configs.
"""
