"""Distillation of a frozen teacher into a small student without ground truth.

``kd.losses`` holds the losses; the teacher wrapper and the trainer step live in their own modules.
"""
