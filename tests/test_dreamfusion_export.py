"""Mesh export: density grid -> marching cubes -> cleaned trimesh -> OBJ/GLB/PLY, auto iso-level, rasterizer.

The field is an analytic stand-in (smooth spheres of high density), so the expected surface is known.
"""

import math

import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.export import (WORLD_TO_GLTF, auto_iso_level, check_resolution, density_grid, estimate_grid_bytes,
                                extract_mesh, max_density_along_rays, render_mesh, write_meshes)
from pipelines.errors import UserError
from pipelines.geometry import AMBIENT, DIFFUSE, camera_frame, camera_rays
from pipelines.media import write_mp4
from tests.tiny import probe
from toyworld.render import SPHERE_RADIUS, render_with_aux
from toyworld.world import Scene

PEAK, SHARPNESS = 10.0, 20.0  # density PEAK inside; the level PEAK / 2 lies exactly on each sphere


class Blobs:
    """Spheres of density PEAK * sigmoid(SHARPNESS * (radius - |x - centre|)), coloured by position."""

    bound = 1.0

    def __init__(self, *spheres):
        self.spheres = spheres or (((0.0, 0.0, 0.0), 0.6),)

    def query_density(self, x):
        d = [PEAK * torch.sigmoid(SHARPNESS * (r - (x - torch.tensor(c)).norm(dim=-1))) for c, r in self.spheres]
        return torch.stack(d).amax(0)

    def __call__(self, x):
        return self.query_density(x), (x * 0.5 + 0.5).clamp(0, 1)


def sphere_mesh(resolution=48, **kw):
    field = Blobs()
    return extract_mesh(density_grid(field, resolution, field.bound), field.bound, PEAK / 2,
                        albedo_fn=lambda x: field(x)[1], **kw)


def test_density_grid_samples_voxel_centres():
    field = Blobs()
    grid = density_grid(field, 8, 1.0, chunk=100)  # chunks that do not divide 8^3
    centre = torch.tensor([[-1 + 0.125 * (2 * 6 + 1), -1 + 0.125, -1 + 0.125 * 7]])  # voxel [6, 0, 3]
    assert grid.shape == (8, 8, 8)
    assert grid[6, 0, 3] == pytest.approx(float(field.query_density(centre)[0]), rel=1e-6)


def test_sphere_mesh_is_closed_outward_and_the_right_size():
    mesh = sphere_mesh()
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.05)
    np.testing.assert_allclose(mesh.bounds, [[-0.6] * 3, [0.6] * 3], atol=0.02)
    assert mesh.volume > 0 and ((mesh.face_normals * mesh.triangles_center).sum(-1) > 0).all()
    colors = mesh.visual.vertex_colors
    assert colors.dtype == np.uint8 and colors.shape == (len(mesh.vertices), 4)
    expected = np.round((np.clip(mesh.vertices * 0.5 + 0.5, 0, 1)) * 255)
    assert np.abs(colors[:, :3] - expected).max() <= 1


def test_surface_cut_by_the_box_is_closed():
    class LowerHalf:
        def query_density(self, x):
            return PEAK * torch.sigmoid(-SHARPNESS * x[:, 2])

    mesh = extract_mesh(density_grid(LowerHalf(), 32, 1.0), 1.0, PEAK / 2)
    assert mesh.is_watertight and mesh.volume == pytest.approx(4.0, rel=0.05)  # the box's lower half
    np.testing.assert_allclose(mesh.bounds, [[-1, -1, -1], [1, 1, 0]], atol=0.02)


def test_cleanup_keeps_the_largest_components():
    field = Blobs(((-0.4, 0.0, 0.0), 0.35), ((0.55, 0.0, 0.0), 0.2))
    grid = density_grid(field, 48, 1.0)
    big = extract_mesh(grid, 1.0, PEAK / 2)
    assert big.body_count == 1 and big.bounds[1, 0] < 0 and big.is_watertight
    assert big.volume == pytest.approx(4 / 3 * math.pi * 0.35**3, rel=0.05)
    assert extract_mesh(grid, 1.0, PEAK / 2, keep_components=2).body_count == 2
    assert extract_mesh(grid, 1.0, PEAK / 2, keep_components=0).body_count == 2  # 0 keeps them all


def test_cleanup_keeps_zero_area_slivers_and_drops_collapsed_faces():
    """Marching cubes can leave a zero-area face with three distinct vertices in a closed surface (it happened
    on a fitted sphere): dropping it opened a hole. A collapsed face (a vertex repeated) is what goes."""
    from dreamfusion.export import _clean

    sphere = trimesh.creation.icosphere(subdivisions=1)
    faces, verts = sphere.faces.tolist(), sphere.vertices.tolist()
    a, b, d = faces.pop()  # split this face's edge a-b at its midpoint m, closing the split with the sliver (a, b, m)
    m = len(verts)
    verts.append(((np.array(verts[a]) + np.array(verts[b])) / 2).tolist())
    faces += [[a, m, d], [m, b, d], [a, b, m], [d, d, a]]  # ... and one collapsed face
    mesh = trimesh.Trimesh(verts, faces, process=False)
    assert mesh.area_faces[-2] < 1e-12 and not mesh.is_watertight  # the collapsed face spoils the edges
    cleaned = _clean(mesh, keep_components=1)
    assert len(cleaned.faces) == len(faces) - 1 and cleaned.is_watertight and cleaned.euler_number == 2


@pytest.mark.parametrize("level, hint", [(PEAK * 2, "lower export.iso_level="), (-1.0, "raise export.iso_level=")])
def test_empty_level_set_raises_and_writes_nothing(tmp_path, level, hint):
    with pytest.raises(UserError, match=hint) as info:
        mesh = extract_mesh(density_grid(Blobs(), 16, 1.0), 1.0, level)
        write_meshes(mesh, tmp_path)
    assert "\n" not in str(info.value) and "density range" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_written_files_round_trip_with_colours(tmp_path):
    mesh = sphere_mesh(32)
    paths = write_meshes(mesh, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "mesh.obj", "mesh.ply"]  # no temp files left
    for fmt, path in paths.items():
        loaded = trimesh.load(path, force="mesh")
        assert (len(loaded.vertices), len(loaded.faces)) == (len(mesh.vertices), len(mesh.faces)), fmt
        expected = mesh.vertices[:, [1, 2, 0]] if fmt == "glb" else mesh.vertices  # glTF's axes: see the next test
        np.testing.assert_allclose(loaded.vertices, expected, atol=1e-6, err_msg=fmt)
        assert loaded.visual.kind == "vertex", fmt
        assert np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors).max() <= 1, fmt
    with pytest.raises(UserError, match="unknown mesh format"):
        write_meshes(mesh, tmp_path / "other", formats=("obj", "stl"))
    assert not (tmp_path / "other").exists()


class Box:
    """A solid box lo < x < hi (smooth edges, density PEAK / 2 on its faces), coloured by position as Blobs."""

    bound = 1.0

    def __init__(self, lo, hi):
        self.lo, self.hi = torch.tensor(lo), torch.tensor(hi)

    def query_density(self, x):
        inside = torch.minimum(x - self.lo, self.hi - x).amin(-1)  # > 0 inside, distance to the nearest face
        return PEAK * torch.sigmoid(SHARPNESS * 4 * inside)

    def __call__(self, x):
        return self.query_density(x), (x * 0.5 + 0.5).clamp(0, 1)


def glb_json(path):
    """The JSON chunk of a binary glTF file (what a viewer reads before the buffers)."""
    import json
    import struct

    data = path.read_bytes()
    assert data[:4] == b"glTF" and data[16:20] == b"JSON"
    return json.loads(data[20:20 + struct.unpack("<I", data[12:16])[0]])


def test_glb_is_y_up_with_the_front_on_z_and_obj_ply_keep_the_world_frame(tmp_path):
    """glTF is +Y up and an asset's front faces +Z: a box tall along world +Z, deepest towards its front (world +X)
    and offset along world Y must come out of mesh.glb tallest along Y, deepest towards +Z, offset along X (a
    rotation: (x, y, z) -> (y, z, x)), its colours still on the same points; OBJ and PLY keep +Z up."""
    lo, hi = (-0.2, -0.3, -0.8), (0.5, 0.2, 0.9)  # world: x (front) -0.2..0.5, y -0.3..0.2, z (up) -0.8..0.9
    box = Box(lo, hi)
    mesh = extract_mesh(density_grid(box, 40, box.bound), box.bound, PEAK / 2, albedo_fn=lambda x: box(x)[1])
    np.testing.assert_allclose(mesh.bounds, [lo, hi], atol=0.03)
    paths = write_meshes(mesh, tmp_path)
    gltf = trimesh.load(paths["glb"], force="mesh")  # node transforms applied, as a viewer would
    np.testing.assert_allclose(gltf.bounds, [[-0.3, -0.8, -0.2], [0.2, 0.9, 0.5]], atol=0.03)
    assert np.argmax(gltf.extents) == 1  # tallest along glTF's up, +Y
    front = gltf.vertices[:, 2] > 0.45  # the front face (world x = 0.5) faces the viewer, on +Z
    assert front.sum() > 10 and np.abs(gltf.vertices[front, 2] - 0.5).max() < 0.03
    assert gltf.volume > 0  # a rotation, not a mirror: faces still wind outwards
    # The colours travel with their points: albedo = world position * 0.5 + 0.5, world = (z, x, y) of glTF's.
    world = gltf.vertices[:, [2, 0, 1]]
    assert gltf.visual.kind == "vertex"
    assert np.abs(gltf.visual.vertex_colors[:, :3].astype(int) - np.round((world * 0.5 + 0.5) * 255)).max() <= 1
    # What a viewer reads: positions already upright (POSITION min / max), no node transform to undo them.
    doc = glb_json(paths["glb"])
    assert all(set(node) <= {"name", "mesh", "children"} for node in doc["nodes"])
    position = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    np.testing.assert_allclose([position["min"], position["max"]], gltf.bounds, atol=1e-6)
    assert "COLOR_0" in doc["meshes"][0]["primitives"][0]["attributes"]
    for fmt in ("obj", "ply"):  # the world frame, +Z up, as the rest of the project
        np.testing.assert_allclose(trimesh.load(paths[fmt], force="mesh").bounds, mesh.bounds, atol=1e-6, err_msg=fmt)
    np.testing.assert_allclose(WORLD_TO_GLTF[:3, :3] @ [0, 0, 1], [0, 1, 0])  # up -> up
    assert np.linalg.det(WORLD_TO_GLTF[:3, :3]) == pytest.approx(1.0)


def test_auto_iso_level_recovers_a_known_level():
    gen = torch.Generator().manual_seed(0)
    max_density = torch.rand(4000, generator=gen) * 10
    opacity = torch.sigmoid((max_density - 3.7) * 50)  # silhouette: exactly the rays above 3.7
    level = auto_iso_level(max_density, opacity)
    assert torch.equal(max_density > level, opacity > 0.5) and level == pytest.approx(3.7, abs=0.02)
    flip = torch.rand(4000, generator=gen) < 0.03  # noisy silhouette: still close
    assert auto_iso_level(max_density, torch.where(flip, 1 - opacity, opacity)) == pytest.approx(3.7, abs=0.3)
    with pytest.raises(UserError, match="train longer"):
        auto_iso_level(max_density, torch.zeros(4000))


def test_auto_iso_level_matches_a_rendered_silhouette():
    field = Blobs()
    frame = camera_frame([0.0, 120.0], [10.0, 50.0], 3.0)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(*frame, 40.0, 32))
    # Quadrature opacity 1 - exp(-sum sigma dt) along each ray, as a NeRF would render it.
    t = torch.linspace(1.5, 4.5, 400)
    sigma = field.query_density((origins[:, None] + t[:, None] * dirs[:, None]).reshape(-1, 3)).reshape(-1, 400)
    opacity = 1 - torch.exp(-sigma.sum(-1) * (t[1] - t[0]))
    max_density = max_density_along_rays(field, origins, dirs, field.bound)
    level = auto_iso_level(max_density, opacity)
    mine, nerf = max_density > level, opacity > 0.5
    assert (mine & nerf).sum() / (mine | nerf).sum() > 0.98 and 0 < level < PEAK


def unit_sphere(rgb=(200, 60, 30), radius=1.0, offset=(0.0, 0.0, 0.0)):
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    mesh.apply_translation(offset)
    mesh.visual.vertex_colors = np.tile([*rgb, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    return mesh


def test_render_mesh_silhouette_shading_and_background():
    size, distance, fov, background = 128, 3.5, 40.0, 0.5
    image = render_mesh(unit_sphere(), [30.0, 200.0], [20.0, -10.0], distance, fov, size, background)
    assert image.shape == (2, 3, size, size)
    mask = (image != background).any(1)  # (B, H, W)
    disc = math.tan(math.asin(1 / distance)) / math.tan(math.radians(fov / 2)) * size / 2  # radius in pixels
    assert mask.sum((1, 2)).float() == pytest.approx([math.pi * disc**2] * 2, rel=0.03)
    lit = AMBIENT + DIFFUSE / math.sqrt(1 + 0.6**2 + 0.4**2)  # normal towards the camera, ToyWorld's light
    expected = torch.tensor([200, 60, 30]) / 255 * lit
    for frame in image:
        assert torch.allclose(frame[:, size // 2, size // 2], expected, atol=0.03)
    border = torch.cat([image[..., :8, :].flatten(), image[..., -8:, :].flatten(), image[..., :, :8].flatten()])
    assert (border == background).all()  # exactly, not approximately
    chunked = render_mesh(unit_sphere(), [30.0, 200.0], [20.0, -10.0], distance, fov, size, background,
                          max_candidates=20_000)  # many face chunks
    assert torch.equal(chunked, image)


def test_render_mesh_matches_toyworld_camera():
    az, el = torch.tensor([0.0, 75.0, 230.0]), torch.tensor([5.0, 30.0, 65.0])
    offset = (0.3, -0.2, 0.15)  # off-centre, so a mirrored or shifted projection would show
    b = len(az)
    scene = Scene(shape=torch.zeros(b, dtype=torch.long), color=torch.zeros(b, dtype=torch.long),
                  azimuth_deg=az, elevation_deg=el, distance=torch.full((b,), 3.5), fov_deg=torch.full((b,), 40.0),
                  scale=torch.ones(b), yaw_deg=torch.zeros(b), offset=torch.tensor([offset] * b))
    _, alpha, _ = render_with_aux(scene, size=64, supersample=1)
    theirs = alpha[:, 0] > 0.5
    mine = (render_mesh(unit_sphere(radius=SPHERE_RADIUS, offset=offset), az, el, 3.5, 40.0, 64) != 0.92).any(1)
    iou = (mine & theirs).sum((1, 2)) / (mine | theirs).sum((1, 2))
    assert (iou > 0.95).all(), iou


def test_turntable_mp4(tmp_path):
    frames = render_mesh(sphere_mesh(24), torch.arange(4) * 90.0, 15.0, 3.0, 40.0, 32)
    info = probe(write_mp4(tmp_path / "turntable.mp4", frames, fps=8))  # how export_asset writes turntables
    assert info["frames"] == 4 and info["codec"] == "h264"


def test_check_resolution():
    with pytest.raises(UserError, match=r"use export.mesh_resolution=\d+") as info:
        check_resolution(4096, available_bytes=2 * 2**30)
    assert "\n" not in str(info.value)
    check_resolution(256, available_bytes=2 * 2**30)
    check_resolution(64)  # reads MemAvailable
    assert estimate_grid_bytes(512) > estimate_grid_bytes(256) >= 4 * 256**3  # at least the float32 grid
    with pytest.raises(UserError):
        check_resolution(2)
