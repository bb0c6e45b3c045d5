"""The rollout policies' names, as stored with a rollout (policy.py says what each does).

No imports: the CLI lists them without loading the statistics.
"""

SEQUENTIAL, THRESHOLD = "sequential", "threshold"
NAMES = (SEQUENTIAL, THRESHOLD)
