"""Tooling that trains the small built-in SDXL- and SD3-architecture checkpoints on procedural shape images.

Not part of the serving package: it writes ordinary diffusers folders that ``hybridiff.families`` loads with
``from_pretrained`` like any downloaded checkpoint.
"""
