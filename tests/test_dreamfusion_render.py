"""DreamFusion field, cameras, shading and renderers: hand-computed toy cases, ToyWorld agreement, GPU parity."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from dreamfusion.cameras import camera_rays, orbit_cameras, sample_cameras, view_names, view_prompts
from dreamfusion.config import CameraConfig, FieldConfig, RenderConfig, ShadingConfig
from dreamfusion.field import Background, NeRFField
from dreamfusion.renderer import BatchedRenderer, NerfaccRenderer, make_renderer, nerfacc_problem
from dreamfusion.shading import eval_shading, sample_shading, shade
from pipelines.config import build, model_defaults
from pipelines.errors import UserError
from pipelines.geometry import KEY_LIGHT_OFFSET, ray_aabb
from tests.conftest import requires_cuda
from toyworld.render import AMBIENT, DIFFUSE

BOUND = 1.5
NO_JITTER = dict(center_jitter=0.0, position_jitter=0.0, up_jitter=0.0)  # the jitters default to threestudio's
BG = torch.tensor([0.2, 0.4, 0.6])
ALBEDO = torch.tensor([0.9, 0.5, 0.1])


class BoxField(nn.Module):
    """Constant density `sigma` and albedo where |x_k| < half[k] for every axis k, 0 elsewhere."""

    def __init__(self, sigma: float, half=(BOUND, BOUND, BOUND)):
        super().__init__()
        self.sigma, self.half = sigma, torch.tensor(half)

    def forward(self, x):
        inside = (x.abs() < self.half).all(-1)
        return torch.where(inside, self.sigma, 0.0), ALBEDO.expand(x.shape[0], 3)

    def query_density(self, x):
        return self(x)[0]

    def normals(self, x, create_graph=False):
        return torch.zeros_like(x)


def fixed_bg(dirs, train, generator):
    return BG.expand(dirs.shape[0], 3)


def albedo_only(albedo, normals, points, ray_index):
    return albedo


def through_origin(dirs, distance=4.0):
    dirs = F.normalize(dirs, dim=-1)
    return -distance * dirs, dirs


# ---------------------------------------------------------------- renderer: hand-computed cases

def test_constant_cube_opacity_is_beer_lambert_and_colour_composites_the_background():
    sigma = 0.7
    origins, dirs = through_origin(torch.tensor([[1.0, 0, 0], [0, -1, 0], [1, 1, 1], [0.3, -0.8, 0.5], [-2, 1, 0.2]]))
    # A ray through the centre crosses the cube over 2 * bound / max_k |d_k| (hand formula).
    length = 2 * BOUND / dirs.abs().amax(-1, keepdim=True)  # (N, 1)
    expected_opacity = 1 - torch.exp(-sigma * length)
    renderer = BatchedRenderer(RenderConfig(samples_per_ray=32), BOUND)
    for train in (False, True):  # stratified jitter moves samples, not interval lengths
        out = renderer.render_rays(origins, dirs, BoxField(sigma), fixed_bg, albedo_only, train=train,
                                   generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out["opacity"], expected_opacity, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["rgb"], expected_opacity * ALBEDO + (1 - expected_opacity) * BG, atol=1e-5, rtol=0)


def test_rays_missing_the_cube_give_zero_opacity_and_exactly_the_background():
    origins = torch.tensor([[0.0, 0, 5], [3, 3, 0], [0, 2, 0]])
    dirs = F.normalize(torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0.1]]), dim=-1)  # parallel, away, away
    out = BatchedRenderer(RenderConfig(samples_per_ray=8), BOUND).render_rays(
        origins, dirs, BoxField(5.0), fixed_bg, albedo_only)
    assert torch.equal(out["opacity"], torch.zeros(3, 1)) and torch.equal(out["rgb"], BG.expand(3, 3))
    assert torch.equal(out["depth"], torch.zeros(3, 1))


def test_slab_opacity_and_depth_match_the_hand_computed_sum():
    # Ray down the z axis from z = 3: the cube spans t in [1.5, 4.5]; 60 intervals of 0.05 put
    # exactly 20 sample midpoints inside the slab |z| < 0.5 (t in [2.5, 3.5]).
    sigma, delta = 2.0, 0.05
    origins, dirs = torch.tensor([[0.2, -0.3, 3.0]]), torch.tensor([[0.0, 0, -1]])
    out = BatchedRenderer(RenderConfig(samples_per_ray=60), BOUND).render_rays(
        origins, dirs, BoxField(sigma, half=(BOUND, BOUND, 0.5)), fixed_bg, albedo_only)
    assert out["opacity"].item() == pytest.approx(1 - math.exp(-sigma * 1.0), abs=1e-5)
    alpha = 1 - math.exp(-sigma * delta)
    depth = sum(math.exp(-sigma * delta * k) * alpha * (2.5 + (k + 0.5) * delta) for k in range(20))
    assert out["depth"].item() == pytest.approx(depth, abs=1e-4)


def test_chunks_give_the_same_image_and_global_ray_indices():
    sigma, n = 1.3, 50
    origins, dirs = through_origin(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)))
    by_index = lambda albedo, normals, points, ray_index: repeat(ray_index.float() / n, "m -> m 3")
    renderer = BatchedRenderer(RenderConfig(samples_per_ray=16), BOUND)
    whole = renderer.render_rays(origins, dirs, BoxField(sigma), fixed_bg, by_index)
    chunked = renderer.render_rays(origins, dirs, BoxField(sigma), fixed_bg, by_index, chunk=7)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key])
    op = whole["opacity"]
    torch.testing.assert_close(whole["rgb"], op * torch.arange(n)[:, None] / n + (1 - op) * BG, atol=1e-5, rtol=0)


class TiltedBox(BoxField):
    """BoxField whose normals are one fixed unit vector everywhere."""

    def __init__(self, sigma, normal):
        super().__init__(sigma)
        self.normal = F.normalize(torch.tensor(normal), dim=0)

    def normals(self, x, create_graph=False):
        return self.normal.expand_as(x)


@pytest.mark.parametrize("train", [False, True])
def test_orientation_penalty_is_zero_for_normals_facing_the_camera_and_weighted_for_those_facing_away(train):
    """DreamFusion's orientation loss, sum_i w_i max(0, n_i . d)^2 with d the ray direction (into the scene):
    normals towards the camera cost nothing; normals facing away cost (n . d)^2 times the ray's opacity."""
    origins, dirs = torch.tensor([[0.1, -0.2, 4.0], [0.3, 0.0, 4.0]]), torch.tensor([[0.0, 0, -1], [0.0, 0, -1]])
    renderer = BatchedRenderer(RenderConfig(samples_per_ray=32), BOUND)
    for normal, cost in [((0.0, 0.0, 1.0), 0.0), ((1.0, 0.0, 1.0), 0.0), ((0.0, 0.0, -1.0), 1.0), ((1.0, 0.0, -1.0), 0.5),
                         ((1.0, 0.0, 0.0), 0.0)]:
        out = renderer.render_rays(origins, dirs, TiltedBox(0.4, normal), fixed_bg, albedo_only, train=train,
                                   generator=torch.Generator().manual_seed(0), need_normals=True)
        assert (out["opacity"] > 0.5).all()
        torch.testing.assert_close(out["orientation"], cost * out["opacity"][:, 0].detach(), atol=1e-5, rtol=0,
                                   msg=str(normal))
        torch.testing.assert_close(out["normal"], out["opacity"] * F.normalize(torch.tensor(normal), dim=0), atol=1e-5,
                                   rtol=0)


class CountingField(BoxField):
    """BoxField that counts the points its density is queried at."""

    queried = 0

    def forward(self, x):
        self.queried += len(x)
        return super().forward(x)


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    """A small box in a big cube: the grid marks only the cells around it, the field is queried at a fraction of
    the samples, and the image is what rendering every sample gives."""
    half = (0.3, 0.5, 0.2)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(orbit_cameras(3, elevation_deg=25.0, distance=4.0), 16))
    renderer = BatchedRenderer(RenderConfig(samples_per_ray=48, grid_resolution=32), BOUND)
    field = CountingField(3.0, half)
    out = renderer.render_rays(origins, dirs, field, fixed_bg, albedo_only, train=True,
                               generator=torch.Generator().manual_seed(0))
    grid = renderer.grid
    assert grid.ready and 0 < grid.fraction() < 0.1
    # every cell that the box touches is occupied, and cells two or more cells away from it are not
    centres = (torch.stack(torch.meshgrid(*[torch.arange(32)] * 3, indexing="ij"), -1) + 0.5) * (2 * BOUND / 32) - BOUND
    gap = (centres.abs() - torch.tensor(half)).clamp(min=0).amax(-1)  # how far outside the box a centre is, per axis
    cell = 2 * BOUND / 32
    assert grid.occupied[gap < cell / 2].all() and not grid.occupied[gap > 2.5 * cell].any()
    samples = int((out["opacity"] >= 0).sum()) * 48
    marched = field.queried - 33**3  # the grid's refresh queried every corner
    full = BatchedRenderer(RenderConfig(samples_per_ray=48, grid_resolution=32), BOUND)
    full.grid.occupied.fill_(True)
    full.grid.refreshed.fill_(0)
    reference = full.render_rays(origins, dirs, BoxField(3.0, half), fixed_bg, albedo_only, train=True,
                                 generator=torch.Generator().manual_seed(0))
    assert 0 < marched < samples / 5
    for key in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(out[key], reference[key])
    assert (out["opacity"] > 0.5).any()


def test_occupancy_grid_refreshes_every_n_steps_and_is_module_state():
    cfg = RenderConfig(grid_resolution=8, grid_update_every=4)
    renderer = BatchedRenderer(cfg, BOUND)
    small, large = BoxField(3.0, (0.2, 0.2, 0.2)), BoxField(3.0, (1.0, 1.0, 1.0))
    renderer.update(1, small)  # never refreshed: refresh now
    first = renderer.grid.occupied.clone()
    renderer.update(2, large)
    renderer.update(3, large)
    assert torch.equal(renderer.grid.occupied, first) and int(renderer.grid.refreshed) == 1
    renderer.update(4, large)
    assert renderer.grid.fraction() > first.float().mean() and int(renderer.grid.refreshed) == 4
    state = renderer.state_dict()
    assert set(state) == {"grid.occupied", "grid.refreshed"}
    again = BatchedRenderer(cfg, BOUND)
    again.load_state_dict(state)
    assert torch.equal(again.grid.occupied, renderer.grid.occupied) and again.grid.ready


def test_ray_aabb_starts_inside_rays_at_zero():
    near, far = ray_aabb(torch.zeros(1, 3), torch.tensor([[0.0, 1, 0]]), BOUND)
    assert near.item() == 0 and far.item() == pytest.approx(BOUND)


# ---------------------------------------------------------------- field

@pytest.mark.parametrize("encoding", ["frequency", "hashgrid"])
def test_blob_is_dense_at_the_centre_and_empty_outside_the_cube(encoding):
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(bound=1.5, encoding=encoding, hash_log2_size=12))
    density = field.query_density(torch.tensor([[0.0, 0, 0], [1.4, 0, 0], [0, 1.6, 0]]))  # centre, in, out
    assert density[0] > 5 and density[0] > 100 * density[1] and density[2] == 0


@pytest.mark.parametrize("encoding", ["frequency", "hashgrid"])
def test_normals_on_the_blob_point_outward(encoding):
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(encoding=encoding, hash_log2_size=12))
    x = 0.3 * F.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():  # normals enable grad locally
        n = field.normals(x)
    assert torch.allclose(n.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert (n * F.normalize(x, dim=-1)).sum(-1).min() > 0.9  # radial: the density falls outward


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_gradients_reach_every_parameter_through_rendering_and_normals(activation):
    torch.manual_seed(0)
    cfg = FieldConfig(density_activation=activation, hidden=16)
    field, background = NeRFField(cfg), Background(cfg)
    cams = orbit_cameras(1, elevation_deg=20.0)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(cams, 8))
    shading = sample_shading(10, ShadingConfig(ambient_only_steps=0, albedo_prob=0.0, textureless_prob=0.0), cams)
    shading_fn = lambda albedo, normals, points, ray_index: shade(
        albedo, normals, points, shading.light[0].expand_as(points), shading.mode, 0.1, 0.9)
    out = BatchedRenderer(RenderConfig(samples_per_ray=16), cfg.bound).render_rays(
        origins, dirs, field, background, shading_fn, train=True, need_normals=True)
    assert shading.mode == "lambertian" and (out["normal"].norm(dim=-1) > 0).any()
    (out["rgb"].mean() + out["orientation"].mean() + out["normal"].square().mean()).backward()
    for name, p in list(field.named_parameters()) + list(background.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_background_modes():
    dirs = F.normalize(torch.randn(5, 3), dim=-1)
    fixed = Background(FieldConfig(background="fixed"))
    assert torch.equal(fixed(dirs, True, None), torch.full((5, 3), 0.92))
    rand = Background(FieldConfig(background="random"))
    a = rand(dirs, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, a[:1].expand(5, 3)) and torch.equal(a, rand(dirs, True, torch.Generator().manual_seed(3)))
    assert torch.equal(rand(dirs, False, None), torch.full((5, 3), 0.92))
    mlp = Background(FieldConfig(background="mlp"))(dirs)
    assert mlp.shape == (5, 3) and ((mlp > 0) & (mlp < 1)).all()


def test_configs_reject_bad_values_with_one_line_errors():
    bad = [FieldConfig(encoding="grid"), FieldConfig(bound=0.0), FieldConfig(background="sky"),
           FieldConfig(density_activation="relu"), CameraConfig(fov_range=(50.0, 40.0)),
           CameraConfig(elevation_range=(0.0, 90.0)), ShadingConfig(albedo_prob=1.5),
           RenderConfig(samples_per_ray=0), RenderConfig(renderer="optix")]
    for cfg in bad:
        with pytest.raises(UserError) as err:
            cfg.validate()
        assert "\n" not in str(err.value)
    for cfg in (FieldConfig(), CameraConfig(), ShadingConfig(), RenderConfig()):
        cfg.validate()
    assert build(CameraConfig, {"elevation_range": [0, 30]}).elevation_range == (0.0, 30.0)


# ---------------------------------------------------------------- cameras

def _hand_camera(azimuth_deg, elevation_deg, distance, fov_deg, size):
    """The camera convention written out by hand for one camera: eye d (cos el cos az, cos el sin az, sin el)
    looking at the origin with z up, image right horizontal, pixel [0, 0] the top-left corner and pixel
    centres at (i + 0.5) / size on [-1, 1] of tan(fov / 2). Returns eye, right, up, forward and dirs (H, W, 3)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = distance * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -eye / distance
    right = torch.tensor([-math.sin(az), math.cos(az), 0.0])  # forward x z, normalised
    up = torch.tensor([-math.sin(el) * math.cos(az), -math.sin(el) * math.sin(az), math.cos(el)])  # right x forward
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    u, v = centres[None, :, None], -centres[:, None, None]  # u grows along a row, v is +1 at the top row
    dirs = F.normalize(forward + math.tan(math.radians(fov_deg) / 2) * (u * right + v * up), dim=-1)
    return eye, right, up, forward, dirs


def test_zero_jitter_cameras_and_rays_follow_the_documented_pinhole_convention():
    """pipelines.geometry's frame and rays (ToyWorld's renderer and the 3D job share them) against the
    convention computed by hand, per camera and per pixel."""
    size = 8
    cams = sample_cameras(4, CameraConfig(**NO_JITTER), torch.Generator().manual_seed(0))
    orbit = orbit_cameras(3, elevation_deg=30.0, distance=3.0, fov_deg=40.0)
    assert orbit.azimuth_deg.tolist() == [0.0, 120.0, 240.0]
    for batch in (cams, orbit):
        origins, dirs = camera_rays(batch, size)
        assert origins.shape == dirs.shape == (len(batch), size, size, 3)
        for b in range(len(batch)):
            eye, right, up, forward, expected = _hand_camera(batch.azimuth_deg[b].item(), batch.elevation_deg[b].item(),
                                                             batch.distance[b].item(), batch.fov_deg[b].item(), size)
            for name, axis in [("eye", eye), ("right", right), ("up", up), ("forward", forward)]:
                torch.testing.assert_close(getattr(batch, name)[b], axis, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(origins[b], eye.expand(size, size, 3), atol=1e-5, rtol=0)
            torch.testing.assert_close(dirs[b], expected, atol=1e-5, rtol=0)
            assert (dirs[b, 0, 0] @ up) > 0 and (dirs[b, 0, 0] @ right) < 0  # pixel [0, 0] looks up and left


def test_view_names_follow_dreamfusions_view_rule():
    """overhead above the overhead threshold, else front / back within the thresholds of azimuth 0 / 180
    (any turn of the circle), else side: hand-picked cases, with the default and with other thresholds."""
    cases = [(0, 0, "front"), (44, 10, "front"), (-44, 10, "front"), (316, 0, "front"), (370, -5, "front"),
             (46, 0, "side"), (90, 30, "side"), (-90, 30, "side"), (134, 0, "side"), (270, 0, "side"),
             (136, 0, "back"), (180, 0, "back"), (-170, 20, "back"), (540, 0, "back"),
             (0, 61, "overhead"), (180, 85, "overhead"), (90, 59, "side")]
    az, el, expected = zip(*cases)
    assert view_names(torch.tensor(az, dtype=torch.float32), torch.tensor(el, dtype=torch.float32),
                      CameraConfig()) == list(expected)
    other = CameraConfig(front_threshold=10.0, back_threshold=80.0, overhead_threshold=20.0)
    assert view_names([15.0, 5.0, 110.0, 90.0, 0.0], [0.0, 0.0, 0.0, 0.0, 25.0], other) == [
        "side", "front", "back", "side", "overhead"]
    az, el = torch.meshgrid(torch.arange(-360.0, 361.0, 7.5), torch.arange(-10.0, 86.0, 5.0), indexing="ij")
    assert set(view_names(az.flatten(), el.flatten(), CameraConfig())) == {"front", "side", "back", "overhead"}
    assert view_prompts("a red cube", ["front", "overhead"]) == ["a red cube, front view", "a red cube, overhead view"]


def test_sampled_cameras_stay_in_their_ranges_and_are_orthonormal():
    cfg = CameraConfig(elevation_range=(5.0, 30.0), azimuth_range=(-90.0, 45.0), distance_range=(2.0, 2.5),
                       fov_range=(20.0, 30.0), **NO_JITTER)
    cams = sample_cameras(256, cfg, torch.Generator().manual_seed(0))
    for name, (lo, hi) in [("elevation_deg", cfg.elevation_range), ("azimuth_deg", cfg.azimuth_range),
                           ("distance", cfg.distance_range), ("fov_deg", cfg.fov_range)]:
        values = getattr(cams, name)
        assert values.min() >= lo and values.max() <= hi, name
    torch.testing.assert_close(cams.eye.norm(dim=-1), cams.distance)
    jittered = sample_cameras(64, CameraConfig(center_jitter=0.1, position_jitter=0.1, up_jitter=0.05),
                              torch.Generator().manual_seed(0))
    axes = torch.stack([jittered.right, jittered.up, jittered.forward], -1)  # (B, 3, 3)
    torch.testing.assert_close(axes.transpose(1, 2) @ axes, torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    assert not torch.allclose(jittered.forward, F.normalize(-jittered.eye, dim=-1))


# ---------------------------------------------------------------- shading

def test_lambertian_and_textureless_shading():
    albedo = torch.tensor([[0.8, 0.4, 0.2], [0.1, 0.9, 0.5]])
    normals, points = torch.tensor([[0.0, 0, 1]]).expand(2, 3), torch.zeros(2, 3)
    behind, above = torch.tensor([[0.0, 0, -5]]).expand(2, 3), torch.tensor([[0.0, 0, 5]]).expand(2, 3)
    torch.testing.assert_close(shade(albedo, normals, points, behind, "lambertian", 0.1, 0.9), 0.1 * albedo)
    torch.testing.assert_close(shade(albedo, normals, points, above, "lambertian", 0.1, 0.9), albedo)
    textureless = shade(albedo, normals, points, above, "textureless", 0.1, 0.6)
    torch.testing.assert_close(textureless, torch.full((2, 3), 0.7))  # the same for both albedos
    assert torch.equal(shade(albedo, None, points, above, "albedo", 0.1, 0.9), albedo)
    with pytest.raises(ValueError):
        shade(albedo, None, points, above, "lambertian", 0.1, 0.9)


def test_sampled_shading_warms_up_on_albedo_and_lights_sit_near_the_camera():
    cams = sample_cameras(16, CameraConfig(), torch.Generator().manual_seed(0))
    gen, cfg = torch.Generator().manual_seed(1), ShadingConfig()
    warm_up = [*range(50), cfg.ambient_only_steps - 1]
    assert {sample_shading(s, cfg, cams, gen).mode for s in warm_up} == {"albedo"}
    modes = [sample_shading(cfg.ambient_only_steps, cfg, cams, gen).mode for _ in range(300)]
    assert abs(modes.count("albedo") / 300 - cfg.albedo_prob) < 0.1
    assert abs(modes.count("textureless") / 300 - (1 - cfg.albedo_prob) * cfg.textureless_prob) < 0.1
    assert "lambertian" in modes
    light = sample_shading(0, ShadingConfig(light_jitter=0.0), cams, gen).light
    ratio = light.norm(dim=-1) / cams.eye.norm(dim=-1)  # in units of the (jittered) camera's distance
    assert ((ratio >= 0.8 - 1e-5) & (ratio <= 1.5 + 1e-5)).all()
    torch.testing.assert_close(F.normalize(light, dim=-1), F.normalize(cams.eye, dim=-1))


def test_eval_shading_is_toyworlds_key_light():
    """Evaluation renders are lit as ToyWorld's images: Lambertian with its intensities, under a far light
    towards the camera moved 0.6 up and 0.4 left in the camera's frame (worked out by hand at elevation 0)."""
    cams = orbit_cameras(4, elevation_deg=0.0)  # azimuths 0, 90, 180, 270
    shading = eval_shading(cams)
    assert (shading.mode, shading.ambient, shading.diffuse) == ("lambertian", AMBIENT, DIFFUSE)
    az = torch.deg2rad(cams.azimuth_deg)
    # towards the camera (cos az, sin az, 0) + 0.6 up (0, 0, 1) - 0.4 right (-sin az, cos az, 0)
    toward = torch.stack([az.cos() + 0.4 * az.sin(), az.sin() - 0.4 * az.cos(), torch.full_like(az, 0.6)], -1)
    torch.testing.assert_close(F.normalize(shading.light, dim=-1), F.normalize(toward, dim=-1))
    assert (shading.light.norm(dim=-1) > 1000 * cams.distance).all()  # far: the same direction at every point


def test_light_offset_moves_the_training_light_to_toyworlds_key_light():
    # unjittered, as ToyWorld's recipe: the training light follows the eye, the key light the viewing direction
    cams = sample_cameras(16, CameraConfig(**NO_JITTER), torch.Generator().manual_seed(0))
    cfg = ShadingConfig(light_jitter=0.0, light_offset=KEY_LIGHT_OFFSET)
    light = sample_shading(0, cfg, cams, torch.Generator().manual_seed(1)).light
    torch.testing.assert_close(F.normalize(light, dim=-1), F.normalize(eval_shading(cams).light, dim=-1))
    assert tuple(model_defaults("toyworld", "3d")["shading"]["light_offset"]) == KEY_LIGHT_OFFSET  # its recipe
    with pytest.raises(UserError, match="light_offset"):
        ShadingConfig(light_offset=(0.6,)).validate()


# ---------------------------------------------------------------- renderer choice and the nerfacc wiring

def test_make_renderer_picks_batched_on_cpu_and_refuses_nerfacc_there():
    assert isinstance(make_renderer("cpu", RenderConfig(), BOUND), BatchedRenderer)
    with pytest.raises(UserError):
        make_renderer("cpu", RenderConfig(renderer="nerfacc"), BOUND)


def _fake_nerfacc(samples_per_ray: int) -> types.ModuleType:
    """A CPU stand-in with nerfacc 0.5's signatures and maths, whose estimator returns the batched
    renderer's equal intervals (the real one, on CUDA, is checked against the batched renderer below)."""
    fake = types.ModuleType("nerfacc")

    class OccGridEstimator:
        def __init__(self, roi_aabb, resolution, levels):
            self.updates, self.binaries = [], torch.zeros(1, dtype=torch.bool)

        def to(self, device):
            return self

        def train(self, mode=True):
            return self

        def update_every_n_steps(self, step, occ_eval_fn, occ_thre, n):
            if step % n == 0:
                self._update(step, occ_eval_fn, occ_thre)

        def _update(self, step, occ_eval_fn, occ_thre):
            assert occ_eval_fn(torch.rand(10, 3)).shape == (10, 1)
            self.updates.append(step)
            self.binaries[:] = True

        @torch.no_grad()
        def sampling(self, rays_o, rays_d, sigma_fn, t_min, t_max, render_step_size, alpha_thre, stratified):
            edges = t_min[:, None] + (t_max - t_min)[:, None] * torch.linspace(0, 1, samples_per_ray + 1)
            keep = repeat(t_max > t_min, "n -> n s", s=samples_per_ray)
            ray_indices = repeat(torch.arange(len(rays_o)), "n -> n s", s=samples_per_ray)[keep]
            t_starts, t_ends = edges[:, :-1][keep], edges[:, 1:][keep]
            assert sigma_fn(t_starts, t_ends, ray_indices).shape == t_starts.shape
            return ray_indices, t_starts, t_ends

    def accumulate_along_rays(weights, values, ray_indices, n_rays):
        src = weights[:, None] if values is None else weights[:, None] * values
        return src.new_zeros(n_rays, src.shape[-1]).index_add(0, ray_indices, src)

    def rendering(t_starts, t_ends, ray_indices, n_rays, rgb_sigma_fn):
        rgbs, sigmas = rgb_sigma_fn(t_starts, t_ends, ray_indices)
        tau = sigmas * (t_ends - t_starts)
        before = torch.cumsum(tau, 0) - tau  # samples of a ray are contiguous: subtract the ray's start
        start = before.new_zeros(n_rays).scatter_reduce(0, ray_indices, before, "amin", include_self=False)
        weights = torch.exp(-(before - start[ray_indices])) * (1 - torch.exp(-tau))
        opacity = accumulate_along_rays(weights, None, ray_indices, n_rays)
        return accumulate_along_rays(weights, rgbs, ray_indices, n_rays), opacity, None, {"weights": weights}

    fake.OccGridEstimator, fake.rendering, fake.accumulate_along_rays = OccGridEstimator, rendering, accumulate_along_rays
    return fake


def _broken(fake: types.ModuleType, method: str) -> types.ModuleType:
    """`fake` whose estimator's `method` fails as nerfacc's first call into its kernels does without ninja."""
    def fail(self, *args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\n(and more lines of build log)")

    setattr(fake.OccGridEstimator, method, fail)
    return fake


def test_nerfacc_probe_runs_its_kernels_once_and_reports_a_failed_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "nerfacc", _fake_nerfacc(4))
    assert nerfacc_problem(torch.device("cpu")) is None  # grid update and sampling ran
    monkeypatch.setitem(sys.modules, "nerfacc", _broken(_fake_nerfacc(4), "sampling"))  # the JIT build is here
    assert nerfacc_problem(torch.device("cpu")) == "RuntimeError: Ninja is required to load C++ extensions"
    monkeypatch.setitem(sys.modules, "nerfacc", None)  # not installed
    assert nerfacc_problem(torch.device("cpu")).startswith("ModuleNotFoundError")


def test_make_renderer_falls_back_to_batched_with_one_warning_when_nerfacc_cannot_run(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nerfacc", _broken(_fake_nerfacc(4), "_update"))
    for renderer in ("auto", "nerfacc"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert isinstance(make_renderer("cuda", RenderConfig(renderer=renderer), BOUND), BatchedRenderer)
        [record] = caplog.records
        message = record.getMessage()
        assert "\n" not in message and "Ninja is required" in message and "batched renderer" in message, message


def test_nerfacc_renderer_wiring_matches_batched_with_a_stand_in_nerfacc(monkeypatch):
    import dreamfusion.renderer as renderer_module

    monkeypatch.setitem(sys.modules, "nerfacc", _fake_nerfacc(16))
    monkeypatch.setattr(renderer_module, "MIN_WEIGHT", -1.0)  # the stand-in shades every sample: so must batched
    torch.manual_seed(0)
    cfg = FieldConfig(hidden=16, background="fixed")
    field, background = NeRFField(cfg), Background(cfg)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(orbit_cameras(2, distance=3.0), 6))
    shading_fn = lambda albedo, normals, points, ray_index: shade(
        albedo, normals, points, torch.full_like(points, 5.0) * (1 + ray_index[:, None]), "lambertian", 0.1, 0.9)
    render_cfg = RenderConfig(samples_per_ray=16, stratified=False, occupancy_threshold=0.0)  # the stand-in skips nothing
    nerfacc_renderer = NerfaccRenderer(render_cfg, cfg.bound, "cpu")
    a = nerfacc_renderer.render_rays(origins, dirs, field, background, shading_fn, need_normals=True, chunk=25)
    b = BatchedRenderer(render_cfg, cfg.bound).render_rays(origins, dirs, field, background, shading_fn,
                                                            need_normals=True)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert nerfacc_renderer.estimator.updates == [0]  # the first render filled the empty grid
    nerfacc_renderer.update(32, field)
    nerfacc_renderer.update(33, field)
    assert nerfacc_renderer.estimator.updates == [0, 32]


@pytest.mark.gpu
@requires_cuda
def test_nerfacc_and_batched_renderers_agree_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = FieldConfig(background="fixed")
    field, background = NeRFField(cfg).to(device), Background(cfg).to(device)
    # ToyWorld's camera distances and fields of view: the blob and empty space are both in view
    cameras = CameraConfig(distance_range=(3.2, 3.8), fov_range=(35.0, 45.0))
    cams = sample_cameras(2, cameras, torch.Generator().manual_seed(0), device)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(cams, 32))  # 2048 rays
    fine = RenderConfig(samples_per_ray=1024, render_step_size=0.005, alpha_threshold=0.0, occupancy_threshold=1e-4)
    nerfacc_renderer = make_renderer(device, fine, cfg.bound)
    assert isinstance(nerfacc_renderer, NerfaccRenderer)
    nerfacc_renderer.refresh(field)
    with torch.no_grad():
        a = nerfacc_renderer.render_rays(origins, dirs, field, background, albedo_only)
        b = BatchedRenderer(fine, cfg.bound).render_rays(origins, dirs, field, background, albedo_only, chunk=512)
    assert (a["opacity"] > 0.5).any() and (a["opacity"] < 0.01).any()  # the blob and empty space are both in view
    assert (a["rgb"] - b["rgb"]).abs().mean() < 0.02 and (a["opacity"] - b["opacity"]).abs().mean() < 0.02
    # training path, on rays through the blob: normals with create_graph, gradients through packed rendering
    solid = (b["opacity"][:, 0] > 0.5).nonzero()[:256, 0]
    out = nerfacc_renderer.render_rays(origins[solid], dirs[solid], field, background, albedo_only, train=True,
                                       need_normals=True)
    (out["rgb"].mean() + out["orientation"].mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in field.parameters())


def test_frequency_annealing_opens_octaves_coarse_to_fine():
    from dreamfusion.field import FrequencyEncoding

    enc = FrequencyEncoding(4)
    x = torch.rand(5, 3) * 2 - 1
    full = enc(x)
    enc.anneal(0.0)
    torch.testing.assert_close(enc(x)[:, 3:], torch.zeros(5, 24))  # only the raw coordinates pass
    enc.anneal(0.5)  # alpha = 2: octaves 0 and 1 open, 2 and 3 shut
    feats = enc(x)[:, 3:].reshape(5, 2, 3, 4)  # (n, sin/cos, xyz, octave)
    assert feats[..., :2].abs().sum() > 0 and feats[..., 2:].abs().sum() == 0
    enc.anneal(1.0)
    torch.testing.assert_close(enc(x), full)
    assert "alpha" in enc.state_dict()  # a resumed or exported field keeps its octaves


def test_hash_grid_interpolates_its_tables_and_its_gradient_repeats_exactly():
    """A point on a dense level's vertex reads that vertex's row; and the tables' gradient is the same bits
    every time with several threads (indexing's backward sums in thread order, which broke exact resume)."""
    from dreamfusion.field import HashGridEncoding

    enc = HashGridEncoding(levels=2, features=2, log2_size=15, base_resolution=16, max_resolution=96)
    assert enc.resolutions == [16, 96] and 17**3 <= enc.table_size < 97**3  # one dense level, one hashed
    with torch.no_grad():
        enc.tables.normal_()
    vertex = torch.tensor([[3, 5, 7]])
    feats = enc(vertex / 16 * 2 - 1)  # the vertex (3, 5, 7) of the 16-cell level, in [-1, 1]^3
    torch.testing.assert_close(feats[0, :2], enc.tables[0, 3 + 17 * (5 + 17 * 7)])
    x = torch.rand(200_000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    weights = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(3):
        enc.tables.grad = None
        (enc(x) * weights).sum().backward()
        grads.append(enc.tables.grad.clone())
    assert torch.get_num_threads() > 1 and all(torch.equal(g, grads[0]) for g in grads[1:])


def test_separate_albedo_network_leaves_density_to_the_trunk():
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(albedo_network="separate"))
    x = torch.randn(32, 3) * 0.5
    density, albedo = field(x)
    torch.testing.assert_close(field.query_density(x), density)  # the density path never runs the albedo MLP
    albedo.sum().backward()  # albedo gradients reach only the albedo MLP and the encoding
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in field.trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.albedo.parameters())
    assert NeRFField(FieldConfig(albedo_network="shared")).albedo is None  # shared: one trunk gives both
    with pytest.raises(UserError, match="albedo_network"):
        FieldConfig(albedo_network="split").validate()


@pytest.mark.parametrize("encoding", ["frequency", "hashgrid"])
def test_finite_difference_normals_match_autograd(encoding):
    torch.manual_seed(0)
    exact = NeRFField(FieldConfig(encoding=encoding, hash_levels=3, hash_max_resolution=16))
    fd = NeRFField(FieldConfig(encoding=encoding, hash_levels=3, hash_max_resolution=16,
                               normals="finite_difference", normal_eps=1e-3))
    fd.load_state_dict(exact.state_dict())
    x = F.normalize(torch.randn(64, 3), dim=-1) * 0.4  # on the blob, where the gradient is large
    cos = (exact.normals(x) * fd.normals(x)).sum(-1)
    assert cos.min() > 0.98
    fd.normals(x, create_graph=True).sum().backward()  # differentiable without a double backward
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fd.parameters())


@pytest.mark.parametrize("train", [False, True])
def test_shading_only_weighted_samples_and_skipping_empty_cells_barely_change_the_image(train, monkeypatch):
    """Against every sample shaded and every cell marched: the blob's image, its normals, the orientation loss
    and the gradients of a training render agree."""
    import dreamfusion.renderer as renderer_module

    torch.manual_seed(0)
    cfg = FieldConfig(hidden=16, background="fixed")
    field, background = NeRFField(cfg), Background(cfg)
    cams = orbit_cameras(2, elevation_deg=20.0, distance=3.0)
    origins, dirs = (x.reshape(-1, 3) for x in camera_rays(cams, 12))
    shading = sample_shading(10, ShadingConfig(ambient_only_steps=0, albedo_prob=0.0, textureless_prob=0.0), cams)
    shading_fn = lambda albedo, normals, points, ray_index: shade(
        albedo, normals, points, shading.light[0].expand_as(points), "lambertian", 0.1, 0.9)

    def render(min_weight: float | None, all_cells: bool):
        if min_weight is not None:
            monkeypatch.setattr(renderer_module, "MIN_WEIGHT", min_weight)
            monkeypatch.setattr(renderer_module, "EVAL_MIN_WEIGHT", min_weight)
        renderer = BatchedRenderer(RenderConfig(samples_per_ray=32, stratified=False), cfg.bound)
        if all_cells:
            renderer.grid.occupied.fill_(True)
            renderer.grid.refreshed.fill_(0)
        field.zero_grad()
        with torch.set_grad_enabled(train):
            out = renderer.render_rays(origins, dirs, field, background, shading_fn, train=train, need_normals=True)
        if train:
            (out["rgb"].sum() + out["orientation"].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in field.parameters()]) if train else None
        return out, grads, renderer.grid.fraction()

    full, full_grads, _ = render(-1.0, all_cells=True)
    monkeypatch.undo()
    assert (full["opacity"] > 0.5).any() and (full["opacity"] < 0.01).any()
    # shading only the samples that weigh over MIN_WEIGHT (EVAL_MIN_WEIGHT without gradients); then also skipping
    # cells whose one-step alpha is under 1%, which cuts a little fog (nerfacc's occupancy test)
    for all_cells, atol, cosine in [(True, 2e-3 if train else 1e-2, 0.9999), (False, 0.015, 0.999)]:
        pruned, pruned_grads, fraction = render(None, all_cells=all_cells)
        assert fraction < 0.5 or all_cells
        for k in ("rgb", "opacity", "depth", "normal", "orientation"):  # depth: about 3 units times the opacity
            torch.testing.assert_close(pruned[k].detach(), full[k].detach(), atol=atol * (4 if k == "depth" else 1), rtol=0)
        if train:
            assert torch.nn.functional.cosine_similarity(pruned_grads, full_grads, dim=0) > cosine
