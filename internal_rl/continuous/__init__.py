"""The continuous pinpad pipeline (spec §10.3): Point-pinpad (MJX) expert data, Hawk
base-model pretraining with closed-loop evaluation, and residual-stream subgoal probes.
CLI: `python -m internal_rl.continuous`.
"""
