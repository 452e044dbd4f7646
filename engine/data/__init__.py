"""Datasets -> the exact tokens a model learns from (sources, formats, templates, masking, packing)."""
