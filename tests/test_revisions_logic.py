"""Revisions, the split and updates as pure rules (README.md "Revisions and updates"):
common/revisions.py, the revision choice of proxy/revisions.py, the lifecycle's per-revision
decisions (workflows/lifecycle.py), the rollout's (workflows/rollout_logic.py), the update options
the API reads (webapp/revisions.py), and the migration that gives every endpoint a revision 1."""
from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from common.revisions import (
    REVISION_FIELDS,
    SplitError,
    apportion,
    blend,
    check_split,
    hashed_choice,
    primary,
    revision_changes,
    smooth_weighted_choice,
)
from proxy.revisions import RevisionPicker, narrow
from proxy.routing_view import EndpointView, InstanceView
from tests.test_lifecycle_logic import NOW, add, make_state, report
from workflows import lifecycle as lc
from workflows import rollout_logic as rl
from workflows.rollout_types import RolloutOptions, RolloutState, RolloutStep


# ---- the split ------------------------------------------------------------------------------------


def test_a_split_is_whole_percentages_of_known_revisions_summing_to_100():
    assert check_split({"1": 90, "2": 10}, [1, 2]) == {1: 90, 2: 10}
    assert check_split({"1": 100, "2": 0}, [1, 2]) == {1: 100}  # a zero share is no share


@pytest.mark.parametrize("raw, fragment", [
    ({"1": 50, "2": 40}, "must sum to 100, got 50 (revision 1) + 40 (revision 2) = 90"),
    ({"1": 60, "2": 60}, "= 120"),
    ({"3": 100}, "revision 3 does not exist (revisions: 1, 2)"),
    ({"one": 100}, "revision numbers"),
    ({"1": 50.5, "2": 49.5}, "whole percentage"),
    ({"1": True, "2": 99}, "whole percentage"),
    ({"1": -10, "2": 110}, "from 0 to 100"),
    ({}, "e.g."),
    ([100], "e.g."),
])
def test_a_bad_split_says_what_to_change(raw, fragment):
    with pytest.raises(SplitError, match=None) as info:
        check_split(raw, [1, 2])
    assert fragment in str(info.value)


def test_a_revision_that_cannot_run_takes_no_share():
    with pytest.raises(SplitError, match="revision 2 cannot take traffic: no source"):
        check_split({"1": 50, "2": 50}, [1, 2], {2: "no source"})
    assert check_split({"1": 100, "2": 0}, [1, 2], {2: "no source"}) == {1: 100}


def test_apportion_and_blend_keep_whole_numbers_summing_to_the_total():
    assert apportion(1, {1: 90, 2: 10}) == {1: 1, 2: 0}  # a 10% canary keeps no instance of the floor
    assert apportion(3, {1: 50, 2: 50}) == {1: 1, 2: 2}  # a tie goes to the newer revision
    assert apportion(0, {1: 100}) == {1: 0}
    assert blend({1: 100}, 2, 10) == {1: 90, 2: 10}
    assert blend({1: 60, 3: 40}, 2, 50) == {1: 30, 2: 50, 3: 20}
    assert blend({1: 100}, 1, 40) == {1: 100}  # a restart: the split stays
    assert blend({1: 100}, 2, 100) == {2: 100}
    for percent in range(0, 101, 7):
        assert sum(blend({1: 33, 3: 67}, 2, percent).values()) == 100
    assert primary({1: 50, 2: 50}) == 2 and primary({}) == 0


def test_smooth_weighted_round_robin_gives_each_revision_exactly_its_share_spread_out():
    counters: dict[int, int] = {}
    picks = [smooth_weighted_choice({1: 90, 2: 10}, counters) for _ in range(1000)]
    assert Counter(picks) == {1: 900, 2: 100}
    assert all(picks[i:i + 10].count(2) == 1 for i in range(0, 1000, 10))  # one in every ten
    counters = {}
    assert Counter(smooth_weighted_choice({4: 25, 5: 75}, counters) for _ in range(400)) == {4: 100, 5: 300}
    smooth_weighted_choice({1: 100}, counters)  # a new split: stale counters are dropped
    assert set(counters) == {1}


def test_a_client_hash_stays_on_its_revision_and_splits_clients_by_share():
    split = {1: 80, 2: 20}
    assert {hashed_choice(split, "10.0.0.7") for _ in range(5)} == {hashed_choice(split, "10.0.0.7")}
    shares = Counter(hashed_choice(split, f"10.0.{i // 256}.{i % 256}") for i in range(4000))
    assert 700 <= shares[2] <= 900


def test_revision_changes_mask_secrets():
    before = {name: None for name in REVISION_FIELDS} | {"env": [{"key": "T", "value": "a", "secret": True}]}
    after = {**before, "env": [{"key": "T", "value": "b", "secret": True}], "port": 9000}
    changes = {c["field"]: c for c in revision_changes(before, after)}
    assert set(changes) == {"port", "env"}
    assert changes["env"]["to"] == [{"key": "T", "value": None, "secret": True}]
    assert [c["field"] for c in revision_changes(None, after)] == list(REVISION_FIELDS)


# ---- the proxy's choice ------------------------------------------------------------------------------


def view(split=((1, 90), (2, 10)), balancing="round_robin", instances=None) -> EndpointView:
    instances = instances if instances is not None else (InstanceView("aaaa", "127.0.0.1:1", 0, 1),
                                                         InstanceView("bbbb", "127.0.0.1:2", 0, 2))
    return EndpointView(name="ep", status="running", balancing=balancing, instances=instances, split=split)


def test_the_proxy_narrows_a_request_to_one_revision_by_the_split():
    picker = RevisionPicker()
    narrowed = [picker.narrow_for(view()) for _ in range(100)]
    assert Counter(v.revision for v in narrowed) == {1: 90, 2: 10}
    assert all([i.revision for i in v.instances] == [v.revision] for v in narrowed)
    # A sticky client keeps its instance's revision; ip_hash keeps a client on one revision.
    assert {picker.choose(view(), sticky_id="bbbb") for _ in range(20)} == {2}
    hashed = view(balancing="ip_hash")
    assert len({picker.choose(hashed, client_ip="10.1.2.3") for _ in range(20)}) == 1


def test_a_health_check_takes_no_turn_of_the_split_and_wakes_no_sleeping_revision():
    picker = RevisionPicker()
    seen = []
    for n in range(100):
        if n % 3 == 0:  # a /ping between requests goes to the primary revision
            assert picker.narrow_for(view(), health_check=True).revision == 1
        seen.append(picker.narrow_for(view()).revision)
    assert Counter(seen) == {1: 90, 2: 10}
    # The primary revision asleep: any running instance answers it, the other revision's included.
    asleep = view(instances=(InstanceView("bbbb", "127.0.0.1:2", 0, 2),))
    assert [i.id for i in picker.narrow_for(asleep, health_check=True).instances] == ["bbbb"]


def test_without_a_split_the_whole_endpoint_is_one_group():
    plain = view(split=(), instances=(InstanceView("aaaa", "127.0.0.1:1"),))
    assert RevisionPicker().narrow_for(plain) is plain
    # A revision that lost its share meanwhile gives way to the primary one.
    assert narrow(view(), 7).revision == 1


# ---- the lifecycle per revision ------------------------------------------------------------------------


def test_the_floor_is_shared_out_by_traffic_and_wakes_go_to_their_revision():
    state = make_state(min_instances=1, split={1: 90, 2: 10})
    assert lc.keep_by_revision(state) == {1: 1, 2: 0}
    assert lc.wanted_by_revision(state) == {1: 1}
    add(state, "a", lc.I_READY, revision=1)
    assert lc.wanted_by_revision(state) == {}
    state.wake_pending, state.wake_revisions = True, [2]
    assert lc.wanted_by_revision(state) == {2: 1}  # the 10% revision wakes on its own request
    add(state, "b", lc.I_STARTING, revision=2)
    assert lc.wanted_by_revision(state) == {}


def test_revisions_without_a_share_retire_unless_an_update_holds_them():
    state = make_state(split={2: 100})
    add(state, "old", lc.I_READY, revision=1)
    add(state, "new", lc.I_READY, revision=2)
    assert lc.to_retire(state) == ["old"]
    state.rollout = RolloutState(1, "w", target=2, generation=0, step=RolloutStep(1, 1, {2: 100}, {2: 1},
                                                                                   hold_old=True))
    assert lc.to_retire(state) == []  # blue-green's rollback window keeps the old set
    assert lc.idle_to_drain(state, NOW + 10_000) == ([], None)  # and neither set is idle-released


def test_an_update_asks_for_new_instances_beyond_max_but_none_after_a_failure():
    state = make_state(max_instances=1, split={1: 100})
    add(state, "old", lc.I_READY, revision=1)
    state.generation = 1
    state.rollout = RolloutState(1, "w", target=2, generation=1, step=RolloutStep(1, 1, {1: 100}, {2: 1}))
    assert lc.rollout_new_needed(state) == {2: 1}  # surge: one over max instances
    add(state, "new", lc.I_FAILED, revision=2)
    assert lc.rollout_new_needed(state) == {}  # it rolls back: no replacement


def test_manual_scale_keeps_that_many_and_drains_the_extra_at_once():
    state = make_state(max_instances=3, idle=3600)
    state.spec.instance_count = 2
    assert lc.wanted_new_instances(state) == 2
    for iid, ready in (("a", NOW - 30), ("b", NOW - 20), ("c", NOW - 10)):
        add(state, iid, lc.I_READY, ready_at=ready)
    assert lc.scaled_down(state) == ["a"]
    state.spec.instance_count = 0
    assert lc.scaled_down(state) == []


# ---- what an update watches ------------------------------------------------------------------------------


def test_the_observation_tells_new_from_old_and_counts_new_errors():
    state = make_state(split={1: 100})
    add(state, "old1", lc.I_READY, revision=1, ready_at=NOW - 50)
    add(state, "old2", lc.I_READY, revision=1, ready_at=NOW - 40)
    state.generation = 1
    state.rollout = RolloutState(3, "w", target=2, generation=1)
    add(state, "new1", lc.I_READY, revision=2)
    add(state, "new2", lc.I_STARTING, revision=2)
    state.instances["new2"].generation = state.instances["new1"].generation = 1
    report(state, "p:1", NOW, new1=(0, NOW))
    state.traffic["p:1"].instances[0].requests, state.traffic["p:1"].instances[0].errors = 40, 3
    obs = rl.observe(state, NOW)
    assert [r.id for r in obs.old_ready] == ["old1", "old2"] and obs.old_live == 2
    assert [r.id for r in obs.new_ready] == ["new1"] and obs.new_pending == 1
    assert (obs.new_requests, obs.new_errors, obs.new_failures) == (40, 3, [])
    state.instances["new2"].status, state.instances["new2"].reason = lc.I_FAILED, "exit 3"
    assert rl.observe(state, NOW).new_failures == ["instance new2 never became ready: exit 3"]


def test_a_stopped_endpoint_still_takes_an_update_a_failed_or_terminated_one_does_not():
    # README.md "Revisions and updates": an endpoint with nothing running updates at once.
    state = make_state(split={1: 100})
    state.rollout = RolloutState(1, "w", target=2, generation=1)
    for desired, serving in ((lc.SERVING, True), (lc.WANT_STOPPED, True), (lc.WANT_FAILED, False),
                             (lc.WANT_TERMINATED, False)):
        state.desired = desired
        obs = rl.observe(state, NOW)
        assert (obs.serving, obs.old_live, obs.old_ready) == (serving, 0, []), desired


def test_health_and_canary_steps():
    assert rl.health_problem(100, 0, 0.05) == ""
    assert rl.health_problem(100, 5, 0.05) == ""
    assert "error rate 6%" in rl.health_problem(100, 6, 0.05)
    assert "100%" in rl.health_problem(0, 1, 0.05)  # an error with no request counted yet
    assert rl.canary_steps([50, 10, 100, 10]) == [10, 50, 100]
    assert rl.instances_for_share(4, 10) == 1 and rl.instances_for_share(4, 50) == 2
    assert RolloutOptions().strategy == "rolling"


# ---- options the API reads -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, field", [
    ({"strategy": "sideways"}, "strategy"), ({"strategy": "canary", "steps": "50,10"}, "steps"),
    ({"strategy": "canary", "steps": "0,100,200"}, "steps"), ({"steps": "10"}, "steps"),
    ({"strategy": "canary", "pause": "soon"}, "pause"), ({"pause": "5"}, "pause"),
    ({"strategy": "rolling", "window": "10"}, "window"), ({"settle": "-1"}, "settle"),
    ({"error_rate": "2"}, "error_rate"), ({"settle": "nan"}, "settle"),
])
def test_update_options_name_what_to_change(args, field):
    from webapp.revisions import OptionsError, parse_options

    with pytest.raises(OptionsError) as info:
        parse_options(args)
    assert field in info.value.errors


def test_update_options():
    from webapp.revisions import parse_options

    options = parse_options({"strategy": "canary", "steps": "10,50", "pause": "manual", "settle": "2"})
    request = options.request(3)
    assert (request.strategy, request.steps, request.manual, request.settle_seconds) == ("canary", [10, 50], True, 2.0)
    assert options.given and not parse_options({}).given
    assert parse_options({"strategy": "Blue_Green", "window": "30"}).request(2).window_seconds == 30.0


# ---- the migration ------------------------------------------------------------------------------------------


def test_the_migration_gives_every_endpoint_a_revision_1_of_its_spec(tmp_path):
    from common.db import Database
    from common.models import Endpoint, Instance, Revision
    from common.revisions import revision_spec
    from common.schema import upgrade
    from tests.test_migrations import make_release_database

    url = f"sqlite:///{tmp_path / 'standby.db'}"
    make_release_database(url)
    upgrade(url)
    db = Database(url)
    try:
        with db.session() as s:
            for endpoint in s.scalars(select(Endpoint)):
                [first] = endpoint.revisions
                assert first.number == 1 and first.spec == revision_spec(endpoint)
                assert (first.state, first.traffic) == (("serving", 100) if endpoint.status != "terminated"
                                                        else ("retired", 0))
                assert first.pinned_at is None  # pinned by its first start
                assert endpoint.instance_count == 0
            tts = s.scalar(select(Endpoint).where(Endpoint.name == "tts"))
            assert tts.revisions[0].spec["env"][0] == {"key": "HF_TOKEN", "value": "hf_secret_value", "secret": True}
            assert {i.revision for i in s.scalars(select(Instance))} == {1}
            assert s.scalar(select(Revision).where(Revision.number == 1)).spec["port"] == 9000
    finally:
        db.engine.dispose()
