"""The continuous pinpads (docs/internal_rl.md D23): configs and presets, Point-pinpad (MJX)
expert data, Hawk base-model pretraining with closed-loop evaluation. Every later stage (probes,
controllers, metacontroller, RL, reproduce) is the grid world's, dispatched by
`internal_rl.pipeline`. CLI: `python -m internal_rl <stage> --env point`.
"""
