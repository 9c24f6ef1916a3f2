"""A run's configuration: its typed fields (`schema`, from which every part of a run is built), what
the hardware and the inputs fill in and every check an input must pass before anything costly
starts (`preflight`), the batch size fitted to the devices (`autosize`), the memory plan of each
ZeRO stage (`planner`), the DeepSpeed presets (`presets`) and a distillation's teacher as described
by its files (`teacher`)."""
