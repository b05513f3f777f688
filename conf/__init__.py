"""Hydra config groups shipped as package data (`megalite.conf`)."""
