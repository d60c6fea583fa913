"""skyferry.pipeline: plans, stages and drivers that move a running container between hosts."""
