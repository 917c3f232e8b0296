"""Pretrained weights: converters from published checkpoints to cxrjax variables."""
