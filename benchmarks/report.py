"""One table per benchmark case, and the same figures as JSON under ``bench-out/results/``.

A case names its rows (the paths it timed: images, seconds, images/s) and its ratios, each
with its goal; the table says whether each goal was met. Nothing is asserted: speed lives here, not in tests.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machine import commit, describe, load, snapshot

WIDTH = 100


@dataclass
class Row:
    """One way of processing the images, timed (a line of the table)."""

    name: str
    images: int | None
    seconds: float | None
    per_second: float | None = None  # given when it is not images / seconds (steady state)
    note: str = ""

    def __post_init__(self):
        if self.per_second is None and self.images and self.seconds:
            self.per_second = self.images / self.seconds


@dataclass
class Ratio:
    """A ratio of two measured figures against its goal (``at_most`` for time and memory)."""

    name: str
    value: float | None
    goal: float | None = None
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value is None:
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal


@dataclass
class Case:
    """A benchmark case: its rows, ratios and notes, and what it ran on."""

    key: str  # file name of its JSON, e.g. "decode_bound"
    title: str
    setup: list[str] = field(default_factory=list)  # "images : ..." lines
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # manifests' timing etc., JSON only
    gpu_used: bool = False
    load_start: str = field(default_factory=load)
    started: float = field(default_factory=time.time)

    def ratio(self, name: str, num: float | None, den: float | None, goal=None, at_most=False):
        value = num / den if num is not None and den else None
        self.ratios.append(Ratio(name, value, goal, at_most))

    def print(self) -> None:
        print("\n" + "=" * WIDTH)
        print(self.title)
        print(f"machine  : {describe(self.gpu_used)}")
        print(
            f"run      : {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}, vitflow {commit()}"
        )
        print(f"load avg : {self.load_start} (1/5/15 min) at start, {load()} at end")
        for line in self.setup:
            print(line)
        print("-" * WIDTH)
        print(f"{'path':<66}{'images':>8}{'seconds':>10}{'img/s':>10}")
        for p in self.rows:
            print(
                f"{p.name:<66}{_num(p.images, '{:d}'):>8}{_num(p.seconds, '{:.1f}'):>10}"
                f"{_num(p.per_second, '{:.1f}'):>10}"
            )
            if p.note:
                print(f"    {p.note}")
        print("-" * WIDTH)
        print(f"{'ratio':<66}{'value':>8}{'goal':>12}{'met':>6}")
        for r in self.ratios:
            goal = "" if r.goal is None else f"{'<=' if r.at_most else '>='} {r.goal:g}"
            met = {True: "yes", False: "NO", None: ""}[r.met]
            print(f"{r.name:<66}{_num(r.value, '{:.2f}'):>8}{goal:>12}{met:>6}")
        if self.notes:
            print("-" * WIDTH)
            for line in self.notes:
                print(line)
        print("=" * WIDTH, flush=True)

    def save(self, work: Path, quick: bool) -> Path:
        """Write ``work/results/<key>[-quick].json``; a quick run never replaces a full one."""
        out = work / "results" / f"{self.key}{'-quick' if quick else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "case": self.key,
            "title": self.title,
            "quick": quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "machine": snapshot(self.gpu_used),
            "load_avg_start": self.load_start,
            "load_avg_end": load(),
            "setup": self.setup,
            "rows": [_rounded(asdict(p)) for p in self.rows],
            "ratios": [{**_rounded(asdict(r)), "met": r.met} for r in self.ratios],
            "notes": self.notes,
            "details": self.details,
        }
        out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"results: {out}")
        return out


def _num(v, fmt: str) -> str:
    return "" if v is None else fmt.format(v)


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
