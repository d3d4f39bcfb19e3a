"""What both engine adapters share: the metric set, step charging, KV-scale checks and the
ledger of engine surfaces we depend on. Imports no engine."""
