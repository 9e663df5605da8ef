"""Internal RL: emergent temporal abstractions in autoregressive models (arXiv 2512.20605).

Part 1: Gridworld-pinpad (`envs`), scripted experts (`experts`), on-the-fly expert data
(`data`), the base autoregressive transformer (`models`), linear probes (`probes`) and
supervised residual controllers (`controllers`). CLI: `python -m internal_rl`.
"""
