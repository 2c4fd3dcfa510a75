"""A short run of the ring fuzzer (``virtwire fuzz``) inside the test suite."""

import json

import pytest

from virtwire.cli import main
from virtwire.virtio.fuzz import FuzzStats, run_case, run_range

# Ring formats fuzzed here (the packed ring's owner adds "packed").
FORMATS = ["split", "packed"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_thousand_cases_only_guest_errors(fmt):
    st = run_range(range(2000), (fmt,))
    assert st.cases == 2000
    assert st.failures == [], st.failures[:3]
    # The fuzzer must actually reach both outcomes and many distinct rejection reasons.
    assert st.outcomes["accepted"] > 200 and st.outcomes["rejected"] > 200
    assert len(st.reasons) >= 12
    assert st.chains > 1000


@pytest.mark.parametrize("fmt", FORMATS)
def test_cases_are_reproducible_from_their_seed(fmt):
    a, b = FuzzStats(), FuzzStats()
    for s in range(50):
        assert run_case(s, fmt, a) == run_case(s, fmt, b)
    assert a.as_dict() == b.as_dict()


def test_fuzz_command_prints_a_json_summary(capsys):
    rc = main(["fuzz", "--cases", "200", "--ring", "split", "--seed", "7", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["cases"] == 200 and out["failures"] == 0 and out["first_seed"] == 7
    assert sum(out["outcomes"].values()) == 200


def test_fuzz_reports_an_unexpected_exception_with_a_reproducer(monkeypatch):
    import virtwire.virtio.split_ring as sr

    def broken(self, mem, limit):
        raise KeyError("boom")

    monkeypatch.setattr(sr.SplitQueue, "pop_batch", broken)
    st = FuzzStats()
    # find a case that reaches the device loop (not the VirtioDevice path)
    for s in range(40):
        run_case(s, "split", st)
    assert st.failures
    f = st.failures[0]
    assert "KeyError" in f["exception"]
    assert f["reproduce"] == f"virtwire fuzz --ring split --seed {f['seed']} --cases 1"


def test_fuzz_command_exits_non_zero_on_failure(monkeypatch, capsys):
    import virtwire.virtio.split_ring as sr

    monkeypatch.setattr(sr.SplitQueue, "pop_batch", lambda self, mem, limit: 1 / 0)
    rc = main(["fuzz", "--cases", "30", "--ring", "split", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["failures"] > 0
    assert "ZeroDivisionError" in out["failure_details"][0]["exception"]
