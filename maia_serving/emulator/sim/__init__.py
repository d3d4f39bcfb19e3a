"""Offline serving: vLLM v1's scheduler replayed on the cost model (scheduler.py, simulate.py),
workloads (workload.py), summaries and traces (report.py), and the layout planner (plan.py)."""
