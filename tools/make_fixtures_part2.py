"""Make Part 2's check fixtures from the reference solution: ``python -m tools.make_fixtures_part2 [--check]``.

Writes ``tests/fixtures/part2_stabilizing.safetensors``: expected outputs of the exercises whose checks
compare against stored values (steering vectors, next-token KL), plus the outputs of a few known mistakes
so that a check can name the mistake it sees. ``--check`` regenerates in memory and fails if the committed
fixtures differ beyond float tolerance. ``make fixtures`` runs it after Part 1's.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tests import part2_stabilizing as checks
from tools.make_fixtures import check_or_write
from tools.reference import load_reference

PART = "part2_stabilizing"
TENSORS = checks.FIXTURES / f"{PART}.safetensors"


def build() -> dict[str, torch.Tensor]:
    ref = load_reference(PART)
    t: dict[str, torch.Tensor] = {}
    axis, projections, multiples = checks.steering_case()
    t["steering_vectors"] = ref["steering_vectors"](axis, projections, multiples)
    unit = axis / axis.norm()
    m = torch.tensor(multiples)[:, None]
    # Known mistakes, so the check can name them.
    t["steering_vectors_population_std"] = m * projections.std(correction=0) * unit
    t["steering_vectors_variance"] = m * projections.var() * unit
    t["steering_vectors_raw_axis"] = m * projections.std() * axis
    t["steering_vectors_mean"] = m * projections.mean() * unit
    lp, lq = checks.kl_case()
    t["kl_expected"] = ref["next_token_kl"](lp, lq)
    return {k: v.detach().float().contiguous().cpu() for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    return check_or_write(build(), TENSORS, check=args.check, made_by="python -m tools.make_fixtures_part2",
                          label="Part 2 fixtures")


if __name__ == "__main__":
    sys.exit(main())
