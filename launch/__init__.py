"""The launch scripts (torchrun wrapper, SLURM batch template), shipped as package data
(`megalite.launch_templates`) so that `megalite-launch` finds them without the source tree."""
