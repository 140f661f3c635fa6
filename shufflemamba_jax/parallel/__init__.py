"""Devices and processes: the ("data", "fsdp") mesh, FSDP shardings, activation constraints, and
joining the processes of a multi-host run. Imports only jax and numpy."""
