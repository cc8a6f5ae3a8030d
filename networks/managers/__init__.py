"""Managers that drive models and engines: training (``trainer``), evaluation and inference."""
