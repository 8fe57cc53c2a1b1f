"""Text-to-4D (Make-A-Video3D): a static 3D fit moved by video SDS."""
