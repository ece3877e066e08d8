"""Object-centric crops (METHOD.md, "Object-centric crop"; used by stages 1 and 2).

The frame is composited on white with the object's mask, and a square window centred on the
mask's bounding box is resampled to `size` x `size` with an affine grid (border padding, as
published; `padding="white"` instead treats everything outside the frame as background).

Departure from the published code, on purpose: the published code squashes every frame to
512x512 first, so its crop scale s = max(w/W, h/H) / 0.65 is a fraction of a square image.  We
keep the frame's aspect ratio, so the window is square in *pixels*: its side is
max(w, h) / fill_ratio frame pixels (w, h = the bounding box in pixels).  For a square frame this
is exactly s * W of the published code; for any frame a round object stays round.

Pixel convention (gsplat's, see backend/cameras.py): pixel (i, j) covers [i, i+1) x [j, j+1)
and its centre is at (i + 0.5, j + 0.5).  `CropWindow` maps points between crop and frame pixels
in these continuous coordinates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backend.errors import InputError

CROP_SIZE = 256
FILL_RATIO = 0.65  # the object's longer bbox side fills this fraction of the crop
CLIP_RATIO = 0.975  # stage 2: grow the window once the bbox would exceed this fraction of it
# Where the window reaches past the frame: "border" repeats the edge pixels (the published
# choice; an object cut by the frame edge is smeared outwards, image and mask alike); "white"
# treats outside the frame as background (the object stays cut at the edge).
PADDING_MODES = ("border", "white")


@dataclass
class CropConfig:
    """Crop settings: `crop_track(frames, masks, **dataclasses.asdict(config))`; `crop_object` takes
    all but `clip_ratio`.  `padding="border"` is the published behaviour; "white" is ours."""

    size: int = CROP_SIZE
    fill_ratio: float = FILL_RATIO
    clip_ratio: float = CLIP_RATIO
    padding: str = "border"


@dataclass(frozen=True)
class CropWindow:
    """A square window of `side` frame pixels centred at (centre_x, centre_y), resampled to size x size.

    Coordinates are continuous frame pixels (pixel centres at i + 0.5).  The window may extend
    past the frame; the resampling then repeats the border pixels.
    """

    centre_x: float
    centre_y: float
    side: float
    size: int
    frame_width: int
    frame_height: int

    @property
    def pixel_scale(self) -> float:
        """Frame pixels per crop pixel."""
        return self.side / self.size

    @property
    def normalised_centre(self) -> tuple[float, float]:
        """The METHOD's (cx, cy): the centre as a fraction of frame width and height."""
        return self.centre_x / self.frame_width, self.centre_y / self.frame_height

    @property
    def origin(self) -> tuple[float, float]:
        """Frame position of the crop's top-left corner (crop point (0, 0))."""
        return self.centre_x - 0.5 * self.side, self.centre_y - 0.5 * self.side

    def crop_to_frame(self, points):
        """Map [..., 2] (x, y) crop-pixel coordinates to frame pixels (numpy array or torch tensor)."""
        return points * self.pixel_scale + _like(points, self.origin)

    def frame_to_crop(self, points):
        """Map [..., 2] (x, y) frame-pixel coordinates to crop pixels (numpy array or torch tensor)."""
        return (points - _like(points, self.origin)) / self.pixel_scale

    def crop_to_frame_matrix(self) -> np.ndarray:
        """3x3 homogeneous matrix A with frame_xy1 = A @ crop_xy1."""
        x0, y0 = self.origin
        s = self.pixel_scale
        return np.array([[s, 0.0, x0], [0.0, s, y0], [0.0, 0.0, 1.0]])

    def frame_intrinsics(self, K_crop: np.ndarray) -> np.ndarray:
        """Intrinsics in frame pixels of a camera whose intrinsics in crop pixels are `K_crop`.

        A camera rendering the crop sees the same rays as the full-frame camera restricted to
        the window, so K_frame = A @ K_crop with A = `crop_to_frame_matrix()`.
        """
        return self.crop_to_frame_matrix() @ np.asarray(K_crop, dtype=np.float64)

    def theta(self) -> torch.Tensor:
        """[2, 3] affine matrix for `F.affine_grid(..., align_corners=False)` sampling the frame.

        Output normalised x_o in (-1, 1) is the crop point (x_o + 1) / 2 * size, i.e. frame point
        centre_x + x_o * side / 2; the input's normalised coordinate of frame point x is
        2 x / W - 1.  So x_in = (side / W) x_o + (2 centre_x / W - 1), and likewise in y with H:
        different factors in x and y keep pixels square when W != H.
        """
        w, h = self.frame_width, self.frame_height
        return torch.tensor(
            [
                [self.side / w, 0.0, 2.0 * self.centre_x / w - 1.0],
                [0.0, self.side / h, 2.0 * self.centre_y / h - 1.0],
            ],
            dtype=torch.float32,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CropWindow:
        return cls(**data)


@dataclass
class ObjectCrop:
    image: torch.Tensor  # [3, S, S] composited on white, in [0, 1]
    mask: torch.Tensor  # [1, S, S] float in [0, 1] (soft at the edges after resampling)
    window: CropWindow


@dataclass
class CropTrack:
    images: torch.Tensor  # [T, 3, S, S]
    masks: torch.Tensor  # [T, 1, S, S]
    windows: list[CropWindow]


def mask_bbox(mask) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the mask's pixels > 0.5, x1/y1 exclusive; None when the mask is empty."""
    m = _as_tensor(mask)
    on = m > 0.5
    cols = torch.nonzero(on.any(dim=0)).flatten()
    if cols.numel() == 0:
        return None
    rows = torch.nonzero(on.any(dim=1)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def window_from_mask(mask, size: int = CROP_SIZE, fill_ratio: float = FILL_RATIO) -> CropWindow:
    """Square window centred on the mask's bounding box, side max(w, h) / fill_ratio pixels."""
    bbox = mask_bbox(mask)
    height, width = mask.shape[-2:]
    if bbox is None:
        raise InputError("the object's mask is empty: no bounding box to crop around")
    x0, y0, x1, y1 = bbox
    side = max(x1 - x0, y1 - y0) / fill_ratio
    return CropWindow(0.5 * (x0 + x1), 0.5 * (y0 + y1), side, size, int(width), int(height))


def composite_on_white(frames, masks) -> torch.Tensor:
    """[..., H, W, 3] frames composited on white where the [..., H, W] mask is off (thresholded at 0.5)."""
    frames = _as_tensor(frames)
    keep = (_as_tensor(masks, device=frames.device) > 0.5).unsqueeze(-1)
    return torch.where(keep, frames, torch.ones((), dtype=frames.dtype, device=frames.device))


def resample(images: torch.Tensor, windows: list[CropWindow], padding_mode: str = "border") -> torch.Tensor:
    """Sample [N, C, H, W] images inside `windows` (one per image) to [N, C, S, S].

    `padding_mode` is grid_sample's ("border" repeats edge pixels, "zeros" gives 0 outside).

    When a window is larger than the crop, the source is first shrunk with an antialiased
    resize so bilinear sampling does not alias.  Normalised coordinates cover the whole image
    whatever its resolution, so the same affine grid applies after the resize.
    """
    if len(windows) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(windows)} windows")
    size = windows[0].size
    if any(w.size != size for w in windows):
        raise ValueError("all windows of one call must have the same crop size")
    n, c, h, w = images.shape
    theta = torch.stack([win.theta() for win in windows]).to(images.device)
    shrink = min(win.size / win.side for win in windows)
    if shrink < 1.0:
        small = (max(1, round(h * shrink)), max(1, round(w * shrink)))
        images = F.interpolate(images, size=small, mode="bilinear", antialias=True, align_corners=False)
    grid = F.affine_grid(theta.to(images.dtype), [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def crop_object(
    frame,
    mask,
    size: int = CROP_SIZE,
    fill_ratio: float = FILL_RATIO,
    window: CropWindow | None = None,
    padding: str = "border",
) -> ObjectCrop:
    """Object-centric crop of one frame [H, W, 3] in [0, 1] with its mask [H, W] (numpy or torch).

    `window` overrides the window derived from the mask; `padding` is one of PADDING_MODES.
    Output tensors are on the frame's device (float64 input stays float64).
    """
    frame = _as_tensor(frame)
    mask = _as_tensor(mask, device=frame.device)
    if window is None:
        window = window_from_mask(mask, size, fill_ratio)
    images, masks = _crop_batch(frame[None], mask[None], [window], padding)
    return ObjectCrop(images[0], masks[0], window)


def track_windows(
    masks,
    size: int = CROP_SIZE,
    fill_ratio: float = FILL_RATIO,
    clip_ratio: float = CLIP_RATIO,
) -> list[CropWindow]:
    """Stage-2 windows for masks [T, H, W]: each frame centred on its own bbox; side s0 of frame 0
    unless the object would be clipped, then max(extent / clip_ratio, s0).

    A frame whose mask is empty (object fully hidden) reuses the previous frame's window.
    """
    masks = _as_tensor(masks)
    first = window_from_mask(masks[0], size, fill_ratio) if mask_bbox(masks[0]) is not None else None
    if first is None:
        raise InputError("the object's first-frame mask is empty; the crop track starts from frame 0")
    height, width = masks.shape[-2:]
    windows = [first]
    for t in range(1, masks.shape[0]):
        bbox = mask_bbox(masks[t])
        if bbox is None:
            windows.append(windows[-1])
            continue
        x0, y0, x1, y1 = bbox
        extent = max(x1 - x0, y1 - y0)
        side = max(extent / clip_ratio, first.side)
        windows.append(CropWindow(0.5 * (x0 + x1), 0.5 * (y0 + y1), side, size, int(width), int(height)))
    return windows


def crop_track(
    frames,
    masks,
    size: int = CROP_SIZE,
    fill_ratio: float = FILL_RATIO,
    clip_ratio: float = CLIP_RATIO,
    windows: list[CropWindow] | None = None,
    padding: str = "border",
) -> CropTrack:
    """Stage-2 crops of frames [T, H, W, 3] with masks [T, H, W] -> CropTrack (see `track_windows`)."""
    frames = _as_tensor(frames)
    masks = _as_tensor(masks, device=frames.device)
    if frames.shape[0] != masks.shape[0] or frames.shape[1:3] != masks.shape[1:3]:
        raise ValueError(f"frames {tuple(frames.shape)} and masks {tuple(masks.shape)} do not match")
    if windows is None:
        windows = track_windows(masks, size, fill_ratio, clip_ratio)
    images, crop_masks = _crop_batch(frames, masks, windows, padding)
    return CropTrack(images, crop_masks, windows)


def _crop_batch(frames: torch.Tensor, masks: torch.Tensor, windows: list[CropWindow], padding: str):
    if padding not in PADDING_MODES:
        raise ValueError(f"crop padding {padding!r} is not one of {', '.join(PADDING_MODES)}")
    composite = composite_on_white(frames, masks).permute(0, 3, 1, 2)  # [N, 3, H, W]
    stacked = torch.cat([composite, (masks > 0.5).to(composite.dtype)[:, None]], dim=1)
    if padding == "border":
        out = resample(stacked, windows, "border")
    else:
        # Zero padding of (1 - image) is white padding of the image; the mask pads with 0.
        stacked[:, :3] = 1.0 - stacked[:, :3]
        out = resample(stacked, windows, "zeros")
        out[:, :3] = 1.0 - out[:, :3]
    out = out.clamp(0.0, 1.0)
    return out[:, :3].contiguous(), out[:, 3:].contiguous()


def _as_tensor(x, device: torch.device | None = None) -> torch.Tensor:
    """Tensor view of numpy or torch input; bool and integer images become float32."""
    t = torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if device is not None:
        t = t.to(device)
    if t.dtype == torch.bool:
        return t.to(torch.float32)
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    if not t.is_floating_point():
        return t.to(torch.float32)
    return t


def _like(points, values: tuple[float, float]):
    if isinstance(points, torch.Tensor):
        return torch.tensor(values, dtype=points.dtype, device=points.device)
    return np.asarray(values, dtype=np.result_type(points, np.float64))
