"""``python -m maia_serving.torch``: build the device for this environment's torch (``make setup`` does)."""

from maia_serving.torch import extension

print(f"maia-serving: the maia torch device is built in {extension.build_dir()}")
