import os

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
