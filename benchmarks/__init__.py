"""Standalone measurements of cxrjax against alternatives and PyTorch (`python -m cxrjax.bench.<name>`)."""
