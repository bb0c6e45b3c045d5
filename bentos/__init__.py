"""The Bento: one service template, built once per registered model version, and its prediction log."""
