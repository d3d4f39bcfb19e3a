"""Test and benchmark harness: server launch and scrapes (launch.py), load generation
(loadgen.py), replays against the simulator (replay.py), and the numeric oracles the unit
tests share. Not shipped in the package."""
