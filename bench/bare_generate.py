"""The baseline for generation speed: what a user writes with numpy and pyarrow, nothing else.

Usage: python bench/bare_generate.py OUT.parquet ROWS FEATURES
"""

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

out, rows, features = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
X = rng.standard_normal((rows, features))
y = X @ rng.standard_normal(features) + rng.standard_normal(rows)
columns = {f"x{i}": X[:, i].astype(np.float32) for i in range(features)}
columns["y"] = y.astype(np.float32)
pq.write_table(pa.table(columns), out)
