"""DreamScene4D for Blender: run the backend, watch it, import animated Gaussian scenes, render paths.

Everything is registered from one `classes` tuple; the scene's state is one PropertyGroup
(`scene.dreamscene4d`).  Format and protocol code lives in the bundled `shared/` package and
never imports bpy.
"""

from __future__ import annotations

import bpy

from . import importer, operators, panels, preferences, props

classes = props.classes + preferences.classes + operators.classes + panels.classes


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    props.register_properties()
    importer.register_handlers()


def unregister():
    operators.stop_link()
    importer.unregister_handlers()
    props.unregister_properties()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
