"""Synthetic click data with a known truth, named training profiles, training into MLflow."""
