"""Floor 1: the shared text-to-image prior and what every job uses (loading, sampling, configs, run
folders, media, cameras). It imports nothing of this project's other packages."""
