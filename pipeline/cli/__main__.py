"""`python -m skyferry.pipeline.cli`: how the local provider starts agents with the venv's Python."""

from skyferry.pipeline.cli import main

main()
