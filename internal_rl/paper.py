"""What the internal RL paper reports, as data for `internal_rl.report` (no code).

Grid world: Figs. 3, 6, 8 and Table A1's held-out task; Ant-pinpad: Figs. 3b, 6, 8 and
App. C.1.1. Most of the paper's results are plots, so many entries are statements read off
a figure rather than numbers.
"""

# Reference points of the grid-world report (quantity -> the paper's statement).
GRID = {
    "probe accuracy, mid-depth": "≈0.5 (chance 0.25)",
    "switches per trajectory (frozen, good α)": "≈ number of subgoals, quasi-binary β",
    "internal RL final success": "high (plot only)",
    "baselines final success": "≈0 within 1e6 episodes",
}
# The same for the Ant-pinpad (the continuous pipeline's report).
CONTINUOUS = {
    "probe accuracy, mid-depth": "high from mid-depth (Fig. 3b)",
    "switches per trajectory (frozen, good α)": "one switch per subgoal, aligned with entering each target cell (Fig. 6)",
    "internal RL final success": "high (plot only; normalised by the expert's 0.7)",
    "baselines final success": "≈0 within 1e6 episodes",
}
# Closed-loop success of the pretrained base model on the held-out task.
HELDOUT_BASE_SUCCESS = {"grid": "≈1e-6", "continuous": "≈0 (not stated for the ant)"}
PROBE_BY_DEPTH = "≈0.3 at the input, ≈0.5 from mid-depth on"
METACONTROLLER = (
    "β quasi-binary, one switch per subgoal, aligned with the subgoal changes; "
    "co-training collapses to one switch at t = 1"
)
RL_HELDOUT = (
    "internal RL reaches a high success rate; raw-action RL, β ≡ 1 and co-trained "
    "stay ≈0 within 1e6 episodes"
)
