"""Checkpoints and run folders: the file and folder types every tool reads (`files`), what a
checkpoint carries besides the weights (`run_info`), when one is written and what a stop signal
saves (`saving`), what a resume must match (`resume`), the conversion that lets a ZeRO checkpoint
resume on another number of processes (`universal`), and the run folder (`run_folder`)."""
