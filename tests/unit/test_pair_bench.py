"""``virtwire bench`` runs end to end and reports consistent JSON."""

import json

from virtwire.cli import main
from virtwire.commands.bench import bench_point


def test_bench_point_counts_whole_rings():
    r = bench_point("split", 16, 4, 2, 0.01)
    assert r["chains"] % 8 == 0  # 16 slots / 2 descriptors per chain, whole fills only
    assert r["chains_per_second"] > 0
    assert r["round_trip_chains_per_second"] <= r["chains_per_second"]


def test_bench_command_json(capsys):
    rc = main(["bench", "--ring", "split", "--size", "8", "--batch", "1,4", "--seconds", "0.01"])
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert rc == 0
    assert [r["batch"] for r in out["results"]] == [1, 4]
    assert "chains/s (device)" in cap.err


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--ring", "split", "--size", "12", "--seconds", "0.01"]) == 2
    assert "power-of-2" in capsys.readouterr().err
    assert main(["bench", "--batch", "x"]) == 2
