"""Evaluation: metrics, reports, Grad-CAM, generator quality, statistics."""
