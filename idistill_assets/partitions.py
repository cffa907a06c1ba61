"""One dynamic partition per target task; the registry sensor adds and removes keys."""

import dagster as dg

targets = dg.DynamicPartitionsDefinition(name="targets")
