"""The text engine: iteration-level (continuous) batching on raw transformers models.

``sequence`` holds one choice's state, ``planner`` decides each step, ``runner`` is
the only code that touches torch models, ``sampler`` turns logits into tokens,
``output`` turns tokens into text (detokenization, stop strings, reasoning split).
"""
