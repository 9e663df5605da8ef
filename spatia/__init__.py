"""Spatia (arXiv 2512.15716): video generation with an updatable 3D point-cloud spatial memory.

Geometry side (pure JAX, usable on its own):

* `spatia.geometry`  pinhole cameras, SE(3), projection, the official camera-file format
* `spatia.scenes`    deterministic synthetic rooms and an analytic ray caster
* `spatia.trajectories` camera paths: exploration splines, exact out-and-back loops, clip splits
* `spatia.memory`    fixed-capacity point memory: static-pixel insertion, voxelisation, edits
* `spatia.render`    two-pass integer scatter-min z-buffer, splats, top-K compositor, visibility
* `spatia.retrieval` visibility sets, intersection counts, Hungarian / threshold reference choice
* `spatia.slam`      point-to-plane ICP pose refinement and memory update from frames

Generation side:

* `spatia.model`, `spatia.flow`, `spatia.model_config`  flow-matching video DiT with a memory
  control branch; logit-normal timesteps; Euler/Heun samplers
* `spatia.datasets`  cached synthetic training clips with projections, references, history
* `spatia.train`     the three training stages (base, control branch, LoRA main branch)
* `spatia.pipeline`  the clip loop: render memory, retrieve, generate, update memory
* `spatia.metrics`   PSNR, SSIM, closed-loop and revisit metrics, match accuracy, camera score
* `spatia.config`, `spatia.reproduce`  presets and the Table 3-7 analogues (`spatia.paper`: the
  paper's numbers; `spatia.report`: report prose, tables and image strips)
* `spatia.plan`      every training stage of a preset compiled for an N-device mesh, unrun

Command line: ``python -m spatia scene|render|edit|memory-report|train|reproduce|plan`` (see
`spatia.cli`).
"""
