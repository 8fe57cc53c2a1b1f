"""One animated GLB of a 4D asset: the canonical mesh with one morph target per frame, played by an animation.

Every frame is the same mesh moved (the motion field moves the canonical mesh's vertices), so the frames share
topology and glTF morph targets hold them exactly: target k is frame k's positions minus the base's, and the
animation sets target k's weight to 1 at time k / fps (linear in between, so a viewer shows the motion smoothly).
Written with pygltflib; axes as the 3D job's GLB (`dreamfusion.export.WORLD_TO_GLTF`: +Y up, front on +Z).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from dreamfusion.export import WORLD_TO_GLTF
from pipelines.runtime import atomic_path


def _to_gltf(vertices: np.ndarray) -> np.ndarray:
    return (vertices @ WORLD_TO_GLTF[:3, :3].T).astype(np.float32)


def write_animated_glb(path: Path, base: trimesh.Trimesh, frames: list[trimesh.Trimesh], fps: float) -> Path:
    """`base` (world frame, uint8 vertex colours) with `frames` (the same faces, moved vertices) as morph targets."""
    import pygltflib as g

    if any(len(f.vertices) != len(base.vertices) for f in frames):
        raise ValueError("every frame must have the base mesh's vertices")
    position = _to_gltf(np.asarray(base.vertices))
    targets = [_to_gltf(np.asarray(f.vertices)) - position for f in frames]
    colors = np.asarray(base.visual.vertex_colors, dtype=np.uint8)[:, :4]
    indices = np.asarray(base.faces, dtype=np.uint32).reshape(-1)
    times = (np.arange(len(frames)) / fps).astype(np.float32)
    weights = np.eye(len(frames), dtype=np.float32).reshape(-1)  # keyframe k: target k alone

    blobs, views, accessors = [], [], []

    def add(array: np.ndarray, component: int, kind: str, target: int | None = None, bounds: bool = False,
            normalized: bool = False) -> int:
        offset = sum(len(b) for b in blobs)
        data = np.ascontiguousarray(array).tobytes()
        blobs.append(data + b"\0" * (-len(data) % 4))  # 4-byte alignment
        views.append(g.BufferView(buffer=0, byteOffset=offset, byteLength=len(data), target=target))
        rows = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)
        accessors.append(g.Accessor(bufferView=len(views) - 1, componentType=component, count=len(rows), type=kind,
                                    normalized=normalized or None,
                                    min=rows.min(0).tolist() if bounds else None,
                                    max=rows.max(0).tolist() if bounds else None))
        return len(accessors) - 1

    pos = add(position, g.FLOAT, g.VEC3, g.ARRAY_BUFFER, bounds=True)
    col = add(colors, g.UNSIGNED_BYTE, g.VEC4, g.ARRAY_BUFFER, normalized=True)
    idx = add(indices, g.UNSIGNED_INT, g.SCALAR, g.ELEMENT_ARRAY_BUFFER)
    morphs = [add(t, g.FLOAT, g.VEC3, g.ARRAY_BUFFER, bounds=True) for t in targets]
    t_in = add(times, g.FLOAT, g.SCALAR, bounds=True)
    w_out = add(weights, g.FLOAT, g.SCALAR)
    primitive = g.Primitive(attributes=g.Attributes(POSITION=pos, COLOR_0=col), indices=idx, mode=g.TRIANGLES,
                            targets=[g.Attributes(POSITION=m) for m in morphs])
    gltf = g.GLTF2(
        asset=g.Asset(generator="text2world 4d (pygltflib)"),
        scene=0, scenes=[g.Scene(nodes=[0])], nodes=[g.Node(mesh=0, name="asset")],
        meshes=[g.Mesh(primitives=[primitive], weights=[0.0] * len(frames), name="asset")],
        animations=[g.Animation(name="motion", samplers=[g.AnimationSampler(input=t_in, output=w_out, interpolation="LINEAR")],
                                channels=[g.AnimationChannel(sampler=0, target=g.AnimationChannelTarget(node=0, path="weights"))])],
        accessors=accessors, bufferViews=views, buffers=[g.Buffer(byteLength=sum(len(b) for b in blobs))])
    gltf.set_binary_blob(b"".join(blobs))
    with atomic_path(path) as tmp:
        gltf.save_binary(str(tmp))
    return path


def read_frames(path: Path) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """A GLB written above -> base positions (V, 3) and each frame's (V, 3) in the world frame, and the faces."""
    import pygltflib as g

    gltf = g.GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()

    def read(index: int, dtype, width: int) -> np.ndarray:
        acc = gltf.accessors[index]
        view = gltf.bufferViews[acc.bufferView]
        data = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=view.byteOffset + (acc.byteOffset or 0))
        return data.reshape(acc.count, width) if width > 1 else data

    prim = gltf.meshes[0].primitives[0]
    base = read(prim.attributes.POSITION, np.float32, 3)
    back = np.linalg.inv(WORLD_TO_GLTF[:3, :3]).T
    frames = [(base + read(t["POSITION"] if isinstance(t, dict) else t.POSITION, np.float32, 3)) @ back for t in prim.targets]
    faces = read(prim.indices, np.uint32, 1).reshape(-1, 3)
    return base @ back, frames, faces
