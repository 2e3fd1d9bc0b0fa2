"""A procedurally rendered indoor depth dataset: the offline stand-in for NYU Depth v2.

Each scene is a room (floor, ceiling, four walls) with a few boxes standing on the floor, seen by a
pinhole camera inside it. A vectorised ray caster intersects every pixel's ray with the room (the
nearest wall in front, from inside) and the boxes (slab test, from outside), keeps the nearest hit,
and shades it: procedural texture × (ambient + Lambertian term of a point light). The target is the
z-depth in metres, as a depth camera measures it. Scene ``i`` of seed ``s`` depends only on
``(s, i)``, so a dataset of any length starts with the same scenes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from qpasses_zoo.data.transforms import IMAGENET, Normalization

# NYU Depth v2's Kinect sees about 58° horizontally; depths stay within its 0.5-10 m range.
_FIELD_OF_VIEW = math.radians(58.0)
_EPS = 1e-9
# Surface ids: the room's faces are axis * 2 + [the ray goes towards +axis], so the floor (y = 0) is 2.
_FLOOR = 2


def _rotation(yaw: float, pitch: float) -> torch.Tensor:
    """Camera-to-world rotation: pitch about x (positive looks up), then yaw about y."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    yaw_m = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    pitch_m = torch.tensor([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
    return yaw_m @ pitch_m


def _sine_texture(points: torch.Tensor, rng: np.random.Generator, waves: int = 4) -> torch.Tensor:
    """A smooth random pattern in [0, 1] over 3-D points: a sum of plane waves of random direction."""
    freqs = torch.from_numpy(rng.normal(0.0, 6.0, size=(waves, 3))).float()
    phases = torch.from_numpy(rng.uniform(0.0, 2 * math.pi, size=waves)).float()
    return 0.5 + 0.5 * torch.sin(points @ freqs.T + phases).mean(dim=1)


def render_room(size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one random scene: an RGB image ``(3, size, size)`` in [0, 1] and its depth ``(size, size)``."""
    # The room spans x in [-w/2, w/2], y in [0, h] (y is up, the floor is y = 0), z in [0, d].
    width, height, length = rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.2), rng.uniform(4.0, 8.0)
    room_lo = torch.tensor([-width / 2, 0.0, 0.0])
    room_hi = torch.tensor([width / 2, height, length])
    camera = torch.tensor([rng.uniform(-0.3, 0.3) * width, rng.uniform(1.0, 1.8), rng.uniform(0.2, 0.8)])

    # Boxes stand on the floor at least a metre in front of the camera, so it is never inside one.
    boxes = int(rng.integers(2, 6))
    box_size = rng.uniform([0.3, 0.3, 0.3], [1.5, 1.5, 1.5], size=(boxes, 3))
    box_x = rng.uniform(-width / 2, width / 2 - box_size[:, 0])
    box_z = rng.uniform(float(camera[2]) + 1.0, length - box_size[:, 2])
    box_lo = torch.from_numpy(np.stack([box_x, np.zeros(boxes), box_z], axis=1)).float()
    box_hi = box_lo + torch.from_numpy(box_size).float()

    # One ray per pixel centre; directions have camera-space z = 1, so the hit distance t is z-depth.
    focal = 0.5 * size / math.tan(_FIELD_OF_VIEW / 2)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2) / focal
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    rays_cam = torch.stack([u, -v, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    rays = rays_cam @ _rotation(rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.1)).T
    rays = torch.where(rays.abs() < _EPS, torch.full_like(rays, _EPS), rays)
    inv = 1.0 / rays

    # From inside the room a ray leaves through the wall it reaches first.
    to_walls = torch.where(rays > 0, room_hi - camera, room_lo - camera) * inv
    t_room, wall_axis = to_walls.min(dim=1)
    # Surfaces 0-5 are the room's faces, 6 onwards the boxes.
    surface = wall_axis * 2 + (rays.gather(1, wall_axis[:, None])[:, 0] > 0).long()
    hit_axis = wall_axis.clone()
    t_hit = t_room

    # Slab test against every box at once: (rays, boxes, axes).
    t_lo = (box_lo[None] - camera) * inv[:, None]
    t_hi = (box_hi[None] - camera) * inv[:, None]
    t_near, near_axis = torch.minimum(t_lo, t_hi).max(dim=2)
    t_far = torch.maximum(t_lo, t_hi).min(dim=2).values
    t_box = torch.where((t_near <= t_far) & (t_near > 0), t_near, torch.full_like(t_near, math.inf))
    t_box_min, box_index = t_box.min(dim=1)
    box_wins = t_box_min < t_hit
    t_hit = torch.where(box_wins, t_box_min, t_hit)
    surface = torch.where(box_wins, 6 + box_index, surface)
    hit_axis = torch.where(box_wins, near_axis.gather(1, box_index[:, None])[:, 0], hit_axis)

    points = camera + rays * t_hit[:, None]
    # Both the walls seen from inside and the boxes seen from outside face against the ray.
    normals = torch.zeros_like(points)
    normals.scatter_(1, hit_axis[:, None], -torch.sign(rays.gather(1, hit_axis[:, None])))

    surfaces = 6 + boxes
    base_colour = torch.from_numpy(rng.uniform(0.2, 0.95, size=(surfaces, 3))).float()
    pattern = torch.empty(points.shape[0])
    for s in range(surfaces):
        on_surface = surface == s
        grain = _sine_texture(points[on_surface], rng)
        if s == _FLOOR:  # half-metre tiles with a little grain
            tiles = (torch.floor(points[on_surface, 0] / 0.5) + torch.floor(points[on_surface, 2] / 0.5)) % 2
            grain = 0.7 * tiles + 0.3 * grain
        pattern[on_surface] = grain
    albedo = base_colour[surface] * (0.6 + 0.4 * pattern[:, None])

    light = torch.tensor([rng.uniform(-0.4, 0.4) * width, height - 0.2, rng.uniform(0.3, 0.7) * length])
    to_light = light - points
    distance = to_light.norm(dim=1, keepdim=True)
    lambert = ((to_light / distance) * normals).sum(dim=1, keepdim=True).clamp(min=0.0)
    intensity = rng.uniform(2.0, 4.0) / (1.0 + 0.15 * distance**2)
    image = (albedo * (0.25 + lambert * intensity)).clamp(0.0, 1.0)
    return image.T.reshape(3, size, size), t_hit.reshape(size, size)


def synthetic_depth(
    n: int,
    size: int = 224,
    seed: int = 0,
    target_size: int | None = None,
    normalization: Normalization = IMAGENET,
) -> TensorDataset:
    """``n`` rendered scenes as ``(image (3, size, size), depth (1, t, t))`` pairs, depth in metres.

    ``t = target_size`` defaults to ``size // 4``, the output resolution of ``depth_unet``; the depth is
    averaged over each output pixel's area. ``target_size=size`` keeps the full resolution.
    """
    target = target_size or size // 4
    images, depths = [], []
    for i in range(n):
        image, depth = render_room(size, np.random.default_rng([seed, i]))
        images.append(image)
        depths.append(F.interpolate(depth[None, None], size=(target, target), mode="area")[0])
    if not images:
        return TensorDataset(torch.empty(0, 3, size, size), torch.empty(0, 1, target, target))
    return TensorDataset(normalization(torch.stack(images)), torch.stack(depths))
