"""Data: tokenizers, token Parquet datasets, the resumable sampler, corpus preparation and the
arithmetic task. A leaf package: it imports nothing from trainer, snapshot or launch.

Modules are imported directly (`from stalwart.data.dataset import TokenDataset`) so that a
user of the tokenizer alone does not pay for pyarrow and torch.
"""
