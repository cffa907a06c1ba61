"""Dynamic partitions: one per target task and one per multi-target mix; the registry sensors add and remove keys."""

import dagster as dg

targets = dg.DynamicPartitionsDefinition(name="targets")

mixes = dg.DynamicPartitionsDefinition(name="mixes")
"""One dynamic partition per multi-target mix (targets/mixes/*.yaml); the mix registry sensor syncs the keys."""
