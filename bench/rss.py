"""Run a console command in this process and print its peak resident memory (KiB) to stderr at exit.

python bench/rss.py pagent run ...      # the same as `pagent run ...`, plus "peak_rss_kib=N"
python bench/rss.py script.py args...   # a plain Python script
"""

import atexit
import resource
import runpy
import sys


def report() -> None:
    sys.stderr.write(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")


atexit.register(report)
program, *arguments = sys.argv[1:]
sys.argv = [program, *arguments]
if program == "pagent":
    from parallel_agent.cli import main

    try:
        main()
    except SystemExit as exit_:
        report()
        atexit.unregister(report)
        raise SystemExit(exit_.code) from None
else:
    runpy.run_path(program, run_name="__main__")
