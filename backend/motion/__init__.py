"""Stage 2 building blocks: deformation field, frame sampling, flow supervision, regularisers and
per-frame placement.

Imports: torch, numpy, cv2 (flow only).  No rasterizer, no diffusion model: the stage-2
trainer combines these pieces with `backend.raster` and the guidance.
"""
