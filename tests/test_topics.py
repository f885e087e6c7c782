"""Topic builders and their parser agree; bad segments are refused."""

from __future__ import annotations

import pytest

from protocol import topics


def test_update_and_status_topics_parse_back() -> None:
    assert topics.parse_device_topic(topics.update_topic("fed", "dev-1")) == ("fed", "update",
                                                                              "dev-1")
    assert topics.parse_device_topic(topics.status_topic("fed", "d2")) == ("fed", "status", "d2")


def test_filters_share_the_versioned_root() -> None:
    assert topics.update_filter("fed") == "fl/v1/fed/update/+"
    assert topics.status_filter("fed") == "fl/v1/fed/status/+"
    assert topics.global_topic("fed") == "fl/v1/fed/global"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "x#"])
def test_wildcards_and_slashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.update_topic("fed", bad)
    with pytest.raises(ValueError):
        topics.global_topic(bad)


@pytest.mark.parametrize("topic", ["fl/v1/fed/global", "fl/v2/fed/update/d", "x/v1/f/update/d"])
def test_non_device_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(ValueError):
        topics.parse_device_topic(topic)
