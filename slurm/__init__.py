"""Launch experiments (``recipes/experiments/*.yaml``) on this machine or on Slurm through submitit;
``python -m slurm.launch --help``."""
