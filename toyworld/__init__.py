"""Floor 2: ToyWorld, the embedded procedural world of coloured primitives (scenes, captions, clips, its
renderer) and the recipes that train the shipped models from it. It imports only `pipelines`."""
