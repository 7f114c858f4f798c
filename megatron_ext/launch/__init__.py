"""Launching jobs: the launch planner (rank layout, groups, memory estimate) and the bootstrap that
fills torchrun's environment for jobs started by srun or mpirun."""
