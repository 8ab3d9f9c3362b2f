"""Rows of the benchmark table, the machine's description, and the printed table."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass
class Row:
    """One figure against its baseline, measured in the same run.

    `ratio` is figure / baseline; `target` is a bound on it: ('>=', 1.2), ('<=', 1.05)
    or ('==', 2) for counts. A row with no baseline (an absolute figure) has no ratio; its target bounds the figure.
    """

    name: str
    figure: float | None
    baseline: float | None
    unit: str
    baseline_name: str = ""
    target: tuple[str, float] | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """figure / baseline, when both exist."""
        if self.figure is None or not self.baseline:
            return None
        return self.figure / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target holds (None when there is no target or nothing was measured)."""
        if self.target is None or self.figure is None:
            return None
        op, bound = self.target
        value = self.figure if op == "==" or self.baseline is None else self.ratio
        if value is None:
            return None
        return {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU, cores, torch threads, GPU (if any), versions and the load: what the figures depend on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores) | torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads | GPU: {gpu} | Python {platform.python_version()} | "
        f"load average: {load}"
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    """A plain-text table: figure, baseline, ratio, target and whether it is met."""
    header = ("figure", "value", "baseline", "unit", "ratio", "target", "met")
    lines = []
    for r in rows:
        target = f"{r.target[0]} {r.target[1]:g}" if r.target else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        base = f"{_fmt(r.baseline)} ({r.baseline_name})" if r.baseline_name else _fmt(r.baseline)
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append((r.name, _fmt(r.figure), base, r.unit, ratio, target, met))
    widths = [max(len(str(x[i])) for x in (header, *lines)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)
