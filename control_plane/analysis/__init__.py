"""Pure statistics and decisions: observations in, a Decision out; no I/O anywhere here."""
