"""The suite's own scheduling: under `-n N --dist loadgroup` (README's test command) every test of an
`xdist_group` runs on one worker, so a session fixture the group shares (tests/test_evaluate.py's
evaluated run) is built once, not once per worker."""

import pytest

GROUP = "xdist_groups_check"


@pytest.mark.xdist_group(GROUP)
def test_group_marks_reach_the_scheduler(request):
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("runs in a pytest-xdist worker under --dist loadgroup")
  # pytest-xdist sends a test to its group's worker by the '@group' suffix it gives the node id;
  # with pytest 9.2 the suffix is lost and the group's tests spread over every worker.
  assert request.node.nodeid.endswith("@" + GROUP), request.node.nodeid
