"""Stage programs: each module exposes ``run(cfg: ResolvedStageConfig) -> StageManifest``."""
