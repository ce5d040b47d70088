"""Measuring: metrics, feature networks, sample and reconstruction evaluation, sweeps."""
