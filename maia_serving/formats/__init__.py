"""The dtype vocabulary every layer shares: precisions, quantization configs, units.

A leaf: it imports nothing else of maia_serving, so the emulator, the ops and the settings
table can all depend on it without a cycle (tests/unit/test_import_rules.py holds it to that).
"""
