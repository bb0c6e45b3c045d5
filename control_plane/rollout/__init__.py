"""The rollout's pure core: traffic assignments, the phases' transition table, and plan(); no I/O.

Imports point down: analysis and settings only, never services, web or db.
"""
