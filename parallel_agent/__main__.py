"""`python -m parallel_agent` runs the pagent command line."""

from parallel_agent.cli import main

main()
