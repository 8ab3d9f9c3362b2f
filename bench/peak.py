"""Run a command and report its wall time and peak resident memory.

Usage: python bench/peak.py RESULT.json CMD [ARGS...]

A separate small launcher because a child's peak RSS (ru_maxrss) counts the memory
of the process it was forked from: launched from the benchmark, which holds torch
and MLflow, every command would appear to need half a gigabyte.
"""

import json
import os
import subprocess
import sys
import time

result, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
with open(result, "w") as fh:
    json.dump({"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
