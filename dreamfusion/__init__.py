"""Text-to-3D (DreamFusion style): SDS from the prior into a NeRF, exported as meshes. Built in issue 5."""
