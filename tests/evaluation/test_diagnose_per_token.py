"""The diagnosis's per-token table, read from `Generation.steps` (explain.py), on the tiny
Hugging Face pair: its counts are those of the explained generations."""

import re

import pytest

from costeer.evaluation.diagnose import per_token
from support.cogenesis import write_split
from support.tiny_hf import TORCH_IN_PROCESS

pytestmark = TORCH_IN_PROCESS  # tiny_costeer


@pytest.mark.parametrize("method", ["costeer", "fit:0.5"])
def test_the_table_counts_the_explained_steps_and_flips(tmp_path, tiny_costeer, method):
    from costeer.evaluation.datasets import load_dataset

    data = write_split(tmp_path / "data", n=2)
    spec = str(data)
    table = per_token(spec, 2, 12, costeer=tiny_costeer, method=method)
    steps = [s for e in load_dataset(spec).examples[:2]
             for s in tiny_costeer.generate_from_messages(e.public, e.private, method=method, max_new_tokens=12,
                                                          explain=True).steps]
    assert f"## Per token ({len(steps)} steps of `{method}` on 2 rows)" in table
    flips = int(re.search(r"Flips: (\d+) of (\d+) steps", table).group(1))
    assert flips == sum(s.changed for s in steps) and len(steps) >= 2
    counted = sum(int(m) for m in re.findall(r"^\| \[[^|]+\) \| (\d+) ", table, re.M))
    assert counted == len(steps)  # every step falls in one band of the cloud's confidence
