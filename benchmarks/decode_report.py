"""What ``decode_overhead.py`` reports beside its ratios: whether the default method is within its
limit, the Markdown table it prints, and which checkout was timed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from decode_timing import CAPTION_TOKENS

DEFAULT_LIMIT = 1.10
"""The default method (``vlsae``) should cost at most this much of plain, on (a) and (b)."""
GEOMETRIES = ("toy", "llava7b_geometry")
"""The models a run may time, in the table's column order."""


def default_verdict(ratios: dict, space_or_steering) -> dict:
    """The default method's ratios, what it resolved to, and whether both are within the limit
    (``space_or_steering``: the space, or the steering it recommends)."""
    if isinstance(space_or_steering, dict):
        steering = space_or_steering
    else:
        from vlsae_hooks.attach import space_steering

        steering = space_steering(space_or_steering)
    one, caption = ratios["vlsae"]["one_token"], ratios["vlsae"]["caption"]
    return {"method": "vlsae", "steering": steering or {"mode": "contrast"},
            "one_token": one, "caption": caption, "limit": DEFAULT_LIMIT,
            "meets_limit": one <= DEFAULT_LIMIT and caption <= DEFAULT_LIMIT}


def _cells(ratios: dict) -> str:
    """(a) and (b), each with its range over the rounds when there were several."""
    spread = ratios.get("range", {})
    return " | ".join(f"{ratios[what]:.2f}x" + (f" ({spread[what][0]:.2f}-{spread[what][1]:.2f})"
                                               if what in spread else "")
                      for what in ("one_token", "caption"))


def markdown_table(results: dict) -> str:
    """One row per method, (a) and (b) for each geometry measured; side by side, one row per
    method and tree, and the current tree's seconds over the baseline's."""
    geometries = [g for g in GEOMETRIES if g in results]
    side_by_side = "trees" in results
    header = " | ".join(f"{g} (a) one token | {g} (b) {CAPTION_TOKENS}-token caption"
                        for g in geometries)
    lines = [f"| method{' | tree' if side_by_side else ''} | {header} |",
             "|---" * (1 + side_by_side + 2 * len(geometries)) + "|"]
    if side_by_side:
        for name in results[geometries[0]]["current"]:
            for tree in results["trees"]:
                cells = " | ".join(_cells(results[g][tree][name]) for g in geometries
                                   if name in results[g][tree])
                lines.append(f"| {name} | {tree} | {cells} |")
        for g in geometries:
            steps = ", ".join(f"{m} {r['decode_step']:.2f}x"
                              for m, r in results[g]["current_vs_baseline"].items())
            lines.append(f"\n{g}: decode step, current / baseline seconds: {steps}")
    else:
        for name in results[geometries[0]]:
            lines.append(f"| {name} | {' | '.join(_cells(results[g][name]) for g in geometries)} |")
    for g in geometries:
        verdicts = results.get("default", {}).get(g)
        for tree, verdict in (verdicts.items() if side_by_side and verdicts else
                              [("", verdicts)] if verdicts else []):
            lines.append(f"\n{g}{f' ({tree})' if tree else ''}: default `vlsae` "
                         f"({verdict['steering']}) "
                         f"{'meets' if verdict['meets_limit'] else 'does NOT meet'} "
                         f"<= {DEFAULT_LIMIT:.2f}x on both (a) and (b)")
    return "\n".join(lines)


def describe_tree(src: Path) -> dict:
    """The folder and, if it is a git checkout, its commit (and whether files differ from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True,
                              text=True).stdout.strip()
    return {"src": str(src), "commit": git("rev-parse", "HEAD") or None,
            "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
