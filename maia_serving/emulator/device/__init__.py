"""The live emulated device the engines charge: its clock (clock.py) and one serving
session's steps priced and timed (session.py)."""
