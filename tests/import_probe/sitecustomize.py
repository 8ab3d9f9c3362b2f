"""Put on PYTHONPATH by tests/test_stage_deps.py: every Python process records, at exit, the project modules it ran.

Each process that loaded a module under pipeline/ or stages/ of its working directory
writes {"argv": ..., "modules": [...], "compiler": [...]} to $STAGE_IMPORTS_DIR/<pid>.json:
the project modules it ran, and the torch compiler modules it loaded (torch._dynamo,
torch._inductor, torch.export). DVC runs each stage's command in the repository root,
so the files tell which code each stage ran.
"""

import atexit
import json
import os
import sys

_ROOT = os.getcwd()
_OUT = os.environ.get("STAGE_IMPORTS_DIR")
COMPILER = ("torch._dynamo", "torch._inductor", "torch.export")


def _record() -> None:
    modules = set()
    for module in list(sys.modules.values()):
        path = os.path.abspath(getattr(module, "__file__", None) or "")
        rel = os.path.relpath(path, _ROOT)
        if rel.startswith(("pipeline" + os.sep, "stages" + os.sep)):
            modules.add(rel.replace(os.sep, "/"))
    compiler = sorted(name for name in list(sys.modules) if name.partition(".")[0] == "torch" and
                      (name in COMPILER or name.startswith(tuple(c + "." for c in COMPILER))))
    if modules and _OUT:
        with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as fh:
            json.dump({"argv": sys.argv, "modules": sorted(modules), "compiler": compiler}, fh)


atexit.register(_record)
