"""recsys canary: serve several model versions at once and move traffic between them safely."""
