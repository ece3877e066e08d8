"""Panels in 3D View > Sidebar > DreamScene4D."""

from __future__ import annotations

import bpy

from .preferences import BackendProcess


class DS4DPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DreamScene4D"


class DREAMSCENE4D_UL_jobs(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.label(text=item.name, icon="FILE_MOVIE" if item.state == "done" else "TIME")
        row.label(text=item.state)
        if item.label:
            row.label(text=item.label)


class DREAMSCENE4D_UL_objects(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.prop(item, "visible", text="", icon="HIDE_OFF" if item.visible else "HIDE_ON", emboss=False)
        row.label(text=f"{item.name} {item.label}" if item.label != item.name else item.name)


class DREAMSCENE4D_UL_clip_masks(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.prop(item, "mask", text="", icon="MOD_MASK")
        if item.mask is not None:
            row.prop_search(item, "layer", item.mask, "layers", text="")


class DREAMSCENE4D_PT_backend(DS4DPanel, bpy.types.Panel):
    bl_label = "Backend"

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        row = layout.row()
        row.label(
            text=settings.connection_message or "not connected",
            icon="LINKED" if settings.connected else "UNLINKED",
        )
        row = layout.row(align=True)
        row.operator("dreamscene4d.connect", icon="PLUGIN")
        row.operator("dreamscene4d.disconnect", text="", icon="X")
        row = layout.row(align=True)
        row.operator("dreamscene4d.backend_start", text="Start Local", icon="PLAY")
        row.operator("dreamscene4d.backend_stop", text="Stop", icon="CANCEL")
        row.operator("dreamscene4d.backend_show_log", text="", icon="TEXT")
        if BackendProcess.running():
            layout.label(text=f"local backend pid {BackendProcess.process.pid}")


class DREAMSCENE4D_PT_input(DS4DPanel, bpy.types.Panel):
    bl_label = "Input and Run"

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        layout.prop(settings, "input_kind", expand=True)
        if settings.input_kind == "REFERENCE":
            layout.prop(settings, "data_root")
            layout.prop(settings, "video")
            layout.prop(settings, "upload_inputs")
        elif settings.input_kind == "CLIP":
            layout.template_ID(settings, "movie_clip", open="clip.open")
            if settings.movie_clip is None:
                layout.prop(settings, "video_file")
            row = layout.row()
            row.template_list(
                "DREAMSCENE4D_UL_clip_masks", "", settings, "clip_masks", settings, "clip_masks_index", rows=2
            )
            column = row.column(align=True)
            column.operator("dreamscene4d.clip_mask_add", text="", icon="ADD")
            column.operator("dreamscene4d.clip_mask_remove", text="", icon="REMOVE")
            row = layout.row(align=True)
            row.prop(settings, "clip_frame_start")
            row.prop(settings, "clip_frame_end")
            row = layout.row(align=True)
            row.prop(settings, "clip_stride")
            row.prop(settings, "clip_max_side")
            layout.prop(settings, "upload_inputs")
        else:
            layout.prop(settings, "frames_dir")
            layout.prop(settings, "masks_dir")
            layout.prop(settings, "inpainted_dir")
            layout.prop(settings, "inpainted_masks_dir")
        layout.prop(settings, "preset")
        column = layout.column(align=True)
        column.prop(settings, "stage1_iters")
        column.prop(settings, "stage2_steps_per_frame")
        layout.prop(settings, "extra_overrides")
        layout.prop(settings, "guidance_kind")
        if settings.guidance_kind == "PATH":
            layout.prop(settings, "guidance_path")
        elif settings.guidance_kind == "HUB":
            layout.prop(settings, "guidance_hub_id")
        layout.prop(settings, "device")
        layout.operator("dreamscene4d.submit", icon="EXPORT")


class DREAMSCENE4D_PT_progress(DS4DPanel, bpy.types.Panel):
    bl_label = "Progress"

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        if not settings.job_id:
            layout.label(text="no job watched")
        else:
            row = layout.row()
            row.label(text=f"job {settings.job_id}: {settings.job_state or '...'}")
            row.operator("dreamscene4d.cancel", text="", icon="CANCEL").job = settings.job_id
            for item in settings.progress:
                eta = f", ETA {item.eta_s:.0f}s" if item.eta_s > 0 and item.fraction < 1 else ""
                text = f"{item.object_id} {item.stage} {item.phase} {item.step}/{item.total}{eta}"
                if hasattr(layout, "progress"):  # Blender 4.0+
                    layout.progress(factor=item.fraction, type="BAR", text=text)
                else:
                    layout.label(text=f"{text} ({100 * item.fraction:.0f}%)")
                if item.losses:
                    layout.label(text=item.losses)
            if settings.job_state == "done":
                layout.operator("dreamscene4d.import_job", icon="IMPORT").job = settings.job_id
        if settings.job_message:
            layout.label(text=settings.job_message)


class DREAMSCENE4D_PT_jobs(DS4DPanel, bpy.types.Panel):
    bl_label = "Jobs"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        layout.template_list("DREAMSCENE4D_UL_jobs", "", settings, "jobs", settings, "jobs_index", rows=3)
        if 0 <= settings.jobs_index < len(settings.jobs):
            job = settings.jobs[settings.jobs_index]
            row = layout.row(align=True)
            row.operator("dreamscene4d.watch", icon="HIDE_OFF").job = job.name
            row.operator("dreamscene4d.cancel", icon="CANCEL").job = job.name
            if job.state == "done":
                row.operator("dreamscene4d.import_job", icon="IMPORT").job = job.name


class DREAMSCENE4D_PT_scene(DS4DPanel, bpy.types.Panel):
    bl_label = "Scene"

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        row = layout.row(align=True)
        row.prop(settings, "import_path", text="")
        row.operator("dreamscene4d.import_scene", text="", icon="IMPORT").directory = settings.import_path
        layout.prop(settings, "splat_shape", expand=True)
        row = layout.row()
        row.prop(settings, "splat_size")
        row.prop(settings, "loop_motion")
        layout.template_list(
            "DREAMSCENE4D_UL_objects", "", settings, "objects", settings, "objects_index", rows=2
        )
        if 0 <= settings.objects_index < len(settings.objects):
            item = settings.objects[settings.objects_index]
            column = layout.column(align=True)
            column.prop(item, "visible")
            column.prop(item, "depth_scale")
            column.prop(item, "depth_offset")


class DREAMSCENE4D_PT_cameras(DS4DPanel, bpy.types.Panel):
    bl_label = "Cameras and Renders"

    def draw(self, context):
        settings = context.scene.dreamscene4d
        layout = self.layout
        layout.prop(settings, "path_loops")
        grid = layout.grid_flow(columns=2, align=True)
        for path, label in (
            ("input", "Input"),
            ("fixed", "Fixed"),
            ("orbit_horizontal", "Horizontal Orbit"),
            ("orbit_elevation", "Elevation Orbit"),
        ):
            grid.operator("dreamscene4d.create_camera", text=label).path = path
        layout.prop(settings, "output_dir")
        row = layout.row(align=True)
        row.operator("dreamscene4d.render_blender", icon="RENDER_ANIMATION")
        row.operator("dreamscene4d.render_backend", icon="URL")


classes = (
    DREAMSCENE4D_UL_jobs,
    DREAMSCENE4D_UL_clip_masks,
    DREAMSCENE4D_UL_objects,
    DREAMSCENE4D_PT_backend,
    DREAMSCENE4D_PT_input,
    DREAMSCENE4D_PT_progress,
    DREAMSCENE4D_PT_jobs,
    DREAMSCENE4D_PT_scene,
    DREAMSCENE4D_PT_cameras,
)
