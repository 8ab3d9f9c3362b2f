"""`./tasks.sh sync`: replay the runs spooled while the MLflow store was down; `--upgrade-store` migrates it.

    python -m pipeline.sync                  # every run under .mlflow-spool/ into the store, then removed
    python -m pipeline.sync --upgrade-store  # back up mlflow.db (SQLite online backup), then `mlflow db upgrade`
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from pipeline.errors import PipelineError


def main(argv: Sequence[str] | None = None) -> int:
    """Sync (or upgrade the store); errors are one line and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(f"usage: python -m pipeline.sync [--upgrade-store]\n\n{__doc__.strip()}")
        return 0
    if args not in ([], ["--upgrade-store"]):
        print(f"sync: unknown arguments {' '.join(args)}; allowed: none, --upgrade-store, or --help", file=sys.stderr)
        return 2
    from pipeline import tracking

    try:
        if args:
            uri = tracking.tracking_uri()
            path = tracking.backup_path(uri)
            if path is None:
                raise PipelineError(f"{uri} is not the embedded SQLite store; upgrade it on the server")
            backup = tracking.backup_store(path)
            print(f"sync: backed up {path} to {backup}", file=sys.stderr)
            return subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri]).returncode
        lines = tracking.sync_spool()
    except PipelineError as exc:
        print(f"sync: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines) if lines else f"sync: nothing to sync in {tracking.SPOOL_DIR}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
