import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Profiles: "default" keeps `make test` fast on 2 cores; "long" (make test-all) digs deeper.
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The suite runs under pytest-xdist with one worker per core; tiny models are several
# times faster single-threaded than with two workers oversubscribing two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) gets a private data/checkpoint cache:
    the suite never reads or writes the user's ~/.cache, and concurrent runs (a benchmark
    beside the tests) cannot race on one cache file."""
    old = os.environ.get("DISPARSE_FX_CACHE")
    os.environ["DISPARSE_FX_CACHE"] = str(tmp_path_factory.mktemp("disparse_fx_cache"))
    yield
    if old is None:
        os.environ.pop("DISPARSE_FX_CACHE", None)
    else:
        os.environ["DISPARSE_FX_CACHE"] = old


#: test files whose outcome is a coverage count the terminal summary reports
COVERAGE_SWEEPS = {
    "tests/test_torchvision_coverage.py": "torchvision CNNs",
    "tests/test_transformer_coverage.py": "torchvision transformers",
}


def pytest_terminal_summary(terminalreporter):
    """Print how many model cases of each coverage sweep passed, failed, were strict
    xfails (known failures, with reasons in the test file) or were skipped."""
    counts = {}
    for outcome in ("passed", "failed", "xfailed", "xpassed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            path = getattr(rep, "nodeid", "").split("::")[0]
            if path in COVERAGE_SWEEPS and getattr(rep, "when", "call") in ("call", "setup"):
                if outcome == "passed" and rep.when != "call":
                    continue
                counts.setdefault(path, {}).setdefault(outcome, 0)
                counts[path][outcome] += 1
    for path, c in counts.items():
        parts = ", ".join(f"{n} {k}" for k, n in c.items())
        terminalreporter.write_line(f"coverage, {COVERAGE_SWEEPS[path]}: {parts} ({path})")
