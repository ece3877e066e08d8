"""Synthetic multi-object scenes with known ground truth, rendered with Blender's Cycles.

`python -m backend.synthetic OUT --seed 0 [--frames 16 --size 384x256]` writes the input in the
reference layout plus a `gt/` folder (see generate.py); the same arguments reuse an existing OUT.
Only generate.py's `generate_scene` needs bpy; spec.py and views.py are plain numpy so the
evaluation can build the same views without Blender.
"""
